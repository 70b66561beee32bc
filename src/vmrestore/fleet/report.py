"""The plan report: per VM phase times and RTO, per disk transport/proxy/attempts, totals.

msgspec Structs, so ``--json`` is the document below encoded as is (version 1,
docs/fleet.md) and the plan state can store each finished VM's line and read
it back on ``--resume``. ``format_table`` is the human summary.
"""

from __future__ import annotations

from typing import Any

import msgspec

PLAN_REPORT_VERSION = 1
MiB = 1 << 20


class PhaseLine(msgspec.Struct):
    name: str
    status: str
    start: float  # seconds from the plan's start
    seconds: float


class AttemptLine(msgspec.Struct):
    attempt: int  # the fencing token the host and the checkpoint saw
    proxy: str
    transport: str
    outcome: str  # ok / lost / failed: ... / running
    start_entry: int = 0  # plan entry it started from (its predecessor's durable checkpoint)


class DiskLine(msgspec.Struct):
    disk: int
    file: str  # the base disk's datastore path, "[ds] vm/vm_1.vmdk"
    capacity: int
    status: str
    transport: str
    proxy: str
    attempts: list[AttemptLine]
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    history: list[str] = msgspec.field(default_factory=list)


class VmLine(msgspec.Struct):
    name: str
    tier: int
    status: str  # ok / failed / not-run
    rto: float | None  # seconds from the plan's start to the VM ready (None: not ready)
    seconds: float  # this VM's own run
    moref: str = ""
    host: str = ""
    failed_phase: str | None = None
    error: str | None = None
    error_type: str | None = None
    earlier_run: bool = False  # restored by an earlier run of the plan (--resume)
    phases: list[PhaseLine] = msgspec.field(default_factory=list)
    disks: list[DiskLine] = msgspec.field(default_factory=list)
    rollback: list[str] = msgspec.field(default_factory=list)


class ProxyUse(msgspec.Struct):
    name: str
    slots: int
    attempts: int  # disk attempts it ran
    lost: int  # of which lost with their worker
    peak: int  # most disk tasks at once
    busy_slot_seconds: float
    utilization: float  # busy slot-seconds / (slots x plan seconds)


class PlanReport(msgspec.Struct):
    plan: str
    status: str  # ok / failed (at least one VM failed)
    cluster: str
    seconds: float
    vms_total: int
    vms_ok: int
    vms_failed: int
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int
    mb_per_s: float  # (written + zeroed) of this run / plan seconds, 10^6 bytes
    logical_mb_per_s: float  # (written + zeroed + skipped) / plan seconds
    proxies: list[ProxyUse]
    vms: list[VmLine]
    resumed: bool = False
    events: list[str] = msgspec.field(default_factory=list)
    plan_report_version: int = PLAN_REPORT_VERSION

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self)
        return d


def vm_line(name: str, tier: int, orch: Any, t0: float) -> VmLine:
    """The plan's line for one VM, from its orchestrator (phases, disks, attempts)."""
    r = orch.report
    phases = [PhaseLine(n, r.phases[n].status, round(s, 3), round(e - s, 3))
              for n, (s, e) in sorted(orch.phase_times.items(), key=lambda x: x[1][0])]
    disks = []
    for d in sorted(r.disks, key=lambda d: d.disk):
        run = orch.disk_runs.get(d.disk)
        attempts = [AttemptLine(a["attempt"], a["proxy"], a["transport"], a["outcome"],
                                a.get("start_entry", 0)) for a in (run.attempts if run else [])]
        disks.append(DiskLine(
            disk=d.disk, file=d.file, capacity=d.capacity, status=d.status, transport=d.transport,
            proxy=run.proxy if run else "", attempts=attempts, bytes_written=d.bytes_written,
            bytes_zeroed=d.bytes_zeroed, bytes_skipped=d.bytes_skipped,
            resumed_from=d.resumed_from, seconds=round(d.seconds, 3),
            mb_per_s=round(d.mbps, 1), history=list(d.history)))
    ok = r.status == "ok"
    end = max((e for _, e in orch.phase_times.values()), default=0.0)
    return VmLine(name=name, tier=tier, status="ok" if ok else "failed",
                  rto=round(end, 3) if ok else None, seconds=round(r.seconds, 3),
                  moref=r.vm_moref, host=r.host, failed_phase=r.failed_phase,
                  error=str(r.error) if r.error is not None else None,
                  error_type=type(r.error).__name__ if r.error is not None else None,
                  phases=phases, disks=disks, rollback=list(r.rollback))


def summarize(plan: str, cluster: str, seconds: float, vms: list[VmLine],
              slot_use: dict[str, dict[str, float]], events: list[str],
              resumed: bool) -> PlanReport:
    fresh = [v for v in vms if not v.earlier_run]
    disks = [d for v in fresh for d in v.disks]
    w = sum(d.bytes_written for d in disks)
    z = sum(d.bytes_zeroed for d in disks)
    s = sum(d.bytes_skipped for d in disks)
    proxies = [ProxyUse(name=n, slots=int(u["slots"]), attempts=int(u["attempts"]),
                        lost=int(u["lost"]), peak=int(u["peak"]),
                        busy_slot_seconds=round(u["busy_slot_seconds"], 2),
                        utilization=round(u["busy_slot_seconds"] / (u["slots"] * seconds), 3)
                        if seconds > 0 and u["slots"] else 0.0)
               for n, u in sorted(slot_use.items())]
    failed = sum(1 for v in vms if v.status != "ok")
    return PlanReport(
        plan=plan, status="ok" if not failed else "failed", cluster=cluster,
        seconds=round(seconds, 3), vms_total=len(vms), vms_ok=len(vms) - failed,
        vms_failed=failed, bytes_written=w, bytes_zeroed=z, bytes_skipped=s,
        mb_per_s=round((w + z) / seconds / 1e6, 1) if seconds > 0 else 0.0,
        logical_mb_per_s=round((w + z + s) / seconds / 1e6, 1) if seconds > 0 else 0.0,
        proxies=proxies, vms=vms, resumed=resumed, events=events)


def format_table(r: PlanReport) -> str:
    lines = [f"plan {r.plan}: {r.vms_ok}/{r.vms_total} VMs restored in {r.seconds:.1f} s "
             f"on {r.cluster}", ""]
    lines.append(f"{'vm':<22}{'tier':>4}  {'status':<8}{'RTO s':>8}  {'disks (transport@proxy'}"
                 " x attempts)")
    for v in sorted(r.vms, key=lambda v: (v.tier, v.rto if v.rto is not None else 1e18)):
        rto = f"{v.rto:.1f}" if v.rto is not None else "-"
        disks = " ".join(f"{d.disk}:{d.transport or '-'}@{d.proxy or '-'}"
                         + (f"x{len(d.attempts)}" if len(d.attempts) > 1 else "")
                         for d in v.disks)
        status = v.status + ("*" if v.earlier_run else "")
        lines.append(f"{v.name:<22}{v.tier:>4}  {status:<8}{rto:>8}  {disks}")
        if v.error:
            lines.append(f"{'':<26}failed in {v.failed_phase}: {v.error}")
    lines.append("")
    lines.append(f"{'proxy':<16}{'slots':>6}{'attempts':>10}{'lost':>6}{'peak':>6}"
                 f"{'slot use':>10}")
    for p in r.proxies:
        lines.append(f"{p.name:<16}{p.slots:>6}{p.attempts:>10}{p.lost:>6}{p.peak:>6}"
                     f"{100 * p.utilization:>9.0f}%")
    lines.append("")
    lines.append(f"moved {(r.bytes_written + r.bytes_zeroed) / MiB:.1f} MiB "
                 f"({r.bytes_skipped / MiB:.1f} MiB of zeros skipped): {r.mb_per_s:.1f} MB/s "
                 f"aggregate, {r.logical_mb_per_s:.1f} MB/s logical")
    if any(v.earlier_run for v in r.vms):
        lines.append("* restored by an earlier run of this plan")
    lines.append("OK" if r.status == "ok" else f"FAILED: {r.vms_failed} VM(s) failed and "
                 "were rolled back (the others are restored)")
    return "\n".join(lines)
