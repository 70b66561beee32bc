"""Progress display shared by all commands: rich bars on a terminal, plain lines otherwise.

The whole API::

    from vmrestore import ui
    with ui.Display(quiet=args.quiet) as display:     # or ui.Display(mode="plain")
        task = display.task("disk 0", total=nbytes)   # one bar / line per unit of work
        task.update(completed=n)                      # absolute (or advance=delta)
        display.log("phase 3: snapshot created")      # a message above the bars
        task.done()

``mode``: "auto" (rich when stderr is a TTY, else plain), "rich", "plain" or
"none"; the environment variable ``VMRESTORE_PROGRESS`` overrides "auto".
``quiet=True`` is "none". Plain mode prints one line per task at most every
``interval`` seconds and one when it finishes, e.g.
``disk 0: 45% 115.2/256.0 MiB 210.3 MB/s``. Everything goes to stderr so
``--json`` output on stdout stays clean. All methods are thread-safe:
a poller thread may update while the main thread logs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any

MODES = ("auto", "rich", "plain", "none")


def _fmt_amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:.0f} {unit}"
    for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"


class Task:
    """One unit of progress (a disk, a file); create with ``Display.task``."""

    def __init__(self, display: Display, label: str, total: float | None, unit: str) -> None:
        self.display = display
        self.label = label
        self.total = total
        self.unit = unit
        self.completed: float = 0
        self.started = time.monotonic()
        self.finished = False
        self._last_print = 0.0
        self._rich_id: Any = None

    def update(self, completed: float | None = None, advance: float | None = None,
               total: float | None = None) -> None:
        self.display._update(self, completed, advance, total)

    def done(self) -> None:
        self.display._done(self)

    def line(self) -> str:
        """The plain-text status of this task."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"{self.label}:"]
        if self.total:
            parts.append(f"{100 * self.completed / self.total:.0f}%")
            if self.unit == "bytes":
                scale, suffix = ((1 << 30, "GiB") if self.total >= 1 << 30 else (1 << 20, "MiB"))
                parts.append(f"{self.completed / scale:.1f}/{self.total / scale:.1f} {suffix}")
            else:
                parts.append(f"{self.completed:.0f}/{self.total:.0f} {self.unit}")
        else:
            parts.append(_fmt_amount(self.completed, self.unit))
        if self.unit == "bytes":
            parts.append(f"{self.completed / elapsed / 1e6:.1f} MB/s")
        if self.finished:
            parts.append(f"done in {elapsed:.1f} s")
        return " ".join(parts)


class Display:
    """Owns the terminal (stderr) for one command run; see the module doc."""

    def __init__(self, *, quiet: bool = False, mode: str = "auto", interval: float = 2.0,
                 stream: IO[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if quiet:
            mode = "none"
        elif mode == "auto":
            env = os.environ.get("VMRESTORE_PROGRESS", "")
            if env in MODES and env != "auto":
                mode = env
            else:
                isatty = getattr(self.stream, "isatty", lambda: False)()
                mode = "rich" if isatty else "plain"
        self.mode = mode
        self.interval = interval
        self._lock = threading.Lock()
        self._rich: Any = None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                  TimeRemainingColumn(),
                                  console=Console(file=self.stream), transient=False)
            self._rich.start()

    def task(self, label: str, total: float | None = None, unit: str = "bytes") -> Task:
        """Start showing progress for one unit of work."""
        t = Task(self, label, total, unit)
        with self._lock:
            if self._rich is not None:
                t._rich_id = self._rich.add_task(label, total=total)
        return t

    def log(self, message: str) -> None:
        """A line of text for the user (not a log record): above the bars, or plain."""
        with self._lock:
            if self.mode == "none":
                return
            if self._rich is not None:
                self._rich.console.print(message, markup=False, highlight=False)
            else:
                print(message, file=self.stream, flush=True)

    def _update(self, t: Task, completed: float | None, advance: float | None,
                total: float | None) -> None:
        with self._lock:
            if total is not None:
                t.total = total
            if completed is not None:
                t.completed = completed
            if advance:
                t.completed += advance
            if self._rich is not None:
                self._rich.update(t._rich_id, completed=t.completed, total=t.total)
            elif self.mode == "plain":
                now = time.monotonic()
                if now - t._last_print >= self.interval:
                    if t._last_print:  # not the first update: something to say
                        print(t.line(), file=self.stream, flush=True)
                    t._last_print = now

    def _done(self, t: Task) -> None:
        with self._lock:
            if t.finished:
                return
            t.finished = True
            if t.total:
                t.completed = max(t.completed, t.total) if t.unit != "bytes" else t.completed
            if self._rich is not None:
                self._rich.update(t._rich_id, completed=t.completed, total=t.total or t.completed)
            elif self.mode == "plain":
                print(t.line(), file=self.stream, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None

    def __enter__(self) -> Display:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
