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

Robustness: a connection that drops is re-established (bounded retries with
backoff) and the batch that was in flight is asked again: everything before
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
from vmrestore.errors import (
    AuthenticationError,
    ChainError,
    ChecksumError,
    MoverError,
    ProtocolError,
    RemoteError,
    TargetError,
    TransportError,
    UsageError,
)
from vmrestore.mover.client import Connection, RemoteFile, RemoteSource, RepoURL
from vmrestore.plan import KIND_DATA, KIND_ZERO

log = logging.getLogger("vmrestore.mover.remote")

BATCH_BYTES = 8 << 20
DEPTH = 2  # requests in flight per connection
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
             target: _Target, disk: int, retries: int) -> None:
    conn: Connection | None = None
    files: dict[int, RemoteFile] = {}
    buf = bytearray(BATCH_BYTES)
    out = bytearray(8 << 20)
    pending: list[tuple[int, np.ndarray, int, list[tuple[int, int]]]] = []
    attempts = 0
    refetch = 0

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
                attempts = 0
                pending.pop(0)
                with sh.lock:
                    sh.done[i] = True
                    sh.written += int(batch["length"].sum())
                    sh.done_entries += len(batch)
            except (ConnectionError, TimeoutError, OSError, ProtocolError) as e:
                if isinstance(e, ProtocolError) and conn is None:
                    raise
                attempts += 1
                with sh.lock:
                    sh.reconnects += 1
                if conn is not None:
                    with sh.lock:
                        sh.wire += conn.wire_bytes
                    with contextlib.suppress(Exception):
                        conn.sock.close()
                conn = None
                if attempts > retries:
                    raise TransportError(
                        f"disk {disk}: lost the repository agent {connector.url.host}:"
                        f"{connector.url.port} and {retries} reconnects failed: {e}") from None
                delay = min(0.2 * 2 ** (attempts - 1), 5.0)
                log.warning("disk %d: connection to the agent lost (%s); reconnect %d/%d in "
                            "%.1f s", disk, e, attempts, retries, delay)
                time.sleep(delay)
            except MoverError as e:
                if isinstance(e, RemoteError | AuthenticationError) or conn is not None:
                    raise
                # Could not reconnect (agent down): retry within the same bound.
                attempts += 1
                if attempts > retries:
                    raise TransportError(f"disk {disk}: cannot reach the repository agent "
                                         f"again after {retries} attempts: {e}") from None
                time.sleep(min(0.2 * 2 ** (attempts - 1), 5.0))
    except BaseException as e:
        sh.fail(e)
    finally:
        if conn is not None:
            with sh.lock:
                sh.wire += conn.wire_bytes
            conn.close()


def open_remote_chain(conn: Connection, rel: str, point: str | None = None) -> Any:
    """The chain of the restore point `rel` on the agent (reader over RemoteSource)."""
    from vmrestore.repository.reader import open_chain

    chain = open_chain(RemoteSource(conn, rel))
    return chain.at(point) if point else chain


def restore_remote_disk(url: RepoURL, token: bytes, disk: int, target: str, *,
                        point: str | None = None, connections: int = 4, force: bool = False,
                        retries: int = RETRIES, client: str | None = None,
                        start_entry: int = 0, target_zeroed: bool | None = None,
                        progress: Callable[[int, int, int], None] | None = None) -> RemoteResult:
    """Restore disk `disk` of the backup at `url` into the local file/device `target`.

    ``start_entry`` resumes: plan entries before it are taken as done.
    ``target_zeroed`` (default: only for a file this call creates) skips zero
    runs. ``progress(done_bytes, total_bytes, completed_prefix)`` is called
    about 5 times a second; the prefix counts plan entries all written, for
    the caller's checkpoints (flushed to the target only at the end).
    """
    from vmrestore.repository.plan import build_plan

    if connections < 1:
        raise UsageError("connections must be at least 1")
    t0 = time.monotonic()
    connector = Connector(url, token, client)
    conn = connector.connect()
    try:
        chain = open_remote_chain(conn, url.path, point)
        plan = build_plan(chain, disk)
        sums = {p.path: p.footer.checksum for p in chain.points}
        meta = conn.wire_bytes
        tls = conn.tls
    finally:
        conn.close()
    res = RemoteResult(disk, target, plan.capacity, metadata_bytes=meta, tls=tls,
                       connections=connections)
    tgt = _Target(target, plan.capacity, force or start_entry > 0)
    if target_zeroed is not None:
        tgt.known_zero = target_zeroed
    try:
        entries = plan.plan
        res.resumed_bytes = int(entries["length"][:start_entry].sum())
        idx = np.arange(len(entries))
        keep = idx >= start_entry
        for e in entries[keep & (entries["kind"] == KIND_ZERO)]:
            if tgt.known_zero:
                res.bytes_skipped += int(e["length"])
            else:
                tgt.zero(int(e["dst_off"]), int(e["length"]))
                res.bytes_zeroed += int(e["length"])
        sel = keep & (entries["kind"] == KIND_DATA)
        data, data_idx = entries[sel], idx[sel]
        sh = _Shared(batches_of(data, BATCH_BYTES, 1024))
        pos = 0
        for b in sh.batches:
            sh.first_index.append(int(data_idx[pos]))
            sh.done.append(False)
            pos += len(b)
        threads = [threading.Thread(target=_fetcher, name=f"fetch-{i}", daemon=True,
                                    args=(sh, connector, plan.sources, sums, tgt, disk, retries))
                   for i in range(min(connections, max(1, len(sh.batches))))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
            if progress:
                progress(res.resumed_bytes + sh.written + res.bytes_zeroed + res.bytes_skipped,
                         plan.capacity, sh.prefix(len(entries)))
        if sh.error is not None:
            raise sh.error
    finally:
        tgt.close()
    res.entries = len(entries)
    res.bytes_written = sh.written
    res.stored_bytes = sh.stored
    res.wire_bytes = meta + sh.wire
    res.reconnects = sh.reconnects
    res.refetches = sh.refetches
    res.seconds = time.monotonic() - t0
    return res
