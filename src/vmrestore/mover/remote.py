"""Restore one disk from a repository agent over TLS (repos://): the Python batch loop.

Demoted: plain repo:// restores run on the core's repository source
(mover/repo_source.py, ext/core/source_repo.c), which any target URI can
use. This loop stays only for TLS, because Python's TLS session cannot be
handed to C; it writes local files and block devices.

Planning runs the repository reader unchanged over RemoteSource (metadata
ranges only). The data phase pulls the plan's stored extents in batches over
several connections (one thread each, two requests in flight per
connection), decompresses and checks XXH3-128 on the proxy with the core's
GIL-free functions, and writes them. Python handles one *batch* of extents
at a time (up to 8 MiB); no Python code touches the bytes.

Robustness: a connection that drops is re-established (retry.py: bounded
retries with backoff and jitter) and the batch that was in flight is asked again: everything before
it was already verified and written. A batch whose bytes do not verify is
fetched again (a flipped bit on the wire); the same block failing every time
is a ChecksumError naming the disk, block and offset (the stored data is bad).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmrestore import core
from vmrestore.checkpoint import Checkpointer
from vmrestore.errors import (
    ChainError,
    ChecksumError,
    Interrupted,
    MoverError,
    ProtocolError,
    TargetError,
    TransportError,
)
from vmrestore.mover.client import Connection, RemoteFile, RepoURL
from vmrestore.plan import KIND_DATA, KIND_ZERO
from vmrestore.retry import Backoff, RetryPolicy

log = logging.getLogger("vmrestore.mover.remote")

BATCH_BYTES = 8 << 20
DEPTH = 2  # requests in flight per connection
CONNECTIONS = 4  # fetch threads (one connection each)
RETRIES = 5
REFETCHES = 2
ZERO_CHUNK = 8 << 20


@dataclass
class RemoteResult:
    """What a remote restore did (the proxy-mover's result line is built from it)."""

    disk: int
    target: str
    capacity: int
    bytes_written: int = 0  # logical data bytes written
    bytes_zeroed: int = 0
    bytes_skipped: int = 0  # zero ranges skipped (target known zero)
    stored_bytes: int = 0  # compressed extent bytes received
    wire_bytes: int = 0  # every byte received from the agent (frames + bulk)
    metadata_bytes: int = 0  # of which for planning
    seconds: float = 0.0
    resumed_bytes: int = 0  # covered by entries before start_entry
    entries: int = 0
    reconnects: int = 0
    refetches: int = 0
    connections: int = 0
    tls: bool = False
    busy_ns: dict[str, float] = field(default_factory=dict)  # "throttle": waits for max_rate
    settings: dict[str, int] | None = None  # {"max_rate": ...} when a rate limit was set

    @property
    def elapsed_ns(self) -> int:
        """The run's time, against which busy_ns is a share (disktask._add sums both)."""
        return int(self.seconds * 1e9)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        logical = self.bytes_written + self.bytes_zeroed + self.bytes_skipped
        d["wire_ratio"] = round(self.wire_bytes / logical, 4) if logical else 0.0
        d["mb_per_s"] = round(logical / self.seconds / 1e6, 1) if self.seconds else 0.0
        return d


class Connector:
    """Opens authenticated connections to one agent; counts reconnects."""

    def __init__(self, url: RepoURL, token: bytes, client: str | None = None) -> None:
        self.url = url
        self.token = token
        self.client = client

    def connect(self) -> Connection:
        return Connection(self.url, self.token, self.client)


@dataclass
class _Shared:
    """State the fetcher threads share: the work queue, counters and the first error."""

    batches: list[np.ndarray]
    first_index: list[int] = field(default_factory=list)  # plan index of each batch's first entry
    done: list[bool] = field(default_factory=list)
    next: int = 0
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stored: int = 0
    written: int = 0
    wire: int = 0
    reconnects: int = 0
    refetches: int = 0
    done_entries: int = 0
    max_rate: int = 0         # data bytes per second over all fetchers (0: no limit)
    t0: float = field(default_factory=time.monotonic)
    paced: int = 0            # data bytes let through so far
    throttle_s: float = 0.0   # time the fetchers waited for the rate, summed

    def pace(self, nbytes: int) -> None:
        """Hold a batch of nbytes data bytes back until the rate allows it.

        As in the core (docs/core.md, "Rate limit"): a batch may start at
        t0 + bytes_before_it / max_rate; waits are short sleeps so an error of
        another fetcher is seen.
        """
        if not self.max_rate:
            return
        with self.lock:
            due = self.t0 + self.paced / self.max_rate
            self.paced += nbytes
        start = time.monotonic()
        while self.error is None and (left := due - time.monotonic()) > 0:
            time.sleep(min(left, 0.02))
        waited = time.monotonic() - start
        if waited > 0.001:
            with self.lock:
                self.throttle_s += waited

    def prefix(self, total: int) -> int:
        """Plan entries [0, prefix) are all written (data entries are taken in plan order)."""
        with self.lock:
            for i, d in enumerate(self.done):
                if not d:
                    return self.first_index[i]
            return total

    def take(self) -> tuple[int, np.ndarray] | None:
        with self.lock:
            if self.error is not None or self.next >= len(self.batches):
                return None
            i = self.next
            self.next += 1
            return i, self.batches[i]

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e


def batches_of(data: np.ndarray, batch_bytes: int, max_ranges: int) -> list[np.ndarray]:
    """Split the data entries (sorted by src, src_off) into batches of one source each."""
    if not len(data):
        return []
    out: list[np.ndarray] = []
    csum = np.cumsum(data["stored_len"].astype(np.int64))
    start = 0
    n = len(data)
    while start < n:
        base = csum[start - 1] if start else 0
        end = int(np.searchsorted(csum, base + batch_bytes, side="right"))
        end = max(end, start + 1)
        end = min(end, start + max_ranges, n)
        src = data["src"][start]
        same = np.flatnonzero(data["src"][start:end] != src)
        if len(same):
            end = start + int(same[0])
        out.append(data[start:end])
        start = end
    return out


class _Target:
    """A local file or block device written with pwrite (the proxy-local target)."""

    def __init__(self, path: str, capacity: int, force: bool) -> None:
        self.path = path
        self.known_zero = False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(self.fd, capacity)
            self.known_zero = True
        elif stat.S_ISBLK(st.st_mode):
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if size < capacity:
                os.close(self.fd)
                raise TargetError(f"{path}: device of {size} bytes is smaller than the disk "
                                  f"({capacity} bytes)")
        elif stat.S_ISREG(st.st_mode):
            if not force:
                raise TargetError(f"{path}: exists (use --force to overwrite)")
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.ftruncate(self.fd, capacity)
        else:
            raise TargetError(f"{path}: not a regular file or block device")

    def pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        z = bytes(min(length, ZERO_CHUNK))
        while length > 0:
            n = min(length, len(z))
            self.pwrite(memoryview(z)[:n], offset)
            offset += n
            length -= n

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _fetch_batch(conn: Connection, files: dict[int, RemoteFile],
                 batch: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    src = int(batch["src"][0])
    ranges = [(int(o), int(n)) for o, n in zip(batch["src_off"], batch["stored_len"], strict=True)]
    rid = conn.request_extents(files[src], ranges)
    return rid, ranges


def _verify_and_write(batch: np.ndarray, recs: list[Any], buf: bytearray, out: bytearray,
                      target: _Target, disk: int, source_name: str) -> int | None:
    """Decompress and check each entry; returns the index of the first bad one, else writes all."""
    view = memoryview(buf)
    pos = 0
    for k, e in enumerate(batch):
        n = int(e["stored_len"])
        raw = int(e["length"])
        r = recs[k]
        if r.flags & 1 and (r.xxh_lo, r.xxh_hi, r.raw_len) != (
            int(e["xxh_lo"]), int(e["xxh_hi"]), raw
        ):
            raise ChecksumError(
                f"disk {disk}, block {int(e['block'])}: extent at offset {int(e['src_off'])} of "
                f"{source_name} is not the one the plan expects (the backup changed?)")
        dst = memoryview(out)[:raw]
        try:
            core.decompress_into(view[pos : pos + n], dst, int(e["codec"]))
            ok = core.xxh3_128(dst) == (int(e["xxh_lo"]), int(e["xxh_hi"]))
        except core.CodecError:
            ok = False
        if not ok:
            return k
        target.pwrite(dst, int(e["dst_off"]))
        pos += n
    return None


def _fetcher(sh: _Shared, connector: Connector, sources: list[str], sums: dict[str, bytes],
             target: _Target, disk: int, policy: RetryPolicy) -> None:
    conn: Connection | None = None
    files: dict[int, RemoteFile] = {}
    buf = bytearray(BATCH_BYTES)
    out = bytearray(8 << 20)
    pending: list[tuple[int, np.ndarray, int, list[tuple[int, int]]]] = []
    refetch = 0
    where = f"{connector.url.host}:{connector.url.port}"
    backoff = Backoff(policy, f"disk {disk}: repository agent {where}", give_up=lambda e, n: (
        TransportError(f"disk {disk}: lost the repository agent {where} and {n} reconnects "
                       f"failed: {e}")))

    def connect() -> Connection:
        c = connector.connect()
        files.clear()
        for i, rel in enumerate(sources):
            f = c.open(rel)
            if f.footer_sum != sums[rel]:
                raise ChainError(f"{rel} on the agent is not the restore point that was "
                                 "planned (footer checksum differs)")
            files[i] = f
        return c

    try:
        while True:
            try:
                if conn is None:
                    conn = connect()
                    for j, (i, b, _, _) in enumerate(pending):  # ask again what was lost
                        rid, rg = _fetch_batch(conn, files, b)
                        pending[j] = (i, b, rid, rg)
                while len(pending) < DEPTH:
                    item = sh.take()
                    if item is None:
                        break
                    sh.pace(int(item[1]["length"].sum()))
                    rid, rg = _fetch_batch(conn, files, item[1])
                    pending.append((item[0], item[1], rid, rg))
                if not pending:
                    break
                i, batch, rid, rg = pending[0]
                total = sum(n for _, n in rg)
                if len(buf) < total:
                    buf = bytearray(total)
                recs = conn.receive_extents(rid, rg, memoryview(buf))
                need = int(batch["length"].max())
                if len(out) < need:
                    out = bytearray(need)
                bad = _verify_and_write(batch, recs, buf, out, target, disk,
                                        sources[int(batch["src"][0])])
                with sh.lock:
                    sh.stored += total
                if bad is not None:
                    e = batch[bad]
                    refetch += 1
                    with sh.lock:
                        sh.refetches += 1
                    if refetch > REFETCHES:
                        raise ChecksumError(
                            f"disk {disk}, block {int(e['block'])}, offset {int(e['dst_off'])}: "
                            f"extent at offset {int(e['src_off'])} of "
                            f"{sources[int(e['src'])]} fails its checksum (fetched "
                            f"{refetch} times)")
                    log.warning("disk %d, block %d: checksum mismatch, fetching again",
                                disk, int(e["block"]))
                    rest = batch[bad:]
                    pending[0] = (i, rest, *_fetch_batch(conn, files, rest))
                    # Answers come in order: the re-request joins the back of the line.
                    pending.append(pending.pop(0))
                    continue
                refetch = 0
                backoff.reset()
                pending.pop(0)
                with sh.lock:
                    sh.done[i] = True
                    sh.written += int(batch["length"].sum())
                    sh.done_entries += len(batch)
            except (ConnectionError, TimeoutError, OSError, ProtocolError, MoverError) as e:
                if conn is None and isinstance(e, ProtocolError):
                    raise             # the agent answered, but not in our protocol
                if conn is not None:
                    # lost mid-stream: every error of the connection is worth a reconnect
                    with sh.lock:
                        sh.reconnects += 1
                        sh.wire += conn.wire_bytes
                    with contextlib.suppress(Exception):
                        conn.sock.close()
                    conn = None
                    if isinstance(e, MoverError) and not isinstance(e, ProtocolError):
                        raise
                    if isinstance(e, OSError) and not _network(e):
                        raise         # the target failed (pwrite), not the connection
                    e = TransportError(str(e))
                backoff.failed(e)     # could not (re)connect: auth/other point are final
    except BaseException as e:
        sh.fail(e)
    finally:
        if conn is not None:
            with sh.lock:
                sh.wire += conn.wire_bytes
            conn.close()


def _network(e: OSError) -> bool:
    """An error of the socket rather than of the local target file."""
    from vmrestore.retry import retryable

    return isinstance(e, ConnectionError | TimeoutError) or retryable(e)


class _Flushable:
    """The batch loop as the Checkpointer sees a pipeline: a completed prefix and a flush."""

    def __init__(self, sh: _Shared, target: _Target, total: int) -> None:
        self.sh, self.target, self.total = sh, target, total

    def completed_prefix(self) -> int:
        return self.sh.prefix(self.total)

    def flush(self) -> None:
        self.target.flush()

    def cancel(self) -> None:
        self.sh.fail(Interrupted("checkpoint failed"))


def run_tls_plan(remote: Any, url: RepoURL, token: bytes, disk: int, target: str, *,
                 start_entry: int = 0, end_entry: int | None = None,
                 connections: int = CONNECTIONS, force: bool = False, retries: int = RETRIES,
                 retry_deadline: float | None = None, client: str | None = None,
                 target_zeroed: bool | None = None, max_rate: int = 0,
                 progress: Callable[[int, int], None] | None = None,
                 on_checkpoint: Callable[[int], None] | None = None,
                 checkpoint_interval: float = 1.0, interval: float = 0.2) -> RemoteResult:
    """Write ``plan[start_entry:end_entry]`` of a plan made over TLS into a local file/device.

    ``remote`` is the repo_source.RemotePlan (planned by the disk task driver).
    ``target_zeroed`` (default: only for a file this call creates) skips zero
    runs. ``max_rate`` holds the data written to that many bytes per second.
    ``progress(done_bytes, completed_prefix)`` (both of the slice) runs
    every ``interval`` seconds; ``on_checkpoint(prefix)`` (entries of the whole
    plan) every ``checkpoint_interval`` seconds once the target was fsynced
    after the prefix was read. An exception from ``progress`` stops the run.
    """
    if connections < 1:
        raise TargetError("connections must be at least 1")
    t0 = time.monotonic()
    plan = remote.plan
    entries = plan.plan
    end = len(entries) if end_entry is None else end_entry
    connector = Connector(url, token, client)
    res = RemoteResult(disk, target, plan.capacity, tls=remote.tls, connections=connections)
    tgt = _Target(target, plan.capacity, force or start_entry > 0)
    if target_zeroed is not None:
        tgt.known_zero = target_zeroed
    try:
        part = entries[start_entry:end]
        res.resumed_bytes = int(entries["length"][:start_entry].sum())
        for e in part[part["kind"] == KIND_ZERO]:
            if tgt.known_zero:
                res.bytes_skipped += int(e["length"])
            else:
                tgt.zero(int(e["dst_off"]), int(e["length"]))
                res.bytes_zeroed += int(e["length"])
        idx = np.arange(len(part))
        sel = part["kind"] == KIND_DATA
        data, data_idx = part[sel], idx[sel]
        sh = _Shared(batches_of(data, BATCH_BYTES, 1024), max_rate=max_rate)
        pos = 0
        for b in sh.batches:
            sh.first_index.append(int(data_idx[pos]))
            sh.done.append(False)
            pos += len(b)
        policy = RetryPolicy(attempts=retries, deadline=retry_deadline)
        threads = [threading.Thread(target=_fetcher, name=f"fetch-{i}", daemon=True,
                                    args=(sh, connector, plan.sources, remote.sums, tgt, disk,
                                          policy))
                   for i in range(min(connections, max(1, len(sh.batches))))]
        for t in threads:
            t.start()
        ckpt = (Checkpointer(checkpoint_interval, on_checkpoint, base=start_entry,
                             name=f"ckpt-tls-disk{disk}") if on_checkpoint else None)
        try:
            if ckpt is not None:
                ckpt.start(_Flushable(sh, tgt, len(part)))
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(interval)
                if progress:
                    try:
                        progress(sh.written + res.bytes_zeroed + res.bytes_skipped,
                                 sh.prefix(len(part)))
                    except BaseException as e:
                        sh.fail(e)
                        for t in threads:
                            t.join()
        finally:
            if ckpt is not None:
                ckpt.stop()
        if sh.error is not None:
            raise sh.error
    finally:
        tgt.close()
    res.entries = len(entries)
    res.bytes_written = sh.written
    res.stored_bytes = sh.stored
    res.wire_bytes = sh.wire
    res.reconnects = sh.reconnects
    res.refetches = sh.refetches
    res.seconds = time.monotonic() - t0
    if max_rate:
        res.settings = {"max_rate": max_rate}
        res.busy_ns = {"throttle": sh.throttle_s * 1e9 / max(1, len(threads))}
    return res
