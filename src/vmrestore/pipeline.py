"""The face of the compiled block pipeline (ext/core/pipeline.c): typed, and errors typed.

A :class:`Job` restores one plan (``vmrestore.plan.PLAN_DTYPE`` entries) from
chain files into one open :class:`Writer` (see ``vmrestore.transport.uri``).
The C threads run with the GIL released; Python only starts the job, polls
counters between waits, and turns the core's (code, message, plan index,
disk offset) error into the matching class of ``vmrestore.errors``.

Ctrl-C: :meth:`Job.run` waits in short slices, so a KeyboardInterrupt lands
between them; it then cancels the job, waits for the workers to finish or
abort their in-flight requests, and raises :class:`~vmrestore.errors.Interrupted`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NoReturn

import numpy as np

from vmrestore.errors import CORE_CLASSES, Interrupted, SourceError, VmrError, from_core
from vmrestore.plan import PLAN_DTYPE, PLAN_VERSION
from vmrestore.safeopen import open_readonly

try:
    from vmrestore import _pipeline
except ImportError as e:  # pragma: no cover - only on a broken install
    raise VmrError(
        f"vmrestore's compiled pipeline is missing ({e}); run scripts/bootstrap.sh "
        "or 'python setup.py build_ext --inplace' to build it"
    ) from e

log = logging.getLogger("vmrestore.pipeline")

assert _pipeline.PLAN_VERSION == PLAN_VERSION, "ext/core/pipeline.h and plan.py disagree"
_CORE_CODES = {_pipeline.E_CHECKSUM: "checksum", _pipeline.E_SOURCE: "source",
               _pipeline.E_TARGET: "target", _pipeline.E_TRANSPORT: "transport",
               _pipeline.E_INTERRUPTED: "interrupted", _pipeline.E_INTERNAL: "internal"}
assert _CORE_CODES == {k: v[0] for k, v in CORE_CLASSES.items()}, \
    "ext/core/writer.h and errors.CORE_CLASSES disagree"

Writer = _pipeline.Writer
CoreError = _pipeline.CoreError

F_TARGET_ZEROED: int = _pipeline.F_TARGET_ZEROED
F_NO_DIRECT: int = _pipeline.F_NO_DIRECT
F_CREATE: int = _pipeline.F_CREATE
F_FORCE: int = _pipeline.F_FORCE

# Measured defaults (docs/core.md, "Measured defaults"): on 2 cores, 2 decompress
# threads keep up with one NVMe-class writer; 16 requests in flight hide NBD latency.
DEFAULT_READERS = 1
DEFAULT_THREADS = 2
DEFAULT_QUEUE_DEPTH = 16
DEFAULT_FILE_LANES = 2
# NBD connections when the server offers multi-conn (one lane each): nbdkit serves one
# connection's requests one at a time, and two of them took a warm 2 GiB restore from
# 1.47-1.54 to 1.15-1.17 s (zstd) and 1.24 to 1.00-1.04 s (lz4) (docs/benchmarks.md,
# "second round"); four were no faster on two cores.
DEFAULT_NBD_CONNECTIONS = 2
# NBD early writeback (writer_nbd.c): one unwaited flush every N MiB written over all
# connections, so the server's disk writes back while we decompress (docs/core.md sweep).
DEFAULT_NBD_FLUSH_EVERY_MIB = 64
# NBD request size (URI request-size=KiB; 0 = one request per block): a larger block goes
# out as several writes (writer_nbd.c). 256 KiB, nbdcopy's size: nbdkit's file plugin spent
# 3-7x the time per byte in 1 MiB writes, and the sweeps leaned to 256 (docs/benchmarks.md).
DEFAULT_NBD_REQUEST_KIB = 256
# Quick rollback (compare mode): each reader thread reads and hashes the target's blocks
# with its own read handle (an NBD connection), so readers are the compare's parallelism.
DEFAULT_COMPARE_READERS = 4


@dataclass(frozen=True)
class Settings:
    """Knobs of one job; 0 means 'the measured default'."""

    readers: int = 0
    threads: int = 0
    lanes: int = 0
    queue_depth: int = 0
    buffers: int = 0
    max_rate: int = 0    # data bytes per second, 0 = no limit (not a measured default)


@dataclass(frozen=True)
class Counters:
    """A snapshot of the job's counters (all monotonic while it runs)."""

    bytes_read: int
    bytes_decompressed: int
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int
    read_ns: int
    decompress_ns: int
    write_ns: int
    entries_done: int
    completed_prefix: int
    entries_total: int
    elapsed_ns: int
    readers: int
    threads: int
    lanes: int
    queue_depth: int
    buffers: int
    running: bool
    bytes_total: int = 0          # logical bytes the plan covers (computed once, in Python)
    # compare mode (quick rollback, ext/core/compare.h); all 0 otherwise
    cmp_entries: int = 0          # plan entries compared with the target
    cmp_differ: int = 0           # of those, entries the target did not hold (then restored)
    cmp_bytes_read: int = 0       # bytes read from the target to compare
    cmp_known_zero: int = 0       # zero-run bytes the target reported as holes (not read)
    bytes_same: int = 0           # bytes the target already held (not written)
    compare_ns: int = 0           # busy time of the compare stage (read + hash), summed
    throttle_ns: int = 0          # time readers waited for the rate limit (max_rate), summed

    @property
    def bytes_done(self) -> int:
        """Logical disk bytes finished: written + zeroed + skipped (known zero) + already
        held by the target (compare mode)."""
        return self.bytes_written + self.bytes_zeroed + self.bytes_skipped + self.bytes_same

    @property
    def busy_ns(self) -> dict[str, float]:
        """Busy time per stage, normalised by its thread count (comparable to elapsed)."""
        out = {
            "read": self.read_ns / max(1, self.readers),
            "decompress": self.decompress_ns / max(1, self.threads),
            "write": self.write_ns / max(1, self.lanes),
        }
        if self.cmp_entries:
            out["compare"] = self.compare_ns / max(1, self.readers)
        if self.throttle_ns:  # held back by --max-rate: what bounded the run
            out["throttle"] = self.throttle_ns / max(1, self.readers)
        return out

    @property
    def busy(self) -> dict[str, float]:
        """Busy fraction (0..1) of each stage over the elapsed time."""
        el = max(1, self.elapsed_ns)
        return {k: min(1.0, v / el) for k, v in self.busy_ns.items()}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name for f in fields(Counters)} - {"bytes_total"}


def _counters(raw: dict[str, Any], total: int) -> Counters:
    return Counters(**{k: raw[k] for k in _FIELDS}, bytes_total=total)


def core_error(e: CoreError, disk: int, sources: Sequence[str] = ()) -> VmrError:
    """The vmrestore.errors exception for a core error (errors.from_core: the one translation)."""
    return from_core(e, disk=disk, sources=sources)


def raise_core_error(e: CoreError, disk: int, sources: Sequence[str] = ()) -> NoReturn:
    raise core_error(e, disk, sources) from None


def as_plan(plan: np.ndarray) -> np.ndarray:
    """The plan as a contiguous PLAN_DTYPE array (no copy when it already is one)."""
    if plan.dtype != PLAN_DTYPE:
        raise ValueError(f"plan dtype {plan.dtype} is not PLAN_DTYPE")
    return np.ascontiguousarray(plan)


class Job:
    """One pipeline run: plan + chain files + writer. Use as a context manager.

    ``completed_prefix()`` and ``flush()`` may be called from another thread
    while ``run()`` is waiting: that is how checkpoints are taken (read the
    prefix, flush, then record it durably; a resume runs ``plan[prefix:]``).
    """

    def __init__(self, plan: np.ndarray, sources: Sequence[str], writer: Any, *,
                 disk: int = 0, settings: Settings | None = None,
                 repo: dict[str, Any] | None = None, compare: bool = False) -> None:
        """``repo``: read from repository-agent sockets instead of local files.

        A dict built by vmrestore.mover.repo_source (fds, handles, readers, ...);
        the sockets belong to the job from here on. ``sources`` then only names
        the chain files in messages.

        ``compare``: quick rollback. The target already holds a version of the
        disk: each entry is first read from it and hashed (XXH3-128, the backup's
        checksum; zero runs must read as zeros) and only entries that differ are
        restored. Needs a writer with a read side (``capabilities()["read"]``)
        that is not marked as reading zeros; give it ``plan.compare_plan(...)``.
        """
        s = settings or Settings()
        self.disk = disk
        self.sources = list(sources)
        self.plan = as_plan(plan)
        self.bytes_total = int(self.plan["length"].sum()) if len(self.plan) else 0
        self._fds: list[int] = []
        try:
            for path in self.sources if repo is None else ():
                try:
                    self._fds.append(open_readonly(path))
                except OSError as e:
                    raise SourceError(f"{path}: cannot open: {e.strerror}") from None
            caps = writer.capabilities()
            lanes = s.lanes or writer.preferred_lanes or (
                DEFAULT_NBD_CONNECTIONS if caps["async"] else DEFAULT_FILE_LANES)
            if not caps["multi_conn"]:
                lanes = 1
            readers = s.readers or (DEFAULT_COMPARE_READERS if compare else DEFAULT_READERS)
            if compare and repo is not None:
                readers = int(repo["readers"])
            try:
                self._p = _pipeline.Pipeline(
                    self.plan.view(np.uint8), self._fds, writer,
                    readers=readers, threads=s.threads or DEFAULT_THREADS,
                    lanes=lanes, queue_depth=s.queue_depth or DEFAULT_QUEUE_DEPTH,
                    buffers=s.buffers, disk=disk, repo=repo, compare=compare,
                    max_rate=s.max_rate)
            except CoreError as e:
                raise_core_error(e, disk, self.sources)
        except BaseException:
            self._close_fds()
            raise
        self.writer = writer

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def start(self) -> None:
        try:
            self._p.start()
        except CoreError as e:
            raise_core_error(e, self.disk, self.sources)

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._p.wait(timeout))

    def cancel(self) -> None:
        self._p.cancel()

    def flush(self, timeout: float | None = None) -> None:
        """Make every completed write durable (safe from another thread while running).

        After the job ended (or was closed) this returns at once if it ended
        well (every lane flushed at its end), else raises the job's error.
        """
        try:
            self._p.flush(timeout)
        except CoreError as e:
            raise_core_error(e, self.disk, self.sources)

    def counters(self) -> Counters:
        """A snapshot; after close(), the final counters."""
        return _counters(self._p.counters(), self.bytes_total)

    def source_stats(self) -> dict[str, int]:
        """Repository source: wire_bytes, bulk_bytes, requests (zeros for local files)."""
        return dict(self._p.source_stats())

    def completed_prefix(self) -> int:
        """Leading plan entries fully written (durable after the next flush())."""
        return self.counters().completed_prefix

    def check(self) -> None:
        """Raise the job's first error, if any."""
        e = self._p.error()
        if e is not None:
            raise_core_error(e, self.disk, self.sources)

    def run(self, on_counters: Callable[[Counters], None] | None = None,
            interval: float = 0.25, on_start: Callable[[Job], None] | None = None) -> Counters:
        """Start, wait (calling on_counters every interval), raise the job's error if any.

        on_start(job) runs right after the threads started (e.g. to start a
        checkpoint thread that calls completed_prefix() and flush()).
        """
        self.start()
        try:
            if on_start is not None:
                on_start(self)
            while not self.wait(interval):
                if on_counters is not None:
                    on_counters(self.counters())
        except KeyboardInterrupt:
            self.cancel()
            self.wait()
            raise Interrupted(f"disk {self.disk}: interrupted") from None
        self.check()
        c = self.counters()
        if on_counters is not None:
            on_counters(c)
        return c

    def close(self) -> None:
        """Join the threads (cancel first if running), free the pool; idempotent.

        Safe while another thread is inside flush() (the core waits for it).
        """
        p = getattr(self, "_p", None)
        if p is not None:
            p.close()
        self._close_fds()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
