"""One VM of a plan: the five phases of orchestrator.py, its disks on the plan's proxies.

:class:`PlanVmRestore` is the orchestrator with three things changed:

- the control phases (1-3, 5) each hold one of admission's vCenter operation
  slots, so a plan of hundreds of VMs never floods vCenter;
- no task slot is taken for the VM: phase 1 lists, per disk, every
  (proxy, transport) that can write it, best first, from the proxies the
  cluster advertises (the same transport rules as a single restore);
- phase 4 queues each disk with admission and, for each grant, attaches the
  disk for that proxy and attempt (the host fences older attempts), runs the
  disk task on the proxy's Dask worker, and releases. A lost worker's attempt
  is revoked and the disk requeued from its last durable checkpoint; a
  transport that fails drops that option (hotadd -> nbd) and requeues.

Everything else (rollback from the ledger, job state, resume, the report) is
the orchestrator's, so a VM that fails rolls back alone while the plan goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from vmrestore import infra as infra_mod
from vmrestore.errors import (
    HostServiceError,
    Interrupted,
    TransportError,
    UsageError,
    VSphereError,
)
from vmrestore.fleet.dispatch import Cancelled, Dispatcher, WorkerLost
from vmrestore.orchestrator import Orchestrator
from vmrestore.schedule import Admission, TaskSpec

MODE_RANK = {"san": 0, "hotadd": 1, "nbd": 2, "nbdssl": 3}
CONTROL_PHASES = ("initialize", "config", "snapshot", "commit")


@dataclass
class DiskRun:
    """What the plan report says about one disk beyond the VM report's disk line."""

    disk: int
    key: str
    proxy: str = ""
    transport: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)  # one per grant


@dataclass
class PlanContext:
    dispatcher: Dispatcher
    admission: Admission
    tier: int
    t0: float  # the plan's start (monotonic): RTO is measured from here
    resume: bool = False
    on_phase: Any = None  # callable(vm name, phase, status)
    stop: threading.Event = field(default_factory=threading.Event)  # the plan is interrupted


class _Either:
    """Set when either event is: the VM failed, or the whole plan was interrupted."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()

    def set(self) -> None:
        self.a.set()


class PlanVmRestore(Orchestrator):
    def __init__(self, job: Any, ctx: PlanContext, display: Any = None,
                 site: Any = None) -> None:
        super().__init__(job, display=display, site=site)
        self.ctx = ctx
        self.resume_if_found = ctx.resume
        self.options: dict[int, list[tuple[str, str]]] = {}
        self.disk_runs: dict[int, DiskRun] = {}
        self.phase_times: dict[str, tuple[float, float]] = {}  # phase -> (start, end) from t0
        self._lock = threading.RLock()  # job state and report: several disk threads
        self._cancel = _Either(threading.Event(), ctx.stop)
        self._once: list[Any] = []  # the attempts' run-once files, removed with the job

    # --- phases -----------------------------------------------------------------------------

    def _phase(self, name: str, fn: Any) -> None:
        start = time.monotonic() - self.ctx.t0
        if self.ctx.stop.is_set():
            raise Interrupted(f"plan interrupted before phase {name} of {self.job.name}")
        if self.ctx.on_phase:
            self.ctx.on_phase(self.job.name, name, "running")
        try:
            if name in CONTROL_PHASES:
                with self.ctx.admission.vcenter_op():
                    super()._phase(name, fn)
            else:
                super()._phase(name, fn)
        finally:
            self.phase_times[name] = (start, time.monotonic() - self.ctx.t0)
            if self.ctx.on_phase:
                self.ctx.on_phase(self.job.name, name, self.report.phases[name].status)

    def _take_slot(self, infra: infra_mod.Infra) -> None:
        self.proxy = None
        self.report.proxy = "per disk (plan)"

    def _choose_transports(self, infra: infra_mod.Infra,
                           facts: list[infra_mod.DiskFacts]) -> list[infra_mod.Decision]:
        """Every (proxy, transport) that can write each disk, best transport first."""
        primary: dict[int, list[tuple[int, str, str]]] = {}
        vm_present: dict[str, bool] = {}  # HotAdd needs the proxy's VM in this datacenter
        fallback: dict[int, list[tuple[str, str]]] = {}
        reasons: dict[int, str] = {}
        refused: list[str] = []
        # a snapshot: the dispatcher thread adds proxies as their workers join
        for p in list(self.ctx.dispatcher.known.values()):
            try:
                decisions = infra_mod.select_transports(self.job.transport, p, facts)
            except UsageError as e:
                refused.append(f"{p.name}: {e}")
                continue
            if any(d.mode == "hotadd" for d in decisions) and p.vm not in vm_present:
                vm_present[p.vm] = self.session.find_vm(self.dc, p.vm) is not None
            for d in decisions:
                if d.mode == "hotadd" and not vm_present[p.vm]:
                    refused.append(f"{p.name}: proxy VM {p.vm!r} not found in {self.dc.name}")
                    if self.job.transport == "hotadd":
                        continue
                    d = infra_mod.Decision(d.disk, "nbd", d.reason)
                primary.setdefault(d.disk, []).append((MODE_RANK.get(d.mode, 9), p.name, d.mode))
                reasons.setdefault(d.disk, d.reason)
                fallback.setdefault(d.disk, []).extend((p.name, m) for m in d.fallback)
        out = []
        for f in facts:
            opts = [(p, m) for _, p, m in sorted(primary.get(f.index, []), key=lambda x: x[0])]
            opts += [o for o in fallback.get(f.index, []) if o not in opts]
            if not opts:
                raise UsageError(f"disk {f.index}: no proxy can write it with transport "
                                 f"{self.job.transport} ({'; '.join(refused) or 'no proxy'})")
            self.options[f.index] = opts
            best = sorted({m for _, m in opts}, key=lambda m: MODE_RANK.get(m, 9))
            out.append(infra_mod.Decision(f.index, opts[0][1], f"{reasons.get(f.index, '')}; "
                                          f"plan: {'/'.join(best)} on "
                                          f"{len({p for p, _ in opts})} proxies"))
        return out

    def _proxy_vm_present(self, decisions: list[infra_mod.Decision]
                          ) -> list[infra_mod.Decision]:
        return decisions  # checked per proxy in _choose_transports

    # --- phase 4 ----------------------------------------------------------------------------

    def transport_data(self) -> str:
        from vmrestore.vsphere import disks as vdisks

        todo = []
        for t in self.layout.disks:
            rd = self.report.disk(t.index)
            st = self.state.disk(t.index)
            if self._done_before(rd, st):
                self.disk_runs[t.index] = DiskRun(t.index, "", st.proxy or "",
                                                  rd.transport)
                continue
            base = vdisks.disk_for_file(self.vm, t.file_name).base_file
            rd.file = base
            self.hostd.prepare_disk(base, t.capacity, t.provisioning)
            todo.append((t, base, rd, st))
        errors: list[BaseException] = []

        def one(item: tuple[Any, str, Any, Any]) -> None:
            try:
                self._restore_granted(*item)
            except BaseException as e:
                errors.append(e)
                self._cancel.set()  # the VM fails: its other disks stop

        threads = [threading.Thread(target=one, args=(item,), name=f"vmr-disk-{item[0].index}")
                   for item in todo]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        real = [e for e in errors if not isinstance(e, Cancelled)]
        if self.ctx.stop.is_set() and not real:
            raise Interrupted(f"plan interrupted in phase data of {self.job.name}")
        if real or errors:
            raise (real or errors)[0]
        total = sum(d.bytes_written + d.bytes_zeroed for d in self.report.disks)
        return f"{len(self.layout.disks)} disk(s), {total / (1 << 20):.1f} MiB moved"

    def _task_spec(self, t: Any, size: int) -> TaskSpec:
        return TaskSpec(key=f"{self.layout.name}/disk{t.index}", vm=self.layout.name,
                        disk=t.index, size=size, tier=self.ctx.tier, host=self._host.name,
                        datastore=t.datastore, repo=self.job.repository or "local",
                        options=tuple(self.options[t.index]))

    def _restore_granted(self, t: Any, base: str, rd: Any, st: Any) -> None:
        from vmrestore.fleet.worker import run_disk
        from vmrestore.jobstate import read_checkpoint

        d = self.ctx.dispatcher
        ckpt_path = self.state.checkpoint_path(t.index)
        ck = read_checkpoint(ckpt_path)
        if ck is not None and not self.job.resume:
            ckpt_path.unlink()
            ck = None
        spec = self._task_spec(t, t.capacity - (ck.bytes_done if ck else 0))
        run = self.disk_runs[t.index] = DiskRun(t.index, spec.key)
        d.add(spec)
        while True:
            g = d.wait_grant(spec.key, self._cancel)
            proxy = d.proxy(g.proxy)
            ck = read_checkpoint(ckpt_path)
            with self._lock:
                # The fencing token survives orchestrator restarts: it is in the job state
                # and in the checkpoint the driver claims for it.
                attempt = st.next_attempt(ck)
                st.status, st.transport, st.proxy = "running", g.transport, g.proxy
                self.state.save()
            record = {"proxy": g.proxy, "transport": g.transport, "attempt": attempt,
                      "outcome": "running", "start_entry": ck.prefix if ck else 0}
            run.attempts.append(record)
            once = ckpt_path.with_name(f"{ckpt_path.name}.attempt{attempt}")
            self._once.append(once)
            try:
                with self._lock:
                    att = self._attach(t, base, g.transport, proxy, attempt)
            except (TransportError, HostServiceError, VSphereError) as e:
                record["outcome"] = f"attach failed: {e}"
                spec = self._without(spec, g, rd, e)
                d.requeue(g, spec, "failed")
                continue
            try:
                task = self._disk_task(t, att.uri, g.transport, ckpt_path, attempt)
                fut = d.run(g, run_disk, task, spec.key, attempt, str(once))
                out = d.result(g, fut, self._cancel)
            except WorkerLost as e:
                _burn(once)  # this attempt may no longer start anywhere; then revoke it
                self._release(att)
                record["outcome"] = "lost"
                rd.history.append(f"attempt {attempt} on {g.proxy} ({g.transport}): {e}")
                self.say(f"disk {t.index}: {e}; attachment revoked, requeued from its "
                         "checkpoint")
                ck = read_checkpoint(ckpt_path)
                spec = msgspec.structs.replace(
                    spec, size=max(0, t.capacity - (ck.bytes_done if ck else 0)))
                d.requeue(g, spec, "lost")
                continue
            except (TransportError, HostServiceError) as e:
                _burn(once)
                self._release(att)
                record["outcome"] = f"failed: {e}"
                spec = self._without(spec, g, rd, e)
                d.requeue(g, spec, "failed")
                continue
            except BaseException as e:
                _burn(once)
                self._release(att)
                record["outcome"] = f"failed: {e}"
                d.finish(g, "failed")
                raise
            self._release(att)
            record["outcome"] = "ok"
            d.finish(g, "ok")
            self._record_outcome(t, base, rd, st, g, out)
            run.proxy, run.transport = g.proxy, g.transport
            return

    def _release_everything(self) -> None:
        super()._release_everything()
        for p in self._once:
            with contextlib.suppress(OSError):
                p.unlink()

    def _without(self, spec: TaskSpec, g: Any, rd: Any, err: BaseException) -> TaskSpec:
        """The task without the option that failed; none left: the disk fails."""
        proxy, mode = g.proxy, g.transport
        left = tuple(o for o in spec.options if o != (proxy, mode))
        if not left:
            self.ctx.dispatcher.finish(g, "failed")
            raise err
        note = f"{mode} on {proxy} failed ({err}); next: {left[0][1]} on {left[0][0]}"
        rd.history.append(note)
        self.say(f"disk {spec.disk}: {note}")
        return msgspec.structs.replace(spec, options=left)

    def _release(self, att: Any) -> None:
        with self._lock, contextlib.suppress(HostServiceError):
            att.release()

    def _disk_task(self, t: Any, uri: str, mode: str, ckpt_path: Any, attempt: int) -> Any:
        """The unit of work the proxy's worker runs (the one driver's DiskTask): it resumes
        from the durable checkpoint, which it claims for ``attempt`` (a lower one stops)."""
        from vmrestore.disktask import DiskTask

        return DiskTask(job_id=self.state.id, vm=self.layout.name, disk=t.index,
                        source=self._point_source(), target=uri, transport=mode,
                        checkpoint=str(ckpt_path), attempt=attempt,
                        settings=self.job.task_settings(target_zeroed=True,
                                                        stall=self.faults["stall"]))

    def _record_outcome(self, t: Any, base: str, rd: Any, st: Any, g: Any, out: Any) -> None:
        with self._lock:
            self._disk_written(base, g.transport, rd, out)
            st.status, st.transport = "done", g.transport
            self.state.save()
        self.say(f"disk {t.index}: {g.transport} on {g.proxy}, "
                 f"{rd.bytes_written / (1 << 20):.1f} MiB written, {rd.mbps:.1f} MB/s")

    def say(self, msg: str) -> None:
        with self._lock:
            super().say(f"{self.job.name}: {msg}")


def _burn(once: Any) -> None:
    """Give up an attempt: its run-once file exists from now on, so the task refuses to
    start if Dask ever runs it (it must not open a device the host may hand to another
    disk once the attachment is revoked)."""
    with contextlib.suppress(OSError):
        os.close(os.open(once, os.O_WRONLY | os.O_CREAT, 0o600))
