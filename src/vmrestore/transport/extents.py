"""Where a file's bytes are on its block device: FIEMAP, as used by the SAN transport.

A SAN proxy writes a thick disk's blocks straight to the LUN, so it needs the
disk file's extents as LUN offsets. On the lab's SAN datastore (ext4 directly
on the LUN) the physical offsets FIEMAP reports are LUN offsets. Only written
extents count: "unwritten" (fallocated) extents read as zeros through the
filesystem whatever is written underneath, and holes have no place at all, so
a map is usable only when written extents cover the whole file.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800

# Extents whose physical place is not plain bytes on the device.
UNUSABLE = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED
            | FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE
            | FIEMAP_EXTENT_DATA_TAIL | FIEMAP_EXTENT_UNWRITTEN)

_HEADER = struct.Struct("=QQIIII")          # struct fiemap (32 bytes)
_EXTENT = struct.Struct("=QQQQQI12x")        # struct fiemap_extent (56 bytes)
_BATCH = 256


@dataclass(frozen=True)
class Extent:
    logical: int    # offset in the file
    physical: int   # offset on the device
    length: int
    flags: int


def fiemap(path: str | os.PathLike[str], *, sync: bool = True) -> list[Extent]:
    """All extents of the file at path, in file order (FIEMAP_FLAG_SYNC flushes first)."""
    out: list[Extent] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = 0
        while start < size:
            buf = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
            _HEADER.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC if sync else 0,
                              0, _BATCH, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                lo, ph, ln, _r1, _r2, fl = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
                out.append(Extent(lo, ph, ln, fl))
                start = lo + ln
                last = bool(fl & FIEMAP_EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return out


class ExtentMapError(ValueError):
    """The file's extents do not make a complete, written map (thin, fallocated, or odd)."""


def written_map(path: str | os.PathLike[str]) -> list[tuple[int, int, int]]:
    """(file_offset, device_offset, length) covering the whole file with written extents.

    Raises ExtentMapError naming the first offset that is a hole, unwritten,
    or not plain bytes on the device.
    """
    size = os.stat(path).st_size
    result: list[tuple[int, int, int]] = []
    pos = 0
    for e in fiemap(path):
        if e.logical > pos:
            raise ExtentMapError(f"{path}: hole at offset {pos} ({e.logical - pos} bytes "
                                 "unallocated): the disk is thin")
        if e.flags & FIEMAP_EXTENT_UNWRITTEN:
            raise ExtentMapError(f"{path}: unwritten (fallocated) extent at offset {e.logical}: "
                                 "the disk is not eager-zeroed")
        if e.flags & UNUSABLE:
            raise ExtentMapError(f"{path}: extent at offset {e.logical} has flags "
                                 f"{e.flags:#x}: not plain bytes on the device")
        length = min(e.logical + e.length, size) - e.logical
        if length <= 0:
            continue
        skip = pos - e.logical  # overlap with what is already mapped
        if skip < length:
            if result and result[-1][0] + result[-1][2] == pos and \
                    result[-1][1] + result[-1][2] == e.physical + skip:
                f0, d0, n0 = result[-1]
                result[-1] = (f0, d0, n0 + length - skip)
            else:
                result.append((pos, e.physical + skip, length - skip))
            pos = e.logical + length
    if pos < size:
        raise ExtentMapError(f"{path}: hole at offset {pos} ({size - pos} bytes unallocated): "
                             "the disk is thin")
    return result
