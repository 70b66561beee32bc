"""Durable progress beside a running pipeline job: read the prefix, flush, then record.

The order is what makes a checkpoint honest. Every plan entry below the
completed prefix had finished before the flush began, so once the flush
returns those entries are on stable storage and a resume may skip them.
Recording first and flushing after would let a crash lose data a checkpoint
claims. Used by the in-process movers, the proxy-mover and the repository
source alike, so the rule lives in one place.

:class:`CheckpointLease` fences attempts: the checkpoint file records the
attempt number of the disk task that owns the disk; an attempt lower than the
recorded one is stale (its worker was given up on and the task resubmitted)
and is refused before it writes and at each checkpoint it would record.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from vmrestore.errors import StaleAttemptError


class _Flushable(Protocol):
    def completed_prefix(self) -> int: ...
    def flush(self) -> None: ...


class Checkpointer:
    """A thread that records ``base + prefix`` every ``interval`` seconds, after a flush.

    Pass :meth:`start` as a pipeline ``on_start`` callback (or call it with the
    job), and :meth:`stop` when the run ends (or use it as a context manager).
    A flush that fails ends the thread quietly: the run itself reports the error.
    A record that fails (a stale attempt, a full disk) cancels the job and is
    re-raised by :meth:`stop`, so the run stops with that error, not a vague
    "cancelled".
    """

    def __init__(self, interval: float, record: Callable[[int], Any], *, base: int = 0,
                 name: str = "checkpoint") -> None:
        self.interval = interval
        self.record = record
        self.base = base
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, job: _Flushable) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, args=(job,), daemon=True,
                                        name=self.name)
        self._thread.start()

    def _loop(self, job: _Flushable) -> None:
        last = 0
        while not self._stop.wait(self.interval):
            prefix = job.completed_prefix()
            if prefix <= last:
                continue
            try:
                job.flush()
            except Exception:  # the run itself reports the error
                return
            try:
                self.record(self.base + prefix)
            except BaseException as e:
                self.error = e
                cancel = getattr(job, "cancel", None)
                if cancel is not None:
                    cancel()
                return
            last = prefix

    def stop(self) -> None:
        """End the thread; raise the error a record met, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def _dir_locked(directory: Path) -> Iterator[None]:
    """flock on the checkpoint's directory: claim and record are read-compare-write."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class CheckpointLease:
    """One disk's checkpoint file, held by one attempt of its disk task.

    :meth:`claim` (before the first write) reads the file, refuses an attempt
    lower than the recorded one, and records this attempt as the owner
    (keeping the durable prefix). :meth:`record` writes a durable prefix after
    the same check. Both run under a lock of the directory, so two attempts
    on one machine cannot interleave a check and a write.
    """

    def __init__(self, path: str | os.PathLike[str], disk: int, attempt: int) -> None:
        self.path = Path(path)
        self.disk = disk
        self.attempt = attempt

    def _check(self, found: Any) -> None:
        if found is not None and found.attempt > self.attempt:
            raise StaleAttemptError(
                f"disk {self.disk}: attempt {self.attempt} is stale: attempt {found.attempt} "
                f"holds the checkpoint {self.path}; this one stops without writing",
                self.attempt, found.attempt)

    def claim(self) -> Any:
        """Take the disk for this attempt; returns the checkpoint found (or None)."""
        from vmrestore.jobstate import Checkpoint, read_checkpoint, write_checkpoint

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _dir_locked(self.path.parent):
            found = read_checkpoint(self.path)
            self._check(found)
            own = (Checkpoint(self.disk, 0, 0, "", 0, self.attempt) if found is None else
                   Checkpoint(found.disk, found.prefix, found.entries, found.digest,
                              found.bytes_done, self.attempt))
            write_checkpoint(self.path, own)
        return found

    def record(self, prefix: int, entries: int, digest: str, bytes_done: int) -> None:
        """Record a durable prefix, unless a later attempt took the disk meanwhile."""
        from vmrestore.jobstate import Checkpoint, read_checkpoint, write_checkpoint

        with _dir_locked(self.path.parent):
            self._check(read_checkpoint(self.path))
            write_checkpoint(self.path, Checkpoint(self.disk, prefix, entries, digest,
                                                   bytes_done, self.attempt))
