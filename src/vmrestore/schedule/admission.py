"""Admission: which disk task may start now, where, and with which transport.

Pure bookkeeping (no I/O, no Dask, no clock): the Dask runner and the
scheduling simulator drive the same object. The policy and its reasons are in
docs/scheduling.md; in short:

* order: RTO tier, then most constrained (fewest live eligible proxies, in
  powers of two), then longest first per VM (the VM with the longest disk,
  all its disks longest first, then the next VM; work = bytes, or bytes /
  stream rate of the task's preferred transport when ``stream_rates`` is given);
* a task takes its most preferred option that is free now, falling back along
  its option list (hotadd -> nbd); with ``stream_rates``, in two passes: first
  near-best options only, then slower fallbacks for tasks that would finish on
  them within the queue's drain time;
* with ``stream_rates``, rate budgets: a proxy with a known ``bandwidth`` takes
  another stream only while its running streams' rates do not fill it, a
  datastore or host with a rate in ``Limits`` only if the stream still fits;
* a task that cannot start never blocks one behind it that can (the scan goes
  on), but within one class of identical constraints only the head is tried.

Tasks with identical constraints (options, and host / datastore / repository
where a cap or budget applies) share one class with its own sorted queue, so
one call to ``grants()`` looks at each class at most once per pass plus once
per grant, never at every queued task.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from vmrestore.schedule.model import (
    NBD_TRANSPORTS,
    Grant,
    Limits,
    ProxySpec,
    TaskSpec,
    Usage,
)

#: An option is near-best when its stream rate is at least this share of the task's best.
NEAR_BEST = 0.5

_Sig = tuple[tuple[tuple[str, str], ...], str, str, str]


class _Proxy:
    __slots__ = ("alive", "committed", "spec", "used")

    def __init__(self, spec: ProxySpec) -> None:
        self.spec = spec
        self.used = 0
        self.committed = 0.0  # sum of the stream rates of its running grants (bytes/s)
        self.alive = True


class _Options:
    """A class's usable options of one kind (near-best or slower), by rank and by proxy."""

    __slots__ = ("by_proxy", "fastest", "live")

    def __init__(self) -> None:
        self.live: list[tuple[str, str]] = []
        self.by_proxy: dict[str, list[tuple[int, str]]] = {}
        self.fastest = ""   # the transport of the highest stream rate among them

    def put(self, rank: int, p: str, t: str, rates: dict[str, float]) -> None:
        self.live.append((p, t))
        self.by_proxy.setdefault(p, []).append((rank, t))
        if not self.fastest or rates.get(t, 0.0) > rates.get(self.fastest, 0.0):
            self.fastest = t


class _Class:
    """Queued tasks sharing (options, host, datastore, repo): interchangeable but for order."""

    __slots__ = ("cid", "constraint", "ds", "ds_cap", "entry", "fast", "first_rate", "host",
                 "options", "q", "repo", "repo_cap", "slow", "works")

    def __init__(self, cid: int, sig: _Sig, limits: Limits, rates: dict[str, float]) -> None:
        self.cid = cid
        self.options, self.host, self.ds, self.repo = sig
        self.ds_cap = limits.datastores.get(self.ds, limits.per_datastore)
        self.repo_cap = limits.repos.get(self.repo, limits.per_repo)
        self.first_rate = rates.get(self.options[0][1]) if self.options else None
        # sorted (tier, -VM's work, -work, seq, key)
        self.q: list[tuple[int, float, float, int, str]] = []
        self.works: list[float] = []   # the queued tasks' work, ascending
        self.entry: tuple[int, int, float, float, int, int] | None = None  # place in the order
        self.fast = _Options()
        self.slow = _Options()
        self.constraint = 0

    def refresh(self, proxies: dict[str, _Proxy], rates: dict[str, float]) -> None:
        """Recompute the options usable now (live proxy offering the transport)."""
        live = [(rank, p, t) for rank, (p, t) in enumerate(self.options)
                if (px := proxies.get(p)) is not None and px.alive and t in px.spec.transports]
        best = max((rates.get(t, 0.0) for _, _, t in live), default=0.0)
        self.fast, self.slow = _Options(), _Options()
        for rank, p, t in live:
            # Options at under half the best live stream rate are fallbacks (e.g. nbd for
            # a disk that hotadd reaches); without rates every option is near-best.
            near = not rates or rates.get(t, 0.0) >= best * NEAR_BEST
            (self.fast if near else self.slow).put(rank, p, t, rates)
        # Fewer eligible proxies = more constrained = earlier; bucketed in powers of two so
        # that 50 vs 60 eligible proxies does not override longest-first.
        n = len({p for _, p, _ in live})
        self.constraint = n.bit_length() if n else 1 << 30

    @property
    def placeable(self) -> bool:
        return bool(self.fast.live or self.slow.live)


class Admission:
    """Admission controller over proxies and limits; see the module docstring.

    Not re-entrant across threads by itself: every public method takes one lock,
    so a runner may call it from a callback thread and its event loop alike.
    """

    def __init__(self, proxies: Sequence[ProxySpec], limits: Limits | None = None,
                 stream_rates: dict[str, float] | None = None) -> None:
        self.limits = limits or Limits()
        self._rates = dict(stream_rates or {})
        self._lock = threading.Lock()
        self._proxies: dict[str, _Proxy] = {}
        self._free: dict[str, None] = {}  # live proxies with a free slot (ordered set)
        for spec in proxies:
            if spec.name in self._proxies:
                raise ValueError(f"proxy {spec.name!r} listed twice")
            self._proxies[spec.name] = _Proxy(spec)
            self._mark(spec.name)
        self._classes: dict[_Sig, _Class] = {}
        self._by_cid: list[_Class] = []
        self._order: list[tuple[int, int, float, float, int, int]] = []
        self._queued: dict[str, tuple[tuple[int, float, float, int, str], _Class, TaskSpec]] = {}
        self._queued_bytes = 0
        self._capacity = 0.0  # bytes/s the live proxies can move at most (with stream_rates)
        self._running: dict[str, Grant] = {}
        self._attempts: Counter[str] = Counter()
        self._host_nbd: Counter[str] = Counter()
        self._ds: Counter[str] = Counter()
        self._repo: Counter[str] = Counter()
        self._seq = 0
        self._vm_work: dict[str, float] = {}   # VM -> work of its longest disk queued so far
        # rate budgets beyond proxy bandwidth: ("d", datastore) and ("h", host) -> bytes/s
        self._budget: dict[tuple[str, str], float] = {}
        if self._rates:
            self._budget.update((("d", k), v) for k, v in self.limits.datastore_rates.items())
            self._budget.update((("h", k), v) for k, v in self.limits.host_rates.items())
        self._load: Counter[tuple[str, str]] = Counter()
        self._vc = threading.Condition()
        self._vc_used = 0
        self._recapacity()

    # --- queue --------------------------------------------------------------------------

    def add(self, tasks: Iterable[TaskSpec]) -> None:
        """Queue tasks; a key already queued or running is an error."""
        with self._lock:
            batch = list(tasks)
            for t in batch:   # a VM's disks sort by the VM's longest disk first
                w = self._work(t)
                if w > self._vm_work.get(t.vm, -1.0):
                    self._vm_work[t.vm] = w
            for t in batch:
                self._enqueue(t)

    def cancel(self, key: str) -> bool:
        """Drop a queued task (e.g. its VM failed); False if it is not queued."""
        with self._lock:
            if key not in self._queued:
                return False
            self._dequeue(key)
            return True

    def grants(self) -> list[Grant]:
        """Every queued task that may start now, in order; their resources are taken.

        First pass: near-best options only, in the task order. Second pass (only
        with ``stream_rates``): slower fallbacks for what is left, each class
        giving its first task that would finish on the fallback within the
        queue's drain time (queued bytes / live capacity), so a slow stream
        does not become the plan's tail.
        """
        out: list[Grant] = []
        with self._lock:
            self._pass(out, None)
            if self._rates and self._free and self._capacity > 0:
                self._pass(out, self._queued_bytes / self._capacity)
        return out

    def _pass(self, out: list[Grant], horizon: float | None) -> None:
        order, free, lim_nbd = self._order, self._free, self.limits.nbd_per_host
        i = 0
        while free and i < len(order):
            c = self._by_cid[order[i][-1]]
            if ((c.ds_cap is not None and self._ds[c.ds] >= c.ds_cap)
                    or (c.repo_cap is not None and self._repo[c.repo] >= c.repo_cap)):
                i += 1
                continue
            host_ok = lim_nbd is None or self._host_nbd[c.host] < lim_nbd
            if horizon is None:
                choice = self._pick(c, c.fast, host_ok)
                j = 0
            else:
                choice, j = self._fallback(c, host_ok, horizon)
            if choice is None:
                i += 1
                continue
            task = self._dequeue(c.q[j][4])   # keeps the class at or after i
            out.append(self._take(task, *choice))

    def _pick(self, c: _Class, opts: _Options, host_ok: bool,
              ok: Callable[[str], bool] | None = None) -> tuple[str, str] | None:
        """The most preferred of these options that is free now (and passes ``ok``)."""
        free = self._free
        room = self._room if self._budget else None
        if len(free) < len(opts.live):
            best: tuple[int, str, str] | None = None
            for p in free:
                for rank, t in opts.by_proxy.get(p, ()):
                    if ((host_ok or t not in NBD_TRANSPORTS) and (ok is None or ok(t))
                            and (room is None or room(c, p, t))):
                        if best is None or rank < best[0]:
                            best = (rank, p, t)
                        break
            return None if best is None else (best[1], best[2])
        for p, t in opts.live:
            if (p in free and (host_ok or t not in NBD_TRANSPORTS) and (ok is None or ok(t))
                    and (room is None or room(c, p, t))):
                return p, t
        return None

    def _room(self, c: _Class, p: str, t: str) -> bool:
        """Would one more stream of ``t`` fit the datastore's and host's rate budgets?

        An idle resource always takes one stream, so a budget below one stream's
        rate slows that stream instead of stranding the task.
        """
        r = self._rates.get(t, 0.0)
        if self._budget:
            for k in (("d", c.ds), ("h", c.host)) if t in NBD_TRANSPORTS else (("d", c.ds),):
                b = self._budget.get(k)
                if b is not None and self._load[k] > 0 and self._load[k] + r > b * (1 + 1e-9):
                    return False
        return True

    def _fallback(self, c: _Class, host_ok: bool,
                  horizon: float) -> tuple[tuple[str, str] | None, int]:
        """A slow option and the class's first task (in its head's tier) done within horizon."""
        if not c.slow.live or not c.q:
            return None, 0
        tier = c.q[0][0]
        scale = c.first_rate or 1.0   # work is bytes / first_rate (or bytes)
        found: dict[str, int] = {}

        def fits(t: str) -> bool:
            # the first task in order with size / rate(t) <= horizon,
            # i.e. work <= horizon * rate / scale
            j = found.get(t)
            if j is None:
                limit = horizon * self._rates.get(t, 0.0) / scale
                j = -1
                if c.works[0] <= limit:   # else none fits: no scan
                    for k, e in enumerate(c.q):
                        if e[0] != tier:
                            break
                        if -e[2] <= limit:
                            j = k
                            break
                found[t] = j
            return j >= 0

        if not fits(c.slow.fastest):
            return None, 0      # not even its smallest task would finish in time

        choice = self._pick(c, c.slow, host_ok, fits)
        return choice, (found[choice[1]] if choice else 0)

    # --- running grants ----------------------------------------------------------------

    def release(self, grant: Grant) -> bool:
        """The grant's task finished or failed for good: free its resources.

        False (and nothing changes) if ``grant`` is not the task's current
        attempt, e.g. it was already requeued by ``proxy_lost``.
        """
        with self._lock:
            return self._drop(grant)

    def requeue(self, grant: Grant, task: TaskSpec | None = None) -> bool:
        """Its worker died or it must run elsewhere: free its resources and queue it again.

        ``task`` (same key) replaces the spec, e.g. with ``size`` reduced to the
        bytes left after the last durable checkpoint. False if ``grant`` is stale.
        """
        with self._lock:
            if not self._drop(grant):
                return False
            new = task or grant.task
            if new.key != grant.task.key:
                raise ValueError(f"requeue of {grant.task.key!r} with task {new.key!r}")
            self._enqueue(new)
            return True

    def proxy_lost(self, name: str) -> list[Grant]:
        """Proxy gone: its running grants are requeued (returned) and it gets no more tasks.

        Its options stay in the tasks (a ``proxy_added`` of the same name makes
        them usable again); queued tasks left with no live option are reported
        by ``unplaceable()``.
        """
        with self._lock:
            px = self._proxies.get(name)
            if px is None or not px.alive:
                return []
            px.alive = False
            self._free.pop(name, None)
            lost = sorted((g for g in self._running.values() if g.proxy == name),
                          key=lambda g: g.task.key)
            for g in lost:
                self._drop(g)
            self._refresh_all()
            self._recapacity()
            for g in lost:
                self._enqueue(g.task)
            return lost

    def proxy_added(self, spec: ProxySpec) -> None:
        """A proxy joined (or came back, possibly with other slots/transports)."""
        with self._lock:
            px = self._proxies.get(spec.name)
            if px is None:
                px = self._proxies[spec.name] = _Proxy(spec)
            px.spec, px.alive = spec, True
            self._mark(spec.name)
            self._refresh_all()
            self._recapacity()

    # --- vCenter control operations ----------------------------------------------------

    def vcenter_acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one of ``Limits.vcenter_ops`` slots; False if not blocking (or timed out)."""
        with self._vc:
            if blocking:
                ok = self._vc.wait_for(lambda: self._vc_used < self.limits.vcenter_ops, timeout)
            else:
                ok = self._vc_used < self.limits.vcenter_ops
            if ok:
                self._vc_used += 1
            return ok

    def vcenter_release(self) -> None:
        with self._vc:
            if self._vc_used <= 0:
                raise ValueError("vcenter_release without a matching acquire")
            self._vc_used -= 1
            self._vc.notify()

    @contextmanager
    def vcenter_op(self, timeout: float | None = None) -> Iterator[None]:
        """Hold one vCenter operation slot for the block (waits for one)."""
        if not self.vcenter_acquire(True, timeout):
            raise TimeoutError(f"no vCenter operation slot free within {timeout} s")
        try:
            yield
        finally:
            self.vcenter_release()

    # --- views ---------------------------------------------------------------------------

    def queued(self) -> int:
        return len(self._queued)

    def running(self) -> list[Grant]:
        with self._lock:
            return list(self._running.values())

    def unplaceable(self) -> list[TaskSpec]:
        """Queued tasks none of whose options is on a live proxy offering that transport."""
        with self._lock:
            return [t for _, c, t in self._queued.values() if not c.placeable]

    def usage(self) -> Usage:
        with self._lock:
            return Usage(
                slots={n: p.used for n, p in self._proxies.items() if p.used or p.alive},
                slot_capacity={n: p.spec.slots for n, p in self._proxies.items() if p.alive},
                nbd_per_host={k: v for k, v in self._host_nbd.items() if v},
                per_datastore={k: v for k, v in self._ds.items() if v},
                per_repo={k: v for k, v in self._repo.items() if v},
                vcenter_ops=self._vc_used,
                queued=len(self._queued),
                running=len(self._running),
                unplaceable=sum(1 for _, c, _ in self._queued.values() if not c.placeable),
            )

    # --- internals (lock held) -----------------------------------------------------------

    def _mark(self, name: str) -> None:
        px = self._proxies[name]
        bw = px.spec.bandwidth
        if px.alive and px.used < px.spec.slots and (bw is None or px.committed < bw):
            self._free[name] = None
        else:
            self._free.pop(name, None)

    def _enqueue(self, t: TaskSpec) -> None:
        if t.key in self._queued or t.key in self._running:
            raise ValueError(f"task {t.key!r} is already queued or running")
        # Host, datastore and repository split classes only where a cap makes them matter.
        lim = self.limits
        nbd = any(tr in NBD_TRANSPORTS for _, tr in t.options) and (
            lim.nbd_per_host is not None or ("h", t.host) in self._budget)
        sig = (t.options, t.host if nbd else "",
               t.datastore if lim.per_datastore is not None or t.datastore in lim.datastores
               or ("d", t.datastore) in self._budget else "",
               t.repo if lim.per_repo is not None or t.repo in lim.repos else "")
        c = self._classes.get(sig)
        if c is None:
            c = self._classes[sig] = _Class(len(self._by_cid), sig, self.limits, self._rates)
            self._by_cid.append(c)
            c.refresh(self._proxies, self._rates)
        self._seq += 1
        w = self._work(t)
        entry = (t.tier, -max(w, self._vm_work.get(t.vm, w)), -w, self._seq, t.key)
        self._queued[t.key] = (entry, c, t)
        self._queued_bytes += t.size
        insort(c.q, entry)
        insort(c.works, w)
        if entry is c.q[0]:
            self._reorder(c)

    def _work(self, t: TaskSpec) -> float:
        rate = self._rates.get(t.options[0][1]) if t.options and self._rates else None
        return t.size / rate if rate else float(t.size)

    def _dequeue(self, key: str) -> TaskSpec:
        entry, c, t = self._queued.pop(key)
        self._queued_bytes -= t.size
        j = bisect_left(c.q, entry)
        del c.q[j]
        del c.works[bisect_left(c.works, -entry[2])]
        if j == 0:
            self._reorder(c)
        return t

    def _reorder(self, c: _Class) -> None:
        """Put the class at the place of its head task in the order (or out of it)."""
        h = c.q[0] if c.q else None
        entry = (h[0], c.constraint, h[1], h[2], h[3], c.cid) if h else None
        if entry == c.entry:
            return
        if c.entry is not None:
            del self._order[bisect_left(self._order, c.entry)]
        c.entry = entry
        if entry is not None:
            insort(self._order, entry)

    def _refresh_all(self) -> None:
        """Recompute every class's live options and constraint, then the whole order."""
        self._order = []
        for c in self._by_cid:
            c.refresh(self._proxies, self._rates)
            c.entry = None
            self._reorder(c)

    def _recapacity(self) -> None:
        """Live capacity: each proxy min(bandwidth, slots x its fastest known stream rate)."""
        total = 0.0
        for px in self._proxies.values():
            if px.alive:
                r = max((self._rates.get(t, 0.0) for t in px.spec.transports), default=0.0)
                cap = px.spec.slots * r
                total += cap if px.spec.bandwidth is None else min(cap, px.spec.bandwidth)
        self._capacity = total

    def _take(self, task: TaskSpec, proxy: str, transport: str) -> Grant:
        px = self._proxies[proxy]
        px.used += 1
        r = self._rates.get(transport, 0.0)
        px.committed += r
        self._mark(proxy)
        if self._budget:
            self._load["d", task.datastore] += r
            if transport in NBD_TRANSPORTS:
                self._load["h", task.host] += r
        if transport in NBD_TRANSPORTS:
            self._host_nbd[task.host] += 1
        self._ds[task.datastore] += 1
        self._repo[task.repo] += 1
        self._attempts[task.key] += 1
        g = Grant(task=task, proxy=proxy, transport=transport, attempt=self._attempts[task.key])
        self._running[task.key] = g
        return g

    def _drop(self, g: Grant) -> bool:
        cur = self._running.get(g.task.key)
        if cur is None or cur.attempt != g.attempt or cur.proxy != g.proxy:
            return False
        del self._running[g.task.key]
        px = self._proxies[g.proxy]
        px.used -= 1
        r = self._rates.get(g.transport, 0.0)
        px.committed -= r
        if px.committed < 1e-6:
            px.committed = 0.0   # no drift: an idle proxy is exactly idle
        self._mark(g.proxy)
        if self._budget:
            keys = [("d", g.task.datastore)]
            if g.transport in NBD_TRANSPORTS:
                keys.append(("h", g.task.host))
            for k in keys:
                self._load[k] -= r
                if self._load[k] < 1e-6:
                    self._load[k] = 0.0
        if g.transport in NBD_TRANSPORTS:
            self._host_nbd[g.task.host] -= 1
        self._ds[g.task.datastore] -= 1
        self._repo[g.task.repo] -= 1
        return True
