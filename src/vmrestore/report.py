"""The restore report: what happened, phase by phase and disk by disk.

One dataclass tree, filled by the orchestrator as it goes, so a failed run
reports as much as a good one (the phase that failed, the cause, what was
rolled back). The ``--json`` document (versioned, docs/restore.md) is declared
once as the msgspec struct :class:`ReportDoc`: ``as_dict`` encodes through it
and ``from_dict`` decodes and validates with it (a bad report file names the
field); ``format_table`` is the short human summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from vmrestore import schema
from vmrestore.errors import FormatError
from vmrestore.timeline import PLACES

REPORT_VERSION = 1
PHASES = ("initialize", "config", "snapshot", "data", "commit")
PHASE_TITLES = {
    "initialize": "1 initialize",
    "config": "2 restore configuration",
    "snapshot": "3 create snapshot",
    "data": "4 transport data",
    "commit": "5 commit snapshot",
}


@dataclass
class PhaseReport:
    name: str
    status: str = "pending"  # pending / ok / skipped / failed / resumed
    seconds: float = 0.0
    detail: str = ""


class DiskReport(msgspec.Struct):
    """One disk's outcome; its fields are also the --json disk entry (DiskDoc adds two)."""

    disk: int
    label: str = ""
    capacity: int = 0
    provisioning: str = ""
    datastore: str = ""
    file: str = ""
    transport: str = ""
    reason: str = ""
    history: list[str] = msgspec.field(default_factory=list)
    status: str = "pending"  # pending / ok / failed / skipped (already done on resume)
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    resumed_from: int = 0  # bytes of the disk already done by an earlier run
    wire_bytes: int = 0  # from a repository agent: bytes received over the network (0: local)
    seconds: float = 0.0
    # source/proxy/network/target (and throttle when --max-rate held the disk back)
    busy: dict[str, float] = msgspec.field(default_factory=dict)
    # Counter samples over time (vmrestore.timeline; docs/restore.md "Timeline").
    timeline: dict[str, Any] = msgspec.field(default_factory=dict)
    # --original: compared/differing/written figures ("original" in the document)
    rollback: dict[str, Any] | None = msgspec.field(default=None, name="original")

    @property
    def mbps(self) -> float:
        moved = self.bytes_written + self.bytes_zeroed
        return moved / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def doc(self) -> DiskDoc:
        """This disk's entry of the --json document (times and fractions rounded)."""
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields.update(seconds=round(self.seconds, 3),
                      busy={k: round(v, 3) for k, v in self.busy.items()})
        return DiskDoc(**fields,
                       logical_bytes=self.bytes_written + self.bytes_zeroed + self.bytes_skipped,
                       mb_per_s=round(self.mbps, 1))


@dataclass
class Report:
    vm_name: str = ""
    vm_moref: str = ""
    backup: str = ""
    point: str = ""
    vcenter: str = ""
    proxy: str = ""
    datacenter: str = ""
    host: str = ""
    snapshot: str = ""  # taken / skipped: reason / removed
    powered_on: bool = False
    resumed: bool = False
    phases: dict[str, PhaseReport] = field(
        default_factory=lambda: {p: PhaseReport(p) for p in PHASES})
    disks: list[DiskReport] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    status: str = "running"  # ok / failed
    failed_phase: str | None = None
    error: Any = None  # the VmrError that failed the run (not serialized as an object)
    rollback: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    seconds: float = 0.0
    original: dict[str, Any] | None = None  # --original: the VM found, mode, config changes

    def disk(self, index: int) -> DiskReport:
        for d in self.disks:
            if d.disk == index:
                return d
        d = DiskReport(index)
        self.disks.append(d)
        return d

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self.doc())
        return d

    def doc(self) -> ReportDoc:
        """The ``--json`` document of this report."""
        err = self.error
        return ReportDoc(
            report_version=REPORT_VERSION, status=self.status, failed_phase=self.failed_phase,
            error=str(err) if err is not None else None,
            error_type=type(err).__name__ if err is not None else None,
            vm=VMDoc(self.vm_name, self.vm_moref, self.datacenter, self.host, self.powered_on),
            backup=self.backup, point=self.point, vcenter=self.vcenter, proxy=self.proxy,
            snapshot=self.snapshot, resumed=self.resumed, seconds=round(self.seconds, 3),
            phases=[PhaseDoc(p.name, p.status, round(p.seconds, 3), p.detail)
                    for p in self.phases.values()],
            disks=[d.doc() for d in sorted(self.disks, key=lambda d: d.disk)],
            rollback=self.rollback, kept=self.kept, events=self.events, original=self.original)


# --- the --json document, declared once -------------------------------------------------


class VMDoc(msgspec.Struct):
    name: str = ""
    moref: str = ""
    datacenter: str = ""
    host: str = ""
    powered_on: bool = False


class PhaseDoc(msgspec.Struct):
    name: str
    status: str = "pending"
    seconds: float = 0.0
    detail: str = ""


class DiskDoc(DiskReport):
    """A disk entry of the document: the DiskReport fields plus two computed ones."""

    logical_bytes: int = 0         # written + zeroed + skipped
    mb_per_s: float = 0.0


class ReportDoc(msgspec.Struct):
    """``restore --json`` (report_version 1)."""

    report_version: int
    status: str
    failed_phase: str | None = None
    error: str | None = None
    error_type: str | None = None
    vm: VMDoc = msgspec.field(default_factory=VMDoc)
    backup: str = ""
    point: str = ""
    vcenter: str = ""
    proxy: str = ""
    snapshot: str = ""
    resumed: bool = False
    seconds: float = 0.0
    phases: list[PhaseDoc] = msgspec.field(default_factory=list)
    disks: list[DiskDoc] = msgspec.field(default_factory=list)
    rollback: list[str] = msgspec.field(default_factory=list)
    kept: list[str] = msgspec.field(default_factory=list)
    events: list[str] = msgspec.field(default_factory=list)
    original: dict[str, Any] | None = None


def from_dict(d: dict[str, Any], where: str = "report") -> Report:
    """A Report from its ``--json`` document (for tools that print a restore's table)."""
    doc = schema.convert(d, ReportDoc, where, error=FormatError)
    r = Report(vm_name=doc.vm.name, vm_moref=doc.vm.moref, backup=doc.backup, point=doc.point,
               vcenter=doc.vcenter, proxy=doc.proxy, datacenter=doc.vm.datacenter,
               host=doc.vm.host, snapshot=doc.snapshot, powered_on=doc.vm.powered_on,
               resumed=doc.resumed, status=doc.status, failed_phase=doc.failed_phase,
               error=doc.error, rollback=doc.rollback, kept=doc.kept, events=doc.events,
               seconds=doc.seconds, original=doc.original)
    for p in doc.phases:
        r.phases[p.name] = PhaseReport(p.name, p.status, p.seconds, p.detail)
    for x in doc.disks:
        r.disks.append(DiskReport(**{f: getattr(x, f) for f in DiskReport.__struct_fields__}))
    return r


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def format_table(r: Report) -> str:
    """A short plain-text summary: phases, then one line per disk, then the outcome."""
    # A run that failed early has no VM name, proxy or disk progress yet: say so, and
    # leave out a table of disks that never started rather than print empty rows.
    same = r.point in (r.backup, r.backup.rsplit("/", 1)[-1])  # the newest point: say it once
    point = f" @ {r.point}" if r.point and not same else ""
    vm = repr(r.vm_name) if r.vm_name else "(not read)"
    lines = [f"restore of {r.backup}{point} -> VM {vm}"
             f"{' (' + r.vm_moref + ')' if r.vm_moref else ''} via proxy "
             f"{r.proxy or '(none taken)'}"]
    lines.append("")
    lines.append(f"{'phase':<26}{'status':<10}{'seconds':>9}  detail")
    for p in r.phases.values():
        lines.append(f"{PHASE_TITLES[p.name]:<26}{p.status:<10}{p.seconds:>9.2f}  {p.detail}")
    if any(d.status != "pending" or d.transport for d in r.disks):
        lines.append("")
        lines.append(f"{'disk':<5}{'transport':<10}{'written':>9}{'zeroed':>9}{'skipped':>9}"
                     f"{'MB/s':>8}  busy src/proxy/net/target  reason")
        for d in sorted(r.disks, key=lambda d: d.disk):
            busy = "/".join(f"{100 * d.busy.get(k, 0):.0f}%" for k in PLACES)
            reason = d.reason + ("; " + "; ".join(d.history) if d.history else "")
            if d.busy.get("throttle"):
                held = f"held back by the rate limit {100 * d.busy['throttle']:.0f}% of the time"
                reason = f"{held}; {reason}" if reason else held
            lines.append(f"{d.disk:<5}{d.transport or '-':<10}{_mib(d.bytes_written):>9}"
                         f"{_mib(d.bytes_zeroed):>9}{_mib(d.bytes_skipped):>9}{d.mbps:>8.1f}"
                         f"  {busy:<24}  {reason}")
        wire = sum(d.wire_bytes for d in r.disks)
        if wire:
            logical = sum(d.bytes_written + d.bytes_zeroed + d.bytes_skipped for d in r.disks)
            lines.append(f"from the repository agent: {_mib(wire)} on the wire for "
                         f"{_mib(logical)} logical ({wire / logical if logical else 0:.3f})")
        lines.append("(sizes in MiB)")
    if r.original is not None:
        lines.append("")
        lines.append(f"original VM {r.original['name']} ({r.original['moref']}), found by "
                     f"{r.original['found_by']}: {r.original['mode']}; configuration "
                     f"{r.original['config']}: "
                     f"{'; '.join(r.original['config_changes']) or 'no change'}")
        lines += [f"  replaced: {x}" for x in r.original.get("replaced", [])]
        lines += [f"  old disk file not deleted: {x}" for x in r.original.get("left", [])]
        for d in sorted(r.disks, key=lambda d: d.disk):
            f = d.rollback
            if f and f["mode"] == "quick rollback":
                lines.append(f"disk {d.disk}: {f['blocks_compared']} blocks compared, "
                             f"{f['blocks_differing']} differing and written "
                             f"({_mib(f['bytes_written'])} MiB of {_mib(f['full_overwrite_bytes'])}"
                             f" MiB a full overwrite writes), {_mib(f['bytes_read'])} MiB read, "
                             f"{f['seconds']:.2f} s")
    lines.append("")
    if r.status == "ok" and r.original is not None:
        how = "with new disks" if r.original.get("replaced") else "in place"
        lines.append(f"OK in {r.seconds:.1f} s: VM {r.vm_name!r} rolled back to the restore "
                     f"point {how}{', powered on' if r.powered_on else ''}; {r.snapshot}")
    elif r.status == "ok":
        lines.append(f"OK in {r.seconds:.1f} s: VM {r.vm_name!r} restored"
                     f"{', powered on' if r.powered_on else ''}; snapshot {r.snapshot}")
    else:
        lines.append(f"FAILED in phase {r.failed_phase}: {r.error}")
        if r.rollback:
            lines.append("rolled back: " + "; ".join(r.rollback))
        if r.kept:
            lines.append("kept (--keep-on-failure): " + "; ".join(r.kept))
    return "\n".join(lines)
