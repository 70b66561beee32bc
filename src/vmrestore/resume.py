"""restore-disk to a new local file: a hidden partial file, its checkpoint, and --resume.

Why: a killed restore (kill -9, SIGTERM from systemd or `timeout`, power loss)
must never leave a full-size file under the target's name that looks restored.
So a restore to a new file writes ``.NAME.vmrestore-partial`` beside NAME and,
for a local backup, records durable progress in ``.NAME.vmrestore-resume``
(JSON, written to a temporary file, fsynced, renamed: the checkpoint rule of
vmrestore.checkpoint, prefix then flush then record). Only a complete run
puts the file in place, by link + unlink, so a NAME that appeared meanwhile
is never replaced. ``restore-disk --resume`` continues from the recorded
entry when the same backup, point and disk are asked for and the partial file
is the very one recorded (device and inode).

Two runs for one target: each holds an exclusive flock on
``.NAME.vmrestore-lock`` for its whole run (the kernel drops it when the
process dies, kill -9 included), so a second run is refused while the first
lives, and whatever partial file it finds after taking the lock was left by
a dead run: replaced by a fresh run, or continued with --resume.
Format: docs/restore.md ("restore-disk --resume").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrestore.errors import TargetError, UsageError

log = logging.getLogger("vmrestore.resume")

VERSION = 1


@dataclass
class ResumeState:
    """The checkpoint document (version 1)."""

    version: int
    backup: str          # absolute path of the restore point file asked for
    point: str           # --point as given ("" = the file's own point)
    point_id: str        # hex id of that file's point (a rewritten file is refused)
    disk: int
    pid: int             # the run that writes the partial file
    dev: int             # identity of the partial file: device, inode, and the token
    ino: int             # written into its xattr when created (an inode number alone
    entry: int           # is reused); entry: plan entries durably written (resume here)
    token: str = ""


def paths(target: Path) -> tuple[Path, Path]:
    """(partial file, checkpoint file) of a target path."""
    return (target.with_name(f".{target.name}.vmrestore-partial"),
            target.with_name(f".{target.name}.vmrestore-resume"))


def _lock(target: Path) -> tuple[int, Path]:
    """Take the target's run lock (flock, non-blocking); TargetError if another run holds it."""
    path = target.with_name(f".{target.name}.vmrestore-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TargetError(f"{target}: another restore is writing it: refused") from None
        try:  # the lock file may have been removed (a run that ended) between open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, path
        os.close(fd)


def _unlock(fd: int, path: Path) -> None:
    """Remove the lock file, then drop the lock (a run that opened it meanwhile retries)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


def load(state_path: Path) -> ResumeState | None:
    """The checkpoint, or None when there is none; a broken one is a TargetError."""
    try:
        raw = state_path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TargetError(f"{state_path}: cannot read the resume checkpoint: {e.strerror}") \
            from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} checkpoint")
        return ResumeState(**{k: doc[k] for k in ResumeState.__dataclass_fields__
                              if k in doc or k != "token"})
    except (ValueError, KeyError, TypeError) as e:
        raise TargetError(f"{state_path}: broken resume checkpoint ({e}): remove it and the "
                          "partial file beside it to start over") from None


def save(state_path: Path, st: ResumeState) -> None:
    from vmrestore.jobstate import atomic_write

    atomic_write(state_path, json.dumps(asdict(st)).encode())


class NewFileTarget:
    """One run's partial file; :meth:`prepare` decides fresh or resumed, :meth:`commit` ends it."""

    def __init__(self, target: Path, backup: str, disk: int, point: str | None,
                 checkpoints: bool, token_file: str | None = None) -> None:
        from vmrestore.mover.url import is_repo_url

        self.target = target
        self.partial, self.state_path = paths(target)
        self.remote = is_repo_url(backup)
        self.backup = backup if self.remote else os.path.abspath(backup)
        self.token_file = token_file
        self.disk = disk
        self.point = point or ""
        self.checkpoints = checkpoints
        self.start = 0
        self.state: ResumeState | None = None
        self._lock: tuple[int, Path] | None = None

    def prepare(self, resume: bool) -> None:
        """Take the run lock; pick up (--resume) or clear what a dead run left."""
        self._lock = _lock(self.target)
        old = load(self.state_path)
        if resume:
            self._resume_from(old)
            return
        if old is not None or self.partial.exists():
            log.warning("%s: removing what an earlier, killed run left (%s)%s", self.target,
                        self.partial.name, "" if old is None else
                        f"; it had {old.entry} entries done: --resume would have continued")
            self.discard()

    def _resume_from(self, old: ResumeState | None) -> None:
        if not self.checkpoints:
            raise UsageError("--resume: this run records no checkpoints")
        if old is None:
            raise UsageError(f"{self.target}: nothing to resume (no {self.state_path.name})")
        try:
            st = os.stat(self.partial)
        except FileNotFoundError:
            raise TargetError(f"{self.target}: the partial file {self.partial.name} is gone: "
                              "nothing to resume") from None
        want = (self.backup, self.point, self.disk)
        if (old.backup, old.point, old.disk) != want:
            raise UsageError(f"{self.target}: the interrupted run restored {old.backup} disk "
                             f"{old.disk}{' point ' + old.point if old.point else ''}: "
                             "--resume must ask for the same")
        if old.point_id != self._point_id():
            raise TargetError(f"{old.backup}: not the restore point the interrupted run read "
                              "(rewritten since): start over without --resume")
        from vmrestore.ownership import FileIdentity, is_same

        if (st.st_dev, st.st_ino) != (old.dev, old.ino) or not is_same(
                FileIdentity(str(self.partial.absolute()), old.dev, old.ino, old.token)):
            raise TargetError(f"{self.partial}: not the file the interrupted run wrote "
                              "(replaced since): start over without --resume")
        self.state = old
        self.start = old.entry
        log.info("%s: resuming at plan entry %d", self.target, self.start)

    def _point_id(self) -> str:
        """The id of the point file asked for (over the wire for repo://, metadata only)."""
        if self.remote:
            from vmrestore.mover.repo_source import open_repository_chain

            chain = open_repository_chain(self.backup, self.token_file)
            try:
                return str(chain.point.point_id)
            finally:
                chain.close()
        from vmrestore.repository.reader import open_point

        p = open_point(self.backup)
        try:
            return str(p.point_id)
        finally:
            p.close()

    def record(self, entry: int) -> None:
        """A durable checkpoint: the first `entry` plan entries are on stable storage."""
        if self.state is None:
            from vmrestore.ownership import created_here

            st = os.stat(self.partial)
            mine = created_here(self.partial)
            self.state = ResumeState(VERSION, self.backup, self.point, self._point_id(),
                                     self.disk, os.getpid(), st.st_dev, st.st_ino, 0,
                                     mine.token if mine is not None else "")
        self.state.pid = os.getpid()
        self.state.entry = entry
        save(self.state_path, self.state)

    def commit(self) -> None:
        """Put the complete file in place (never over one that appeared meanwhile)."""
        try:
            os.link(self.partial, self.target)
        except FileExistsError:
            raise TargetError(f"{self.target} appeared while restoring: the restored disk "
                              f"stays in {self.partial}") from None
        os.unlink(self.partial)
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def release(self) -> None:
        """Drop the run lock."""
        if self._lock is not None:
            _unlock(*self._lock)
            self._lock = None

    def discard(self) -> None:
        """Remove the partial file and its checkpoint (ours by identity, or a dead run's)."""
        from vmrestore import ownership

        mine = ownership.created_here(self.partial)
        if mine is not None:
            ownership.remove_if_ours(mine)
        elif self._lock is not None:  # under the lock: only a dead run's leftovers
            with contextlib.suppress(FileNotFoundError):
                self.partial.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def keep_or_discard(self, exc: BaseException) -> None:
        """After a failure: keep a resumable partial (progress recorded), else remove it."""
        from vmrestore.errors import Interrupted, TransportError

        resumable = isinstance(exc, (KeyboardInterrupt, Interrupted, TransportError))
        if resumable and self.state is not None and self.state.entry > 0:
            log.warning("%s: kept the partial restore %s (%d plan entries done): rerun with "
                        "--resume to continue, or delete it", self.target, self.partial.name,
                        self.state.entry)
            return
        self.discard()


@contextlib.contextmanager
def new_file_target(target: Path, backup: str, disk: int, point: str | None, *,
                    resume: bool, checkpoints: bool = True,
                    token_file: str | None = None) -> Iterator[NewFileTarget]:
    """A NewFileTarget prepared for this run; on failure kept for --resume or removed."""
    t = NewFileTarget(target, backup, disk, point, checkpoints, token_file)
    try:
        t.prepare(resume)  # a refusal here touches nothing
        try:
            yield t
        except BaseException as e:
            t.keep_or_discard(e)
            raise
    finally:
        t.release()
