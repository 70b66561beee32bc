"""The bytes of backup format v1 (docs/format.md): header, footer, section table, index dtypes.

This module owns the layout and nothing else: it packs and unpacks fixed-size
records and checks their checksums, so the writer and the reader cannot drift
apart. It does no I/O. Every reason a record is rejected is raised here with
the name of the file, so the reader only has to pass the name along.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgspec
import numpy as np

from vmrestore import core
from vmrestore.errors import FormatError, IncompleteBackupError, UnsupportedVersionError

VERSION_MAJOR = 1
VERSION_MINOR = 0
SUFFIX = ".vmrb"

HEADER_MAGIC = b"VMRBAK\r\n"
FOOTER_MAGIC = b"VMREND\r\n"
HEADER_SIZE = 4096  # 64 used, padded so stored extents start 4 KiB aligned
FOOTER_SIZE = 128
MIN_FILE_SIZE = HEADER_SIZE + FOOTER_SIZE

NO_DISK = 0xFFFFFFFF
ZERO_ID = b"\0" * 16

# Section kinds.
SEC_MANIFEST = 1
SEC_VM_CONFIG = 2
SEC_EXTENTS = 3
SEC_BLOCK_MAP = 4

# Block map kinds.
BLOCK_ZERO = 0
BLOCK_DATA = 1
BLOCK_UNCHANGED = 2

MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 8 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 1024 * 1024



class VMDisk(msgspec.Struct):
    """A disk of the VM configuration section (docs/format.md); other keys are kept as read."""

    index: int | None = None
    label: str | None = None
    controller: str | None = None
    bus: int | None = None
    unit: int | None = None
    capacity: int | None = None
    provisioning: str | None = None
    datastore: str | None = None


class VMNic(msgspec.Struct):
    label: str | None = None
    type: str | None = None
    network: str | None = None
    mac: str | None = None


class VMConfig(msgspec.Struct):
    """The VM configuration section (kind 2), declared once: a forged one is refused
    (FormatError naming the field) instead of failing deep in a restore."""

    name: str | None = None
    guest_id: str | None = None
    num_cpus: int | None = None
    memory_mb: int | None = None
    firmware: str | None = None
    disks: list[VMDisk] | None = None
    nics: list[VMNic] | None = None
    instance_uuid: str | None = None   # vSphere's instanceUuid: restore --original finds by it


_HEADER = struct.Struct("<8sHHI16sQQ")  # 48 bytes, then XXH3-128 of them
_FOOTER = struct.Struct("<8sHHI16s16s16sIIQQ16sQ")  # 112 bytes, then XXH3-128 of them
_SECTION = struct.Struct("<IIQQQ16s")  # 48 bytes
SECTION_SIZE = _SECTION.size
assert _HEADER.size == 48 and _FOOTER.size == 112 and SECTION_SIZE == 48

EXTENT_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("stored_len", "<u4"),
        ("raw_len", "<u4"),
        ("codec", "u1"),
        ("level", "i1"),
        ("flags", "<u2"),
        ("reserved", "<u4"),
        ("xxh", "<u8", (2,)),
        ("blake", "V24"),
    ]
)
BLOCK_DTYPE = np.dtype(
    [
        ("kind", "u1"),
        ("reserved0", "u1"),
        ("point", "<u2"),
        ("reserved1", "<u4"),
        ("extent", "<u8"),
    ]
)
assert EXTENT_DTYPE.itemsize == 64 and BLOCK_DTYPE.itemsize == 16


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """XXH3-128 as stored on disk: two little-endian u64 (low, high)."""
    lo, hi = core.xxh3_128(data)
    return struct.pack("<QQ", lo, hi)


def valid_block_size(n: int) -> bool:
    return MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE and n & (n - 1) == 0


def block_count(capacity: int, block_size: int) -> int:
    return -(-capacity // block_size)


@dataclass(frozen=True)
class Header:
    point_id: bytes
    created_ns: int
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR

    def pack(self) -> bytes:
        body = _HEADER.pack(HEADER_MAGIC, self.major, self.minor, 0, self.point_id,
                            self.created_ns, 0)
        return (body + checksum(body)).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def unpack(cls, buf: bytes, name: str) -> Header:
        if len(buf) < 64:
            raise IncompleteBackupError(f"{name}: truncated header")
        magic, major, minor, _flags, pid, created, _r = _HEADER.unpack_from(buf)
        if magic != HEADER_MAGIC:
            raise FormatError(f"{name}: not a vmrestore backup (bad header magic {magic!r})")
        if checksum(buf[:48]) != buf[48:64]:
            raise FormatError(f"{name}: header checksum mismatch at offset 48")
        if major != VERSION_MAJOR:
            raise UnsupportedVersionError(
                f"{name}: header says format version {major}.{minor}; this build reads "
                f"{VERSION_MAJOR}.x"
            )
        return cls(pid, created, major, minor)


@dataclass(frozen=True)
class Footer:
    point_id: bytes
    parent_id: bytes
    parent_checksum: bytes
    depth: int
    section_count: int
    section_offset: int
    section_length: int
    section_checksum: bytes
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    checksum: bytes = b""  # the footer checksum (set by pack / unpack)

    def pack(self) -> bytes:
        body = _FOOTER.pack(FOOTER_MAGIC, self.major, self.minor, 0, self.point_id,
                            self.parent_id, self.parent_checksum, self.depth,
                            self.section_count, self.section_offset, self.section_length,
                            self.section_checksum, 0)
        return body + checksum(body)

    @classmethod
    def unpack(cls, buf: bytes, name: str) -> Footer:
        """Validate in the order docs/format.md gives: magic, checksum, version."""
        if len(buf) != FOOTER_SIZE or buf[:8] != FOOTER_MAGIC:
            raise IncompleteBackupError(
                f"{name}: incomplete backup (no footer; the writer did not finish)"
            )
        if checksum(buf[:112]) != buf[112:]:
            raise IncompleteBackupError(f"{name}: incomplete backup (footer checksum mismatch)")
        (_m, major, minor, _flags, pid, parent, pcs, depth, count, off, length, scs,
         _r) = _FOOTER.unpack_from(buf)
        if major != VERSION_MAJOR:
            raise UnsupportedVersionError(
                f"{name}: format version {major}.{minor} is not supported; this build reads "
                f"{VERSION_MAJOR}.x"
            )
        return cls(pid, parent, pcs, depth, count, off, length, scs, major, minor,
                   bytes(buf[112:]))


@dataclass(frozen=True)
class Section:
    kind: int
    disk: int
    offset: int
    length: int
    records: int
    checksum: bytes

    def pack(self) -> bytes:
        return _SECTION.pack(self.kind, self.disk, self.offset, self.length, self.records,
                             self.checksum)


def pack_sections(sections: list[Section]) -> bytes:
    return b"".join(s.pack() for s in sections)


def unpack_sections(buf: bytes, count: int) -> list[Section]:
    return [Section(*_SECTION.unpack_from(buf, i * SECTION_SIZE)) for i in range(count)]
