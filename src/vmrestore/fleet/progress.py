"""The plan's live view: one screen on a terminal, JSON lines otherwise.

Fed once a second with the runner's snapshot (VMs done/running/queued/failed,
disk bytes done, slots in use per proxy). On a terminal a rich Live panel
redraws in place; on a pipe each snapshot is one JSON object per line on
stderr (``{"event": "plan-progress", ...}``, docs/fleet.md), so ``--json`` on
stdout stays the report alone. Mode as ui.Display: ``VMRESTORE_PROGRESS``
(rich | plain | none) overrides the TTY check; ``-q`` is none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any


class PlanProgress:
    def __init__(self, mode: str = "auto", stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        env = os.environ.get("VMRESTORE_PROGRESS")
        if mode == "auto":
            mode = env if env in ("rich", "plain", "none") else (
                "rich" if self.stream.isatty() else "plain")
        self.mode = mode
        self._live: Any = None
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def __enter__(self) -> PlanProgress:
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), refresh_per_second=2,
                              transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def update(self, snap: dict[str, Any], final: bool = False) -> None:
        now, done = time.monotonic(), int(snap.get("bytes_done", 0))
        if self._last is not None and now > self._last[0]:
            inst = max(0, done - self._last[1]) / (now - self._last[0]) / 1e6
            self.rate = inst if self.rate == 0 else 0.5 * self.rate + 0.5 * inst
        self._last = (now, done)
        if self.mode == "plain":
            self.stream.write(json.dumps({"event": "plan-progress", "final": final,
                                          "mb_per_s": round(self.rate, 1), **snap}) + "\n")
            self.stream.flush()
        elif self.mode == "rich" and self._live is not None:
            self._live.update(self._render(snap))

    def _render(self, snap: dict[str, Any]) -> Any:
        from rich.table import Table

        v = snap["vms"]
        t = Table(title=f"plan: {v['done']} done, {v['running']} running, {v['queued']} queued"
                  f", {v['failed']} failed  |  {self.rate:.1f} MB/s  |  {snap['t']:.0f} s",
                  title_justify="left", show_edge=False)
        t.add_column("proxy")
        t.add_column("slots in use")
        for name, cap in sorted(snap["slot_capacity"].items()):
            used = snap["slots"].get(name, 0)
            t.add_row(name, f"{'#' * used}{'.' * max(0, cap - used)} {used}/{cap}")
        t.caption = (f"disks: {snap['disks_running']} running, {snap['disks_queued']} queued;"
                     f" vCenter ops {snap['vcenter_ops']}")
        return t
