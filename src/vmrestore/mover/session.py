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
        import vmrestore.pipeline  # noqa: F401

        self._open = True

    def close(self) -> None:
        self._open = False

    def restore_disk(self, job: DiskJob,
                     progress: Callable[[DiskProgress], None] | None = None) -> DiskOutcome:
        from vmrestore import pipeline as pl
        from vmrestore.jobstate import Checkpoint, plan_digest, write_checkpoint
        from vmrestore.repository.plan import build_plan
        from vmrestore.repository.reader import open_chain
        from vmrestore.transport.uri import OpenOptions, open_target

        chain = open_chain(job.backup)
        try:
            dp = build_plan(chain, job.disk)
        finally:
            chain.close()
        plan = dp.plan
        total = len(plan)
        digest = plan_digest(plan)
        ends = plan["length"].cumsum()
        done_before = int(ends[job.start_entry - 1]) if job.start_entry > 0 else 0
        ckpt_path = Path(job.checkpoint) if job.checkpoint else None
        out = DiskOutcome(job.disk, resumed_bytes=done_before)
        settings = pl.Settings(threads=job.threads or 0, queue_depth=job.queue_depth or 0)
        t0 = time.monotonic()

        def record(prefix_abs: int) -> None:
            if ckpt_path is not None:
                done = int(ends[prefix_abs - 1]) if prefix_abs > 0 else 0
                write_checkpoint(ckpt_path, Checkpoint(job.disk, prefix_abs, total, digest, done))

        slices = [(job.start_entry, total)]
        if job.stall > 0:
            step = max(1, (total - job.start_entry) // 8)
            slices = [(a, min(a + step, total)) for a in range(job.start_entry, total, step)]
        busy_ns: dict[str, float] = {}
        elapsed_ns = 0.0
        for a, b in slices:
            writer = open_target(job.target, dp.capacity,
                                 OpenOptions(target_zeroed=job.target_zeroed))
            try:
                with pl.Job(plan[a:b], dp.sources, writer, disk=job.disk,
                            settings=settings) as pj:
                    stop = threading.Event()

                    def checkpointer(pj: pl.Job = pj, a: int = a,
                                     stop: threading.Event = stop) -> None:
                        # Beside the pipeline: prefix, then flush, then the durable record.
                        last = 0
                        while not stop.wait(job.checkpoint_interval):
                            prefix = pj.completed_prefix()
                            if prefix <= last:
                                continue
                            try:
                                pj.flush()
                            except Exception:  # the run itself reports the error
                                return
                            record(a + prefix)
                            last = prefix

                    def on_counters(c: pl.Counters, a: int = a) -> None:
                        if progress is not None:
                            base = int(ends[a - 1]) if a > 0 else 0
                            progress(DiskProgress(job.disk, base + c.bytes_done, dp.capacity))

                    th = threading.Thread(target=checkpointer, daemon=True,
                                          name=f"ckpt-disk{job.disk}")
                    th.start()
                    try:
                        c = pj.run(on_counters)
                    finally:
                        stop.set()
                        th.join()
            finally:
                writer.close()
            record(b)  # the run ended with a final flush: all of [a, b) is durable
            out.bytes_written += c.bytes_written
            out.bytes_zeroed += c.bytes_zeroed
            out.bytes_skipped += c.bytes_skipped
            out.entries += b - a
            elapsed_ns += c.elapsed_ns
            for k, v in c.busy_ns.items():
                busy_ns[k] = busy_ns.get(k, 0.0) + v
            if job.stall > 0 and b < total:
                log.info("disk %d: stalling %.1fs after entry %d (test hook)", job.disk,
                         job.stall, b)
                time.sleep(job.stall)
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
