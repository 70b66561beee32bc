"""Run a restore plan: VMs in parallel, their disks scheduled over the proxies' Dask workers.

The runner connects to the cluster (cluster.py: the embedded LocalCluster or
``--scheduler``), builds admission over the proxies the workers advertise,
starts the dispatcher, and runs each VM's five phases in a thread
(vm.PlanVmRestore), at most ``max_vms`` at once, in RTO tier order. A VM that
fails rolls back alone; the others go on. The plan's own state (which VMs are
done, with their report line) is an fsynced file beside the plan, written as
each VM commits, so ``--resume`` after the orchestrator died rebuilds the plan
from it and from the VMs' job states: nothing depends on scheduler memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import msgspec

from vmrestore import infra as infra_mod
from vmrestore.errors import Interrupted, LabError, UsageError
from vmrestore.fleet.plan import Plan, PlanVm
from vmrestore.fleet.report import PlanReport, VmLine, summarize, vm_line
from vmrestore.jobstate import atomic_write

log = logging.getLogger("vmrestore.fleet")

STATE_VERSION = 1
DEFAULT_LAB_SLOTS = 2


def plan_infra(plan: Plan, lab_dir: Any = None) -> infra_mod.Infra:
    """The plan's proxies: its infra file, else one proxy per lab proxy VM, else `local`."""
    if plan.doc.infra:
        return infra_mod.load_infra(plan.doc.infra)
    from vmrestore.lab.client import lab_is_up, load_lab

    if lab_is_up(lab_dir):
        try:
            lab = load_lab(lab_dir)
            return infra_mod.Infra([infra_mod.Proxy(name=vm, slots=DEFAULT_LAB_SLOTS, vm=vm)
                                    for vm in lab.proxy_vms], source="the lab's proxy VMs")
        except LabError as e:
            log.info("lab not usable: %s", e)
    return infra_mod.default_infra()


class PlanState:
    """plan-<name>-<digest>.json: the VMs a run of this plan finished (durable)."""

    def __init__(self, plan: Plan) -> None:
        self.path = plan.state_path
        self.digest = plan.digest
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"version": STATE_VERSION, "digest": plan.digest,
                                     "plan": str(plan.path), "vms": {}}

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> None:
        try:
            d = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # killed before any VM finished: nothing to skip
        except (OSError, ValueError) as e:
            raise UsageError(f"plan state {self.path} unreadable: {e}") from None
        if d.get("version") != STATE_VERSION or d.get("digest") != self.digest:
            raise UsageError(f"plan state {self.path} belongs to another version of the plan")
        self.data = d

    def done(self, name: str) -> VmLine | None:
        e = self.data["vms"].get(name)
        if e and e.get("status") == "ok":
            return msgspec.convert(e["line"], VmLine)
        return None

    def record(self, name: str, line: VmLine) -> None:
        with self.lock:
            self.data["vms"][name] = {"status": line.status,
                                      "line": msgspec.to_builtins(line)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self.data, indent=1).encode())

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class PlanRunner:
    def __init__(self, plan: Plan, *, scheduler: str | None = None, resume: bool = False,
                 progress: Any = None, lab_dir: Any = None) -> None:
        self.plan = plan
        self.scheduler = scheduler
        self.resume = resume
        self.progress = progress
        self.lab_dir = lab_dir
        self.state = PlanState(plan)
        self.vm_status: dict[str, str] = {v.name: "queued" for v in plan.vms}
        self.dispatcher: Any = None
        self.admission: Any = None
        self.stop = threading.Event()

    def run(self) -> PlanReport:
        from vmrestore.fleet import cluster
        from vmrestore.fleet.dispatch import Dispatcher
        from vmrestore.schedule import Admission, ProxySpec

        if self.resume:
            self.state.load()
        elif self.state.exists():
            raise UsageError(f"an interrupted run of plan {self.plan.path.name} exists (state "
                             f"{self.state.path}): rerun with --resume, or remove that file")
        infra = plan_infra(self.plan, self.lab_dir)
        t0 = time.monotonic()
        lines: dict[str, VmLine] = {}
        with cluster.connect(self.scheduler, infra) as (client, about):
            want = len(infra.proxies) if not self.scheduler else 1
            live = cluster.wait_for_proxies(client, want, timeout=60)
            if not live:
                raise UsageError(f"{about}: no proxy worker joined (start 'vmrestore "
                                 "proxy-worker --scheduler ... --name P' on the proxies)")
            self.admission = Admission([ProxySpec(n, p.slots, tuple(p.transports))
                                        for n, (_, p) in live.items()], self.plan.doc.limits)
            self.dispatcher = Dispatcher(client, self.admission, live).start()
            self.dispatcher.say(f"plan {self.plan.path.name}: {len(self.plan.vms)} VMs on "
                                f"{about}: proxies " + ", ".join(
                                    f"{n} ({a})" for n, (a, _) in sorted(live.items())))
            ticker = _Ticker(self)
            try:
                ticker.start()
                lines = self._run_vms(t0, sum(p.slots for _, p in live.values()))
                t_end = time.monotonic()  # the plan is done: the cluster's shutdown is not in it
            finally:
                ticker.stop()
                self.dispatcher.stop()
        seconds = t_end - t0
        report = summarize(str(self.plan.path), about, seconds,
                           [lines[v.name] for v in self.plan.vms],
                           self.dispatcher.slot_use(t0 + seconds), self.dispatcher.events,
                           self.resume)
        if report.status == "ok":
            self.state.remove()
        return report

    def _run_vms(self, t0: float, total_slots: int) -> dict[str, VmLine]:
        lines: dict[str, VmLine] = {}
        todo: list[PlanVm] = []
        for v in self.plan.vms:
            earlier = self.state.done(v.name) if self.resume else None
            if earlier is not None:
                earlier.earlier_run = True
                lines[v.name] = earlier
                self.vm_status[v.name] = "done"
            else:
                todo.append(v)
        todo.sort(key=lambda v: (v.tier, v.index))
        workers = self.plan.doc.max_vms or max(1, total_slots)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmr-vm") as pool:
            futs = {v.name: pool.submit(self._run_vm, v, t0) for v in todo}
            try:
                for name, f in futs.items():
                    lines[name] = f.result()
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM: every VM not done stops at its next phase or disk step
                # and rolls back; the VMs done stay done (the plan state says so).
                self.stop.set()
                self.dispatcher.say("plan interrupted: rolling back the VMs not done")
                for f in futs.values():
                    with contextlib.suppress(BaseException):
                        f.result()
                raise Interrupted(f"plan {self.plan.path.name} interrupted; the VMs done are "
                                  "restored, the others rolled back (--resume continues)") \
                    from None
        return lines

    def _run_vm(self, v: PlanVm, t0: float) -> VmLine:
        from vmrestore.fleet.vm import PlanContext, PlanVmRestore

        self.vm_status[v.name] = "running"

        def on_phase(name: str, phase: str, status: str) -> None:
            self.vm_status[name] = f"{phase}" if status == "running" else self.vm_status[name]

        ctx = PlanContext(self.dispatcher, self.admission, v.tier, t0, self.resume, on_phase,
                          self.stop)
        from vmrestore.commands.restore import default_site

        orch = PlanVmRestore(v.job, ctx, site=partial(default_site, lab_dir=self.lab_dir))
        # Recorded as done in the plan state the moment phase 5 ends, before the job
        # state goes: a resume never restores a VM twice.
        commit = orch.commit

        def commit_and_record() -> str:
            detail = commit()
            orch.phase_times["commit"] = (orch.phase_times.get("data", (0, 0))[1],
                                          time.monotonic() - t0)
            orch.report.status = "ok"
            self.state.record(v.name, vm_line(v.name, v.tier, orch, t0))
            return detail

        orch.commit = commit_and_record  # type: ignore[method-assign]
        try:
            orch.run()
        except BaseException as e:  # a bug in the runner must not take the plan down
            log.exception("VM %s", v.name)
            orch.report.status, orch.report.error = "failed", e
        line = vm_line(v.name, v.tier, orch, t0)
        if line.status != "ok":
            self.state.record(v.name, line)
        self.vm_status[v.name] = "done" if line.status == "ok" else "failed"
        self.dispatcher.say(f"VM {v.name}: {line.status}"
                            + (f" (RTO {line.rto:.1f} s)" if line.rto is not None else
                               f" in {line.failed_phase}: {line.error}"))
        return line

    # --- for the live view ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        d = self.dispatcher
        counts: dict[str, int] = {"done": 0, "failed": 0, "queued": 0, "running": 0}
        # Copies first (one C call each): other threads update these dicts meanwhile.
        for s in list(self.vm_status.values()):
            counts[s if s in ("done", "failed", "queued") else "running"] += 1
        u = self.admission.usage()
        done = sum(x[1] for x in list(d.progress.values()))
        return {"t": round(time.monotonic() - d.t0, 2), "vms": counts,
                "bytes_done": done, "slots": dict(u.slots),
                "slot_capacity": dict(u.slot_capacity), "disks_queued": u.queued,
                "disks_running": u.running, "vcenter_ops": u.vcenter_ops,
                "workers": dict(d.pids)}


class _Ticker:
    """Feeds the progress view once a second from the runner's snapshot."""

    def __init__(self, runner: PlanRunner) -> None:
        self.runner = runner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmr-progress", daemon=True)

    def start(self) -> None:
        if self.runner.progress is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.runner.progress is not None:
            try:
                self.runner.progress.update(self.runner.snapshot(), final=True)
            except Exception as e:  # the view must not fail the plan; say why it stopped
                log.warning("progress view: %r", e)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                self.runner.progress.update(self.runner.snapshot())

