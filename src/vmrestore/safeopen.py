"""Open a file for reading without ever blocking on what is not a file.

Opening a FIFO read-only blocks until a writer appears (forever, for a FIFO
named like a backup); a character device such as /dev/zero reads without end.
Wherever a backup, a source disk or a chain member is expected, only a regular
file or a block device makes sense: open with O_NONBLOCK (which never blocks
the open itself), fstat the handle, and refuse anything else. Checking the
open handle, not the path, leaves no window for a swap between check and use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class NotAFileError(OSError):
    """The path names something that is neither a regular file nor a block device."""


def kind_of(mode: int) -> str:
    """What a stat mode names, in words (for error messages)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_readonly(path: str | os.PathLike[str], *, block_ok: bool = True,
                  flags: int = 0) -> int:
    """Open path read-only (O_CLOEXEC) if it is a regular file (or a block device).

    Raises NotAFileError (an OSError whose strerror says what the path is)
    for a FIFO, a socket, a character device, a directory; other OSErrors as
    os.open raises them. The returned descriptor is blocking again.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (block_ok and stat.S_ISBLK(mode))):
            want = "a regular file or block device" if block_ok else "a regular file"
            raise NotAFileError(errno.EINVAL, f"is {kind_of(mode)}, not {want}")
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
