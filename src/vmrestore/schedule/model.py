"""The scheduler's vocabulary: proxies, disk tasks, limits, grants, usage.

Plain msgspec Structs so the Dask runner can ship them between processes and
the plan report can embed them; no behaviour here (docs/scheduling.md).
"""

from __future__ import annotations

import msgspec

#: Transports that open an NFC/NBD connection on the ESXi host of the disk:
#: they count against ``Limits.nbd_per_host``.
NBD_TRANSPORTS = frozenset({"nbd", "nbdssl", "vddk-nbd", "vddk-nbdssl"})


class ProxySpec(msgspec.Struct, frozen=True):
    """One proxy (a Dask worker of the same name): its task slots and transports.

    ``transports`` is what the proxy can use at all; which disks it can reach
    with them is in each task's ``options``. ``bandwidth`` (bytes/s, None =
    unknown) is informational for admission and used by the simulator.
    """

    name: str
    slots: int
    transports: tuple[str, ...] = ("san", "hotadd", "nbd", "nbdssl")
    bandwidth: float | None = None


class TaskSpec(msgspec.Struct, frozen=True):
    """One disk of one VM to restore: the unit admission schedules.

    ``options`` are the (proxy name, transport) pairs that can move this disk,
    most preferred first (e.g. hotadd on the proxies that reach the datastore,
    then nbd anywhere). ``size`` is the bytes still to move (ordering key).
    """

    key: str
    vm: str
    disk: int
    size: int
    tier: int
    host: str
    datastore: str
    repo: str
    options: tuple[tuple[str, str], ...]


class Limits(msgspec.Struct, frozen=True):
    """Caps admission enforces; None = no cap.

    ``nbd_per_host``: NBD/NFC streams per ESXi host (each open disk is one NFC
    connection; ~48 exhaust the host's NFC buffers). ``per_datastore`` and
    ``per_repo``: streams writing one datastore / reading one repository
    agent. ``vcenter_ops``: concurrent vCenter control operations.
    ``datastores`` / ``repos``: per-name overrides of the two stream caps.
    ``datastore_rates`` / ``host_rates`` (bytes/s a datastore takes, a host's
    NFC service moves for NBD-class streams): rate budgets, used only when
    admission knows the transports' stream rates.
    """

    nbd_per_host: int | None = 48
    per_datastore: int | None = None
    per_repo: int | None = None
    vcenter_ops: int = 8
    datastores: dict[str, int] = msgspec.field(default_factory=dict)
    repos: dict[str, int] = msgspec.field(default_factory=dict)
    datastore_rates: dict[str, float] = msgspec.field(default_factory=dict)
    host_rates: dict[str, float] = msgspec.field(default_factory=dict)


class Grant(msgspec.Struct, frozen=True):
    """Permission to run ``task`` now on ``proxy`` with ``transport``.

    ``attempt`` counts grants of this task key (1 = first): the fencing token a
    runner hands to the disk task so a stale attempt cannot write after its
    successor started.
    """

    task: TaskSpec
    proxy: str
    transport: str
    attempt: int = 1


class Usage(msgspec.Struct):
    """A snapshot of what is in use, for progress views and the plan report."""

    slots: dict[str, int]            # proxy -> slots in use
    slot_capacity: dict[str, int]    # live proxy -> slots
    nbd_per_host: dict[str, int]     # host -> NBD streams
    per_datastore: dict[str, int]    # datastore -> streams
    per_repo: dict[str, int]         # repository agent -> streams
    vcenter_ops: int
    queued: int
    running: int
    unplaceable: int                 # queued tasks none of whose proxies is alive
