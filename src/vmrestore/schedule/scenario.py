"""Synthetic fleets for the scheduling simulator: what is restored, where, and over what.

A ``Scenario`` is everything the simulation needs and nothing it decides: the
proxies, the disk tasks with their eligible (proxy, transport) options, the
VMs with their control-phase durations, the rates of streams, datastores and
hosts, and the proxy kills. ``fleet()`` builds the benchmark's fleet from a
seed; ``identical()`` the Graham test's (identical slots, no caps, no control).
"""

from __future__ import annotations

import math
import random

import msgspec

from vmrestore.schedule.model import Limits, ProxySpec, TaskSpec

GB = 10**9
MB = 10**6


class VmSpec(msgspec.Struct, frozen=True):
    """One VM: its disks (task keys) and vCenter control work before and after data."""

    name: str
    tier: int
    disks: tuple[str, ...]
    prepare: float   # seconds: register VM + create disks + create snapshot (vCenter ops)
    finish: float    # seconds: commit snapshot + power on (vCenter ops)


class Kill(msgspec.Struct, frozen=True):
    """Proxy ``proxy`` dies at ``at`` seconds and its worker is back ``down`` seconds later."""

    at: float
    proxy: str
    down: float


class Scenario(msgspec.Struct):
    proxies: list[ProxySpec]
    tasks: list[TaskSpec]
    vms: list[VmSpec]
    limits: Limits
    stream_rates: dict[str, float]        # transport -> bytes/s of one stream
    datastore_rate: dict[str, float]      # datastore -> bytes/s written at most
    host_nbd_rate: dict[str, float]       # ESXi host -> bytes/s through its NFC service
    attach: tuple[float, float] = (30.0, 60.0)   # HotAdd attach seconds (uniform)
    checkpoint: int = 4 * GB              # bytes between durable checkpoints
    kills: list[Kill] = msgspec.field(default_factory=list)
    seed: int = 0


def fleet(seed: int, vms: int = 1000, hosts: int = 20, datastores: int = 10,
          proxies: int = 50, kills: int = 3, tier0: float = 0.0) -> Scenario:
    """The benchmark's fleet (docs/scheduling.md, "The simulated fleet")."""
    rnd = random.Random(seed)
    clusters = 4
    host_names = [f"esx{i:02d}" for i in range(hosts)]
    cluster_of = {h: i % clusters for i, h in enumerate(host_names)}
    ds_names = [f"ds{i:02d}" for i in range(datastores)]
    shared = set(ds_names[-2:])                       # mounted by every cluster (NFS)
    san_ds = set(ds_names[: max(1, datastores * 6 // 10)]) - shared   # VMFS on SAN LUNs
    ds_cluster = {d: i % clusters for i, d in enumerate(ds_names) if d not in shared}
    mounts = {c: [d for d in ds_names if d in shared or ds_cluster.get(d) == c]
              for c in range(clusters)}

    n_phys = max(1, proxies // 5)
    specs: list[ProxySpec] = []
    reach: dict[str, set[str]] = {}       # proxy -> datastores it reaches by san / hotadd
    san_sorted = sorted(san_ds)
    for i in range(proxies):
        slots = rnd.randint(4, 16)
        if i < n_phys:                    # physical SAN proxy, one of two fabrics
            name = f"phys{i:02d}"
            fabric = i % 2
            reach[name] = {d for j, d in enumerate(san_sorted) if j % 2 == fabric}
            specs.append(ProxySpec(name, slots, ("san", "nbd"), bandwidth=2.5 * GB))
        else:                             # proxy VM in one cluster: hotadd to its mounts
            name = f"pvm{i:02d}"
            reach[name] = set(mounts[i % clusters])
            specs.append(ProxySpec(name, slots, ("hotadd", "nbd"), bandwidth=1.25 * GB))

    rates = {"san": 300.0 * MB, "hotadd": 250.0 * MB, "nbd": 60.0 * MB}
    nbd = tuple((p.name, "nbd") for p in specs)
    tasks: list[TaskSpec] = []
    vm_specs: list[VmSpec] = []
    for v in range(vms):
        host = rnd.choice(host_names)
        home = mounts[cluster_of[host]]
        own = [d for d in home if d not in shared]
        primary = rnd.choice(own if own and rnd.random() < 0.8 else home)
        tier = 0 if rnd.random() < tier0 else 1
        nbd_only = rnd.random() < 0.05   # small VMs that may only use NBD (e.g. encrypted)
        biggest = 250 * GB if nbd_only else 4000 * GB
        keys = []
        for d in range(rnd.randint(1, 8)):
            ds = primary if rnd.random() < 0.8 else rnd.choice(home)
            size = int(min(biggest, max(20 * GB, rnd.lognormvariate(math.log(120 * GB), 1.0))))
            thick = rnd.random() < 0.4
            opts: list[tuple[str, str]] = []
            if not nbd_only:
                if thick and ds in san_ds:
                    opts += [(p.name, "san") for p in specs if "san" in p.transports
                             and ds in reach[p.name]]
                opts += [(p.name, "hotadd") for p in specs if "hotadd" in p.transports
                         and ds in reach[p.name]]
            key = f"vm{v:04d}/disk-{d}"
            keys.append(key)
            tasks.append(TaskSpec(key=key, vm=f"vm{v:04d}", disk=d, size=size, tier=tier,
                                  host=host, datastore=ds, repo=f"repo{v % 4}",
                                  options=(*opts, *nbd)))
        vm_specs.append(VmSpec(f"vm{v:04d}", tier, tuple(keys),
                               prepare=rnd.uniform(4, 12), finish=rnd.uniform(3, 8)))

    ds_rate = {d: rnd.uniform(8, 16) * GB for d in ds_names}
    host_rate = {h: 2.5 * GB for h in host_names}
    # Admission is told the same rates the simulation enforces (an operator's estimates).
    limits = Limits(nbd_per_host=48, datastore_rates=ds_rate, host_rates=host_rate)
    sc = Scenario(proxies=specs, tasks=tasks, vms=vm_specs, limits=limits, stream_rates=rates,
                  datastore_rate=ds_rate, host_nbd_rate=host_rate, seed=seed)
    if kills:
        from vmrestore.schedule.bound import lower_bound
        horizon = 0.8 * lower_bound(sc).value
        victims = rnd.sample([p.name for p in specs], kills)
        sc.kills = sorted((Kill(rnd.uniform(0, horizon), p, rnd.uniform(300, 900))
                           for p in victims), key=lambda k: k.at)
    return sc


def identical(seed: int, proxies: int = 4, slots: int = 3, tasks: int = 60,
              rate: float = 100.0 * MB) -> Scenario:
    """Identical proxies, one transport, no caps, no control phases: list scheduling pure."""
    rnd = random.Random(seed)
    specs = [ProxySpec(f"p{i}", slots, ("nbd",)) for i in range(proxies)]
    opts = tuple((p.name, "nbd") for p in specs)
    ts = [TaskSpec(key=f"vm{i:03d}/disk-0", vm=f"vm{i:03d}", disk=0,
                   size=int(rnd.lognormvariate(math.log(50 * GB), 1.2)), tier=0,
                   host=f"esx{i % 3}", datastore=f"ds{i % 2}", repo="repo0", options=opts)
          for i in range(tasks)]
    vms = [VmSpec(t.vm, 0, (t.key,), 0.0, 0.0) for t in ts]
    return Scenario(proxies=specs, tasks=ts, vms=vms,
                    limits=Limits(nbd_per_host=None, vcenter_ops=10**9),
                    stream_rates={"nbd": rate}, datastore_rate={}, host_nbd_rate={},
                    attach=(0.0, 0.0), seed=seed)
