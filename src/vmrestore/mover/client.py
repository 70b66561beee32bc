"""The proxy side of the mover protocol: authenticated connections to a repository agent.

A `Connection` speaks docs/protocol.md over one socket and counts the bytes
it received (the "bytes on the wire" of the report). `RemoteSource` is a
served file as the repository reader's ByteSource, so open_chain and the plan
builder run unchanged on the proxy without the data being local; the data
itself is then pulled extent by extent (remote.py / the C repo source).
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmrestore.errors import AuthenticationError, MoverError, ProtocolError, RemoteError, UsageError
from vmrestore.mover import protocol as P
from vmrestore.mover.protocol import E, T
from vmrestore.mover.url import RepoURL

log = logging.getLogger("vmrestore.mover.client")

CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 120.0
TOKEN_ENV = "VMRESTORE_REPO_TOKEN"


def load_token(token_file: str | None = None) -> bytes:
    """The per-job token: from a file, else from $VMRESTORE_REPO_TOKEN."""
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as e:
            raise UsageError(f"token file {token_file}: {e.strerror}") from None
    else:
        text = os.environ.get(TOKEN_ENV, "")
        if not text:
            raise UsageError(f"a repository URL needs a token: --token-file or ${TOKEN_ENV}")
    token = text.strip().encode("utf-8")
    if len(token) < P.MIN_TOKEN or len(token.split()) != 1:
        raise UsageError(f"the token must be one word of at least {P.MIN_TOKEN} characters")
    return token


def client_tls_context(ca: str | None) -> ssl.SSLContext:
    """TLS 1.2 (tls-unique binding); the certificate is checked only when a CA is given.

    Without a CA the HMAC transcript, which includes the channel binding, is
    what proves the agent: a man in the middle cannot produce it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(ca)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _CountingSocket:
    """Counts received bytes under the framing helpers (wire bytes for the report)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        n = self.sock.recv_into(buffer, nbytes)
        self.received += n
        return n

    def sendall(self, data: bytes, /) -> None:
        self.sock.sendall(data)


@dataclass(frozen=True)
class RemoteFile:
    handle: int
    path: str
    size: int
    data_end: int
    footer_sum: bytes


class Connection:
    """One authenticated connection to an agent. Not thread-safe: one user at a time."""

    def __init__(self, url: RepoURL, token: bytes, client: str | None = None,
                 timeout: float = IO_TIMEOUT) -> None:
        self.url = url
        self.client = client or socket.gethostname()[: P.MAX_NAME] or "proxy"
        self._ids = itertools.count(1)
        self.version = 0
        self.tls = False
        self.max_ranges = P.MAX_RANGES
        self.max_bulk = P.MAX_EXTENTS_BULK
        try:
            raw = socket.create_connection((url.host, url.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise MoverError(f"cannot connect to repository agent {url.host}:{url.port}: "
                             f"{e.strerror or e}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        try:
            self._handshake(raw, token)
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(timeout)
        self.io = _CountingSocket(self.sock)

    # ------------------------------------------------------------------ handshake

    def _expect(self, sock: socket.socket | _CountingSocket, want: T) -> P.Frame:
        try:
            fr = P.read_frame(sock)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise MoverError(f"repository agent {self.url.host}:{self.url.port} dropped the "
                             f"connection during the handshake: {e}") from None
        if fr.type == T.ERROR:
            err = P.Error.decode(fr.payload)
            cls = AuthenticationError if err.code == E.AUTH_FAILED else RemoteError
            raise cls(f"repository agent {self.url.host}:{self.url.port} refused: "
                      f"{err.message} ({err.name()})", *([err.code] if cls is RemoteError else []))
        if fr.type != want:
            raise ProtocolError(f"expected {want.name}, agent sent {fr.type.name}")
        return fr

    def _handshake(self, raw: socket.socket, token: bytes) -> None:
        hello = P.Hello(P.MIN_VERSION, P.VERSION, P.FLAG_WANT_TLS if self.url.tls else 0).encode()
        P.send_frame(raw, T.HELLO, 0, hello)
        fr = self._expect(raw, T.HELLO_OK)
        ok = P.HelloOk.decode(fr.payload)
        if not P.MIN_VERSION <= ok.version <= P.VERSION:
            raise ProtocolError(f"agent chose protocol version {ok.version}")
        self.version, self.max_ranges = ok.version, min(ok.max_ranges, P.MAX_RANGES)
        self.max_bulk = min(ok.max_bulk, P.MAX_EXTENTS_BULK)
        sock: socket.socket = raw
        if ok.flags & P.FLAG_TLS:
            try:
                sock = client_tls_context(self.url.ca).wrap_socket(raw)
            except (ssl.SSLError, OSError) as e:
                raise MoverError(f"TLS with {self.url.host}:{self.url.port} failed: {e}") from None
            self.tls = True
        elif self.url.tls:
            raise ProtocolError("agent did not start TLS although it was asked to")
        self.sock = sock
        nonce = os.urandom(P.NONCE_SIZE)
        auth = P.Auth(nonce, self.client).encode()
        P.send_frame(sock, T.AUTH, 0, auth)
        ch = P.Challenge.decode(self._expect(sock, T.CHALLENGE).payload)
        tr = P.transcript(hello, fr.payload, auth, ch.nonce, P.channel_binding(sock))
        if not hmac.compare_digest(ch.proof, P.proof(token, b"agent", tr)):
            raise AuthenticationError(
                f"repository agent {self.url.host}:{self.url.port} could not prove it knows "
                "the token (wrong token, or someone in the middle): not using it")
        P.send_frame(sock, T.PROOF, 0, P.proof(token, b"proxy", tr))
        self._expect(sock, T.READY)

    # ------------------------------------------------------------------ requests

    @property
    def wire_bytes(self) -> int:
        return self.io.received

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    def send(self, mtype: T, payload: bytes = b"") -> int:
        rid = self.next_id()
        P.send_frame(self.io, mtype, rid, payload)
        return rid

    def reply(self, rid: int, want: T) -> P.Frame:
        """The answer to request `rid` (answers come in request order)."""
        fr = P.read_frame(self.io)
        if fr.req_id != rid:
            raise ProtocolError(f"answer to request {fr.req_id} while waiting for {rid}")
        if fr.type == T.ERROR:
            err = P.Error.decode(fr.payload)
            raise RemoteError(f"repository agent: {err.message} ({err.name()})", err.code)
        if fr.type != want:
            raise ProtocolError(f"expected {want.name}, agent sent {fr.type.name}")
        return fr

    def open(self, path: str) -> RemoteFile:
        rid = self.send(T.OPEN, P.encode_path(path))
        o = P.Opened.decode(self.reply(rid, T.OPENED).payload)
        return RemoteFile(o.handle, path, o.size, o.data_end, o.footer_sum)

    def close_file(self, f: RemoteFile) -> None:
        rid = self.send(T.CLOSE, struct.pack("<I", f.handle))
        self.reply(rid, T.CLOSED)

    def list(self, directory: str) -> list[str]:
        rid = self.send(T.LIST, P.encode_path(directory))
        return P.decode_listing(self.reply(rid, T.LISTING).payload)

    def read(self, f: RemoteFile, offset: int, length: int) -> bytes:
        """Any byte range of the file (metadata), in requests of at most MAX_READ."""
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            n = min(P.MAX_READ, length - pos)
            rid = self.send(T.READ, P.Read(f.handle, offset + pos, n).encode())
            d = P.Data.decode(self.reply(rid, T.DATA).payload)
            if d.offset != offset + pos or d.length != n:
                raise ProtocolError(f"DATA for {d.offset}+{d.length}, asked {offset + pos}+{n}")
            P.recv_exact_into(self.io, view[pos : pos + n])
            pos += n
        return bytes(out)

    def request_extents(self, f: RemoteFile, ranges: list[tuple[int, int]]) -> int:
        return self.send(T.EXTENTS, P.Extents(f.handle, tuple(ranges)).encode())

    def receive_extents(self, rid: int, ranges: list[tuple[int, int]],
                        into: memoryview) -> list[P.Record]:
        """Read the records and the bulk bytes of one EXTENTS answer into `into` (back to back)."""
        recs = P.decode_extent_data(self.reply(rid, T.EXTENT_DATA).payload)
        if len(recs) != len(ranges) or any(
            (r.offset, r.length) != rg for r, rg in zip(recs, ranges, strict=True)
        ):
            raise ProtocolError("EXTENT_DATA records do not match the ranges asked")
        total = sum(n for _, n in ranges)
        if len(into) < total:
            raise ValueError("buffer too small for the extents asked")
        P.recv_exact_into(self.io, into[:total])
        return recs

    def detach_fd(self) -> int:
        """Hand the (plain, authenticated) socket's fd to C; this object is unusable after."""
        if self.tls:
            raise MoverError("a TLS connection cannot be handed to the C source")
        self.sock.setblocking(True)
        return self.sock.detach()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            P.send_frame(self.sock, T.BYE, self.next_id())
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- remote files


class RemoteSource:
    """A backup file served by the agent, as the repository reader's ByteSource.

    The reader (repository.reader.open_chain) and the plan builder run
    unchanged on the proxy: they ask for the header, sections and footer, and
    this object fetches exactly those ranges; parents are found through
    `sibling` / `siblings` (OPEN / LIST on the same connection). ``path`` is
    the file's path relative to the agent's root: it is what the plan's
    source list holds, and what the data phase re-opens on its connections.
    """

    def __init__(self, conn: Connection, rel: str) -> None:
        self.conn = conn
        self.file = conn.open(rel)
        self.path = rel
        self.size = self.file.size

    def pread(self, length: int, offset: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        return self.conn.read(self.file, offset, length)

    def sibling(self, name: str) -> RemoteSource:
        rel = _join(_dirname(self.path), PurePosixPath(name).name)
        try:
            return RemoteSource(self.conn, rel)
        except RemoteError as e:
            if e.code == E.NOT_FOUND:
                raise FileNotFoundError(rel) from None
            raise

    def siblings(self) -> list[str]:
        return self.conn.list(_dirname(self.path))

    def close(self) -> None:
        with contextlib.suppress(MoverError, OSError):
            self.conn.close_file(self.file)


def _dirname(rel: str) -> str:
    d = str(PurePosixPath(rel).parent)
    return "" if d == "." else d


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name
