"""Backup infrastructure: proxies, their task slots, what storage they see, transport choice.

The orchestrator asks two questions here and nowhere else: *which proxy runs
this restore* (one with a free task slot that can serve the requested
transport) and *which transport each disk uses, and why*. Both answers are
pure decisions over facts the caller gathered (disk provisioning, datastore,
whether the proxy sees that datastore's LUN), so they are unit-tested without
a vCenter.

Infrastructure file (YAML, version 1; documented in docs/restore.md)::

    version: 1
    proxies:
      - name: proxy1
        slots: 2                 # concurrent disk restores (task slots)
        vm: vmr-proxy            # the proxy is this VM in vCenter: HotAdd possible
        datastores: [ds-local]   # datastores the proxy VM can hot-add from (omit: all)
        san: auto                # datastores whose LUN it sees, or 'auto' (LUN path present)
        transports: [san, hotadd, nbd, nbdssl]
        hotadd: hostd            # hostd (host services attach it) | scsi (docs/hotadd.md)

Without a file there is one local proxy (``local``) with 4 slots, SAN 'auto',
and as its VM the proxy VM of the restore's site (the command's choice: the
lab's proxy VM when restoring into the lab).

Task slots are lock files taken with ``flock`` in :func:`slot_dir`: a
slot is free again the moment its holder exits, even by kill -9, so a crashed
restore never leaks a slot and ``--resume`` can take one at once.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from vmrestore import schema
from vmrestore.errors import UsageError

MODES = ("san", "hotadd", "nbd", "nbdssl")
THICK = ("thick-lazy", "thick-eager")
# SAN writes go straight to the LUN at the extents the host maps for the disk file: only an
# eager-zeroed disk has every extent allocated and initialised (a thick-lazy one has
# unwritten extents the host does not map, a thin one has holes).
SAN_PROVISIONING = "thick-eager"
INFRA_VERSION = 1


Mode = Literal["san", "hotadd", "nbd", "nbdssl"]


class Proxy(msgspec.Struct, forbid_unknown_fields=True):
    """One backup proxy: where the proxy-side data mover runs (an entry of 'proxies')."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    slots: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4  # concurrent disk restores
    vm: str | None = None
    datastores: list[str] | None = None  # None: every datastore (for HotAdd)
    san: list[str] | Literal["auto"] = "auto"  # datastore names, or "auto"
    transports: Annotated[tuple[Mode, ...], msgspec.Meta(min_length=1)] = MODES
    # How a hot-added disk reaches this process: "hostd" (the host data services attach
    # it, as in the lab) or "scsi" (we run inside the proxy VM: reconfigure, then find
    # the new SCSI disk by UUID / controller+unit; transport/hotadd.py).
    hotadd: Literal["hostd", "scsi"] = "hostd"

    @property
    def is_vm(self) -> bool:
        return bool(self.vm)

    def can_hotadd(self, datastore: str) -> bool:
        return self.is_vm and "hotadd" in self.transports and (
            self.datastores is None or datastore in self.datastores)

    def sees_lun(self, datastore: str, lun_path: str | None) -> bool:
        """True when this proxy can write the datastore's LUN directly."""
        if "san" not in self.transports or not lun_path:
            return False
        if self.san == "auto":
            return os.path.exists(lun_path)
        return datastore in self.san


@dataclass
class Infra:
    proxies: list[Proxy]
    source: str = "default"

    def get(self, name: str) -> Proxy:
        for p in self.proxies:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.proxies)
        raise UsageError(f"proxy {name!r} not in the infrastructure ({self.source}: {known})")


def default_infra(proxy_vm: str | None = None) -> Infra:
    """One local proxy; a VM (HotAdd) when the caller knows the proxy VM (the site's)."""
    return Infra([Proxy(name="local", slots=4, vm=proxy_vm)], source="default")


class InfraDoc(msgspec.Struct, forbid_unknown_fields=True):
    """The infrastructure file (version 1), declared once: loading validates every field."""

    proxies: Annotated[list[Proxy], msgspec.Meta(min_length=1)]
    version: Literal[1] = INFRA_VERSION


def load_infra(path: str | Path) -> Infra:
    p = Path(path)
    src = f"infrastructure file {p}"
    doc = schema.load(schema.read_bytes(p, src), InfraDoc, src)
    proxies = doc.proxies
    names = [p.name for p in proxies]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"{src}: proxy name(s) given twice: {', '.join(sorted(dup))}")
    return Infra(proxies, source=str(p))


def parse_proxy(item: Any, where: str) -> Proxy:
    """One proxy entry given on its own (a worker's command line): checked like the file's."""
    return schema.convert(item, Proxy, where)


# --- task slots -------------------------------------------------------------------------


def slot_dir() -> Path:
    """Where slot locks live: one place per orchestrator machine, whatever the backup.

    ``$VMRESTORE_SLOT_DIR``, else ``$XDG_RUNTIME_DIR/vmrestore/slots``, else
    ``~/.cache/vmrestore/slots``.
    """
    env = os.environ.get("VMRESTORE_SLOT_DIR")
    if env:
        return Path(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return Path(run) / "vmrestore" / "slots"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vmrestore" / "slots"


class SlotLease:
    """A held task slot; released by :meth:`release` or when the process dies."""

    def __init__(self, proxy: Proxy, index: int, fd: int, path: Path) -> None:
        self.proxy = proxy
        self.index = index
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_slot(slot_dir: Path, proxy: Proxy, i: int) -> SlotLease | None:
    path = slot_dir / f"{proxy.name}.{i}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return SlotLease(proxy, i, fd, path)


def free_slots(infra: Infra, slot_dir: Path) -> dict[str, int]:
    """How many slots each proxy has free right now (probing the locks)."""
    slot_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in infra.proxies:
        n = 0
        for i in range(p.slots):
            lease = _try_slot(slot_dir, p, i)
            if lease:
                n += 1
                lease.release()
        out[p.name] = n
    return out


def acquire_more(lease: SlotLease, slot_dir: Path, n: int) -> list[SlotLease]:
    """Up to ``n`` more free slots on the proxy of ``lease``, without waiting.

    A job whose VM has several disks runs them in parallel, one slot each: the
    job holds its first slot for its whole run and these for its data phase.
    """
    out: list[SlotLease] = []
    for i in range(lease.proxy.slots):
        if len(out) >= n:
            break
        if i == lease.index:
            continue
        extra = _try_slot(slot_dir, lease.proxy, i)
        if extra is not None:
            out.append(extra)
    return out


def acquire_slot(infra: Infra, slot_dir: Path, wanted: str | None,
                 transport: str) -> SlotLease:
    """Take a free slot: on the named proxy, else on the proxy with most free slots.

    A proxy that cannot serve an explicitly requested transport is not a
    candidate (auto can always fall back to nbd).
    """
    slot_dir.mkdir(parents=True, exist_ok=True)
    if wanted:
        candidates = [infra.get(wanted)]
    else:
        candidates = [p for p in infra.proxies
                      if transport == "auto" or transport in p.transports]
        if transport == "hotadd":
            candidates = [p for p in candidates if p.is_vm]
        if not candidates:
            raise UsageError(f"no proxy in {infra.source} offers transport {transport!r}")
        free = free_slots(infra, slot_dir)
        candidates.sort(key=lambda p: -free.get(p.name, 0))
    for p in candidates:
        for i in range(p.slots):
            lease = _try_slot(slot_dir, p, i)
            if lease:
                return lease
    names = ", ".join(p.name for p in candidates)
    raise UsageError(f"no free task slot on proxy {names} (all slots busy; try again later)")


# --- transport selection ----------------------------------------------------------------


@dataclass
class DiskFacts:
    """What transport selection needs to know about one target disk."""

    index: int
    datastore: str
    provisioning: str  # target provisioning: thin / thick-lazy / thick-eager
    datastore_type: str = "OTHER"
    lun_path: str | None = None  # LUN behind the datastore, if the host reports one


@dataclass
class Decision:
    """The transport of one disk, why, and what to try if it fails."""

    disk: int
    mode: str
    reason: str
    fallback: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # failed attempts, in order

    def as_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "mode": self.mode, "reason": self.reason,
                "fallback": self.fallback, "history": self.history}


def select_transports(requested: str, proxy: Proxy,
                      disks: Sequence[DiskFacts]) -> list[Decision]:
    """Pick a mode per disk; an explicit mode the disks cannot use is refused up front.

    auto: san only when every disk is thick-eager (eager-zeroed) and the proxy
    sees each disk's LUN; else hotadd per disk when the proxy is a VM that
    reaches the disk's datastore; else nbd. Every auto choice can fall back to nbd.
    """
    if requested not in ("auto", *MODES):
        raise UsageError(f"unknown transport {requested!r}")
    if requested != "auto":
        return [_explicit(requested, proxy, d) for d in disks]

    thin = [d for d in disks if d.provisioning != SAN_PROVISIONING]
    blind = [d for d in disks if not proxy.sees_lun(d.datastore, d.lun_path)]
    if not thin and not blind and disks:
        lun_ds = sorted({d.datastore for d in disks})
        return [Decision(d.index, "san",
                         f"auto: every disk is thick-eager and proxy {proxy.name} sees the LUN "
                         f"of {', '.join(lun_ds)}", ["nbd"]) for d in disks]
    if thin:
        no_san = (f"not san: disk {thin[0].index} is {thin[0].provisioning} (SAN writes only "
                  "eager-zeroed disks)")
    else:
        no_san = (f"not san: proxy {proxy.name} does not see a LUN for datastore "
                  f"{blind[0].datastore}")
    out = []
    for d in disks:
        if proxy.can_hotadd(d.datastore):
            out.append(Decision(d.index, "hotadd",
                                f"auto: {no_san}; proxy VM {proxy.vm} reaches {d.datastore}",
                                ["nbd"]))
        elif proxy.is_vm:
            out.append(Decision(d.index, "nbd",
                                f"auto: {no_san}; proxy VM {proxy.vm} cannot reach "
                                f"{d.datastore}"))
        else:
            out.append(Decision(d.index, "nbd",
                                f"auto: {no_san}; proxy {proxy.name} is not a VM (no hotadd)"))
    return out


def check_source(repository: str | None, disk_library: str,
                 decisions: Sequence[Decision]) -> None:
    """Refuse transports the backup source cannot feed (phase 1, before anything exists).

    repos:// (TLS to the repository agent): Python's TLS session cannot move
    into the core, so the Python batch loop writes, and it writes local files
    and block devices only: hotadd, not san/nbd/nbdssl nor VixDiskLib. An auto
    choice then has no nbd fallback.
    """
    if not (repository or "").startswith("repos://"):
        return
    for d in decisions:
        if disk_library == "vddk":
            raise UsageError(f"disk {d.disk}: a repos:// (TLS) source cannot feed VixDiskLib "
                             "(--disk-library vddk): use repo:// or the built-in writers")
        if d.mode != "hotadd":
            raise UsageError(f"disk {d.disk}: transport {d.mode} refused: a repos:// (TLS) "
                             "source writes only through hotadd (local block devices); use "
                             "--transport hotadd with a proxy VM, or repo://")
        d.fallback = []


def _explicit(mode: str, proxy: Proxy, d: DiskFacts) -> Decision:
    if mode not in proxy.transports:
        raise UsageError(f"transport {mode}: proxy {proxy.name} does not offer it "
                         f"(offers {', '.join(proxy.transports)})")
    if mode == "san":
        if d.provisioning != SAN_PROVISIONING:
            raise UsageError(
                f"transport san refused: disk {d.index} would be {d.provisioning} on "
                f"{d.datastore}; direct SAN writes need every disk eager-zeroed "
                "(use --disk-format thick-eager, or another transport)")
        if not proxy.sees_lun(d.datastore, d.lun_path):
            raise UsageError(
                f"transport san refused: proxy {proxy.name} does not see a LUN for datastore "
                f"{d.datastore} (disk {d.index})")
        return Decision(d.index, "san", f"requested; disk is {d.provisioning} and proxy "
                        f"{proxy.name} sees the LUN of {d.datastore}")
    if mode == "hotadd":
        if not proxy.is_vm:
            raise UsageError(f"transport hotadd refused: proxy {proxy.name} is not a VM")
        if not proxy.can_hotadd(d.datastore):
            raise UsageError(f"transport hotadd refused: proxy VM {proxy.vm} cannot reach "
                             f"datastore {d.datastore} (disk {d.index})")
        return Decision(d.index, "hotadd",
                        f"requested; proxy VM {proxy.vm} reaches {d.datastore}")
    return Decision(d.index, mode, "requested")
