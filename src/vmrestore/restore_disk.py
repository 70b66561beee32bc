"""Restore one disk of a restore point to a target URI on the C pipeline.

Python opens the chain, builds the plan (numpy, repository.plan), opens the
target writer (transport.uri) and hands both to the core; it never touches
block bytes. Two levels:

- :func:`restore_disk` -- backup path or repo:// URL + disk index + target ->
  DiskTaskResult: a :class:`vmrestore.disktask.DiskTask` run by the one
  driver, ``run_disk_task`` (the command, the orchestrator's movers and the
  proxy mover all go through it).
- :func:`run_plan` -- a plan (or a slice ``plan[k:]`` for a resume) + chain
  file paths + target -> DiskTaskResult (of that run): the driver's engine for local chain
  files. ``on_start(job)`` receives the running
  :class:`vmrestore.pipeline.Job`: ``job.completed_prefix()`` then
  ``job.flush()`` then record = a durable checkpoint (prefix counts entries of
  the slice given).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vmrestore import ownership
from vmrestore.disktask import DiskTaskResult
from vmrestore.errors import TargetError, UsageError
from vmrestore.timeline import SAMPLE_INTERVAL, Sampler

MiB = 1 << 20


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_plan(plan: np.ndarray, sources: Sequence[str], target: str, *, disk: int = 0,
             capacity: int | None = None, force: bool = True,
             target_zeroed: bool | None = None, threads: int = 0, queue_depth: int = 0,
             lanes: int = 0, readers: int = 0, buffers: int = 0, max_rate: int = 0,
             direct: bool = True, retries: int = 3, compare: bool = False,
             open_options: dict[str, Any] | None = None, sampler: Sampler | None = None,
             on_counters: Callable[[Any], None] | None = None,
             on_start: Callable[[Any], None] | None = None,
             interval: float = SAMPLE_INTERVAL) -> DiskTaskResult:
    """Run a plan (slice) into target; writes in place (force=True) unless told otherwise.

    ``compare``: quick rollback of an existing target (give ``plan.compare_plan``):
    only the entries the target does not already hold are written.
    ``open_options``: more transport.uri.OpenOptions fields (VDDK ``max_request``, ...).
    ``sampler``: the timeline.Sampler this run adds to (the disk task driver keeps
    one per disk across slices); default a new one, returned in ``timeline``.
    """
    from vmrestore import pipeline as pl
    from vmrestore.transport.uri import OpenOptions, open_target, parse_target

    spec = parse_target(target)
    ownership.refuse_overlap(ownership.target_path(target), sources, what="restore target",
                             why="a file of the backup chain this restore reads")
    size = capacity if capacity is not None else _plan_end(plan)
    t0 = time.monotonic()
    if compare:
        if target_zeroed:
            raise UsageError("a quick rollback compares with what the target holds: "
                             "--target-zeroed does not apply")
        target_zeroed = False
        if spec.kind == "file" and not os.path.exists(spec.path or ""):
            raise TargetError(f"{spec.path}: does not exist; a quick rollback compares with an "
                              "existing disk")
    sampler = sampler or Sampler(spec.transport)
    writer = open_target(spec, size, OpenOptions(force=force, target_zeroed=target_zeroed,
                                                 direct=direct, retries=retries,
                                                 **(open_options or {})))
    try:
        if compare and not writer.capabilities()["read"]:
            raise UsageError(f"{target}: the {writer.name} target cannot be read back, so a "
                             "quick rollback cannot compare it (use a full overwrite)")
        settings = pl.Settings(readers=readers, threads=threads, lanes=lanes,
                               queue_depth=queue_depth, buffers=buffers, max_rate=max_rate)
        with pl.Job(plan, sources, writer, disk=disk, settings=settings,
                    compare=compare) as job:
            c = job.run(sampler.segment(on_counters), interval, on_start=on_start)
        name = writer.name
        note = writer.note
        mode = getattr(writer, "transport_mode", None) or spec.transport
    finally:
        writer.close()
    return DiskTaskResult.from_counters(
        c, disk=disk, target=target, transport=mode, writer=name, capacity=size,
        seconds=time.monotonic() - t0, entries=c.entries_total,
        completed_prefix=c.completed_prefix, compare=compare, note=note,
        timeline=sampler.as_dict(), settings={"max_rate": max_rate} if max_rate else None)


def _plan_end(plan: np.ndarray) -> int:
    if len(plan) == 0:
        return 0
    return int((plan["dst_off"] + plan["length"]).max())


def restore_disk(backup: str, disk: int, target: str, *, point: str | None = None,
                 start_entry: int | None = None, checkpoint: str | None = None,
                 progress: Any = None, cancel: Any = None, **settings: Any) -> Any:
    """Restore disk ``disk`` of the restore point ``backup`` (its chain resolved) to target.

    ``backup`` is a local point file or a repository agent's ``repo://`` /
    ``repos://`` URL. ``point`` selects an earlier point of the chain (id
    prefix or file name); ``start_entry`` resumes at that plan entry;
    ``checkpoint`` names a checkpoint file (resume from it, record into it).
    ``progress(DiskProgress)`` sees samples and durable checkpoints. Other
    keywords are :class:`vmrestore.disktask.TaskSettings` fields (threads,
    queue_depth, lanes, connections, token_file, retries, force, ...).
    Returns the driver's DiskTaskResult.
    """
    from vmrestore.disktask import DiskTask, TaskSettings, run_disk_task

    try:
        s = TaskSettings(**settings)
    except TypeError as e:
        raise UsageError(f"restore_disk: {e}") from None
    task = DiskTask(disk=disk, source=str(backup), target=target, point=point,
                    start_entry=start_entry, checkpoint=checkpoint, settings=s)
    return run_disk_task(task, progress, cancel)
