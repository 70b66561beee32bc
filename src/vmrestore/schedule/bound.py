"""A lower bound on any schedule's makespan for a Scenario, and which term binds.

Each term is a resource no schedule can avoid, at the best rate it could ever
run (docs/scheduling.md, "The lower bound"). Kills, HotAdd attach time and
vCenter queueing are left out, so the bound stays a bound.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec

from vmrestore.schedule.model import NBD_TRANSPORTS, ProxySpec
from vmrestore.schedule.scenario import Scenario


class Bound(msgspec.Struct):
    value: float            # seconds
    term: str               # the binding term, e.g. "aggregate", "datastore ds03", "vm vm0042"
    terms: dict[str, float]  # the largest term of each kind


def _proxy_rate(sc: Scenario, p: ProxySpec, transports: set[str]) -> float:
    """What one proxy can move at most with these transports: min(bandwidth, slots x stream)."""
    stream = max((sc.stream_rates[t] for t in transports if t in p.transports), default=0.0)
    cap = p.slots * stream
    return cap if p.bandwidth is None else min(p.bandwidth, cap)


def lower_bound(sc: Scenario) -> Bound:
    terms: dict[str, tuple[float, str]] = {}
    proxies = {p.name: p for p in sc.proxies}

    def offer(kind: str, value: float, name: str) -> None:
        if value > terms.get(kind, (-1.0, ""))[0]:
            terms[kind] = (value, name)

    total = sum(t.size for t in sc.tasks)
    agg = sum(_proxy_rate(sc, p, set(p.transports)) for p in sc.proxies)
    offer("aggregate", total / agg, "aggregate")

    by_ds: dict[str, int] = defaultdict(int)
    for t in sc.tasks:
        by_ds[t.datastore] += t.size
    for d, b in by_ds.items():
        if d in sc.datastore_rate:
            offer("datastore", b / sc.datastore_rate[d], f"datastore {d}")

    nbd_rate = max((r for t, r in sc.stream_rates.items() if t in NBD_TRANSPORTS), default=0.0)
    per_host = sc.limits.nbd_per_host
    by_host: dict[str, int] = defaultdict(int)
    for t in sc.tasks:
        if t.options and all(tr in NBD_TRANSPORTS for _, tr in t.options):
            by_host[t.host] += t.size
    for h, b in by_host.items():
        caps = [sc.host_nbd_rate.get(h, float("inf"))]
        if per_host is not None:
            caps.append(per_host * nbd_rate)
        offer("host-nbd", b / min(caps), f"host-nbd {h}")

    # Eligibility groups: tasks whose options all lie within a group's options can only be
    # moved by the group's proxies, each at min(bandwidth, slots x fastest stream it may use).
    groups: dict[frozenset[tuple[str, str]], int] = defaultdict(int)
    for t in sc.tasks:
        groups[frozenset(t.options)] += t.size
    for g in groups:
        b = sum(size for other, size in groups.items() if other <= g)
        by_proxy: dict[str, set[str]] = defaultdict(set)
        for p, tr in g:
            by_proxy[p].add(tr)
        bw = sum(_proxy_rate(sc, proxies[p], trs) for p, trs in by_proxy.items())
        if bw > 0:
            offer("group", b / bw, f"group of {len(by_proxy)} proxies "
                  f"({'/'.join(sorted({tr for _, tr in g}))})")

    task_by_key = {t.key: t for t in sc.tasks}
    for vm in sc.vms:
        longest = 0.0
        for k in vm.disks:
            t = task_by_key[k]
            best = 0.0
            for p, tr in t.options:
                spec = proxies[p]
                r = sc.stream_rates.get(tr, 0.0)
                best = max(best, r if spec.bandwidth is None else min(r, spec.bandwidth))
            attach = sc.attach[0] if all(tr == "hotadd" for _, tr in t.options) else 0.0
            longest = max(longest, attach + t.size / best if best else float("inf"))
        offer("vm", vm.prepare + longest + vm.finish, f"vm {vm.name}")

    value, term = max(terms.values())
    return Bound(value=value, term=term, terms={k: v for k, (v, _) in terms.items()})
