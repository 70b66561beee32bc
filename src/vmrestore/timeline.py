"""Per-disk counter samples over time: the data behind the report's timeline.

Why: a final "write 96 % busy" says where the time went on average; an
engineer tuning a restore wants to see *when* (a slow start, a stall, the
final flush). The core's counters are read every ``interval`` seconds anyway
(progress); a :class:`Sampler` keeps those readings as a few columns of
cumulative numbers, small enough to live in the JSON report (documented in
docs/restore.md, "Timeline"; drawn by ``vmrestore report --html``).

A disk may run as several core jobs (plan slices, reconnects): each job's
counters start from zero, so every job gets its own :meth:`Sampler.segment`
callback, and the sampler adds the finished jobs' totals to the next ones.
Long restores are thinned (every other sample dropped) so a disk never
keeps more than ``max_samples`` points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

TIMELINE_VERSION = 2  # 2: busy_s.throttle (version 1 documents read it as zeros)
SAMPLE_INTERVAL = 0.1  # seconds between counter readings (also the progress refresh)
PLACES = ("source", "proxy", "network", "target")  # where a disk's time is spent
# "throttle" is not a place but a choice: time the readers waited for --max-rate.
ROLES = (*PLACES, "throttle")
_BYTES = ("written", "zeroed", "skipped")


def stage_roles(transport: str) -> dict[str, str]:
    """Core stage -> where that time is spent, for a transport.

    The writer stage is network time for nbd/nbdssl (the host's own disk write
    sits behind the socket) and target time for local I/O (hotadd, san, files).
    The readers' waits for the rate limit (``max_rate``) are their own role, so a
    held-back disk says so instead of looking idle.
    """
    write = "network" if transport in ("nbd", "nbdssl") else "target"
    return {"read": "source", "decompress": "proxy", "write": write, "throttle": "throttle"}


def role_busy(transport: str, stage: dict[str, float]) -> dict[str, float]:
    """Stage busy fractions (read/decompress/write) -> source/proxy/network/target."""
    out = dict.fromkeys(ROLES, 0.0)
    for st, role in stage_roles(transport).items():
        out[role] = stage.get(st, 0.0)
    if not out["throttle"]:  # only a held-back disk names the rate limit
        del out["throttle"]
    return out


class Sampler:
    """Cumulative bytes and busy seconds of one disk, sampled from core counters."""

    def __init__(self, transport: str, max_samples: int = 2000) -> None:
        self.roles = stage_roles(transport)
        self.max_samples = max(16, max_samples)
        self._t0 = time.monotonic()
        self._base: dict[str, float] = {}      # totals of the finished segments
        self._last: dict[str, float] = {}      # latest reading of the current segment
        self._step = 1                          # keep every _step-th reading (thinning)
        self._seen = 0
        self.t: list[float] = []
        self.cols: dict[str, list[float]] = {k: [] for k in (*_BYTES, *ROLES)}

    def segment(self, then: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
        """An ``on_counters`` callback for one core job; calls ``then(c)`` after sampling."""
        self._fold()

        def on_counters(c: Any) -> None:
            self.add(c)
            if then is not None:
                then(c)

        return on_counters

    def _fold(self) -> None:
        for k, v in self._last.items():
            self._base[k] = self._base.get(k, 0.0) + v
        self._last = {}

    def add(self, c: Any) -> None:
        """Record one counters reading (vmrestore.pipeline.Counters) of the current job."""
        busy_ns = c.busy_ns
        now = {"written": c.bytes_written, "zeroed": c.bytes_zeroed,
               "skipped": c.bytes_skipped}
        for role in ROLES:
            now[role] = 0.0
        for st, role in self.roles.items():
            now[role] += busy_ns.get(st, 0.0) / 1e9
        self._last = now
        self._seen += 1
        if (self._seen - 1) % self._step and c.running:
            return
        self.t.append(round(time.monotonic() - self._t0, 3))
        for k, col in self.cols.items():
            v = self._base.get(k, 0.0) + now[k]
            col.append(int(v) if k in _BYTES else round(v, 4))
        if len(self.t) > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        """Halve the resolution: keep every other point (always the newest)."""
        keep = list(range(len(self.t) - 1, -1, -2))[::-1]
        self.t = [self.t[i] for i in keep]
        self.cols = {k: [v[i] for i in keep] for k, v in self.cols.items()}
        self._step *= 2

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (docs/restore.md, "Timeline")."""
        return {"version": TIMELINE_VERSION, "t": self.t,
                **{k: self.cols[k] for k in _BYTES},
                "busy_s": {r: self.cols[r] for r in ROLES}}


def busy_column(tl: dict[str, Any], role: str) -> list[float]:
    """The cumulative busy seconds of a role; zeros where a document lacks it (version 1)."""
    col = (tl.get("busy_s") or {}).get(role)
    return col if col is not None else [0.0] * len(tl.get("t", []))


def intervals(tl: dict[str, Any]) -> list[dict[str, float]]:
    """Per sampling interval: start, end, MB/s (data and zeros) and busy share per role.

    Busy share = busy seconds gained in the interval / its length (0..1, one
    role may exceed 1 only through rounding, so it is clipped).
    """
    t = [0.0, *tl.get("t", [])]
    out: list[dict[str, float]] = []
    busy = {r: busy_column(tl, r) for r in ROLES}
    prev = {k: 0.0 for k in (*_BYTES, *ROLES)}
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        if dt <= 0:
            continue
        cur = {k: float(tl[k][i - 1]) for k in _BYTES}
        cur.update({r: float(busy[r][i - 1]) for r in ROLES})
        row = {"t0": t[i - 1], "t1": t[i],
               "data_mbps": (cur["written"] - prev["written"]) / dt / 1e6,
               "zero_mbps": (cur["zeroed"] + cur["skipped"] - prev["zeroed"]
                             - prev["skipped"]) / dt / 1e6}
        for r in ROLES:
            row[r] = min(1.0, max(0.0, (cur[r] - prev[r]) / dt))
        out.append(row)
        prev = cur
    return out


def bottleneck(tl: dict[str, Any]) -> tuple[str, float, float]:
    """(role, its busy share over the whole disk, share of intervals where it led).

    The role busiest over the whole run is the bottleneck: it is the stage
    the others wait for. Under ~50 % nothing is saturated (start-up, latency
    or the source's speed dominate); the caller says so.
    """
    rows = intervals(tl)
    if not rows:
        return "", 0.0, 0.0
    span = rows[-1]["t1"]
    totals = {r: float(busy_column(tl, r)[-1]) for r in ROLES}
    role = max(ROLES, key=lambda r: totals[r])
    led = sum(1 for x in rows if max(ROLES, key=lambda r: x[r]) == role)
    return role, min(1.0, totals[role] / span) if span > 0 else 0.0, led / len(rows)
