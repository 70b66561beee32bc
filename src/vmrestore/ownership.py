"""What this run owns, by identity: never write into a chain, never remove another's file.

Two rules (docs/errors.md, "Ownership"):

- A file this process created is known by its identity (device, inode) taken
  from the descriptor that created it with O_EXCL, plus a creation token
  written into an extended attribute when the filesystem keeps one. A failed
  run removes a target only when the path still names that very file: a
  racer that created the same path first (our O_EXCL failed) or replaced it
  later keeps its file.
- A restore never writes into a file of the chain it reads, nor ``backup
  create`` into its own sources or parents, ``--force`` or not: paths are
  compared by (device, inode) after resolving symlinks, so a hard link or a
  symlink to a chain file is the chain file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Iterable

import msgspec

from vmrestore.errors import UsageError

log = logging.getLogger("vmrestore.ownership")

TOKEN_XATTR = "user.vmrestore.owner"


class FileIdentity(msgspec.Struct, frozen=True):
    """A file this job created: where, which inode, and the token written into it."""

    path: str
    dev: int
    ino: int
    token: str = ""  # "" when the filesystem keeps no user xattrs


_lock = threading.Lock()
_created: dict[str, FileIdentity] = {}


def _open_nofollow(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def record_created(path: str, dev: int, ino: int) -> FileIdentity | None:
    """Register a file a writer just created (its (dev, ino) from the creating descriptor).

    Writes a fresh token into the file's xattr when it is still that inode; returns
    the identity, or None when the path already names another file (then it is not ours).
    """
    apath = os.path.abspath(path)
    try:
        fd = _open_nofollow(apath)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            return None
        token = os.urandom(16).hex()  # what secrets.token_hex does, without its imports
        try:
            os.setxattr(fd, TOKEN_XATTR, token.encode())
        except OSError:  # tmpfs before 6.6, some NFS: identity by inode alone
            token = ""
    finally:
        os.close(fd)
    ident = FileIdentity(apath, dev, ino, token)
    with _lock:
        _created[apath] = ident
    return ident


def created_here(path: str | os.PathLike[str]) -> FileIdentity | None:
    """The identity of the file this process created at path, if it did."""
    with _lock:
        return _created.get(os.path.abspath(os.fspath(path)))


def is_same(ident: FileIdentity) -> bool:
    """Whether ident.path still names the file ident describes (inode and token)."""
    try:
        fd = _open_nofollow(ident.path)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (ident.dev, ident.ino) or not stat.S_ISREG(st.st_mode):
            return False
        if ident.token:
            try:
                return os.getxattr(fd, TOKEN_XATTR) == ident.token.encode()
            except OSError:
                return False
        return True
    finally:
        os.close(fd)


def remove_if_ours(ident: FileIdentity | None) -> bool:
    """Unlink ident.path only when it is still the file we created; True when removed."""
    if ident is None:
        return False
    with _lock:
        _created.pop(ident.path, None)
    if not is_same(ident):
        log.warning("%s is no longer the file this run created: left in place", ident.path)
        return False
    try:
        os.unlink(ident.path)
    except OSError as e:
        log.warning("could not remove %s: %s", ident.path, e.strerror)
        return False
    return True


def forget(path: str | os.PathLike[str]) -> None:
    """The run succeeded: the file is the user's result now, not a partial to remove."""
    with _lock:
        _created.pop(os.path.abspath(os.fspath(path)), None)


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a link to a chain file is the chain file
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _backing_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """A loop device's backing file (a hot-add of a file is one): its identity, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
    try:
        with open(sysfs) as f:
            backing = f.read().strip()
    except OSError:
        return None
    return _identity(backing.removesuffix(" (deleted)"))


def refuse_overlap(target: str | os.PathLike[str] | None,
                   protected: Iterable[str | os.PathLike[str]], *, what: str,
                   why: str) -> None:
    """UsageError (exit 2) when target is one of the protected files (device + inode)."""
    if target is None:
        return
    t = _identity(target)
    if t is None:
        return
    behind = _backing_identity(target)  # a loop device over a chain file writes that file
    for p in protected:
        ident = _identity(p)  # None: not a local file (repo://...), it cannot be the target
        if ident is not None and ident in (t, behind):
            same = ("" if os.path.abspath(target) == os.path.abspath(p)
                    else f" (the same file as {p})")
            raise UsageError(f"{what} {target}{same} is {why}: refused, --force or not")


def target_path(target: str) -> str | None:
    """The local path a restore target URI writes to (file: or a bare path), else None."""
    from vmrestore.transport.uri import parse_target

    with contextlib.suppress(Exception):  # a bad target is reported by whoever opens it
        spec = parse_target(target)
        if spec.kind in ("file", "san"):
            return spec.path
    return None
