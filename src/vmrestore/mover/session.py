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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmrestore.checkpoint import Checkpointer
from vmrestore.plan import compare_plan
from vmrestore.timeline import SAMPLE_INTERVAL, Sampler

log = logging.getLogger("vmrestore.mover")


@dataclass
class DiskJob:
    """One disk of the data phase, as the proxy-side mover receives it."""

    disk: int
    backup: str  # the restore point file (chain resolved by the mover), or its repo:// URL
    target: str  # writer URI (path, file://, nbd://, nbd+unix://, nbds..., san:...)
    transport: str
    start_entry: int = 0  # resume: run plan[start_entry:]
    checkpoint: str | None = None  # checkpoint file (jobstate format)
    checkpoint_interval: float = 1.0
    target_zeroed: bool = True  # a new disk reads as zeros: zero runs need no writes
    threads: int | None = None
    queue_depth: int | None = None
    token_file: str | None = None  # repo:// backups: the agent's token (else $VMRESTORE_REPO_TOKEN)
    # Quick rollback: the target holds a version of the disk; compare each entry and write
    # only what differs (plan.compare_plan; checkpoints count entries of that plan).
    compare: bool = False
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
    wire_bytes: int = 0  # received from a repository agent (0 for a local backup)
    timeline: dict[str, Any] = field(default_factory=dict)  # vmrestore.timeline samples
    # quick rollback (compare): entries compared / differing, target bytes read to compare,
    # zero bytes the target reported as holes, bytes it already held
    compared: int = 0
    differing: int = 0
    compare_read: int = 0
    known_zero: int = 0
    same: int = 0


def slices(start: int, total: int, stall: float) -> list[tuple[int, int]]:
    """Plan ranges to run: all at once, or (test hook ``stall``) in eight slices."""
    if stall <= 0 or total <= start:
        return [(start, total)]
    step = max(1, (total - start) // 8)
    return [(a, min(a + step, total)) for a in range(start, total, step)]


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
        from vmrestore.mover.client import is_repo_url
        from vmrestore.repository.plan import build_plan
        from vmrestore.repository.reader import open_chain
        from vmrestore.transport.uri import OpenOptions, open_target

        if is_repo_url(job.backup):
            if job.compare:
                from vmrestore.errors import UsageError

                raise UsageError(f"disk {job.disk}: a quick rollback reads a local backup in "
                                 "this build (use --backup, or a full overwrite)")
            return _restore_from_agent(job, progress)
        chain = open_chain(job.backup)
        try:
            dp = build_plan(chain, job.disk)
        finally:
            chain.close()
        plan = compare_plan(dp.plan, dp.block_size) if job.compare else dp.plan
        total = len(plan)
        digest = plan_digest(plan)
        ends = plan["length"].cumsum()
        done_before = int(ends[job.start_entry - 1]) if job.start_entry > 0 else 0
        ckpt_path = Path(job.checkpoint) if job.checkpoint else None
        out = DiskOutcome(job.disk, resumed_bytes=done_before)
        settings = pl.Settings(threads=job.threads or 0, queue_depth=job.queue_depth or 0)
        if job.compare:
            job.target_zeroed = False
        t0 = time.monotonic()

        def record(prefix_abs: int) -> None:
            if ckpt_path is not None:
                done = int(ends[prefix_abs - 1]) if prefix_abs > 0 else 0
                write_checkpoint(ckpt_path, Checkpoint(job.disk, prefix_abs, total, digest, done))

        busy_ns: dict[str, float] = {}
        elapsed_ns = 0.0
        sampler = Sampler(job.transport)
        parts = slices(job.start_entry, total, job.stall)
        for a, b in parts:
            writer = open_target(job.target, dp.capacity,
                                 OpenOptions(target_zeroed=job.target_zeroed))
            try:
                with pl.Job(plan[a:b], dp.sources, writer, disk=job.disk,
                            settings=settings, compare=job.compare) as pj:

                    def on_counters(c: pl.Counters, a: int = a) -> None:
                        if progress is not None:
                            base = int(ends[a - 1]) if a > 0 else 0
                            progress(DiskProgress(job.disk, base + c.bytes_done, dp.capacity))

                    with Checkpointer(job.checkpoint_interval, record, base=a,
                                      name=f"ckpt-disk{job.disk}") as ckpt:
                        ckpt.start(pj)
                        c = pj.run(sampler.segment(on_counters), SAMPLE_INTERVAL)
            finally:
                writer.close()
            record(b)  # the run ended with a final flush: all of [a, b) is durable
            out.bytes_written += c.bytes_written
            out.bytes_zeroed += c.bytes_zeroed
            out.bytes_skipped += c.bytes_skipped
            out.entries += b - a
            out.compared += c.cmp_entries
            out.differing += c.cmp_differ
            out.compare_read += c.cmp_bytes_read
            out.known_zero += c.cmp_known_zero
            out.same += c.bytes_same
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
        out.timeline = sampler.as_dict()
        if progress is not None:
            progress(DiskProgress(job.disk, dp.capacity, dp.capacity))
        return out


def _restore_from_agent(job: DiskJob,
                        progress: Callable[[DiskProgress], None] | None) -> DiskOutcome:
    """A repo:// backup: the core pulls from the agent (token: job.token_file or env).

    Checkpoints as on the local path: the repository run reads the pipeline's
    completed prefix, flushes, then we record it (fsynced) every
    ``checkpoint_interval`` seconds; a resumed job passes ``start_entry``.
    """
    from vmrestore.jobstate import Checkpoint, plan_digest, write_checkpoint
    from vmrestore.mover.client import RepoURL, load_token
    from vmrestore.mover.repo_source import plan_remote, restore_repo_disk

    t0 = time.monotonic()
    url = RepoURL.parse(job.backup)
    token = load_token(job.token_file)
    if url.tls:
        return _restore_from_agent_tls(job, progress, url, token)
    rp = plan_remote(url, token, job.disk)
    plan = rp.plan.plan
    total = len(plan)
    if not 0 <= job.start_entry <= total:
        from vmrestore.errors import UsageError

        raise UsageError(f"disk {job.disk}: checkpoint entry {job.start_entry} outside the "
                         f"plan (0..{total})")
    digest = plan_digest(plan)
    ends = plan["length"].cumsum()
    ckpt_path = Path(job.checkpoint) if job.checkpoint else None

    def done_at(prefix: int) -> int:
        return int(ends[prefix - 1]) if prefix > 0 else 0

    def record(prefix_abs: int) -> None:
        if ckpt_path is not None:
            write_checkpoint(ckpt_path, Checkpoint(job.disk, prefix_abs, total, digest,
                                                   done_at(prefix_abs)))

    out = DiskOutcome(job.disk, resumed_bytes=done_at(job.start_entry),
                      wire_bytes=rp.metadata_bytes)
    busy_ns: dict[str, float] = {}
    elapsed_ns = 0.0
    sampler = Sampler(job.transport)
    parts = slices(job.start_entry, total, job.stall)
    for a, b in parts:
        def on_counters(c: Any, a: int = a) -> None:
            if progress is not None:
                progress(DiskProgress(job.disk, done_at(a) + c.bytes_done, rp.plan.capacity))

        res = restore_repo_disk(url, token, job.disk, job.target, start_entry=a, end_entry=b,
                                target_zeroed=job.target_zeroed, threads=job.threads or 0,
                                queue_depth=job.queue_depth or 0, force=True,
                                on_counters=sampler.segment(on_counters), remote_plan=rp,
                                on_checkpoint=record,
                                checkpoint_interval=job.checkpoint_interval)
        record(b)  # the run ended with a final flush: all of [a, b) is durable
        out.bytes_written += res.bytes_written
        out.bytes_zeroed += res.bytes_zeroed
        out.bytes_skipped += res.bytes_skipped
        out.entries += b - a
        out.wire_bytes += res.wire_bytes - res.metadata_bytes
        elapsed_ns += res.elapsed_ns
        for k, v in res.busy_ns.items():
            busy_ns[k] = busy_ns.get(k, 0.0) + v
        if job.stall > 0 and b < total:
            log.info("disk %d: stalling %.1fs after entry %d (test hook)", job.disk, job.stall, b)
            time.sleep(job.stall)
    out.seconds = time.monotonic() - t0
    if elapsed_ns > 0:
        out.busy = {k: min(1.0, v / elapsed_ns) for k, v in busy_ns.items()}
    out.timeline = sampler.as_dict()
    if progress is not None:
        progress(DiskProgress(job.disk, rp.plan.capacity, rp.plan.capacity))
    return out


def _restore_from_agent_tls(job: DiskJob, progress: Callable[[DiskProgress], None] | None,
                            url: Any, token: bytes) -> DiskOutcome:
    """repos://: Python's TLS session cannot move into the core, so mover/remote.py's batch
    loop writes (local files and block devices only: hotadd); the checkpoint is written when
    the disk is done, since that loop flushes only at its end."""
    from vmrestore.errors import UsageError
    from vmrestore.jobstate import Checkpoint, write_checkpoint
    from vmrestore.mover.remote import restore_remote_disk

    if "://" in job.target or job.target.startswith("san:"):
        raise UsageError(f"disk {job.disk}: transport {job.transport}: over TLS (repos://) "
                         "this build writes local files and block devices only (--transport "
                         "hotadd), or use repo://")

    def on_progress(done: int, total: int, _prefix: int) -> None:
        if progress is not None:
            progress(DiskProgress(job.disk, done, total))

    res = restore_remote_disk(url, token, job.disk, job.target, start_entry=job.start_entry,
                              target_zeroed=job.target_zeroed, force=True, progress=on_progress)
    if job.checkpoint:
        write_checkpoint(Path(job.checkpoint), Checkpoint(job.disk, res.entries, res.entries, "",
                                                          res.capacity))
    return DiskOutcome(job.disk, bytes_written=res.bytes_written, bytes_zeroed=res.bytes_zeroed,
                       bytes_skipped=res.bytes_skipped, resumed_bytes=res.resumed_bytes,
                       seconds=res.seconds, entries=res.entries - job.start_entry,
                       wire_bytes=res.wire_bytes)


class SubprocessMovers:
    """The proxy side as a ``vmrestore proxy-mover`` subprocess (docs/proxy-mover.md).

    One subprocess per disk; its progress events drive the display. Only its
    ``checkpoint`` events (``"durable": true``: the mover flushed the target
    after reading the prefix) are recorded in the checkpoint file, never a
    progress event's ``completed_prefix``, so a resume restarts an unfinished
    disk from its last durable point, never from an unflushed one.
    """

    name = "proxy-mover subprocess"

    def open(self) -> None:
        from vmrestore.mover import launcher  # noqa: F401  (fails early when missing)

    def close(self) -> None:
        pass

    def restore_disk(self, job: DiskJob,
                     progress: Callable[[DiskProgress], None] | None = None) -> DiskOutcome:
        from vmrestore import errors
        from vmrestore.jobstate import Checkpoint, write_checkpoint
        from vmrestore.mover.launcher import run_proxy_mover

        if job.compare:
            raise errors.UsageError(f"disk {job.disk}: a quick rollback runs in the in-process "
                                    "mover in this build (VMRESTORE_MOVER=in-process)")
        repo = job.backup.startswith(("repo://", "repos://"))
        settings: dict[str, Any] = {
            "progress_interval": min(job.checkpoint_interval, 0.5), "threads": job.threads,
            "queue_depth": job.queue_depth, "checkpoint_interval": job.checkpoint_interval}
        if job.stall > 0:
            settings["stall"] = job.stall
        spec = {
            "version": 1, "job_id": f"disk{job.disk}",
            "source": ({"repository": job.backup, "token_file": job.token_file} if repo
                       else {"backup": job.backup}),
            "transport": job.transport,
            "disks": [{"disk": job.disk, "target": job.target, "start_entry": job.start_entry,
                       "target_zeroed": job.target_zeroed}],
            "settings": settings,
        }
        done: dict[str, Any] = {}
        entries_total = [0]

        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "progress" and progress is not None:
                progress(DiskProgress(job.disk, int(ev.get("done", 0)), int(ev.get("total", 0))))
            if kind == "checkpoint" and ev.get("durable") is True and job.checkpoint \
                    and int(ev.get("disk", -1)) == job.disk:
                # prefix is in entries of the whole plan (start_entry already included)
                write_checkpoint(Path(job.checkpoint), Checkpoint(
                    job.disk, int(ev["prefix"]), int(ev.get("entries", 0)),
                    str(ev.get("digest", "")), int(ev.get("bytes_done", 0))))
            if kind == "disk_done":
                done.update(ev)
                entries_total[0] = int(ev.get("entries") or 0)

        res = run_proxy_mover(spec, on_event=on_event)
        if not res.ok:
            err = (res.errors or [{}])[-1]
            msg = err.get("message") or f"proxy mover {res.status} (exit {res.exit_code}): " \
                f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}"
            raise errors.from_exit(res.exit_code, msg, str(err.get("kind") or ""),
                                   int(err.get("vendor_code") or 0))
        return DiskOutcome(
            job.disk, bytes_written=int(done.get("bytes_written", 0)),
            bytes_zeroed=int(done.get("bytes_zeroed", 0)),
            bytes_skipped=int(done.get("bytes_skipped", 0)),
            resumed_bytes=int(done.get("resumed_bytes", 0)),
            seconds=float(done.get("seconds", 0.0)), entries=entries_total[0],
            busy={k: float(v) for k, v in (done.get("busy") or {}).items()},
            wire_bytes=int(done.get("wire_bytes", 0)),
            timeline=done.get("timeline") or {})


def default_session() -> MoverSession:
    """The movers the orchestrator uses (env VMRESTORE_MOVER: in-process | subprocess)."""
    kind = os.environ.get("VMRESTORE_MOVER", "in-process")
    if kind == "in-process":
        return InProcessMovers()
    if kind == "subprocess":
        return SubprocessMovers()
    from vmrestore.errors import UsageError

    raise UsageError(f"VMRESTORE_MOVER={kind!r}: expected 'in-process' or 'subprocess'")
