"""Start `vmrestore proxy-mover` as a subprocess, stream its events, get its result.

For the orchestrator (docs/proxy-mover.md)::

    from vmrestore.mover.launcher import ProxyMover
    with ProxyMover(job_dict) as pm:
        for ev in pm.events():          # dicts, in order; ends at the 'result' line
            ...                          # progress / warning / disk_done / error
    res = pm.result                      # MoverResult: exit_code, status, result, stderr

The job goes through stdin, so a token path (never a token) appears in it.
The default argv passes ``--parent-pid``: the mover gets SIGTERM when the
thread that started it dies (Linux PR_SET_PDEATHSIG follows the creating
thread), so start it from a thread that lives as long as the job.
The same contract works over ssh for a remote proxy later: only the argv changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoverResult:
    exit_code: int
    status: str  # ok / failed / interrupted / crashed
    result: dict[str, Any] | None  # the final 'result' event, None if the mover died first
    errors: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.status == "ok"


class ProxyMover:
    """One proxy-mover subprocess running one job."""

    def __init__(self, job: dict[str, Any], argv: Sequence[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.job = job
        # A local mover dies with us (a kill -9 of the orchestrator must not leave it writing).
        self.argv = list(argv) if argv else [sys.executable, "-m", "vmrestore", "proxy-mover",
                                             "--parent-pid", str(os.getpid())]
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.result: MoverResult | None = None
        self._errors: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None
        self._drained = False

    def start(self) -> ProxyMover:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env if self.env is not None else os.environ.copy(),
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(self.job))
        self.proc.stdin.close()
        return self

    def events(self) -> Iterator[dict[str, Any]]:
        """Each event as a dict; lines that are not JSON come as {'event': 'output'}."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                ev = {"event": "output", "text": line}
            if not isinstance(ev, dict):
                ev = {"event": "output", "text": line}
            if ev.get("event") == "error":
                self._errors.append(ev)
            if ev.get("event") == "result":
                self._final = ev
            yield ev
        self._drained = True
        self.wait()

    def wait(self, timeout: float | None = None) -> MoverResult:
        if self.result is not None:
            return self.result
        if self.proc is None:
            raise RuntimeError("the proxy mover was not started")
        if not self._drained:
            for _ in self.events():  # drain (collects result/errors), then waits
                pass
            assert self.result is not None
            return self.result
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        rc = self.proc.wait(timeout)
        final = self._final
        if final is None:
            status = "crashed"
        else:
            status = str(final.get("status", "failed"))
        self.result = MoverResult(rc, status, final, self._errors, stderr)
        return self.result

    def cancel(self) -> None:
        """Ask the mover to stop (it reports 'interrupted' and exits 130)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def __enter__(self) -> ProxyMover:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cancel()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.result is None and self.proc is not None:
            with contextlib.suppress(Exception):
                self.wait()


def run_proxy_mover(job: dict[str, Any], on_event: Any = None, **kw: Any) -> MoverResult:
    """Run a job to the end; `on_event(dict)` sees every event."""
    with ProxyMover(job, **kw) as pm:
        for ev in pm.events():
            if on_event is not None:
                on_event(ev)
    assert pm.result is not None
    return pm.result
