"""The orchestrator's view of the data movers: one interface, replaceable implementations.

In the seed's initialization phase the repository-side and proxy-side data
movers are started and connected; in the data phase the proxy-side mover
writes each disk. The orchestrator only talks to a :class:`MoverSession`:

    session = InProcessMovers(settings)     # or a subprocess/network pair (issue 7)
    session.open()                          # start both movers, connect them
    outcome = session.restore_disk(disk_job, progress_callback)
    session.close()

:class:`DiskJob` is a plain, JSON-able description (backup path, disk,
target URI, where to start, where to checkpoint), so the same job can be
handed to a ``vmrestore proxy-mover`` subprocess or a remote proxy unchanged
(docs/proxy-mover.md). The in-process implementation here runs the core in a
thread of this process: the "repository side" is the local chain file, the
"proxy side" is the core's pipeline.

Checkpoints are the mover's job because only the mover sees the pipeline:
every ``checkpoint_interval`` seconds it reads ``completed_prefix``, calls
``flush()`` (the prefix is durable once flush returns), and records
``start_entry + prefix`` in the checkpoint file (fsynced). A resumed job
passes that number as ``start_entry`` and the mover runs ``plan[start_entry:]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("vmrestore.mover")


@dataclass
class DiskJob:
    """One disk of the data phase, as the proxy-side mover receives it."""

    disk: int
    backup: str  # the restore point file (its chain is resolved by the mover)
    target: str  # writer URI (path, file://, nbd://, nbd+unix://, nbds..., san:...)
    transport: str
    start_entry: int = 0  # resume: run plan[start_entry:]
    checkpoint: str | None = None  # checkpoint file (jobstate format)
    checkpoint_interval: float = 1.0
    target_zeroed: bool = True  # a new disk reads as zeros: zero runs need no writes
    threads: int | None = None
    queue_depth: int | None = None
    # Test-only (VMRESTORE_FAULT=stall:data:SECONDS): run the plan in small slices with a
    # checkpoint and a pause after each, so a test can kill -9 the run mid-data.
    stall: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DiskProgress:
    disk: int
    done: int  # bytes of the disk done (written + zeroed + skipped, incl. resumed)
    total: int


@dataclass
class DiskOutcome:
    disk: int
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    resumed_bytes: int = 0
    seconds: float = 0.0
    entries: int = 0
    busy: dict[str, float] = field(default_factory=dict)  # source/proxy/network/target 0..1


class MoverSession(Protocol):
    """A connected pair of data movers for one restore job."""

    name: str

    def open(self) -> None: ...

    def restore_disk(self, job: DiskJob,
                     progress: Callable[[DiskProgress], None] | None = None) -> DiskOutcome: ...

    def close(self) -> None: ...


class InProcessMovers:
    """Both movers in this process: the chain is read locally, the core writes."""

    name = "in-process"

    def __init__(self) -> None:
        self._open = False

    def open(self) -> None:
        # Nothing to start: the repository side is a local file, the proxy side our core.
        # Import the core now so a broken build fails in the initialize phase, not later.
        import vmrestore.restore_disk  # noqa: F401

        self._open = True

    def close(self) -> None:
        self._open = False

    def restore_disk(self, job: DiskJob,
                     progress: Callable[[DiskProgress], None] | None = None) -> DiskOutcome:
        from vmrestore.jobstate import Checkpoint, plan_digest, write_checkpoint
        from vmrestore.repository.plan import build_plan
        from vmrestore.repository.reader import open_chain
        from vmrestore.restore_disk import run_plan

        chain = open_chain(job.backup)
        try:
            dp = build_plan(chain, job.disk)
        finally:
            chain.close()
        plan = dp.plan
        total = len(plan)
        digest = plan_digest(plan)
        lengths = plan["length"]
        done_before = int(lengths[:job.start_entry].sum())
        ckpt_path = Path(job.checkpoint) if job.checkpoint else None
        out = DiskOutcome(job.disk, resumed_bytes=done_before)
        t0 = time.monotonic()

        def record(prefix_abs: int) -> None:
            if ckpt_path is not None:
                write_checkpoint(ckpt_path, Checkpoint(job.disk, prefix_abs, total, digest,
                                                       int(lengths[:prefix_abs].sum())))

        slices = [(job.start_entry, total)]
        if job.stall > 0:
            step = max(1, (total - job.start_entry) // 8 or 1)
            slices = [(a, min(a + step, total)) for a in range(job.start_entry, total, step)]
        busy_ns: dict[str, float] = {}
        elapsed_ns = 0.0
        for a, b in slices:
            if a >= b:
                continue
            stop = threading.Event()

            def on_counters(c: Any, _a: int = a) -> None:
                if progress is not None:
                    done = done_before + int(c.bytes_written + c.bytes_zeroed + c.bytes_skipped)
                    progress(DiskProgress(job.disk, done, dp.capacity))

            def checkpointer(handle: Any, _a: int = a, stop: threading.Event = stop) -> None:
                # Runs beside the pipeline: prefix -> flush -> durable record.
                while not stop.wait(job.checkpoint_interval):
                    prefix = handle.completed_prefix()
                    if prefix <= 0:
                        continue
                    handle.flush()
                    record(_a + prefix)

            res = run_plan(plan[a:b], dp.sources, job.target, disk=job.disk,
                           capacity=dp.capacity, target_zeroed=job.target_zeroed,
                           threads=job.threads, queue_depth=job.queue_depth,
                           on_counters=on_counters, on_start=lambda h: threading.Thread(
                               target=checkpointer, args=(h,), daemon=True,
                               name=f"ckpt-disk{job.disk}").start())
            stop.set()
            record(b)  # run_plan flushed at its end: all of [a, b) is durable
            out.bytes_written += res.bytes_written
            out.bytes_zeroed += res.bytes_zeroed
            out.bytes_skipped += res.bytes_skipped
            out.entries += b - a
            elapsed_ns += res.elapsed_ns
            for k, v in res.busy_ns.items():
                busy_ns[k] = busy_ns.get(k, 0.0) + v
            if job.stall > 0:
                time.sleep(job.stall)
        out.bytes_skipped += 0
        out.seconds = time.monotonic() - t0
        if elapsed_ns > 0:
            out.busy = {k: min(1.0, v / elapsed_ns) for k, v in busy_ns.items()}
        if progress is not None:
            progress(DiskProgress(job.disk, dp.capacity, dp.capacity))
        return out


def default_session() -> MoverSession:
    """The movers the orchestrator uses unless told otherwise (env: VMRESTORE_MOVER)."""
    kind = os.environ.get("VMRESTORE_MOVER", "in-process")
    if kind == "in-process":
        return InProcessMovers()
    from vmrestore.errors import UsageError

    raise UsageError(f"VMRESTORE_MOVER={kind!r}: only 'in-process' is available in this build")
