"""Discrete-event simulation of a mass restore, driving the real ``Admission``.

Simulated time, one heap of events. What is modelled (docs/scheduling.md):

* each VM: a *prepare* vCenter operation (register, create disks, snapshot),
  then its disk tasks go to admission, then a *finish* operation (commit
  snapshot, power on) after its last disk; vCenter operations wait for one of
  ``Limits.vcenter_ops`` slots (finish before prepare, then the task order);
* a granted hotadd task first attaches (uniform ``Scenario.attach`` seconds,
  holding its slot), then streams;
* streams share bandwidth: a stream's rate is the least of its transport's
  stream rate and its max-min fair share of its proxy's bandwidth, its
  datastore's rate and (NBD only) its host's NFC rate, each resource taken
  alone; every start and end re-rates the streams sharing a resource with it;
* a killed proxy loses its running tasks; each resumes elsewhere from its
  last durable checkpoint (every ``Scenario.checkpoint`` bytes of the disk),
  the bytes after it are copied again and counted; the proxy's worker comes
  back after ``Kill.down`` seconds.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import defaultdict

import msgspec

from vmrestore.schedule.admission import Admission
from vmrestore.schedule.bound import Bound, lower_bound
from vmrestore.schedule.model import NBD_TRANSPORTS, Grant
from vmrestore.schedule.scenario import Scenario


class Result(msgspec.Struct):
    seed: int
    makespan: float          # seconds, plan start to the last VM ready
    bound: Bound
    ratio: float             # makespan / bound
    rto_p50: float
    rto_p99: float
    rto_by_tier: dict[int, tuple[float, float]]   # tier -> (p50, p99)
    tasks: int
    total_bytes: int
    recopied_bytes: int      # copied again after proxy kills (past the last checkpoint)
    kills: int
    grants: int
    by_transport: dict[str, int]   # bytes moved per transport, re-copies included
    events: int
    admission_cpu: float     # CPU seconds spent inside Admission
    sim_cpu: float           # CPU seconds of the whole simulation


class _Stream:
    __slots__ = ("base", "done", "grant", "groups", "last", "live", "rate", "version")

    def __init__(self, grant: Grant, base: int) -> None:
        self.grant = grant
        self.base = base          # bytes of the disk durable before this attempt
        self.done = 0.0           # bytes moved by this attempt
        self.rate = 0.0
        self.last = 0.0
        self.version = 0
        self.live = True
        self.groups: tuple[tuple[str, str], ...] = ()


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else 0.0


class _Sim:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.adm = Admission(sc.proxies, sc.limits, stream_rates=sc.stream_rates)
        self.rnd = random.Random(sc.seed * 7919 + 1)
        self.now = 0.0
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.task = {t.key: t for t in sc.tasks}
        self.vm = {v.name: v for v in sc.vms}
        self.left = {v.name: len(v.disks) for v in sc.vms}
        self.ready: dict[str, float] = {}
        self.vc_wait: list[tuple[tuple, int, str, str]] = []
        self.streams: dict[str, _Stream] = {}
        self.members: dict[tuple[str, str], set[_Stream]] = defaultdict(set)
        self.cap: dict[tuple[str, str], float] = {}
        for p in sc.proxies:
            if p.bandwidth is not None:
                self.cap["p", p.name] = p.bandwidth
        for d, r in sc.datastore_rate.items():
            self.cap["d", d] = r
        for h, r in sc.host_nbd_rate.items():
            self.cap["h", h] = r
        self.spec = {p.name: p for p in sc.proxies}
        self.recopied = 0
        self.grants = 0
        self.moved: dict[str, float] = defaultdict(float)
        self.adm_cpu = 0.0
        self.n_events = 0

    # --- plumbing ------------------------------------------------------------------------

    def push(self, at: float, kind: str, obj: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, obj))

    def call(self, fn, *args):
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            self.adm_cpu += time.process_time() - t0

    # --- vCenter operations ----------------------------------------------------------------

    def vc_request(self, vm: str, kind: str) -> None:
        v = self.vm[vm]
        if kind == "finish":
            prio: tuple = (0,)
        else:
            longest = max(self.task[k].size for k in v.disks) if v.disks else 0
            prio = (1, v.tier, -longest)
        self.seq += 1
        heapq.heappush(self.vc_wait, (prio, self.seq, vm, kind))

    def vc_dispatch(self) -> None:
        while self.vc_wait and self.call(self.adm.vcenter_acquire, False):
            _, _, vm, kind = heapq.heappop(self.vc_wait)
            v = self.vm[vm]
            self.push(self.now + (v.prepare if kind == "prepare" else v.finish), "vc", (vm, kind))

    def vc_done(self, vm: str, kind: str) -> None:
        self.call(self.adm.vcenter_release)
        if kind == "finish":
            self.ready[vm] = self.now
        elif self.vm[vm].disks:
            self.call(self.adm.add, [self.task[k] for k in self.vm[vm].disks])
        else:
            self.vc_request(vm, "finish")

    # --- streams ---------------------------------------------------------------------------

    def settle(self, s: _Stream) -> None:
        moved = s.rate * (self.now - s.last)
        s.done += moved
        self.moved[s.grant.transport] += moved
        s.last = self.now

    def rerate(self, affected: set[_Stream]) -> None:
        rates = self.sc.stream_rates
        levels: dict[tuple[str, str], float] = {}
        for s in affected:
            self.settle(s)
            r = rates[s.grant.transport]
            for g in s.groups:
                if g in self.cap:
                    if g not in levels:
                        levels[g] = self.level(g)
                    r = min(r, levels[g])
            s.rate = r
            s.version += 1
            left = max(0.0, s.grant.task.size - s.done)
            self.push(self.now + left / r, "done", (s, s.version))

    def level(self, g: tuple[str, str]) -> float:
        """Max-min fair share of one resource: streams wanting less get what they want."""
        rates = self.sc.stream_rates
        wants = sorted(rates[s.grant.transport] for s in self.members[g])
        left, n = self.cap[g], len(wants)
        for i, w in enumerate(wants):
            if w * (n - i) >= left:
                return left / (n - i)
            left -= w
        return float("inf")

    def join(self, s: _Stream) -> None:
        g = s.grant
        groups = [("p", g.proxy), ("d", g.task.datastore)]
        if g.transport in NBD_TRANSPORTS:
            groups.append(("h", g.task.host))
        s.groups = tuple(groups)
        s.last = self.now
        affected = {s}
        for k in s.groups:
            self.members[k].add(s)
            if k in self.cap:
                affected |= self.members[k]
        self.rerate(affected)

    def leave(self, s: _Stream) -> None:
        self.settle(s)
        affected: set[_Stream] = set()
        for k in s.groups:
            self.members[k].discard(s)
            if k in self.cap:
                affected |= self.members[k]
        s.groups = ()
        self.rerate(affected)

    def start(self, g: Grant) -> None:
        self.grants += 1
        s = _Stream(g, self.task[g.task.key].size - g.task.size)
        self.streams[g.task.key] = s
        if g.transport == "hotadd" and self.sc.attach[1] > 0:
            self.push(self.now + self.rnd.uniform(*self.sc.attach), "attached", (s, 0))
        else:
            self.join(s)

    def finished(self, s: _Stream) -> None:
        self.leave(s)
        s.live = False
        del self.streams[s.grant.task.key]
        self.call(self.adm.release, s.grant)
        self.disk_done(s.grant.task.vm)

    def disk_done(self, vm: str) -> None:
        self.left[vm] -= 1
        if self.left[vm] == 0:
            self.vc_request(vm, "finish")

    def kill(self, proxy: str, down: float) -> None:
        lost = self.call(self.adm.proxy_lost, proxy)
        ck = self.sc.checkpoint
        for g in lost:
            s = self.streams.pop(g.task.key)
            if s.groups:
                self.leave(s)
            s.live = False
            reached = s.base + int(s.done)
            durable = max(s.base, reached // ck * ck)
            self.recopied += reached - durable
            full = self.task[g.task.key].size
            self.call(self.adm.cancel, g.task.key)
            if durable >= full:
                self.disk_done(g.task.vm)
            else:
                new = msgspec.structs.replace(g.task, size=full - durable)
                self.call(self.adm.add, [new])
        self.push(self.now + down, "back", proxy)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> float:
        for v in self.sc.vms:
            self.vc_request(v.name, "prepare")
        for k in self.sc.kills:
            self.push(k.at, "kill", (k.proxy, k.down))
        self.vc_dispatch()
        while len(self.ready) < len(self.vm):
            if not self.events:
                raise RuntimeError(f"simulation stuck at {self.now:.0f} s: "
                                   f"{self.adm.queued()} tasks queued, none can start")
            self.now = self.events[0][0]
            while self.events and self.events[0][0] <= self.now:
                _, _, kind, obj = heapq.heappop(self.events)
                self.n_events += 1
                if kind == "done":
                    s, version = obj  # type: ignore[misc]
                    if s.live and version == s.version:
                        self.finished(s)
                elif kind == "attached":
                    s, _ = obj  # type: ignore[misc]
                    if s.live:
                        self.join(s)
                elif kind == "vc":
                    self.vc_done(*obj)  # type: ignore[misc]
                elif kind == "kill":
                    self.kill(*obj)  # type: ignore[misc]
                elif kind == "back":
                    self.call(self.adm.proxy_added, self.spec[obj])
            for g in self.call(self.adm.grants):
                self.start(g)
            self.vc_dispatch()
        return max(self.ready.values(), default=0.0)


def simulate(sc: Scenario, bound: Bound | None = None) -> Result:
    """Run the scenario to the last VM ready; makespan against the lower bound."""
    t0 = time.process_time()
    bound = bound or lower_bound(sc)
    sim = _Sim(sc)
    makespan = sim.run()
    rtos = list(sim.ready.values())
    tiers: dict[int, list[float]] = defaultdict(list)
    for v in sc.vms:
        tiers[v.tier].append(sim.ready[v.name])
    return Result(
        seed=sc.seed, makespan=makespan, bound=bound,
        ratio=makespan / bound.value if bound.value else float("nan"),
        rto_p50=_pct(rtos, 0.50), rto_p99=_pct(rtos, 0.99),
        rto_by_tier={k: (_pct(v, 0.50), _pct(v, 0.99)) for k, v in sorted(tiers.items())},
        tasks=len(sc.tasks), total_bytes=sum(t.size for t in sc.tasks), recopied_bytes=sim.recopied,
        kills=len(sc.kills), grants=sim.grants,
        by_transport={k: int(v) for k, v in sorted(sim.moved.items())},
        events=sim.n_events, admission_cpu=sim.adm_cpu, sim_cpu=time.process_time() - t0,
    )


class Summary(msgspec.Struct):
    """Several seeds of one fleet: what docs/benchmarks.md records."""

    seeds: list[int]
    ratio_median: float
    ratio_worst: float
    binding_terms: dict[str, int]      # kind of binding term -> seeds
    rto_p50_median: float              # seconds, median over seeds of each seed's p50
    rto_p99_median: float
    rto_p99_worst: float
    rto_by_tier: dict[int, tuple[float, float]]   # tier -> medians over seeds of (p50, p99)
    recopied_bytes_total: int
    recopied_bytes_mean: float
    kills_total: int
    admission_cpu_per_sim_hour: float  # CPU seconds inside Admission per simulated hour
    results: list[Result]


def summarize(results: list[Result]) -> Summary:
    ratios = [r.ratio for r in results]
    terms: dict[str, int] = defaultdict(int)
    for r in results:
        terms[r.bound.term.split(" ")[0]] += 1
    sim_hours = sum(r.makespan for r in results) / 3600
    return Summary(
        seeds=[r.seed for r in results],
        ratio_median=_median(ratios),
        ratio_worst=max(ratios),
        binding_terms=dict(sorted(terms.items())),
        rto_p50_median=_median([r.rto_p50 for r in results]),
        rto_p99_median=_median([r.rto_p99 for r in results]),
        rto_p99_worst=max(r.rto_p99 for r in results),
        rto_by_tier={k: (_median([r.rto_by_tier[k][0] for r in results if k in r.rto_by_tier]),
                         _median([r.rto_by_tier[k][1] for r in results if k in r.rto_by_tier]))
                     for k in sorted({k for r in results for k in r.rto_by_tier})},
        recopied_bytes_total=sum(r.recopied_bytes for r in results),
        recopied_bytes_mean=sum(r.recopied_bytes for r in results) / len(results),
        kills_total=sum(r.kills for r in results),
        admission_cpu_per_sim_hour=sum(r.admission_cpu for r in results) / sim_hours
        if sim_hours else 0.0,
        results=results,
    )


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2 if s else 0.0
