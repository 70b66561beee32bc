"""Durable state of one restore job: what it created, how far each disk got.

Two kinds of small files under the state directory (default
``BACKUP_DIR/.vmrestore/``, or ``--state-dir``, or ``$VMRESTORE_STATE_DIR``):

- ``restore-<vm>-<id>.json`` (the job state, version 1, :class:`StateDoc`):
  the job's identity, the phase reached, the typed ledger of what this
  restore created (:class:`Created`: the VM by managed object id and the
  owner token written into its configuration, the datastore directories it
  made, its snapshot; host attachments such as NBD exports and hot-added
  disks) and each disk's status. Rollback and ``--resume`` read only this,
  and remove only what the ledger names (docs/errors.md, Ownership).
- ``restore-<vm>-<id>.disk<N>.ckpt`` (checkpoint, version 1): the number of
  leading plan entries of disk N that are written *and flushed*, plus the
  plan's length and digest so a checkpoint is never applied to another plan,
  and the disk task attempt that owns the disk (``attempt``, 0 when absent:
  a stale attempt is refused, checkpoint.CheckpointLease).

Every write is write-temp, fsync, rename, fsync-directory: after a kill -9
or a power loss a file is either the old or the new version, never half.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from vmrestore import schema
from vmrestore.errors import UsageError

STATE_VERSION = 1
CHECKPOINT_VERSION = 1
T = TypeVar("T")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace path with data durably (temp + fsync + rename + fsync dir)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def state_dir_for(job: Any, point_id: str = "") -> Path:
    """--state-dir, else $VMRESTORE_STATE_DIR, else next to the backup file.

    A repo:// backup has no local directory (and the orchestrator may not be
    allowed to write on the repository): its state lives under
    ``$XDG_STATE_HOME/vmrestore`` (default ``~/.local/state/vmrestore``) in
    ``repo-<hash>``, the hash of the URL and the restore point's id, so the
    same point restored again (``--resume``) finds its state and another
    point on the same agent does not.
    """
    if job.state_dir:
        return Path(job.state_dir)
    env = os.environ.get("VMRESTORE_STATE_DIR")
    if env:
        return Path(env)
    if getattr(job, "repository", None):
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        h = hashlib.sha256(f"{job.repository}#{point_id}".encode()).hexdigest()[:16]
        return base / "vmrestore" / f"repo-{h}"
    return Path(job.backup).resolve().parent / ".vmrestore"


def job_id(job: Any, vm_name: str) -> str:
    ident = job.identity()
    if job.backup:
        ident["backup"] = str(Path(job.backup).resolve())
    ident["vm_name"] = vm_name
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class Checkpoint(msgspec.Struct):
    """``restore-<vm>-<id>.disk<N>.ckpt`` (version 1), declared once."""

    disk: int
    prefix: int  # leading plan entries durable on the target
    entries: int  # plan length
    digest: str  # of the plan array
    bytes_done: int = 0
    attempt: int = 0  # the disk task attempt that wrote it (fencing, docs/disktask.md)
    version: int = CHECKPOINT_VERSION
    time: float = 0.0  # when it was written (informational)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self)
        return d


def plan_digest(plan: Any) -> str:
    return hashlib.sha256(memoryview(plan).cast("B")).hexdigest()[:32]


def write_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    ckpt.time = time.time()
    atomic_write(path, msgspec.json.encode(ckpt))


def read_checkpoint(path: Path) -> Checkpoint | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"checkpoint {path} unreadable ({e.strerror}); remove it to restart "
                         "the disk") from None
    return _decode(raw, Checkpoint, f"checkpoint {path}", CHECKPOINT_VERSION,
                   "; remove it to restart the disk")


def _decode(raw: bytes, typ: type[T], where: str, version: int, hint: str = "") -> T:
    """A versioned JSON document: the version is checked first, then every field (named)."""
    try:
        d = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise UsageError(f"{where} unreadable ({e}){hint}") from None
    if not isinstance(d, dict) or d.get("version") != version:
        got = d.get("version") if isinstance(d, dict) else None
        raise UsageError(f"{where} has version {got!r} (this build reads {version})")
    return schema.convert(d, typ, where, raw.decode(errors="replace"))


# -- the job-state document (one declaration: validation and serialisation) ---------------


class VMRecord(msgspec.Struct):
    """The VM this job created: its moref, and the token in its extraConfig (ownership)."""

    name: str
    moref: str = ""   # "" while CreateVM runs: then only the token can prove the VM is ours
    token: str = ""   # extraConfig vmrestore.owner; "" in files of builds without tokens


class Attachment(msgspec.Struct):
    """A host attachment this job made (an NBD export, a hot-added disk), by its id."""

    kind: str
    id: str
    disk: int


class Created(msgspec.Struct):
    """The ledger: everything rollback may remove, recorded when this job created it."""

    vm: VMRecord | None = None
    dirs: list[str] = msgspec.field(default_factory=list)  # "[ds] name" made by MakeDirectory
    snapshot: bool = False


class DiskStatus(msgspec.Struct):
    status: str = "pending"   # pending | running | done
    transport: str | None = None
    proxy: str | None = None  # a plan run: the proxy of the disk's last attempt
    attempt: int = 0          # its fencing token (docs/fleet.md), kept across runs (--resume)

    def next_attempt(self, ck: Checkpoint | None) -> int:
        """Take the disk's next fencing token: above every attempt the job state or the
        checkpoint has seen (both survive a kill); the caller saves the state before it
        attaches, so a killed run's attachment is always fenced by the next one."""
        self.attempt = max(self.attempt, ck.attempt if ck else 0) + 1
        return self.attempt


class NewDisk(msgspec.Struct):
    """--original --full: a disk file this job creates for backup disk ``disk``; its name
    carries the job's random token, so a file of that name is this job's to delete."""

    disk: int
    path: str
    created: bool = False   # CreateVirtualDisk returned (False: it may exist half-made)


class OldDisk(msgspec.Struct):
    """--original --full: a disk the VM had before the swap, where it was (to put it back)."""

    path: str
    key: int
    controller_key: int
    unit: int
    capacity: int
    provisioning: str = "thin"


class OriginalRecord(msgspec.Struct):
    """--original: the VM rolled back in place (never removed), and what was done to it."""

    moref: str
    name: str
    found_by: str = ""
    files: list[str] = msgspec.field(default_factory=list)
    snapshot: str | None = None      # the safety snapshot's moref while it exists
    powered_off: bool = False        # this job powered the VM off
    # --full: the new files (rollback deletes them), the disks they replace, and the swap:
    # "" not started, "running" (ReconfigVM sent: rollback puts the old disks back),
    # "done" (the VM runs on the new disks), "committed" (deleting the old files: the new
    # disks are the VM's, nothing is rolled back any more)
    new_disks: list[NewDisk] = msgspec.field(default_factory=list)
    old_disks: list[OldDisk] = msgspec.field(default_factory=list)
    swap: str = ""


class StateDoc(msgspec.Struct):
    """``restore-<vm>-<id>.json`` (docs/restore.md)."""

    version: int
    identity: dict[str, Any]
    status: str = "running"   # running | done | failed-kept | rollback-failed
    phase: str = "initialize"
    created: Created = msgspec.field(default_factory=Created)
    attachments: list[Attachment] = msgspec.field(default_factory=list)
    disks: dict[str, DiskStatus] = msgspec.field(default_factory=dict)
    original: OriginalRecord | None = None
    started: float = 0.0
    updated: float = 0.0
    pid: int = 0


def decode_state(raw: bytes, where: str) -> StateDoc:
    """A job-state file, validated; a bad one names the field (UsageError)."""
    return _decode(raw, StateDoc, f"job state {where}", STATE_VERSION)


class JobState:
    """The job-state file plus its lock (one run of a job at a time).

    ``doc`` is the typed document (None until start() or load()).
    """

    def __init__(self, directory: Path, job: Any, vm_name: str) -> None:
        self.dir = directory
        self.id = job_id(job, vm_name)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in vm_name)[:40]
        self.stem = f"restore-{safe}-{self.id}"
        self.path = directory / f"{self.stem}.json"
        self.doc: StateDoc | None = None
        self._lock_fd: int | None = None
        # the disks of one VM run in threads: one writer of the document at a time
        self.mutex = threading.RLock()
        self._identity = job.identity()

    def lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / f"{self.stem}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another run of this restore job is active (lock "
                             f"{self.dir / (self.stem + '.lock')})") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            with contextlib.suppress(OSError):
                os.unlink(self.dir / f"{self.stem}.lock")

    def exists(self) -> bool:
        return self.path.exists()

    def peek(self) -> StateDoc:
        """The file as it is, without adopting it (the previous run's ledger)."""
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise UsageError(f"job state {self.path} unreadable: {e.strerror}") from None
        return decode_state(raw, str(self.path))

    def load(self) -> StateDoc:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"--resume: no interrupted restore of this job in {self.dir} "
                             f"(looked for {self.path.name})") from None
        except OSError as e:
            raise UsageError(f"job state {self.path} unreadable: {e.strerror}") from None
        doc = decode_state(raw, str(self.path))
        if doc.identity != json.loads(json.dumps(self._identity)):
            raise UsageError(f"--resume: job state {self.path} belongs to a different job")
        self.doc = doc
        return doc

    def start(self) -> None:
        self.doc = StateDoc(version=STATE_VERSION, identity=self._identity,
                            started=time.time(), pid=os.getpid())
        self.save()

    def save(self) -> None:
        if self.doc is None:
            return
        with self.mutex:
            self.doc.updated = time.time()
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path,
                         msgspec.json.format(msgspec.json.encode(self.doc), indent=1))

    def checkpoint_path(self, disk: int) -> Path:
        return self.dir / f"{self.stem}.disk{disk}.ckpt"

    def remove(self) -> None:
        """The job ended (done or fully rolled back): nothing to resume."""
        for p in self.dir.glob(f"{self.stem}.disk*.ckpt"):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.path.unlink()

    # -- ledger helpers ----------------------------------------------------------------
    def attach(self, kind: str, ident: str, disk: int) -> None:
        assert self.doc is not None
        with self.mutex:
            self.doc.attachments.append(Attachment(kind, ident, disk))
            self.save()

    def detach(self, kind: str, ident: str) -> None:
        assert self.doc is not None
        with self.mutex:
            self.doc.attachments = [a for a in self.doc.attachments
                                    if not (a.kind == kind and a.id == ident)]
            self.save()

    def disk(self, index: int) -> DiskStatus:
        """The status record of disk index (created pending)."""
        assert self.doc is not None
        with self.mutex:
            return self.doc.disks.setdefault(str(index), DiskStatus())
