"""The dispatcher: admission's grants become Dask tasks; lost workers become requeues.

One thread owns the loop: it asks admission (vmrestore.schedule) for grants
and hands each to the disk thread waiting for it, and once a second it
compares the proxies Dask reports with the ones it knows: a proxy whose worker
is gone (or came back at another address, i.e. restarted) is ``proxy_lost``:
each of its running grants is marked lost, so the disk thread cancels the
Dask future, revokes the attempt's attachment and waits for its next grant.
A proxy that joins is ``proxy_added``. Only granted tasks are submitted to
Dask, pinned to the proxy's worker (``workers=[proxy]``,
``allow_other_workers=False``, ``resources={'slot': 1}``).

The dispatcher also keeps what the plan report and the live view need:
per-grant intervals (slot use per proxy), the latest progress of each disk
(worker events), and a sample of admission's usage.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmrestore.errors import TransportError, VmrError
from vmrestore.fleet.cluster import live_proxies, workers
from vmrestore.infra import Proxy
from vmrestore.schedule import Admission, Grant, ProxySpec, TaskSpec

log = logging.getLogger("vmrestore.fleet")

POLL = 0.2          # seconds between admission scans when nothing wakes the loop
WATCH = 1.0         # seconds between worker checks
UNPLACEABLE = 120.0  # seconds a task may wait with no live proxy able to take it


class WorkerLost(VmrError):
    """The worker running this attempt died or left: the task is resubmitted."""


class Cancelled(VmrError):
    """The disk's VM failed: its queued disks are dropped."""


@dataclass
class Interval:
    proxy: str
    key: str
    attempt: int
    transport: str
    start: float
    end: float | None = None
    outcome: str = "running"  # ok / lost / failed / running


@dataclass
class _Waiter:
    q: queue.Queue[Grant | BaseException] = field(default_factory=queue.Queue)
    lost: dict[int, threading.Event] = field(default_factory=dict)  # attempt -> lost flag
    unplaceable_since: float | None = None


class Dispatcher:
    """Grants to disk threads, worker watch, progress; see the module docstring."""

    def __init__(self, client: Any, admission: Admission,
                 proxies: dict[str, tuple[str, Proxy]],
                 on_change: Callable[[], None] | None = None) -> None:
        self.client = client
        self.admission = admission
        self.live: dict[str, str] = {n: a for n, (a, _) in proxies.items()}  # name -> address
        self.known: dict[str, Proxy] = {n: p for n, (_, p) in proxies.items()}
        self.on_change = on_change
        self.intervals: list[Interval] = []
        self.progress: dict[str, tuple[int, int, int]] = {}  # key -> (attempt, done, total)
        self.events: list[str] = []
        self.pids: dict[str, int] = {}  # proxy -> its worker's process id
        self._lost_grants: set[tuple[str, int]] = set()  # (key, attempt) given up by proxy_lost
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmr-dispatch", daemon=True)
        self.t0 = time.monotonic()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Dispatcher:
        from vmrestore.fleet.worker import TOPIC

        with contextlib.suppress(Exception):
            self.client.subscribe_topic(TOPIC, self._on_progress)
        with contextlib.suppress(Exception):  # the live view's proxy -> process id
            live_proxies(self.client, self.pids, only=list(self.live.values()))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(Exception):
            from vmrestore.fleet.worker import TOPIC

            self.client.unsubscribe_topic(TOPIC)

    def say(self, msg: str) -> None:
        log.info("%s", msg)
        with self._lock:
            self.events.append(f"{time.monotonic() - self.t0:7.2f}s {msg}")

    # --- what disk threads call -----------------------------------------------------------

    def add(self, task: TaskSpec) -> None:
        with self._lock:
            self._waiters[task.key] = _Waiter()
        self.admission.add([task])
        self._wake.set()

    def proxy(self, name: str) -> Proxy:
        return self.known[name]

    def wait_grant(self, key: str, cancel: Any) -> Grant:
        """Block until the task gets a grant; Cancelled when ``cancel`` is set."""
        w = self._waiters[key]
        while True:
            if cancel.is_set():
                if self.admission.cancel(key):
                    self._forget(key)
                    raise Cancelled(f"{key}: cancelled (its VM failed)")
            try:
                item = w.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                self._forget(key)
                raise item
            with self._lock:
                if (key, item.attempt) in self._lost_grants:
                    continue  # its proxy was lost before it was picked up: requeued already
                w.lost[item.attempt] = threading.Event()
                self.intervals.append(Interval(item.proxy, key, item.attempt, item.transport,
                                               time.monotonic()))
            return item

    def run(self, grant: Grant, fn: Callable[..., Any], *args: Any) -> Any:
        """Submit ``fn(*args)`` to the grant's proxy worker only; returns the Dask future.

        Pinned to the worker's address, not its name: a restarted worker of the same
        name is a new member, and the attempt granted on the old one is lost."""
        addr = self.live.get(grant.proxy)
        with self._lock:
            lost = (grant.task.key, grant.attempt) in self._lost_grants
        if addr is None or lost:
            raise WorkerLost(f"{grant.task.key}: proxy {grant.proxy} lost before attempt "
                             f"{grant.attempt} started")
        return self.client.submit(
            fn, *args, key=f"vmr-{grant.task.key}-a{grant.attempt}-{time.monotonic_ns()}",
            workers=[addr], allow_other_workers=False, resources={"slot": 1}, pure=False,
            retries=0)

    def result(self, grant: Grant, future: Any, cancel: Any) -> Any:
        """The future's result; WorkerLost if its worker died or the proxy was lost.

        Only an error the disk task itself raised (a VmrError) is passed on; anything
        else (KilledWorker, a result lost with its worker, a cancelled gather) means
        the attempt's outcome is unknown: the disk is requeued from its checkpoint.
        The future is released as soon as its outcome is known, so Dask never
        recomputes a finished task whose result died with its worker.
        """
        from distributed import wait

        lost = self._waiters[grant.task.key].lost[grant.attempt]
        try:
            while True:
                if lost.is_set() or (grant.task.key, grant.attempt) in self._lost_grants:
                    raise WorkerLost(f"{grant.task.key}: proxy {grant.proxy} lost during "
                                     f"attempt {grant.attempt}")
                if cancel.is_set():
                    raise Cancelled(f"{grant.task.key}: cancelled (its VM failed)")
                with contextlib.suppress(TimeoutError):
                    wait([future], timeout=0.25)
                status = future.status
                if status == "pending":
                    continue
                if status == "error":
                    exc = future.exception()
                    if isinstance(exc, VmrError):
                        raise exc
                    raise WorkerLost(f"{grant.task.key}: attempt {grant.attempt} on proxy "
                                     f"{grant.proxy} ended with {type(exc).__name__}: {exc}")
                if status != "finished":  # lost (its result died with the worker), cancelled
                    raise WorkerLost(f"{grant.task.key}: attempt {grant.attempt} on proxy "
                                     f"{grant.proxy}: task {status}")
                try:
                    return future.result(timeout=2)
                except TimeoutError:
                    continue  # the result is on a worker that may be gone: look again
                except VmrError:
                    raise
                except BaseException as e:
                    raise WorkerLost(f"{grant.task.key}: the result of attempt "
                                     f"{grant.attempt} was lost with proxy {grant.proxy}'s "
                                     f"worker ({type(e).__name__})") from None
        finally:
            with contextlib.suppress(Exception):
                future.release()

    def finish(self, grant: Grant, outcome: str) -> None:
        """The attempt ended (ok / failed): its resources go back to admission."""
        self._close(grant, outcome)
        self.admission.release(grant)
        if outcome == "ok" or outcome == "failed":
            self._forget(grant.task.key)
        self._wake.set()

    def requeue(self, grant: Grant, task: TaskSpec, outcome: str) -> None:
        """Queue the task again (a lost worker, a failed transport): the next attempt."""
        self._close(grant, outcome)
        if not self.admission.requeue(grant, task):
            # proxy_lost requeued it already (with the old spec): take ours instead.
            if self.admission.cancel(task.key):
                self.admission.add([task])
        self._wake.set()

    def _close(self, grant: Grant, outcome: str) -> None:
        with self._lock:
            for iv in reversed(self.intervals):
                if iv.key == grant.task.key and iv.attempt == grant.attempt:
                    if iv.end is None:
                        iv.end, iv.outcome = time.monotonic(), outcome
                    break

    def _forget(self, key: str) -> None:
        with self._lock:
            self._waiters.pop(key, None)

    # --- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        next_watch = 0.0
        while not self._stop.is_set():
            self._wake.wait(POLL)
            self._wake.clear()
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + WATCH
                try:
                    self._watch()
                except Exception as e:  # a scheduler hiccup: no change known, next round
                    log.warning("worker watch skipped: %s", e)
                self._check_unplaceable(now)
            for g in self.admission.grants():
                w = self._waiters.get(g.task.key)
                if w is None:  # its disk thread is gone (VM failed): give it back
                    self.admission.release(g)
                    continue
                w.q.put(g)
            if self.on_change is not None:
                with contextlib.suppress(Exception):
                    self.on_change()

    def _watch(self) -> None:
        """Membership is the scheduler's word: a proxy is lost when its worker's address is
        no longer a member (dead, or restarted elsewhere); a worker that is merely slow to
        answer is not. New members are asked for their proxy facts."""
        members = workers(self.client)
        for name, addr in list(self.live.items()):
            if addr not in members:
                del self.live[name]
                lost = self.admission.proxy_lost(name)
                self.say(f"proxy {name}: worker {addr} gone; {len(lost)} running disk "
                         "task(s) requeued")
                with self._lock:
                    for g in lost:
                        self._lost_grants.add((g.task.key, g.attempt))
                        w = self._waiters.get(g.task.key)
                        if w is not None and g.attempt in w.lost:
                            w.lost[g.attempt].set()
        known = set(self.live.values())
        new = [a for a in members if a not in known]
        if not new:
            return
        for name, (addr, p) in live_proxies(self.client, self.pids, only=new).items():
            if name in self.live:  # two workers claim one proxy: keep the first
                continue
            self.live[name] = addr
            self.known[name] = p
            self.admission.proxy_added(ProxySpec(name, p.slots, tuple(p.transports)))
            self.say(f"proxy {name}: worker {addr} joined ({p.slots} slots)")

    def _check_unplaceable(self, now: float) -> None:
        stuck = {t.key for t in self.admission.unplaceable()}
        with self._lock:
            for key, w in self._waiters.items():
                if key not in stuck:
                    w.unplaceable_since = None
                elif w.unplaceable_since is None:
                    w.unplaceable_since = now
                elif now - w.unplaceable_since > UNPLACEABLE and self.admission.cancel(key):
                    w.q.put(TransportError(f"{key}: no live proxy can write this disk "
                                           f"(waited {UNPLACEABLE:.0f} s for one)"))

    def _on_progress(self, event: Any) -> None:
        _, msg = event if isinstance(event, tuple) else (0, event)
        if not isinstance(msg, dict):
            return
        key = msg.get("key")
        cur = self.progress.get(key)
        if cur is None or msg["attempt"] >= cur[0]:
            self.progress[key] = (msg["attempt"], msg["done"], msg["total"])

    # --- views ----------------------------------------------------------------------------

    def slot_use(self, end: float | None = None) -> dict[str, dict[str, float]]:
        """Per proxy: slots, busy slot-seconds, peak concurrent tasks, disk attempts."""
        end = end or time.monotonic()
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            ivs = list(self.intervals)
        for name, p in list(self.known.items()):
            mine = [iv for iv in ivs if iv.proxy == name]
            edges = sorted([(iv.start, 1) for iv in mine] +
                           [(iv.end or end, -1) for iv in mine])
            peak = cur = 0
            for _, d in edges:
                cur += d
                peak = max(peak, cur)
            out[name] = {"slots": p.slots,
                         "busy_slot_seconds": sum((iv.end or end) - iv.start for iv in mine),
                         "peak": peak, "attempts": len(mine),
                         "lost": sum(1 for iv in mine if iv.outcome == "lost")}
        return out
