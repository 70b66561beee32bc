"""The mover wire format, version 1 (docs/protocol.md): framing, messages, limits.

One module owns the bytes; agent.py and client.py only move them. Every
decoder raises ProtocolError (never IndexError, struct.error or
UnicodeDecodeError) on any malformed input, because the agent feeds it bytes
from unauthenticated peers; tests/mover fuzz this module with hypothesis.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from vmrestore.errors import ProtocolError

VERSION = 1
MIN_VERSION = 1
MAGIC = b"VM"
HELLO_MAGIC = b"VMRMOVER"

HEADER = struct.Struct("<2sBBIII")  # magic, type, flags, request id, length, crc32
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 16

MAX_PAYLOAD = 1 << 20
MAX_RANGES = 4096
MAX_READ = 16 << 20
MAX_EXTENTS_BULK = 64 << 20
MAX_HANDLES = 64
MAX_PATH = 4096
MAX_LISTING = 4096
MAX_NAME = 255
MAX_ERROR_TEXT = 1000
NONCE_SIZE = 32
MAC_SIZE = 32
MIN_TOKEN = 16
DATA_START = 4096  # stored extents start after the 4 KiB header (docs/format.md)

FLAG_WANT_TLS = 0x1  # HELLO
FLAG_TLS = 0x1  # HELLO_OK: TLS follows on this socket
REC_EXACT = 0x1  # EXTENT_DATA record: the range is exactly one stored extent


class T(IntEnum):
    """Message types."""

    HELLO = 1
    HELLO_OK = 2
    ERROR = 3
    AUTH = 4
    CHALLENGE = 5
    PROOF = 6
    READY = 7
    OPEN = 16
    OPENED = 17
    LIST = 18
    LISTING = 19
    READ = 20
    DATA = 21
    EXTENTS = 22
    EXTENT_DATA = 23
    CLOSE = 24
    CLOSED = 25
    BYE = 26


class E(IntEnum):
    """Error codes of ERROR messages."""

    BAD_MESSAGE = 1
    UNSUPPORTED_VERSION = 2
    AUTH_FAILED = 3
    TLS_UNAVAILABLE = 4
    NOT_FOUND = 5
    REFUSED_PATH = 6
    NOT_A_BACKUP = 7
    BAD_RANGE = 8
    TOO_LARGE = 9
    IO_ERROR = 10
    BAD_HANDLE = 11
    BUSY = 12


# Errors after which the sender closes the connection.
FATAL_ERRORS = frozenset(
    {E.BAD_MESSAGE, E.UNSUPPORTED_VERSION, E.AUTH_FAILED, E.TLS_UNAVAILABLE, E.BUSY}
)
_TYPES = frozenset(int(t) for t in T)


# --------------------------------------------------------------------------- frames


def frame(mtype: int, req_id: int, payload: bytes = b"") -> bytes:
    """One frame: header (with CRC over header and payload) + payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = struct.pack("<2sBBII", MAGIC, mtype, 0, req_id, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


@dataclass(frozen=True)
class Frame:
    type: T
    req_id: int
    payload: bytes


def parse_header(head: bytes) -> tuple[T, int, int, int]:
    """Check a 16-byte header; returns (type, request id, payload length, crc)."""
    if len(head) != HEADER_SIZE:
        raise ProtocolError(f"frame header of {len(head)} bytes, expected {HEADER_SIZE}")
    magic, mtype, flags, req_id, length, crc = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if mtype not in _TYPES:
        raise ProtocolError(f"unknown message type {mtype}")
    if flags != 0:
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"payload length {length} exceeds {MAX_PAYLOAD}")
    return T(mtype), req_id, length, crc


def check_frame(head: bytes, payload: bytes) -> Frame:
    """Validate header + payload (CRC included) into a Frame."""
    mtype, req_id, length, crc = parse_header(head)
    if len(payload) != length:
        raise ProtocolError(f"payload of {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload, zlib.crc32(head[:12])) != crc:
        raise ProtocolError(f"bad CRC on a {mtype.name} frame")
    return Frame(mtype, req_id, payload)


def split_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Parse as many whole frames as `data` holds; returns them and the rest (tests, fuzzing)."""
    out: list[Frame] = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        head = data[pos : pos + HEADER_SIZE]
        _, _, length, _ = parse_header(head)
        if len(data) - pos - HEADER_SIZE < length:
            break
        payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        out.append(check_frame(head, payload))
        pos += HEADER_SIZE + length
    return out, data[pos:]


class Conn(Protocol):
    """What the framing needs of a socket (plain or TLS)."""

    def recv_into(self, buffer: memoryview, nbytes: int = ...) -> int: ...
    def sendall(self, data: bytes, /) -> None: ...


def recv_exact(sock: Conn, n: int) -> bytes:
    """Read exactly n bytes; a closed peer is a ConnectionError."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def recv_exact_into(sock: Conn, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed by peer ({got} of {n} bytes received)")
        got += k


def read_frame(sock: Conn) -> Frame:
    """Read and check one frame (header first, so an oversized one allocates nothing)."""
    head = recv_exact(sock, HEADER_SIZE)
    _, _, length, _ = parse_header(head)
    payload = recv_exact(sock, length) if length else b""
    return check_frame(head, payload)


def send_frame(sock: Conn, mtype: int, req_id: int, payload: bytes = b"") -> None:
    sock.sendall(frame(mtype, req_id, payload))


# --------------------------------------------------------------------------- messages


class _Reader:
    """Bounds-checked cursor over a payload: every short read is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"{self.what}: payload too short")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def text(self, n: int) -> str:
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: text is not UTF-8") from None

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


@dataclass(frozen=True)
class Hello:
    min_version: int
    max_version: int
    flags: int

    def encode(self) -> bytes:
        return HELLO_MAGIC + struct.pack("<HHI", self.min_version, self.max_version, self.flags)

    @classmethod
    def decode(cls, p: bytes) -> Hello:
        r = _Reader(p, "HELLO")
        if r.take(8) != HELLO_MAGIC:
            raise ProtocolError("HELLO: not a vmrestore mover")
        lo, hi, flags = r.unpack("HHI")
        r.end()
        if lo > hi:
            raise ProtocolError(f"HELLO: version range {lo}..{hi} is empty")
        return cls(lo, hi, flags)


@dataclass(frozen=True)
class HelloOk:
    version: int
    flags: int
    max_ranges: int
    max_bulk: int

    def encode(self) -> bytes:
        return struct.pack("<HIII", self.version, self.flags, self.max_ranges, self.max_bulk)

    @classmethod
    def decode(cls, p: bytes) -> HelloOk:
        r = _Reader(p, "HELLO_OK")
        v = cls(*r.unpack("HIII"))
        r.end()
        return v


@dataclass(frozen=True)
class Error:
    code: int
    message: str

    def encode(self) -> bytes:
        text = self.message.encode("utf-8")[:MAX_ERROR_TEXT]
        return struct.pack("<I", self.code) + text

    @classmethod
    def decode(cls, p: bytes) -> Error:
        r = _Reader(p, "ERROR")
        (code,) = r.unpack("I")
        rest = r.rest()
        if len(rest) > MAX_ERROR_TEXT:
            raise ProtocolError("ERROR: message too long")
        return cls(code, rest.decode("utf-8", errors="replace"))

    def name(self) -> str:
        try:
            return E(self.code).name
        except ValueError:
            return f"code {self.code}"


@dataclass(frozen=True)
class Auth:
    nonce: bytes
    client: str

    def encode(self) -> bytes:
        name = self.client.encode("utf-8")
        return self.nonce + struct.pack("<H", len(name)) + name

    @classmethod
    def decode(cls, p: bytes) -> Auth:
        r = _Reader(p, "AUTH")
        nonce = r.take(NONCE_SIZE)
        (n,) = r.unpack("H")
        if not 1 <= n <= MAX_NAME:
            raise ProtocolError(f"AUTH: client name of {n} bytes")
        name = r.text(n)
        r.end()
        return cls(nonce, name)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    proof: bytes

    def encode(self) -> bytes:
        return self.nonce + self.proof

    @classmethod
    def decode(cls, p: bytes) -> Challenge:
        r = _Reader(p, "CHALLENGE")
        v = cls(r.take(NONCE_SIZE), r.take(MAC_SIZE))
        r.end()
        return v


def decode_proof(p: bytes) -> bytes:
    r = _Reader(p, "PROOF")
    mac = r.take(MAC_SIZE)
    r.end()
    return mac


def decode_empty(p: bytes, what: str) -> None:
    if p:
        raise ProtocolError(f"{what}: payload should be empty")


def _check_path(text: str, what: str) -> str:
    if "\x00" in text:
        raise ProtocolError(f"{what}: NUL in path")
    return text


def encode_path(path: str) -> bytes:
    raw = path.encode("utf-8")
    if len(raw) > MAX_PATH:
        raise ProtocolError(f"path of {len(raw)} bytes exceeds {MAX_PATH}")
    return raw


def decode_path(p: bytes, what: str, allow_empty: bool = False) -> str:
    if len(p) > MAX_PATH:
        raise ProtocolError(f"{what}: path of {len(p)} bytes exceeds {MAX_PATH}")
    if not p and not allow_empty:
        raise ProtocolError(f"{what}: empty path")
    return _check_path(_Reader(p, what).text(len(p)), what)


@dataclass(frozen=True)
class Opened:
    handle: int
    size: int
    data_end: int
    footer_sum: bytes

    def encode(self) -> bytes:
        return struct.pack("<IQQ", self.handle, self.size, self.data_end) + self.footer_sum

    @classmethod
    def decode(cls, p: bytes) -> Opened:
        r = _Reader(p, "OPENED")
        h, size, end = r.unpack("IQQ")
        s = r.take(16)
        r.end()
        if not DATA_START <= end <= size:
            raise ProtocolError(f"OPENED: data end {end} outside the file of {size} bytes")
        return cls(h, size, end, s)


def encode_listing(names: list[str]) -> bytes:
    return b"\x00".join(n.encode("utf-8") for n in names)


def decode_listing(p: bytes) -> list[str]:
    if not p:
        return []
    names = [x for x in _Reader(p, "LISTING").text(len(p)).split("\x00")]
    if len(names) > MAX_LISTING or any(not n or "/" in n for n in names):
        raise ProtocolError("LISTING: bad file names")
    return names


@dataclass(frozen=True)
class Read:
    handle: int
    offset: int
    length: int

    def encode(self) -> bytes:
        return struct.pack("<IQI", self.handle, self.offset, self.length)

    @classmethod
    def decode(cls, p: bytes) -> Read:
        r = _Reader(p, "READ")
        v = cls(*r.unpack("IQI"))
        r.end()
        return v


@dataclass(frozen=True)
class Data:
    offset: int
    length: int

    def encode(self) -> bytes:
        return struct.pack("<QI", self.offset, self.length)

    @classmethod
    def decode(cls, p: bytes) -> Data:
        r = _Reader(p, "DATA")
        v = cls(*r.unpack("QI"))
        r.end()
        return v


RANGE = struct.Struct("<QII")
RECORD = struct.Struct("<QIIBB6xQQ")
assert RANGE.size == 16 and RECORD.size == 40


@dataclass(frozen=True)
class Extents:
    handle: int
    ranges: tuple[tuple[int, int], ...]  # (offset, length)

    def encode(self) -> bytes:
        out = [struct.pack("<II", self.handle, len(self.ranges))]
        out += [RANGE.pack(o, n, 0) for o, n in self.ranges]
        return b"".join(out)

    @classmethod
    def decode(cls, p: bytes) -> Extents:
        r = _Reader(p, "EXTENTS")
        handle, count = r.unpack("II")
        if count == 0 or count > MAX_RANGES:
            raise ProtocolError(f"EXTENTS: {count} ranges (1..{MAX_RANGES} allowed)")
        if len(p) != 8 + count * RANGE.size:
            raise ProtocolError("EXTENTS: payload length does not match the range count")
        ranges = tuple((o, n) for o, n, _ in RANGE.iter_unpack(p[8:]))
        return cls(handle, ranges)


@dataclass(frozen=True)
class Record:
    offset: int
    length: int
    raw_len: int = 0
    codec: int = 0
    flags: int = 0
    xxh_lo: int = 0
    xxh_hi: int = 0

    def encode(self) -> bytes:
        return RECORD.pack(self.offset, self.length, self.raw_len, self.codec, self.flags,
                           self.xxh_lo, self.xxh_hi)


def encode_extent_data(records: list[Record]) -> bytes:
    return struct.pack("<II", len(records), 0) + b"".join(r.encode() for r in records)


def decode_extent_data(p: bytes) -> list[Record]:
    r = _Reader(p, "EXTENT_DATA")
    count, _ = r.unpack("II")
    if count == 0 or count > MAX_RANGES or len(p) != 8 + count * RECORD.size:
        raise ProtocolError(f"EXTENT_DATA: bad record count {count}")
    recs = [Record(*v) for v in RECORD.iter_unpack(p[8:])]
    if sum(x.length for x in recs) > MAX_EXTENTS_BULK:
        raise ProtocolError("EXTENT_DATA: announces more bulk bytes than allowed")
    return recs


def decode_handle(p: bytes, what: str) -> int:
    r = _Reader(p, what)
    (h,) = r.unpack("I")
    r.end()
    return h


def decode(fr: Frame) -> object:
    """Decode any frame's payload to its message object (used by the fuzz tests)."""
    t, p = fr.type, fr.payload
    decoders = {
        T.HELLO: Hello.decode,
        T.HELLO_OK: HelloOk.decode,
        T.ERROR: Error.decode,
        T.AUTH: Auth.decode,
        T.CHALLENGE: Challenge.decode,
        T.PROOF: decode_proof,
        T.OPEN: lambda b: decode_path(b, "OPEN"),
        T.OPENED: Opened.decode,
        T.LIST: lambda b: decode_path(b, "LIST", allow_empty=True),
        T.LISTING: decode_listing,
        T.READ: Read.decode,
        T.DATA: Data.decode,
        T.EXTENTS: Extents.decode,
        T.EXTENT_DATA: decode_extent_data,
        T.CLOSE: lambda b: decode_handle(b, "CLOSE"),
    }
    if t in decoders:
        return decoders[t](p)
    decode_empty(p, t.name)
    return None


# --------------------------------------------------------------------------- auth


def load_tokens(text: str) -> dict[str | None, bytes]:
    """Parse a token file: one token (any client: key None) or `NAME TOKEN` lines."""
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError("the token file is empty")
    if len(lines) == 1 and len(lines[0].split()) == 1:
        table: dict[str | None, bytes] = {None: lines[0].encode("utf-8")}
    else:
        table = {}
        for ln in lines:
            parts = ln.split()
            if len(parts) != 2:
                raise ValueError(f"token file line {ln[:20]!r}…: expected 'NAME TOKEN'")
            table[parts[0]] = parts[1].encode("utf-8")
    for key in table.values():
        if len(key) < MIN_TOKEN:
            raise ValueError(f"a token is shorter than {MIN_TOKEN} characters")
    return table


def proof(key: bytes, role: bytes, transcript: bytes) -> bytes:
    """HMAC-SHA256 of role label + transcript (role: b"agent" or b"proxy")."""
    return hmac.new(key, b"vmrp1 " + role + transcript, hashlib.sha256).digest()


def transcript(hello: bytes, hello_ok: bytes, auth: bytes, agent_nonce: bytes,
               binding: bytes | None) -> bytes:
    return hello + hello_ok + auth + agent_nonce + (binding or b"")


def channel_binding(sock: socket.socket) -> bytes | None:
    """TLS `tls-unique` of an SSL socket, None for a plain one."""
    get = getattr(sock, "get_channel_binding", None)
    if get is None:
        return None
    return get("tls-unique")
