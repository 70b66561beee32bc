"""The proxy mover: runs one data-phase job and reports it as JSON lines (docs/proxy-mover.md).

The orchestrator starts `vmrestore proxy-mover` as a subprocess (launcher.py)
with a job: which disks of which backup go to which target URIs. This module
validates the job, runs each disk (in-process core for a local backup, the
repository agent for repo:// URLs), and emits one JSON object per line on
stdout: start, progress, checkpoint, warning, disk_done, error, and a final
result.

Checkpoints: every ``checkpoint_interval`` seconds a thread beside the core
reads the pipeline's completed prefix, flushes the target, and only then
emits ``{"event": "checkpoint", "disk": N, "prefix": P, "durable": true}``
(P in entries of the whole plan, so a resume passes it back as
``start_entry``). The orchestrator records that line in its checkpoint file.

The exit code is the one of the first error class (errors.py), so a caller
can act without parsing text.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from vmrestore.checkpoint import Checkpointer
from vmrestore.errors import UsageError, VddkError, VmrError
from vmrestore.timeline import Sampler
from vmrestore.transport.uri import parse_target

JOB_VERSION = 1
EVENT_VERSION = 1

log = logging.getLogger("vmrestore.mover.proxy")

Emit = Callable[[dict[str, Any]], None]


@dataclass
class DiskJob:
    disk: int
    target: str
    start_entry: int = 0
    target_zeroed: bool | None = None


@dataclass
class Job:
    """A validated data-phase job (see docs/proxy-mover.md for the JSON form)."""

    disks: list[DiskJob]
    backup: str | None = None
    repository: str | None = None
    token_file: str | None = None
    point: str | None = None
    transport: str = "auto"
    job_id: str = ""
    connections: int = 4
    retries: int = 5
    force: bool = False
    threads: int | None = None
    queue_depth: int | None = None
    progress_interval: float = 1.0
    checkpoint_interval: float = 1.0
    stall: float = 0.0  # test only: run each disk in slices with a pause after each
    client: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Job:
        if not isinstance(d, dict):
            raise UsageError("job: expected a JSON object")
        v = d.get("version", JOB_VERSION)
        if v != JOB_VERSION:
            raise UsageError(f"job: version {v!r} not supported (this proxy mover reads "
                             f"{JOB_VERSION})")
        src = d.get("source")
        if not isinstance(src, dict) or ("backup" in src) == ("repository" in src):
            raise UsageError("job.source: exactly one of 'backup' (a local path) or "
                             "'repository' (repo://HOST:PORT/PATH)")
        disks_raw = d.get("disks")
        if not isinstance(disks_raw, list) or not disks_raw:
            raise UsageError("job.disks: a non-empty list of {disk, target}")
        disks = []
        for i, x in enumerate(disks_raw):
            if (not isinstance(x, dict) or not isinstance(x.get("disk"), int)
                    or x["disk"] < 0 or not isinstance(x.get("target"), str) or not x["target"]):
                raise UsageError(f"job.disks[{i}]: needs 'disk' (index >= 0) and 'target' (URI)")
            se = x.get("start_entry", 0)
            tz = x.get("target_zeroed")
            if not isinstance(se, int) or se < 0 or not (tz is None or isinstance(tz, bool)):
                raise UsageError(f"job.disks[{i}]: start_entry >= 0, target_zeroed true/false")
            disks.append(DiskJob(x["disk"], x["target"], se, tz))
        if len({x.disk for x in disks}) != len(disks):
            raise UsageError("job.disks: a disk index appears twice")
        s = d.get("settings", {}) or {}
        if not isinstance(s, dict):
            raise UsageError("job.settings: expected an object")
        known = {"connections", "retries", "force", "threads", "queue_depth",
                 "progress_interval", "checkpoint_interval", "stall", "client"}
        unknown = set(s) - known
        if unknown:
            raise UsageError(f"job.settings: unknown field(s) {', '.join(sorted(unknown))}")

        def num(name: str, default: Any, lo: float) -> Any:
            val = s.get(name, default)
            if val is None and default is None:
                return None
            if isinstance(val, bool) or not isinstance(val, int | float) or val < lo:
                raise UsageError(f"job.settings.{name}: expected a number >= {lo}")
            return val

        job = cls(
            disks=disks,
            backup=src.get("backup"),
            repository=src.get("repository"),
            token_file=src.get("token_file"),
            point=d.get("point"),
            transport=str(d.get("transport", "auto")),
            job_id=str(d.get("job_id", "")),
            connections=int(num("connections", 4, 1)),
            retries=int(num("retries", 5, 0)),
            force=bool(s.get("force", False)),
            threads=num("threads", None, 1),
            queue_depth=num("queue_depth", None, 1),
            progress_interval=float(num("progress_interval", 1.0, 0.05)),
            checkpoint_interval=float(num("checkpoint_interval", 1.0, 0.05)),
            stall=float(num("stall", 0.0, 0.0)),
            client=s.get("client"),
        )
        if job.repository is not None:
            from vmrestore.mover.client import RepoURL

            RepoURL.parse(job.repository)
        return job


class JsonLines:
    """Writes events as JSON lines, one lock so threads never interleave a line."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        event = {"event": event.pop("event"), "t": round(time.time(), 3), **event}
        line = json.dumps(event, separators=(",", ":"))
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


def _error_event(e: BaseException, disk: int | None) -> dict[str, Any]:
    code = e.exit_code if isinstance(e, VmrError) else 1
    ev = {"event": "error", "disk": disk, "kind": type(e).__name__, "exit_code": code,
          "message": str(e)}
    if getattr(e, "code", None) and isinstance(e, VddkError):
        ev["vendor_code"] = e.code
    return ev


class _Progress:
    """Rate-limited progress events and durable checkpoint events of one disk."""

    def __init__(self, job: Job, dj: DiskJob, emit: Emit, plan: Any) -> None:
        from vmrestore.jobstate import plan_digest

        self.job, self.dj, self.emit = job, dj, emit
        self.ends = plan["length"].cumsum()
        self.entries = len(plan)
        self.capacity = int(self.ends[-1]) if self.entries else 0
        self.digest = plan_digest(plan)
        self.last = 0.0
        self.lock = threading.Lock()
        self.prefix = dj.start_entry  # last durable prefix emitted

    def done_at(self, prefix: int) -> int:
        return int(self.ends[prefix - 1]) if prefix > 0 else 0

    def progress(self, base: int, c: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.job.progress_interval:
            self.last = now
            self.emit({"event": "progress", "disk": self.dj.disk,
                       "done": self.done_at(base) + c.bytes_done, "total": self.capacity,
                       "completed_prefix": base + c.completed_prefix})

    def checkpoint(self, prefix: int) -> None:
        """``prefix`` (entries of the whole plan) is flushed on the target: say so."""
        with self.lock:
            if prefix <= self.prefix:
                return
            self.prefix = prefix
            self.emit({"event": "checkpoint", "disk": self.dj.disk, "prefix": prefix,
                       "durable": True, "entries": self.entries, "digest": self.digest,
                       "bytes_done": self.done_at(prefix)})


def _slices(job: Job, dj: DiskJob, total: int) -> list[tuple[int, int]]:
    if not 0 <= dj.start_entry <= total:
        raise UsageError(f"disk {dj.disk}: start_entry {dj.start_entry} outside the plan "
                         f"(0..{total})")
    from vmrestore.mover.session import slices

    return slices(dj.start_entry, total, job.stall)


def _stall(job: Job, dj: DiskJob, b: int, total: int) -> None:
    if job.stall > 0 and b < total:
        log.info("disk %d: stalling %.1fs after entry %d (test hook)", dj.disk, job.stall, b)
        time.sleep(job.stall)


def _sum(results: list[Any], dj: DiskJob, first: Any, t0: float) -> dict[str, Any]:
    """One disk_done record from the slices' RestoreResults."""
    out = first.as_dict()
    for k in ("bytes_written", "bytes_zeroed", "bytes_skipped", "bytes_read"):
        out[k] = sum(getattr(r, k) for r in results)
    seconds = time.monotonic() - t0
    moved = out["bytes_written"] + out["bytes_zeroed"] + out["bytes_skipped"]
    out["seconds"] = round(seconds, 3)
    out["mb_per_s"] = round(moved / (1 << 20) / seconds, 1) if seconds > 0 else 0.0
    out["completed_prefix"] = results[-1].completed_prefix if results else dj.start_entry
    return out


def _run_remote(job: Job, dj: DiskJob, emit: Emit) -> dict[str, Any]:
    """A disk from a repository agent: the core's repo source (any target URI).

    repos:// (TLS) keeps Python's TLS session, so it runs mover.remote's batch
    loop instead (local files and block devices only).
    """
    from vmrestore.mover.client import RepoURL, load_token

    url = RepoURL.parse(job.repository or "")
    token = load_token(job.token_file)
    if url.tls:
        return _run_remote_tls(job, dj, emit, url, token)
    from vmrestore.mover.repo_source import plan_remote, restore_repo_disk

    t0 = time.monotonic()
    rp = plan_remote(url, token, dj.disk, point=job.point, client=job.client)
    pg = _Progress(job, dj, emit, rp.plan.plan)
    sampler = Sampler(parse_target(dj.target).transport)
    results = []
    wire = rp.metadata_bytes
    reconnects = refetches = 0
    for a, b in _slices(job, dj, pg.entries):
        res = restore_repo_disk(
            url, token, dj.disk, dj.target, point=job.point,
            force=job.force or bool(results), target_zeroed=dj.target_zeroed,
            start_entry=a, end_entry=b, threads=job.threads or 0,
            queue_depth=job.queue_depth or 0, retries=job.retries,
            connections=job.connections, client=job.client, remote_plan=rp,
            on_counters=sampler.segment(lambda c, a=a: pg.progress(a, c)),
            on_checkpoint=pg.checkpoint,
            checkpoint_interval=job.checkpoint_interval)
        pg.checkpoint(b)  # the run ended with a final flush of every lane
        results.append(res)
        wire += res.wire_bytes - res.metadata_bytes
        reconnects += res.reconnects
        refetches += res.refetches
        _stall(job, dj, b, pg.entries)
    if reconnects or refetches:
        emit({"event": "warning", "disk": dj.disk,
              "message": f"{reconnects} reconnects, {refetches} re-fetched extents"})
    out = _sum(results, dj, results[0], t0)
    out.update(source="repository", resumed_bytes=pg.done_at(dj.start_entry),
               wire_bytes=wire, metadata_bytes=rp.metadata_bytes,
               stored_bytes=sum(r.stored_bytes for r in results),
               reconnects=reconnects, refetches=refetches, entries=pg.entries,
               timeline=sampler.as_dict())
    logical = out["bytes_written"] + out["bytes_zeroed"] + out["bytes_skipped"]
    out["wire_ratio"] = round(wire / logical, 4) if logical else 0.0
    return out


def _run_remote_tls(job: Job, dj: DiskJob, emit: Emit, url: Any, token: bytes
                    ) -> dict[str, Any]:
    from vmrestore.mover.remote import restore_remote_disk

    target = dj.target.removeprefix("file://")
    if "://" in target or target.startswith("san:"):
        raise UsageError(f"disk {dj.disk}: target {dj.target}: over TLS (repos://) this build "
                         "writes local files and block devices only (TLS stays in Python); "
                         "use repo:// for nbd/san/vddk targets")
    last = [0.0]

    def progress(done: int, total: int, prefix: int) -> None:
        now = time.monotonic()
        if now - last[0] >= job.progress_interval:
            last[0] = now
            emit({"event": "progress", "disk": dj.disk, "done": done, "total": total,
                  "completed_prefix": prefix})

    res = restore_remote_disk(url, token, dj.disk, target, point=job.point,
                              connections=job.connections, force=job.force,
                              retries=job.retries, client=job.client, progress=progress,
                              start_entry=dj.start_entry, target_zeroed=dj.target_zeroed)
    if res.reconnects or res.refetches:
        emit({"event": "warning", "disk": dj.disk,
              "message": f"{res.reconnects} reconnects, {res.refetches} re-fetched batches"})
    return {"source": "repository", **res.as_dict()}


def _run_local(job: Job, dj: DiskJob, emit: Emit) -> dict[str, Any]:
    """A local backup on the in-process core, from ``start_entry``, with checkpoints."""
    try:
        from vmrestore import restore_disk as rd  # H2's API: the in-process core
    except ImportError:
        raise UsageError("this build has no in-process restore core "
                         "(vmrestore.restore_disk); use a repository source") from None
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    t0 = time.monotonic()
    full = open_chain(job.backup or "")
    try:
        chain = full.at(job.point) if job.point else full
        dp = build_plan(chain, dj.disk)
    finally:
        full.close()
    pg = _Progress(job, dj, emit, dp.plan)
    sampler = Sampler(parse_target(dj.target).transport)
    results = []
    for a, b in _slices(job, dj, pg.entries):
        with Checkpointer(job.checkpoint_interval, pg.checkpoint, base=a,
                          name=f"ckpt-disk{dj.disk}") as ckpt:
            res = rd.run_plan(dp.plan[a:b], dp.sources, dj.target, disk=dj.disk,
                              capacity=dp.capacity, force=job.force or a > 0 or bool(results),
                              target_zeroed=dj.target_zeroed, threads=job.threads or 0,
                              queue_depth=job.queue_depth or 0,
                              on_counters=sampler.segment(lambda c, a=a: pg.progress(a, c)),
                              on_start=ckpt.start)
        pg.checkpoint(b)  # run_plan ended with a final flush of every lane
        results.append(res)
        _stall(job, dj, b, pg.entries)
    out = _sum(results, dj, results[0], t0)
    out.update(source="local", disk=dj.disk, target=dj.target, entries=pg.entries,
               resumed_bytes=pg.done_at(dj.start_entry), capacity=dp.capacity,
               timeline=sampler.as_dict())
    return out


def run_job(job: Job, emit: Emit) -> int:
    """Run every disk of the job; returns the exit code (0, or the first error's)."""
    emit({"event": "start", "version": EVENT_VERSION, "job_id": job.job_id,
          "disks": [d.disk for d in job.disks],
          "source": "repository" if job.repository else "local"})
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    rc = 0
    status = "ok"
    for dj in job.disks:
        try:
            r = (_run_remote if job.repository else _run_local)(job, dj, emit)
            results.append(r)
            emit({"event": "disk_done", **{k: v for k, v in r.items() if k != "event"}})
        except KeyboardInterrupt:
            emit({"event": "error", "disk": dj.disk, "kind": "Interrupted", "exit_code": 130,
                  "message": "interrupted"})
            rc, status = 130, "interrupted"
            break
        except VmrError as e:
            log.debug("disk %d failed", dj.disk, exc_info=True)
            emit(_error_event(e, dj.disk))
            rc, status = e.exit_code, "failed"
            break
    wire = sum(int(r.get("wire_bytes", 0)) for r in results)
    logical = sum(int(r.get("bytes_written", 0)) + int(r.get("bytes_zeroed", 0))
                  + int(r.get("bytes_skipped", 0)) for r in results)
    emit({"event": "result", "status": status, "exit_code": rc, "job_id": job.job_id,
          "disks_done": [r["disk"] for r in results], "seconds": round(time.monotonic() - t0, 3),
          "wire_bytes": wire, "logical_bytes": logical,
          "wire_ratio": round(wire / logical, 4) if logical else 0.0})
    return rc


def load_job(text: str) -> Job:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"job: not valid JSON ({e.msg} at line {e.lineno})") from None
    return Job.from_dict(data)


def main(job_text: str, out: IO[str] = sys.stdout) -> int:
    """Parse + run; a bad job is reported as an error event and a result, like any failure."""
    emit = JsonLines(out)
    try:
        job = load_job(job_text)
    except VmrError as e:
        emit(_error_event(e, None))
        emit({"event": "result", "status": "failed", "exit_code": e.exit_code, "job_id": "",
              "disks_done": [], "seconds": 0.0, "wire_bytes": 0, "logical_bytes": 0,
              "wire_ratio": 0.0})
        return e.exit_code
    return run_job(job, emit)
