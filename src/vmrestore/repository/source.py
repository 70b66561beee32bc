"""Where a backup file's bytes come from: the reader's only view of storage.

The reader never opens files itself; it asks a ``ByteSource`` for ranges. A
local file is the common case (``FileSource``); the network data mover can
hand the reader its own source (a remote file served by the repository agent)
and plan a restore without the file being local. A source also finds its
siblings (other restore points in the same directory) so chains resolve the
same way wherever the files live.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from typing import Protocol, runtime_checkable

from vmrestore.errors import SourceError
from vmrestore.safeopen import open_readonly

BLKGETSIZE64 = 0x80081272


@runtime_checkable
class ByteSource(Protocol):
    """Read-only random access to one backup file.

    ``path``: a name for messages and the plan's source list (for a local file,
    its absolute path). ``size``: length in bytes. ``pread(length, offset)``:
    exactly ``length`` bytes or fewer only at end of file. ``sibling(name)``:
    the source of another file in the same directory (raises FileNotFoundError).
    ``siblings()``: names of the ``*.vmrb`` files in that directory.
    """

    path: str
    size: int

    def pread(self, length: int, offset: int) -> bytes: ...

    def sibling(self, name: str) -> ByteSource: ...

    def siblings(self) -> list[str]: ...

    def close(self) -> None: ...


def device_size(fd: int) -> int:
    """Size of an open file or block device (BLKGETSIZE64, falling back to lseek)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        except OSError:
            pass
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class FileSource:
    """A local backup file, read with pread (thread-safe: no shared file position)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        try:
            self.fd = open_readonly(self.path)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot open backup: {e.strerror}") from None
        self.size = device_size(self.fd)

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(
                f"{self.path}: read of {length} bytes at offset {offset} failed: {e.strerror}"
            ) from None

    def sibling(self, name: str) -> FileSource:
        p = os.path.join(os.path.dirname(self.path), os.path.basename(name))
        if not os.path.exists(p):
            raise FileNotFoundError(p)
        return FileSource(p)

    def siblings(self) -> list[str]:
        d = os.path.dirname(self.path)
        return sorted(n for n in os.listdir(d) if n.endswith(".vmrb"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
