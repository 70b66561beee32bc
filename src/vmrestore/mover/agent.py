"""The repository agent: serves backup files under one root, read-only, to proxy movers.

Why a thread per connection: the agent's work per request is a few syscalls
(sendfile moves the bytes kernel-side), so threads spend their time blocked in
the kernel with the GIL released; a connection cannot slow the others down and
a broken one is simply closed. Nothing is served before the peer has proved it
knows the token (docs/protocol.md, "Handshake").

Robust against its peers and its own files (docs/protocol.md, "Limits and
deadlines"): a connection must finish the whole handshake within
handshake_timeout and each request frame within idle_timeout of the previous
answer (one reaper thread shuts down sockets past their deadline, so a peer
sending a byte every few seconds gains nothing); unauthenticated connections
have their own, larger budget, and a served slot (max_clients) is taken only
once the peer proved the token, so silent or hostile connections cannot starve
proxies. Files are read only with pread/sendfile on the handle OPEN returned
(never mapped, never reopened by path): a file truncated while served gives
that client an error, not a SIGBUS that kills the agent; a file replaced by
rename keeps being served from the handle, as opened.
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
from vmrestore.safeopen import NotAFileError, open_readonly

log = logging.getLogger("vmrestore.mover.agent")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
MAX_CLIENTS = 64
PENDING_PER_CLIENT = 4   # unauthenticated connections allowed per served slot (at least 256)
TABLE_STRIDE = 512       # extent records per window of the sparse index (32 KiB reads)
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
    max_pending: int = 0  # unauthenticated connections at once (0: PENDING_PER_CLIENT x, >= 256)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2 only: it has the tls-unique binding the authentication transcript uses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _record_dtype() -> Any:
    import numpy as np

    return np.dtype([("off", "<u8"), ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1"),
                     ("level", "i1"), ("flags", "<u2"), ("res", "<u4"),
                     ("lo", "<u8"), ("hi", "<u8"), ("blake", "V24")])


@dataclass
class ServedFile:
    """One OPENed backup file: its fd, bounds, and (lazily) a sparse index of its extent table.

    The table is read through the handle with pread, TABLE_STRIDE records at a
    time: a lookup costs one 32 KiB read, a file of millions of extents costs
    its sparse index (one 8-byte read per window, once), and nothing is mapped
    (a mapping of a file truncated under it faults the whole process).
    """

    path: Path
    fd: int
    size: int
    data_end: int
    footer_sum: bytes
    extents_at: tuple[int, int] | None  # (offset, count) of the extent table section
    _index: Any = None  # first stored offset of every TABLE_STRIDE-th record

    def pread_exact(self, n: int, off: int) -> bytes:
        """n bytes at off of the open file; RequestError when it is shorter now."""
        try:
            data = os.pread(self.fd, n, off)
        except OSError as e:
            raise RequestError(E.IO_ERROR, f"{self.path.name}: read failed: {e.strerror}") \
                from None
        if len(data) != n:
            raise RequestError(E.IO_ERROR, f"{self.path.name} changed while served: "
                               f"it ends before {off + n} (truncated)")
        return data

    def check_unchanged(self) -> None:
        """Refuse to serve a file that shrank since OPEN (its bounds no longer hold)."""
        now = os.fstat(self.fd).st_size
        if now < self.size:
            raise RequestError(E.IO_ERROR, f"{self.path.name} changed while served: "
                               f"{now} bytes now, {self.size} when opened (truncated)")

    def window(self, k: int) -> Any:
        """Records [k*STRIDE, (k+1)*STRIDE) of the extent table, read through the handle."""
        import numpy as np

        assert self.extents_at is not None
        off, count = self.extents_at
        first = k * TABLE_STRIDE
        n = min(TABLE_STRIDE, count - first)
        return np.frombuffer(self.pread_exact(n * 64, off + first * 64), _record_dtype())

    def index(self) -> Any:
        """Stored offset of the first record of each window (None: no extent table)."""
        if self._index is None and self.extents_at is not None:
            import numpy as np

            off, count = self.extents_at
            firsts = range(0, count, TABLE_STRIDE)
            self._index = np.array([struct.unpack("<Q", self.pread_exact(8, off + i * 64))[0]
                                    for i in firsts], dtype=np.uint64)
        return self._index


def open_backup(root: Path, rel: str) -> ServedFile:
    """Resolve `rel` under root and open it if it is a complete backup file; else RequestError."""
    if not rel or rel.startswith("/") or "\\" in rel:
        raise RequestError(E.REFUSED_PATH, f"path {rel!r} must be relative to the agent's root")
    full = Path(os.path.realpath(root / rel))
    if full != root and root not in full.parents:
        raise RequestError(E.REFUSED_PATH, f"path {rel!r} leads outside the agent's root")
    if full.suffix != ".vmrb":
        raise RequestError(E.NOT_A_BACKUP, f"{rel}: not a *.vmrb backup file")
    try:  # O_NONBLOCK + fstat inside: a FIFO named like a backup never blocks the thread
        fd = open_readonly(full, block_ok=False, flags=os.O_NOFOLLOW)
    except FileNotFoundError:
        raise RequestError(E.NOT_FOUND, f"{rel}: no such backup") from None
    except NotAFileError as e:
        raise RequestError(E.NOT_A_BACKUP, f"{rel}: {e.strerror}") from None
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
        if os.pread(fd, 8, 0) != HEADER_MAGIC or footer[:8] != FOOTER_MAGIC or \
                len(footer) != FOOTER_SIZE:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: not a complete vmrestore backup")
        count, tab_off, tab_len = struct.unpack_from("<IQQ", footer, 68)
        if count * SECTION.size != tab_len or not P.DATA_START <= tab_off <= size - tab_len:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: broken section table")
        table = os.pread(fd, tab_len, tab_off)
        if len(table) != tab_len:
            raise RequestError(E.NOT_A_BACKUP, f"{rel}: truncated while opened")
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


class Deadlines:
    """One reaper thread for all connections: shuts a socket down when its deadline passes.

    A per-recv socket timeout bounds silence, not slowness: a peer sending one
    byte every few seconds would hold its thread and slot forever. A deadline
    over a whole phase (the handshake, one request frame) does not care how the
    bytes trickle in; shutdown() wakes the thread blocked in recv, which then
    closes the connection. Keyed by file descriptor: clear() comes before the
    socket is closed, under the same lock, so a reused number is never hit.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[int, tuple[float, int]] = {}   # fd -> (deadline, address family)
        self._expired: set[int] = set()
        self._thread: threading.Thread | None = None

    def set(self, sock: socket.socket, seconds: float) -> None:
        with self._cv:
            self._due[sock.fileno()] = (time.monotonic() + seconds, sock.family)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="agent-deadlines")
                self._thread.start()
            self._cv.notify()

    def clear(self, fd: int) -> bool:
        """Forget fd's deadline; True when it had already passed (the socket was shut down)."""
        with self._cv:
            self._due.pop(fd, None)
            if fd in self._expired:
                self._expired.discard(fd)
                return True
            return False

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                for fd, (due, family) in list(self._due.items()):
                    if due <= now:
                        del self._due[fd]
                        self._expired.add(fd)
                        with contextlib.suppress(OSError):  # a dup: shutdown acts on the socket
                            s = socket.fromfd(fd, family, socket.SOCK_STREAM)
                            s.shutdown(socket.SHUT_RDWR)
                            s.close()
                nxt = min((d for d, _ in self._due.values()), default=now + 60)
                self._cv.wait(max(0.01, min(nxt - now, 60)))


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
        self.pending = threading.BoundedSemaphore(
            cfg.max_pending or max(256, PENDING_PER_CLIENT * cfg.max_clients))
        self.deadlines = Deadlines()
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
        if not self.pending.acquire(blocking=False):
            log.warning("refused %s: too many connections not yet authenticated", who)
            with contextlib.suppress(OSError):
                P.send_frame(conn, T.ERROR, 0, P.Error(E.BUSY, "too many connections").encode())
            conn.close()
            return
        session = Session()
        sock: socket.socket = conn
        fd = conn.fileno()
        pending, served = True, False
        phase = f"handshake not finished in {self.cfg.handshake_timeout:g} s"
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.cfg.handshake_timeout)
            self.deadlines.set(conn, self.cfg.handshake_timeout)
            sock, client, ready_id = self._handshake(conn, who)
            # a served slot only for a peer that proved the token
            if not self.slots.acquire(blocking=False):
                self._refuse(sock, E.BUSY, "too many connections",
                             f"too many clients served ({self.cfg.max_clients})")
            served = True
            P.send_frame(sock, T.READY, ready_id)
            self.deadlines.clear(fd)
            self.pending.release()
            pending = False
            log.info("client %r from %s authenticated%s", client, who,
                     " (TLS)" if sock is not conn else "")
            sock.settimeout(self.cfg.idle_timeout)
            phase = f"no complete request in {self.cfg.idle_timeout:g} s"
            self._requests(sock, session, who)
        except ProtocolError as e:
            log.warning("closing %s: protocol violation: %s", who, e)
            with contextlib.suppress(OSError, ValueError):
                P.send_frame(sock, T.ERROR, 0, P.Error(E.BAD_MESSAGE, str(e)).encode())
        except _Refused as e:
            log.warning("refused %s: %s", who, e)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError, ValueError) as e:
            if self.deadlines.clear(fd) or isinstance(e, TimeoutError):
                log.warning("closing %s: %s", who, phase)
            else:
                log.info("connection %s ended: %s", who, e)
        finally:
            self.deadlines.clear(fd)
            session.close()
            with contextlib.suppress(OSError):
                sock.close()
            if sock is not conn:
                with contextlib.suppress(OSError):
                    conn.close()
            if served:
                self.slots.release()
            if pending:
                self.pending.release()

    def _handshake(self, conn: socket.socket, who: str) -> tuple[socket.socket, str, int]:
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
        return sock, auth.client, fr3.req_id

    @staticmethod
    def _refuse(sock: socket.socket, code: E, message: str, why: str | None = None) -> None:
        with contextlib.suppress(OSError):
            P.send_frame(sock, T.ERROR, 0, P.Error(code, message).encode())
        raise _Refused(why or message)

    def _requests(self, sock: socket.socket, s: Session, who: str) -> None:
        tls = isinstance(sock, ssl.SSLSocket)
        while True:
            self.deadlines.set(sock, self.cfg.idle_timeout)  # the whole frame, not each byte
            try:
                fr = P.read_frame(sock)
            except ConnectionError:
                if self.deadlines.clear(sock.fileno()):
                    raise TimeoutError("idle") from None
                return
            self.deadlines.clear(sock.fileno())
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
            f.check_unchanged()
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
        f.check_unchanged()
        index = f.index()
        if index is None or len(index) == 0:
            return [P.Record(o, n) for o, n in ranges]
        import numpy as np

        offs = np.fromiter((o for o, _ in ranges), dtype=np.uint64, count=len(ranges))
        wins = np.maximum(np.searchsorted(index, offs, side="right") - 1, 0)
        windows: dict[int, Any] = {}
        out = []
        for k, (o, n) in enumerate(ranges):
            w = int(wins[k])
            if w not in windows:
                windows[w] = f.window(w)
            tab = windows[w]
            i = int(np.searchsorted(tab["off"], o))
            r = tab[min(i, len(tab) - 1)]
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
