"""Property test: admission against a plain greedy reference, limits never exceeded.

The reference sorts every queued task by the documented order and gives each
its first feasible option; the class-and-heap implementation must grant exactly
the same (task, proxy, transport) list after any sequence of adds, releases,
requeues, proxy losses and returns.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace as msgspec_replace

from vmrestore.schedule import NBD_TRANSPORTS, Admission, Grant, Limits, ProxySpec, TaskSpec
from vmrestore.schedule.admission import NEAR_BEST

PROXIES = ["p0", "p1", "p2", "p3"]
TRANSPORTS = ["san", "hotadd", "nbd", "nbdssl"]
cap = st.one_of(st.none(), st.integers(1, 3))


@st.composite
def proxy_spec(draw, name: str) -> ProxySpec:
    tr = draw(st.lists(st.sampled_from(TRANSPORTS), min_size=1, max_size=4, unique=True))
    return ProxySpec(name, draw(st.integers(0, 3)), tuple(tr))


@st.composite
def task_spec(draw, key: str) -> TaskSpec:
    pairs = [(p, t) for p in PROXIES for t in TRANSPORTS]
    opts = draw(st.lists(st.sampled_from(pairs), min_size=0, max_size=5, unique=True))
    return TaskSpec(key=key, vm=draw(st.sampled_from(["vm-a", "vm-b", "vm-c", key])), disk=0,
                    size=draw(st.integers(1, 50)),
                    tier=draw(st.integers(0, 1)), host=draw(st.sampled_from(["h0", "h1"])),
                    datastore=draw(st.sampled_from(["d0", "d1"])),
                    repo=draw(st.sampled_from(["r0", "r1"])), options=tuple(opts))


class Reference:
    """The documented policy, written the slow and obvious way."""

    def __init__(self, proxies: list[ProxySpec], limits: Limits) -> None:
        self.proxies = {p.name: p for p in proxies}
        self.alive = set(self.proxies)
        self.limits = limits
        self.queue: dict[str, tuple[int, int, TaskSpec]] = {}   # key -> (seq, vm size, task)
        self.vm_size: dict[str, int] = {}    # the largest disk ever queued for each VM
        self.running: dict[str, Grant] = {}
        self.seq = 0

    def add(self, batch: list[TaskSpec]) -> None:
        for t in batch:
            self.vm_size[t.vm] = max(self.vm_size.get(t.vm, 0), t.size)
        for t in batch:
            self.seq += 1
            self.queue[t.key] = (self.seq, self.vm_size[t.vm], t)

    def live(self, t: TaskSpec) -> list[tuple[str, str]]:
        return [(p, tr) for p, tr in t.options
                if p in self.alive and tr in self.proxies[p].transports]

    def grants(self) -> list[tuple[str, str, str]]:
        def order(item: tuple[int, TaskSpec]):
            seq, vm_size, t = item
            n = len({p for p, _ in self.live(t)})
            return (t.tier, n.bit_length() if n else 1 << 30, -vm_size, -t.size, seq)

        lim, out = self.limits, []
        for _, _, t in sorted(self.queue.values(), key=order):
            use = Counter()
            for g in self.running.values():
                use["p", g.proxy] += 1
                use["d", g.task.datastore] += 1
                use["r", g.task.repo] += 1
                use["h", g.task.host] += g.transport in NBD_TRANSPORTS
            dcap = lim.datastores.get(t.datastore, lim.per_datastore)
            rcap = lim.repos.get(t.repo, lim.per_repo)
            if (dcap is not None and use["d", t.datastore] >= dcap) or (
                    rcap is not None and use["r", t.repo] >= rcap):
                continue
            for p, tr in self.live(t):
                host_full = (lim.nbd_per_host is not None
                             and use["h", t.host] >= lim.nbd_per_host)
                if use["p", p] < self.proxies[p].slots and not (
                        tr in NBD_TRANSPORTS and host_full):
                    del self.queue[t.key]
                    self.running[t.key] = Grant(t, p, tr)
                    out.append((t.key, p, tr))
                    break
        return out


def check_limits(adm: Admission, limits: Limits, proxies: dict[str, ProxySpec],
                 before: dict[str, int]) -> None:
    """No cap exceeded; a proxy shrunk below its running tasks only gets none more."""
    u = adm.usage()
    for name, used in u.slots.items():
        assert used <= max(proxies[name].slots, before.get(name, 0))
    for n in u.nbd_per_host.values():
        assert limits.nbd_per_host is None or n <= limits.nbd_per_host
    for d, n in u.per_datastore.items():
        c = limits.datastores.get(d, limits.per_datastore)
        assert c is None or n <= c
    for r, n in u.per_repo.items():
        c = limits.repos.get(r, limits.per_repo)
        assert c is None or n <= c


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_admission_matches_reference_and_never_exceeds_a_limit(data):
    proxies = [data.draw(proxy_spec(n)) for n in PROXIES]
    limits = Limits(nbd_per_host=data.draw(cap), per_datastore=data.draw(cap),
                    per_repo=data.draw(cap), datastores=data.draw(st.sampled_from([{}, {"d0": 2}])))
    adm, ref = Admission(proxies, limits), Reference(proxies, limits)
    specs = {p.name: p for p in proxies}
    grants: dict[str, Grant] = {}
    n = 0
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["add", "add", "grant", "release", "requeue",
                                        "lost", "added"]))
        if op == "add":
            new = [data.draw(task_spec(f"t{n + i}")) for i in range(data.draw(st.integers(1, 4)))]
            n += len(new)
            adm.add(new)
            ref.add(new)
        elif op in ("release", "requeue") and grants:
            g = grants.pop(data.draw(st.sampled_from(sorted(grants))))
            del ref.running[g.task.key]
            if op == "release":
                assert adm.release(g)
            else:
                assert adm.requeue(g)
                ref.add([g.task])
        elif op == "lost":
            name = data.draw(st.sampled_from(PROXIES))
            lost = adm.proxy_lost(name)
            if name in ref.alive:
                ref.alive.discard(name)
                expect = sorted(k for k, g in ref.running.items() if g.proxy == name)
                assert [g.task.key for g in lost] == expect
                for k in expect:
                    ref.add([ref.running.pop(k).task])
                    del grants[k]
            else:
                assert lost == []
        elif op == "added":
            spec = data.draw(proxy_spec(data.draw(st.sampled_from(PROXIES))))
            adm.proxy_added(spec)
            ref.proxies[spec.name] = specs[spec.name] = spec
            ref.alive.add(spec.name)
        before = adm.usage().slots
        got = adm.grants()
        assert [(g.task.key, g.proxy, g.transport) for g in got] == ref.grants()
        for g in got:
            assert (g.proxy, g.transport) in g.task.options
            grants[g.task.key] = g
        check_limits(adm, limits, specs, before)
        assert adm.queued() == len(ref.queue)


RATES = {"san": 300.0, "hotadd": 250.0, "nbd": 60.0, "nbdssl": 40.0}


def near_best(t: TaskSpec, specs: dict[str, ProxySpec]) -> list[tuple[str, str]]:
    live = [(p, tr) for p, tr in t.options if tr in specs[p].transports]
    best = max((RATES[tr] for _, tr in live), default=0.0)
    return [(p, tr) for p, tr in live if RATES[tr] >= best * NEAR_BEST]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_with_stream_rates_both_passes_are_maximal_and_fallbacks_finish_in_time(data):
    """With rates: near-best options first, slow ones only within the drain time.

    After every grants(): no queued task could still start on a near-best option; none
    could start on a slow option within the horizon; every slow grant was within it;
    a proxy only got a stream while its committed rates were below its bandwidth, and
    a datastore or host only within its rate budget (or while idle).
    """
    proxies = [msgspec_replace(data.draw(proxy_spec(n)),
                               bandwidth=data.draw(st.sampled_from([None, 400.0, 900.0])))
               for n in PROXIES]
    limits = Limits(nbd_per_host=data.draw(cap), per_datastore=data.draw(cap),
                    datastore_rates=data.draw(st.sampled_from([{}, {"d0": 500.0}])),
                    host_rates=data.draw(st.sampled_from([{}, {"h1": 100.0}])))
    budget = {("d", k): v for k, v in limits.datastore_rates.items()} | {
        ("h", k): v for k, v in limits.host_rates.items()}
    adm = Admission(proxies, limits, stream_rates=RATES)
    specs = {p.name: p for p in proxies}
    capacity = sum(min(p.bandwidth or float("inf"),
                       p.slots * max(RATES[t] for t in p.transports)) for p in proxies)
    queued: dict[str, TaskSpec] = {}
    running: dict[str, Grant] = {}
    use: Counter = Counter()
    committed: Counter = Counter()   # proxy name, ("d", ds), ("h", host) -> rates

    def count(g: Grant) -> None:
        r, nbd = RATES[g.transport], g.transport in NBD_TRANSPORTS
        use["p", g.proxy] += 1
        use["d", g.task.datastore] += 1
        use["h", g.task.host] += nbd
        committed[g.proxy] += r
        committed["d", g.task.datastore] += r
        committed["h", g.task.host] += r if nbd else 0.0

    def within(k: tuple[str, str], r: float) -> bool:
        return k not in budget or committed[k] < 1e-6 or committed[k] + r <= budget[k]

    for step in range(data.draw(st.integers(1, 12))):
        if running and data.draw(st.booleans()):
            assert adm.release(running.pop(data.draw(st.sampled_from(sorted(running)))))
        else:
            for i in range(data.draw(st.integers(1, 6))):
                t = msgspec_replace(data.draw(task_spec(f"t{step}.{i}")), tier=0,
                                    size=data.draw(st.integers(1, 5000)))
                queued[t.key] = t
                adm.add([t])
        use.clear()
        committed.clear()
        for g in running.values():
            count(g)
        got = adm.grants()
        slow = [g for g in got if (g.proxy, g.transport) not in near_best(g.task, specs)]
        for g in got:
            bw, r = specs[g.proxy].bandwidth, RATES[g.transport]
            assert bw is None or committed[g.proxy] < bw
            assert within(("d", g.task.datastore), r)
            assert g.transport not in NBD_TRANSPORTS or within(("h", g.task.host), r)
            count(g)
            running[g.task.key] = queued.pop(g.task.key) and g
        # the second pass's horizon: bytes queued when it began / live capacity
        horizon = ((sum(t.size for t in queued.values()) + sum(g.task.size for g in slow))
                   / capacity if capacity else 0.0)
        for g in slow:
            assert g.task.size / RATES[g.transport] <= horizon * (1 + 1e-9)
        for t in queued.values():
            fast = near_best(t, specs)
            for p, tr in t.options:
                sp = specs[p]
                free = (tr in sp.transports and use["p", p] < sp.slots
                        and (sp.bandwidth is None or committed[p] < sp.bandwidth)
                        and not (tr in NBD_TRANSPORTS and limits.nbd_per_host is not None
                                 and use["h", t.host] >= limits.nbd_per_host)
                        and not (limits.per_datastore is not None
                                 and use["d", t.datastore] >= limits.per_datastore)
                        and within(("d", t.datastore), RATES[tr])
                        and (tr not in NBD_TRANSPORTS or within(("h", t.host), RATES[tr])))
                if free:
                    assert (p, tr) not in fast, f"{t.key} could start on {p}/{tr}"
                    assert t.size / RATES[tr] > horizon * (1 - 1e-9), f"{t.key} fits {p}/{tr}"
