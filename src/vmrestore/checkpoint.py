"""Durable progress beside a running pipeline job: read the prefix, flush, then record.

The order is what makes a checkpoint honest. Every plan entry below the
completed prefix had finished before the flush began, so once the flush
returns those entries are on stable storage and a resume may skip them.
Recording first and flushing after would let a crash lose data a checkpoint
claims. Used by the in-process movers, the proxy-mover and the repository
source alike, so the rule lives in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol


class _Flushable(Protocol):
    def completed_prefix(self) -> int: ...
    def flush(self) -> None: ...


class Checkpointer:
    """A thread that records ``base + prefix`` every ``interval`` seconds, after a flush.

    Pass :meth:`start` as a pipeline ``on_start`` callback (or call it with the
    job), and :meth:`stop` when the run ends (or use it as a context manager).
    A flush that fails ends the thread quietly: the run itself reports the error.
    """

    def __init__(self, interval: float, record: Callable[[int], Any], *, base: int = 0,
                 name: str = "checkpoint") -> None:
        self.interval = interval
        self.record = record
        self.base = base
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            self.record(self.base + prefix)
            last = prefix

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
