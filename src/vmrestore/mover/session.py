"""The orchestrator's view of the data movers: one interface, replaceable implementations.

In the seed's initialization phase the repository-side and proxy-side data
movers are started and connected; in the data phase the proxy-side mover
writes each disk. The orchestrator only talks to a :class:`MoverSession`:

    session = InProcessMovers()             # or SubprocessMovers()
    session.open()                          # start both movers, connect them
    result = session.restore_disk(task, progress_callback)   # DiskTask -> DiskTaskResult
    session.close()

Both run the same :class:`vmrestore.disktask.DiskTask` through the same
driver, ``run_disk_task``: in a thread of this process, or in a
``vmrestore proxy-mover`` subprocess (JSON job in, JSON lines out,
docs/proxy-mover.md). Either way the driver claims the task's checkpoint
for its attempt, resumes from the durable prefix and records checkpoints
(prefix, flush, fsynced record). Several disks may run at once: a session
is safe to call from several threads (one subprocess per disk).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from vmrestore.disktask import DiskProgress, DiskTask, DiskTaskResult, run_disk_task

log = logging.getLogger("vmrestore.mover")

__all__ = ["DiskProgress", "DiskTask", "DiskTaskResult", "InProcessMovers", "MoverSession",
           "SubprocessMovers", "default_session"]


class MoverSession(Protocol):
    """A connected pair of data movers for one restore job."""

    name: str

    def open(self) -> None: ...

    def restore_disk(self, task: DiskTask,
                     progress: Callable[[DiskProgress], None] | None = None,
                     cancel: threading.Event | None = None) -> DiskTaskResult: ...

    def close(self) -> None: ...


class InProcessMovers:
    """Both movers in this process: the driver runs in the calling thread."""

    name = "in-process"

    def open(self) -> None:
        # Nothing to start: the repository side is a local file or agent, the proxy side our
        # core. Import the core now so a broken build fails in the initialize phase, not later.
        import vmrestore.pipeline  # noqa: F401

    def close(self) -> None:
        pass

    def restore_disk(self, task: DiskTask,
                     progress: Callable[[DiskProgress], None] | None = None,
                     cancel: threading.Event | None = None) -> DiskTaskResult:
        return run_disk_task(task, progress, cancel)


def _progress_event(ev: dict[str, Any], task: DiskTask) -> DiskProgress | None:
    """A proxy mover's progress/checkpoint line as the driver's DiskProgress."""
    kind = ev.get("event")
    if int(ev.get("disk", -1)) != task.disk:
        return None
    if kind == "progress":
        return DiskProgress(task.disk, int(ev.get("done", 0)), int(ev.get("total", 0)),
                            int(ev.get("completed_prefix", 0)), attempt=task.attempt)
    if kind == "checkpoint" and ev.get("durable") is True:
        return DiskProgress(task.disk, int(ev.get("bytes_done", 0)), 0, int(ev["prefix"]),
                            True, int(ev.get("entries", 0)), str(ev.get("digest", "")),
                            int(ev.get("attempt", task.attempt)))
    return None


class SubprocessMovers:
    """The proxy side as a ``vmrestore proxy-mover`` subprocess per disk (docs/proxy-mover.md).

    The task goes to the mover unchanged (job version 2); the mover's driver
    writes the checkpoint file itself (the same path, fenced by the task's
    attempt) and says so in ``checkpoint`` events, which reach ``progress``
    as durable DiskProgress. Each call starts its own subprocess from the
    calling thread, so disks of one VM run in parallel from worker threads.
    """

    name = "proxy-mover subprocess"

    def open(self) -> None:
        from vmrestore.mover import launcher  # noqa: F401  (fails early when missing)

    def close(self) -> None:
        pass

    def restore_disk(self, task: DiskTask,
                     progress: Callable[[DiskProgress], None] | None = None,
                     cancel: threading.Event | None = None) -> DiskTaskResult:
        import msgspec

        from vmrestore import errors
        from vmrestore.mover.launcher import ProxyMover

        spec = {"version": 2, "job_id": task.job_id or f"disk{task.disk}",
                "tasks": [msgspec.to_builtins(task)]}
        done: dict[str, Any] = {}

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "disk_done":
                done.update(ev)
                return
            p = _progress_event(ev, task)
            if p is not None and progress is not None:
                progress(p)

        ended = threading.Event()

        def watch(pm: ProxyMover) -> None:  # cancel -> SIGTERM: the mover stops, exit 130
            while not ended.wait(0.2):
                if cancel is not None and cancel.is_set():
                    pm.cancel()
                    return

        with ProxyMover(spec) as pm:
            threading.Thread(target=watch, args=(pm,), daemon=True,
                             name=f"cancel-disk{task.disk}").start()
            try:
                for ev in pm.events():
                    on_event(ev)
            finally:
                ended.set()
        res = pm.result
        assert res is not None
        if not res.ok:
            err = (res.errors or [{}])[-1]
            msg = err.get("message") or f"proxy mover {res.status} (exit {res.exit_code}): " \
                f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}"
            raise errors.from_exit(res.exit_code, msg, str(err.get("kind") or ""),
                                   int(err.get("vendor_code") or 0))
        return DiskTaskResult.from_dict(done)


def default_session() -> MoverSession:
    """The movers the orchestrator uses (env VMRESTORE_MOVER: in-process | subprocess)."""
    kind = os.environ.get("VMRESTORE_MOVER", "in-process")
    if kind == "in-process":
        return InProcessMovers()
    if kind == "subprocess":
        return SubprocessMovers()
    from vmrestore.errors import UsageError

    raise UsageError(f"VMRESTORE_MOVER={kind!r}: expected 'in-process' or 'subprocess'")
