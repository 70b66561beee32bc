"""The proxy mover: runs data-phase disk tasks and reports them as JSON lines (docs/proxy-mover.md).

The orchestrator starts `vmrestore proxy-mover` as a subprocess (launcher.py)
with a job: version 2 carries :class:`vmrestore.disktask.DiskTask` documents
unchanged; version 1 (which disks of which backup go to which target URIs)
is still read and turned into tasks. Every task runs through the one
driver, ``run_disk_task``, and the mover emits one JSON object per line on
stdout: start, progress, checkpoint, warning, disk_done, error, and a final
result.

Checkpoints: every ``checkpoint_interval`` seconds a thread beside the core
reads the pipeline's completed prefix, flushes the target, records it in the
task's checkpoint file when it names one (fenced by the task's attempt), and
only then emits ``{"event": "checkpoint", "disk": N, "prefix": P, "durable":
true}`` (P in entries of the whole plan, so a resume passes it back as
``start_entry``).

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
from dataclasses import dataclass
from typing import IO, Any

from vmrestore import schema
from vmrestore.disktask import DiskProgress, DiskTask, TaskSettings, run_disk_task
from vmrestore.errors import UsageError, VddkError, VmrError

JOB_VERSION = 2
JOB_VERSIONS = (1, 2)
EVENT_VERSION = 1

log = logging.getLogger("vmrestore.mover.proxy")

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    """A validated data-phase job: its disk tasks, in order."""

    tasks: list[DiskTask]
    job_id: str = ""


def _v1_tasks(d: dict[str, Any]) -> list[DiskTask]:
    """A version 1 job (docs/proxy-mover.md) as disk tasks."""
    src = d.get("source")
    if not isinstance(src, dict) or ("backup" in src) == ("repository" in src):
        raise UsageError("job.source: exactly one of 'backup' (a local path) or "
                         "'repository' (repo://HOST:PORT/PATH)")
    disks_raw = d.get("disks")
    if not isinstance(disks_raw, list) or not disks_raw:
        raise UsageError("job.disks: a non-empty list of {disk, target}")
    s = d.get("settings", {}) or {}
    if not isinstance(s, dict):
        raise UsageError("job.settings: expected an object")
    known = {"connections", "retries", "force", "threads", "queue_depth", "max_rate",
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

    source = src.get("backup") or src.get("repository")
    if not isinstance(source, str) or not source:
        raise UsageError("job.source: the backup path or repository URL is empty")
    if "repository" in src:
        from vmrestore.mover.client import RepoURL

        RepoURL.parse(source)
    base = dict(connections=int(num("connections", 4, 1)), retries=int(num("retries", 5, 0)),
                force=bool(s.get("force", False)), threads=int(num("threads", None, 1) or 0),
                queue_depth=int(num("queue_depth", None, 1) or 0),
                max_rate=int(num("max_rate", 0, 0)),
                progress_interval=float(num("progress_interval", 1.0, 0.05)),
                checkpoint_interval=float(num("checkpoint_interval", 1.0, 0.05)),
                stall=float(num("stall", 0.0, 0.0)), client=s.get("client"),
                token_file=src.get("token_file"))
    tasks = []
    for i, x in enumerate(disks_raw):
        if (not isinstance(x, dict) or not isinstance(x.get("disk"), int)
                or x["disk"] < 0 or not isinstance(x.get("target"), str) or not x["target"]):
            raise UsageError(f"job.disks[{i}]: needs 'disk' (index >= 0) and 'target' (URI)")
        se = x.get("start_entry", 0)
        tz = x.get("target_zeroed")
        if not isinstance(se, int) or se < 0 or not (tz is None or isinstance(tz, bool)):
            raise UsageError(f"job.disks[{i}]: start_entry >= 0, target_zeroed true/false")
        tasks.append(DiskTask(disk=x["disk"], source=source, target=x["target"],
                              job_id=str(d.get("job_id", "")), point=d.get("point"),
                              transport=str(d.get("transport", "auto")), start_entry=se,
                              settings=TaskSettings(**base, target_zeroed=tz)))
    return tasks


def job_from_dict(d: Any) -> Job:
    if not isinstance(d, dict):
        raise UsageError("job: expected a JSON object")
    v = d.get("version", 1)
    if v not in JOB_VERSIONS:
        raise UsageError(f"job: version {v!r} not supported (this proxy mover reads "
                         f"{', '.join(map(str, JOB_VERSIONS))})")
    if v == 1:
        tasks = _v1_tasks(d)
    else:
        unknown = set(d) - {"version", "job_id", "tasks"}
        if unknown:
            raise UsageError(f"job: unknown field(s) {', '.join(sorted(unknown))}")
        raw = d.get("tasks")
        if not isinstance(raw, list) or not raw:
            raise UsageError("job.tasks: a non-empty list of disk tasks (docs/disktask.md)")
        tasks = []
        for i, t in enumerate(raw):
            tasks.append(schema.convert(t, DiskTask, f"job.tasks[{i}]").validate())
    if len({t.disk for t in tasks}) != len(tasks):
        raise UsageError("job.disks: a disk index appears twice")
    return Job(tasks, str(d.get("job_id", "")))


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


def _emitter(emit: Emit) -> Callable[[DiskProgress], None]:
    """The driver's DiskProgress as progress / checkpoint events."""

    def on_progress(p: DiskProgress) -> None:
        if p.durable:
            emit({"event": "checkpoint", "disk": p.disk, "prefix": p.prefix, "durable": True,
                  "entries": p.entries, "digest": p.digest, "bytes_done": p.done,
                  "attempt": p.attempt})
        else:
            emit({"event": "progress", "disk": p.disk, "done": p.done, "total": p.total,
                  "completed_prefix": p.prefix})

    return on_progress


def run_job(job: Job, emit: Emit) -> int:
    """Run every disk task of the job; returns the exit code (0, or the first error's)."""
    from vmrestore.mover.url import is_repo_url

    emit({"event": "start", "version": EVENT_VERSION, "job_id": job.job_id,
          "disks": [t.disk for t in job.tasks],
          "source": "repository" if is_repo_url(job.tasks[0].source) else "local"})
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    rc = 0
    status = "ok"
    for task in job.tasks:
        try:
            r = run_disk_task(task, _emitter(emit))
            if r.reconnects or r.refetches:
                emit({"event": "warning", "disk": task.disk,
                      "message": f"{r.reconnects} reconnects, {r.refetches} re-fetched extents"})
            d = r.as_dict()
            results.append(d)
            emit({"event": "disk_done", **d})
        except KeyboardInterrupt:
            emit({"event": "error", "disk": task.disk, "kind": "Interrupted", "exit_code": 130,
                  "message": "interrupted"})
            rc, status = 130, "interrupted"
            break
        except VmrError as e:
            log.debug("disk %d failed", task.disk, exc_info=True)
            emit(_error_event(e, task.disk))
            rc, status = e.exit_code, ("interrupted" if e.exit_code == 130 else "failed")
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
    """The job document (JSON): syntax, depth and fields checked by vmrestore.schema."""
    return job_from_dict(schema.parse(text, "job", json_only=True))


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
