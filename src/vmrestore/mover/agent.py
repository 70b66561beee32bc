"""The repository agent: serves backup files under one root, read-only, to proxy movers.

Why a thread per connection: the agent's work per request is a few syscalls
(sendfile moves the bytes kernel-side), so threads spend their time blocked in
the kernel with the GIL released; a connection cannot slow the others down and
a broken one is simply closed. Nothing is served before the peer has proved it
knows the token (docs/protocol.md, "Handshake").
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrestore.errors import ProtocolError
from vmrestore.mover import protocol as P
from vmrestore.mover.protocol import E, T

log = logging.getLogger("vmrestore.mover.agent")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
MAX_CLIENTS = 64
SEND_CHUNK = 4 << 20

HEADER_MAGIC = b"VMRBAK\r\n"
FOOTER_MAGIC = b"VMREND\r\n"
FOOTER_SIZE = 128
SECTION = struct.Struct("<IIQQQ16s")
KIND_EXTENTS = 3


class RequestError(Exception):
    """A per-request refusal: answered with ERROR, the connection stays open."""

    def __init__(self, code: E, message: str) -> None:
        super().__init__(message)
        self.code = code


class RateLimit:
    """A token bucket shared by all connections (bytes per second; 0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class AgentConfig:
    root: Path
    tokens: dict[str | None, bytes]
    tls: ssl.SSLContext | None = None
    bwlimit: float = 0.0  # bytes per second, 0 = unlimited
    max_clients: int = MAX_CLIENTS
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2 only: it has the tls-unique binding the authentication transcript uses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class ServedFile:
    """One OPENed backup file: its fd, bounds, and (lazily) its extent table."""

    path: Path
    fd: int
    size: int
    data_end: int
    footer_sum: bytes
    extents_at: tuple[int, int] | None  # (offset, count) of the extent table section
    _table: Any = None

    def table(self) -> Any:
        """The extent table as a read-only memory map (only the pages touched are read)."""
        if self._table is None and self.extents_at is not None:
            import numpy as np

            off, count = self.extents_at
            dtype = np.dtype([("off", "<u8"), ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1"),
                              ("level", "i1"), ("flags", "<u2"), ("res", "<u4"),
                              ("lo", "<u8"), ("hi", "<u8"), ("blake", "V24")])
            if count == 0:
                self._table = np.zeros(0, dtype)
            else:
                self._table = np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=count)
        return self._table


def open_backup(root: Path, rel: str) -> ServedFile:
    """Resolve `rel` under root and open it if it is a complete backup file; else RequestError."""
    if not rel or rel.startswith("/") or "\\" in rel:
        raise RequestError(E.REFUSED_PATH, f"path {rel!r} must be relative to the agent's root")
    full = Path(os.path.realpath(root / rel))
    if full != root and root not in full.parents:
        raise RequestError(E.REFUSED_PATH, f"path {rel!r} leads outside the agent's root")
    if full.suffix != ".vmrb":
        raise RequestError(E.NOT_A_BACKUP, f"{rel}: not a *.vmrb backup file")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise RequestError(E.NOT_FOUND, f"{rel}: no such backup") from None
    except OSError as e:
        raise RequestError(E.IO_ERROR, f"{rel}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: not a regular file")
        size = st.st_size
        if size < P.DATA_START + FOOTER_SIZE:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: too short to be a complete backup")
        footer = os.pread(fd, FOOTER_SIZE, size - FOOTER_SIZE)
        if os.pread(fd, 8, 0) != HEADER_MAGIC or footer[:8] != FOOTER_MAGIC:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: not a complete vmrestore backup")
        count, tab_off, tab_len = struct.unpack_from("<IQQ", footer, 68)
        if count * SECTION.size != tab_len or not P.DATA_START <= tab_off <= size - tab_len:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: broken section table")
        table = os.pread(fd, tab_len, tab_off)
        data_end = tab_off
        extents_at = None
        for kind, _disk, off, length, nrec, _sum in SECTION.iter_unpack(table):
            if not P.DATA_START <= off <= size - length:
                raise RequestError(E.NOT_A_BACKUP, f"{rel}: section outside the file")
            data_end = min(data_end, off)
            if kind == KIND_EXTENTS and length == nrec * 64:
                extents_at = (off, nrec)
        return ServedFile(full, fd, size, data_end, footer[112:128], extents_at)
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Session:
    """One authenticated connection's state: its open files."""

    files: dict[int, ServedFile] = field(default_factory=dict)
    next_handle: int = 1

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files.clear()


class Agent:
    """Accepts connections on a listening socket and serves each in its own thread."""

    def __init__(self, cfg: AgentConfig, listener: socket.socket) -> None:
        self.cfg = cfg
        self.root = Path(os.path.realpath(cfg.root))
        self.listener = listener
        self.limiter = RateLimit(cfg.bwlimit)
        self.slots = threading.BoundedSemaphore(cfg.max_clients)
        self.stopping = threading.Event()
        self.bytes_sent = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            threading.Thread(target=self._serve_one, args=(conn, peer), daemon=True,
                             name=f"agent-{peer[0]}:{peer[1]}").start()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    # ----------------------------------------------------------------- one connection

    def _serve_one(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        who = f"{peer[0]}:{peer[1]}"
        if not self.slots.acquire(blocking=False):
            log.warning("refused %s: too many connections (%d)", who, self.cfg.max_clients)
            with contextlib.suppress(OSError):
                P.send_frame(conn, T.ERROR, 0, P.Error(E.BUSY, "too many connections").encode())
            conn.close()
            return
        session = Session()
        sock: socket.socket = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.cfg.handshake_timeout)
            sock, client = self._handshake(conn, who)
            log.info("client %r from %s authenticated%s", client, who,
                     " (TLS)" if sock is not conn else "")
            sock.settimeout(self.cfg.idle_timeout)
            self._requests(sock, session, who)
        except ProtocolError as e:
            log.warning("closing %s: protocol violation: %s", who, e)
            with contextlib.suppress(OSError, ValueError):
                P.send_frame(sock, T.ERROR, 0, P.Error(E.BAD_MESSAGE, str(e)).encode())
        except _Refused as e:
            log.warning("refused %s: %s", who, e)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as e:
            log.info("connection %s ended: %s", who, e)
        finally:
            session.close()
            with contextlib.suppress(OSError):
                sock.close()
            if sock is not conn:
                with contextlib.suppress(OSError):
                    conn.close()
            self.slots.release()

    def _handshake(self, conn: socket.socket, who: str) -> tuple[socket.socket, str]:
        fr = P.read_frame(conn)
        if fr.type != T.HELLO:
            raise ProtocolError(f"expected HELLO, got {fr.type.name}")
        hello = P.Hello.decode(fr.payload)
        if hello.max_version < P.MIN_VERSION or hello.min_version > P.VERSION:
            self._refuse(conn, E.UNSUPPORTED_VERSION,
                         f"protocol versions {hello.min_version}..{hello.max_version} "
                         f"not supported (agent speaks {P.MIN_VERSION}..{P.VERSION})")
        version = min(P.VERSION, hello.max_version)
        use_tls = self.cfg.tls is not None
        if hello.flags & P.FLAG_WANT_TLS and not use_tls:
            self._refuse(conn, E.TLS_UNAVAILABLE, "TLS asked for, but this agent has no "
                         "certificate (--tls-cert/--tls-key)")
        ok = P.HelloOk(version, P.FLAG_TLS if use_tls else 0, P.MAX_RANGES, P.MAX_EXTENTS_BULK)
        ok_bytes = ok.encode()
        P.send_frame(conn, T.HELLO_OK, fr.req_id, ok_bytes)
        sock: socket.socket = conn
        if use_tls:
            assert self.cfg.tls is not None
            sock = self.cfg.tls.wrap_socket(conn, server_side=True)
        fr2 = P.read_frame(sock)
        if fr2.type != T.AUTH:
            raise ProtocolError(f"expected AUTH, got {fr2.type.name}")
        auth = P.Auth.decode(fr2.payload)
        key = self.cfg.tokens.get(auth.client, self.cfg.tokens.get(None))
        known = key is not None
        if key is None:
            key = os.urandom(32)  # answer as usual; the proof below cannot match
        nonce = os.urandom(P.NONCE_SIZE)
        tr = P.transcript(fr.payload, ok_bytes, fr2.payload, nonce, P.channel_binding(sock))
        P.send_frame(sock, T.CHALLENGE, fr2.req_id,
                     P.Challenge(nonce, P.proof(key, b"agent", tr)).encode())
        try:
            fr3 = P.read_frame(sock)
        except ConnectionError:
            if not known:
                raise _Refused(f"unknown client {auth.client!r}: nothing served") from None
            raise _Refused(f"client {auth.client!r} hung up after the challenge (it did not "
                           "accept the agent's proof: wrong token?): nothing served") from None
        if fr3.type != T.PROOF:
            raise ProtocolError(f"expected PROOF, got {fr3.type.name}")
        mac = P.decode_proof(fr3.payload)
        if not known:
            self._refuse(sock, E.AUTH_FAILED, "authentication failed",
                         f"unknown client {auth.client!r}")
        if not hmac.compare_digest(mac, P.proof(key, b"proxy", tr)):
            self._refuse(sock, E.AUTH_FAILED, "authentication failed",
                         f"client {auth.client!r}: wrong token")
        P.send_frame(sock, T.READY, fr3.req_id)
        return sock, auth.client

    @staticmethod
    def _refuse(sock: socket.socket, code: E, message: str, why: str | None = None) -> None:
        with contextlib.suppress(OSError):
            P.send_frame(sock, T.ERROR, 0, P.Error(code, message).encode())
        raise _Refused(why or message)

    def _requests(self, sock: socket.socket, s: Session, who: str) -> None:
        tls = isinstance(sock, ssl.SSLSocket)
        while True:
            try:
                fr = P.read_frame(sock)
            except ConnectionError:
                return
            if fr.type == T.BYE:
                P.decode_empty(fr.payload, "BYE")
                return
            try:
                self._one_request(sock, s, fr, tls)
            except RequestError as e:
                log.info("%s: %s refused: %s", who, fr.type.name, e)
                P.send_frame(sock, T.ERROR, fr.req_id, P.Error(e.code, str(e)).encode())

    def _handle(self, s: Session, h: int) -> ServedFile:
        f = s.files.get(h)
        if f is None:
            raise RequestError(E.BAD_HANDLE, f"no open file with handle {h}")
        return f

    def _one_request(self, sock: socket.socket, s: Session, fr: P.Frame, tls: bool) -> None:
        if fr.type == T.OPEN:
            rel = P.decode_path(fr.payload, "OPEN")
            if len(s.files) >= P.MAX_HANDLES:
                raise RequestError(E.TOO_LARGE, f"more than {P.MAX_HANDLES} open files")
            f = open_backup(self.root, rel)
            h = s.next_handle
            s.next_handle += 1
            s.files[h] = f
            P.send_frame(sock, T.OPENED, fr.req_id,
                         P.Opened(h, f.size, f.data_end, f.footer_sum).encode())
        elif fr.type == T.LIST:
            rel = P.decode_path(fr.payload, "LIST", allow_empty=True)
            P.send_frame(sock, T.LISTING, fr.req_id, P.encode_listing(self._list(rel)))
        elif fr.type == T.READ:
            rd = P.Read.decode(fr.payload)
            f = self._handle(s, rd.handle)
            if rd.length > P.MAX_READ:
                raise RequestError(E.TOO_LARGE, f"READ of {rd.length} bytes (max {P.MAX_READ})")
            if rd.offset + rd.length > f.size:
                raise RequestError(E.BAD_RANGE, f"READ {rd.offset}+{rd.length} past the end "
                                   f"of {f.path.name} ({f.size} bytes)")
            self._send_with_bulk(sock, T.DATA, fr.req_id, P.Data(rd.offset, rd.length).encode(),
                                 f.fd, [(rd.offset, rd.length)], tls)
        elif fr.type == T.EXTENTS:
            ex = P.Extents.decode(fr.payload)
            f = self._handle(s, ex.handle)
            records = self._records(f, ex.ranges)
            self._send_with_bulk(sock, T.EXTENT_DATA, fr.req_id, P.encode_extent_data(records),
                                 f.fd, list(ex.ranges), tls)
        elif fr.type == T.CLOSE:
            h = P.decode_handle(fr.payload, "CLOSE")
            f = self._handle(s, h)
            del s.files[h]
            os.close(f.fd)
            P.send_frame(sock, T.CLOSED, fr.req_id)
        else:
            raise ProtocolError(f"{fr.type.name} is not a request")

    def _list(self, rel: str) -> list[str]:
        d = Path(os.path.realpath(self.root / rel)) if rel else self.root
        if rel.startswith("/") or (d != self.root and self.root not in d.parents):
            raise RequestError(E.REFUSED_PATH, f"directory {rel!r} is outside the agent's root")
        try:
            names = sorted(e.name for e in os.scandir(d)
                           if e.name.endswith(".vmrb") and e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            raise RequestError(E.NOT_FOUND, f"{rel}: no such directory") from None
        except OSError as e:
            raise RequestError(E.IO_ERROR, f"{rel}: {e.strerror}") from None
        return names[: P.MAX_LISTING]

    def _records(self, f: ServedFile, ranges: tuple[tuple[int, int], ...]) -> list[P.Record]:
        total = 0
        for off, n in ranges:
            if n == 0 or off < P.DATA_START or off + n > f.data_end:
                raise RequestError(E.BAD_RANGE, f"extent {off}+{n} is outside the stored data "
                                   f"of {f.path.name} [{P.DATA_START}, {f.data_end})")
            total += n
        if total > P.MAX_EXTENTS_BULK:
            raise RequestError(E.TOO_LARGE, f"EXTENTS asks {total} bytes "
                               f"(max {P.MAX_EXTENTS_BULK})")
        table = f.table()
        if table is None or len(table) == 0:
            return [P.Record(o, n) for o, n in ranges]
        import numpy as np

        offs = np.fromiter((o for o, _ in ranges), dtype=np.uint64, count=len(ranges))
        idx = np.minimum(np.searchsorted(table["off"], offs), len(table) - 1)
        hit = table[idx]
        out = []
        for k, (o, n) in enumerate(ranges):
            r = hit[k]
            if int(r["off"]) == o and int(r["stored"]) == n:
                out.append(P.Record(o, n, int(r["raw"]), int(r["codec"]), P.REC_EXACT,
                                    int(r["lo"]), int(r["hi"])))
            else:
                out.append(P.Record(o, n))
        return out

    def _send_with_bulk(self, sock: socket.socket, mtype: T, req_id: int, payload: bytes,
                        fd: int, ranges: list[tuple[int, int]], tls: bool) -> None:
        """The answer frame, then the ranges' bytes: sendfile when plain, pread+send under TLS."""
        head = P.frame(mtype, req_id, payload)
        merged: list[list[int]] = []
        for off, n in ranges:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1][1] += n
            else:
                merged.append([off, n])
        if tls:
            sock.sendall(head)
            for off, n in merged:
                self._send_tls(sock, fd, off, n)
        else:
            sock.sendall(head, socket.MSG_MORE)
            for off, n in merged:
                self._sendfile(sock, fd, off, n)

    def _sendfile(self, sock: socket.socket, fd: int, off: int, n: int) -> None:
        out = sock.fileno()
        timeout = sock.gettimeout()
        while n > 0:
            chunk = min(n, SEND_CHUNK)
            self.limiter.take(chunk)
            try:
                sent = os.sendfile(out, fd, off, chunk)
            except BlockingIOError:
                _, w, _ = select.select([], [out], [], timeout)
                if not w:
                    raise TimeoutError("peer does not read (send timed out)") from None
                continue
            if sent == 0:
                raise ConnectionError(f"file ended at {off} while sending: it shrank")
            off += sent
            n -= sent
            self._count(sent)

    def _send_tls(self, sock: socket.socket, fd: int, off: int, n: int) -> None:
        while n > 0:
            chunk = min(n, 1 << 20)
            data = os.pread(fd, chunk, off)
            if not data:
                raise ConnectionError(f"file ended at {off} while sending: it shrank")
            self.limiter.take(len(data))
            sock.sendall(data)
            off += len(data)
            n -= len(data)
            self._count(len(data))

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


class _Refused(Exception):
    """The handshake refused the peer (already answered); only logged."""


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(128)
    return s
