"""The five restore phases, rollback, checkpoint/resume, and the report. No block I/O here.

1. initialize  open the backup chain; take a proxy with a free task slot; connect to
               vCenter/ESXi; start and connect the data movers; check every named
               object exists; choose each disk's transport (refusals happen here,
               before anything is created)
2. config      build the VM from the backup's configuration plus the amendments and
               register it (its disks are created empty with the requested provisioning)
3. snapshot    snapshot the VM, unless one of its datastores is VVOL
4. data        per disk: give the disk its size on the datastore, find its base file
               (the snapshot's parent), attach it by the chosen transport, have the
               proxy-side mover write the plan, detach; fall back to nbd when allowed
5. commit      remove (commit) the snapshot, power on if asked

Any failure: what this run created is removed (unless --keep-on-failure), host
attachments are released, and the report names the phase and the cause. A kill -9
leaves the job-state file (jobstate.py): ``--resume`` reuses the VM and continues
each disk from its checkpoint.

Test-only fault hook, ``VMRESTORE_FAULT`` (comma-separated):
``phase:NAME`` fail at the start of phase NAME; ``transport:MODE`` make attaching a
disk by MODE fail (exercises the nbd fallback); ``stall:data:SECONDS`` run each
disk in slices with a checkpoint and a pause after each (lets a test kill -9 mid-data);
``after:swap`` fail in phase 5 right after ``--original --full`` swapped the disks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from vmrestore import infra as infra_mod
from vmrestore.errors import (
    HostServiceError,
    Interrupted,
    TransportError,
    UsageError,
    VmrError,
    VSphereError,
)
from vmrestore.job import RestoreJob
from vmrestore.jobstate import (
    Created,
    DiskStatus,
    NewDisk,
    OldDisk,
    OriginalRecord,
    VMRecord,
)
from vmrestore.report import PHASES, Report
from vmrestore.timeline import role_busy

log = logging.getLogger("vmrestore.restore")


class InjectedFault(VmrError):
    """A failure asked for by VMRESTORE_FAULT (tests only)."""


def parse_faults(text: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": set(), "transports": set(), "stall": 0.0,
                           "after": set()}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        parts = item.split(":")
        if parts[0] == "phase" and len(parts) == 2 and parts[1] in PHASES:
            out["phases"].add(parts[1])
        elif parts[0] == "transport" and len(parts) == 2:
            out["transports"].add(parts[1])
        elif parts[0] == "stall" and len(parts) == 3 and parts[1] == "data":
            out["stall"] = float(parts[2])
        elif item == "after:swap":
            out["after"].add(parts[1])
        else:
            raise UsageError(f"VMRESTORE_FAULT: unknown item {item!r} (phase:NAME, "
                             "transport:MODE, stall:data:SECONDS, after:swap)")
    return out


class _Attachment:
    """A disk made reachable for the proxy by one transport; release() undoes it."""

    def __init__(self, uri: str, release: Callable[[], None], note: str = "") -> None:
        self.uri = uri
        self.release = release
        self.note = note


@dataclass
class Site:
    """Where a restore goes, as the command decided it (the lab as default is its choice).

    ``target`` is the vCenter/ESXi connection (vsphere.connect.Target), ``hostd`` the
    hosts' data services client (transport.host.HostServices; None: none known, refused
    in phase 1 after the connection to vCenter). The defaults apply
    when the job names none: the datacenter, the default proxy's VM (HotAdd), and the
    VixDiskLib to use with ``--disk-library vddk`` (with the environment it needs and
    the password file its sessions read).
    """

    target: Any
    hostd: Any
    datacenter: str | None = None
    proxy_vm: str | None = None
    vddk_libdir: str | None = None
    vddk_env: dict[str, str] = field(default_factory=dict)
    vddk_password_file: str | None = None
    vddk_note: str = ""          # said in phase 1 when that library is used


class Orchestrator:
    """One VM restore in five phases. ``site(job) -> Site`` says where it goes (the command's
    choice; phase 1 calls it, so a refusal there is reported as a failed initialize)."""

    def __init__(self, job: RestoreJob, display: Any = None, movers: Any = None,
                 site: Callable[[RestoreJob], Site] | None = None) -> None:
        self.job = job
        self.display = display
        self.report = Report(backup=job.backup or job.repository or "", point=job.point or "")
        self.faults = parse_faults(os.environ.get("VMRESTORE_FAULT"))
        self._site_for = site
        self.site: Site | None = None
        self._movers = movers
        self.session: Any = None
        self.state: Any = None
        self.slot: Any = None
        self.chain: Any = None
        self._full_chain: Any = None  # what open_chain returned (closing it closes a connection)
        self.layout: Any = None
        self.decisions: dict[int, infra_mod.Decision] = {}
        self.vm: Any = None
        self.dc: Any = None
        self.hostd: Any = None
        self.ds_types: dict[str, str] = {}
        self.luns: dict[str, str] = {}
        self.proxy: infra_mod.Proxy | None = None
        self.original: Any = None  # original.Original when rolling back the original VM
        # A plan's resume: resume this VM when its job state exists, else start it afresh.
        self.resume_if_found = False

    # --- plumbing ---------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self.report.events.append(msg)
        log.info("%s", msg)
        if self.display is not None:
            self.display.log(msg)

    def _save_phase(self, name: str) -> None:
        if self.state is not None and self.state.doc is not None:
            self.state.doc.phase = name
            self.state.save()

    def _phase(self, name: str, fn: Callable[[], str | None]) -> None:
        pr = self.report.phases[name]
        t0 = time.monotonic()
        pr.status = "running"
        try:
            if name in self.faults["phases"]:
                raise InjectedFault(f"fault injected at the start of phase {name} "
                                    "(VMRESTORE_FAULT, test only)")
            self._save_phase(name)
            detail = fn()
            if pr.status == "running":
                pr.status = "ok"
            if detail:
                pr.detail = detail
        except BaseException:
            pr.status = "failed"
            raise
        finally:
            pr.seconds = time.monotonic() - t0

    # --- the run ----------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        phase = "initialize"
        try:
            for phase, fn in (("initialize", self.initialize), ("config", self.restore_config),
                              ("snapshot", self.create_snapshot), ("data", self.transport_data),
                              ("commit", self.commit)):
                self._phase(phase, fn)
            self.report.status = "ok"
            if self.state is not None:
                self.state.remove()
        except KeyboardInterrupt:
            self._failed(phase, Interrupted(f"interrupted in phase {phase}"))
        except VmrError as e:
            self._failed(phase, e)
        except Exception as e:  # a bug, but the target must still be left clean
            log.exception("unexpected error in phase %s", phase)
            self._failed(phase, VmrError(f"unexpected error in phase {phase}: {e!r}"))
        finally:
            self._release_everything()
            self.report.seconds = time.monotonic() - t0
        return self.report

    def _failed(self, phase: str, err: VmrError) -> None:
        self.report.status = "failed"
        self.report.failed_phase = phase
        self.report.error = err
        # Recorded, not shown: the report's last line and the CLI edge's one-line error say it.
        self.report.events.append(f"phase {phase} failed: {err}")
        if self.job.keep_on_failure:
            self._release_attachments()
            if self.vm is not None:
                self.report.kept.append(f"VM {self.layout.name} ({self.vm._moId})")
            if self.state is not None and self.state.doc is not None:
                self.state.doc.status = "failed-kept"
                self.state.save()
                self.report.kept.append(f"job state {self.state.path} (use --resume)")
            return
        try:
            self.rollback()
            if self.state is not None and self.state.doc is not None:
                self.state.remove()
        except Exception as e2:  # whatever broke: report it, keep the ledger for a retry
            log.debug("rollback failed", exc_info=True)
            self.report.rollback.append(f"rollback incomplete: {e2}")
            self.say(f"rollback incomplete: {e2}")
            if self.state is not None and self.state.doc is not None:
                self.state.doc.status = "rollback-failed"
                self.state.save()

    def rollback(self) -> None:
        """Remove what this job created (from the ledger), newest first."""
        self._release_attachments()
        self._end_vddk_access()
        if self.job.original:
            self._rollback_original()
            return
        from vmrestore.vsphere import cleanup

        doc = self.state.doc if self.state is not None else None
        rec = doc.created.vm if doc is not None else None
        if rec is not None and self.session is None:
            raise VSphereError(f"VM {rec.name} ({rec.moref or 'being created'}) left in place: "
                               "no vCenter connection to remove it")
        vm = self._our_vm(rec) if rec is not None else self.vm
        ours: set[str] = set()
        if vm is not None and self.session is not None:
            ours = cleanup.vm_files(vm)  # what our directories may hold once it is gone
            cleanup.destroy_vm(self.session, vm)
            self.report.rollback.append(f"destroyed VM {rec.name if rec else vm._moId} "
                                        f"({vm._moId}) with its disks and snapshot")
        self.vm = None
        if doc is not None and doc.created.vm is not None:
            doc.created.vm = None
            self.state.save()
        if doc is not None and doc.created.dirs and self.session is not None:
            for ds_path in list(doc.created.dirs):
                how = cleanup.delete_datastore_dir(self.session, self.dc, ds_path, ours)
                if how != "gone":
                    self.report.rollback.append(
                        f"deleted {ds_path}" if how == "deleted" else
                        f"left {ds_path} in place: it holds files this job did not create")
                doc.created.dirs.remove(ds_path)
                self.state.save()

    def _our_vm(self, rec: Any) -> Any:
        """The VM the ledger names, if it still exists and carries this job's owner token.

        By moref; while CreateVM ran (no moref recorded yet), by name AND token. A VM of
        that name without the token was made by someone else: never ours to remove.
        """
        from vmrestore.vsphere import cleanup

        vm = self.session.vm_by_moref(rec.moref) if rec.moref else \
            self.session.find_vm(self.dc, rec.name) if self.dc is not None else None
        if vm is None or not cleanup.vm_exists(vm):
            return None
        if rec.token and cleanup.owner_token(vm) != rec.token:
            self.report.rollback.append(f"left VM {rec.name} ({vm._moId}) in place: it is not "
                                        "the VM this job created")
            return None
        return vm

    def _rollback_original(self) -> None:
        """The original VM is never removed: revert it to the safety snapshot (the disks and
        configuration as they were), and power it on again if this job powered it off."""
        from vmrestore import original as orig
        from vmrestore.vsphere import power

        doc = self.state.doc if self.state is not None else None
        rec = doc.original if doc is not None else None
        if rec is None or not rec.moref:
            return
        if self.session is None:
            raise VSphereError(f"VM {rec.name} ({rec.moref}): no vCenter connection "
                               "to revert it to its safety snapshot")
        if rec.swap == "committed":  # --full: the VM already runs on the backup's disks
            return
        vm = self.session.vm_by_moref(rec.moref)
        if rec.new_disks:
            self._rollback_new_disks(vm, rec)
        elif rec.snapshot:
            orig.revert(self.session, vm, rec.snapshot, self.hostd, rec.files)
            self.report.rollback.append(f"reverted VM {rec.name} ({rec.moref}) to its "
                                        "safety snapshot and removed it: disks and "
                                        "configuration as before the rollback")
            rec.snapshot = None
            self.state.save()
        elif self.report.phases["data"].status != "pending":
            # VVOL: no safety snapshot to go back to, and the disks are partly rolled back
            self.report.rollback.append(
                f"VM {rec.name} ({rec.moref}) not reverted: no safety snapshot (VVOL); its "
                "disks are partly rolled back and it stays off: run the same restore "
                "--original again to finish")
            return
        if rec.powered_off:
            power.power_on(self.session, vm)
            self.report.rollback.append(f"powered VM {rec.name} on again")
            rec.powered_off = False
            self.state.save()

    def _rollback_new_disks(self, vm: Any, rec: OriginalRecord) -> None:
        """--full: the old disks back where they were if the swap began, then the new files
        (the ledger's, by their token-bearing names) deleted. The VM's own files were never
        written."""
        from vmrestore import original as orig

        paths = [n.path for n in rec.new_disks]
        if rec.swap in ("running", "done"):
            orig.swap_back(self.session, vm, rec.old_disks, paths)
            rec.swap = ""
            self.state.save()
            self.report.rollback.append(f"put VM {rec.name}'s own disks back "
                                        f"({', '.join(o.path for o in rec.old_disks)})")
        for n in list(rec.new_disks):
            if orig.delete_disk_file(self.session, self.dc, n.path):
                self.report.rollback.append(f"deleted new disk {n.path}")
            rec.new_disks.remove(n)
            self.state.save()

    def _release_attachments(self) -> None:
        if self.state is None or self.state.doc is None or self.hostd is None:
            return
        for a in list(self.state.doc.attachments):
            try:
                if a.kind == "export":
                    self.hostd.unexport_nbd(a.id)
                elif a.kind == "hotadd":
                    self.hostd.hot_remove(a.id)
                elif a.kind == "hotadd-scsi":  # our own SCSI hot-add: not released for us
                    self.report.rollback.append(
                        f"disk {a.disk} may still be hot-added to the proxy VM as {a.id}: "
                        "remove it from the VM (docs/hotadd.md)")
                    continue
                self.report.rollback.append(f"released {a.kind} {a.id} (disk {a.disk})")
            except HostServiceError as e:
                if e.kind != "not-found":
                    self.report.rollback.append(f"could not release {a.kind} {a.id}: {e}")
                    continue
            self.state.detach(a.kind, a.id)

    def _release_everything(self) -> None:
        with contextlib.suppress(Exception):
            if self.state is not None and self.state.doc is not None and \
                    self.report.status == "ok":
                self._release_attachments()
        self._end_vddk_access()
        if self._movers is not None:
            with contextlib.suppress(Exception):
                self._movers.close()
        if self.slot is not None:
            self.slot.release()
        for ch in {id(c): c for c in (self.chain, self._full_chain) if c is not None}.values():
            with contextlib.suppress(Exception):
                ch.close()
        if self.session is not None:
            self.session.close()
        if self.state is not None:
            self.state.unlock()

    # --- phase 1 ----------------------------------------------------------------------

    def _site(self) -> Site:
        if self._site_for is None:
            raise UsageError("restore: no target site given (the command decides where a "
                             "restore goes)")
        return self._site_for(self.job)

    def initialize(self) -> str:
        from vmrestore.jobstate import JobState, state_dir_for
        from vmrestore.repository.reader import open_chain
        from vmrestore.vsphere.connect import connect
        from vmrestore.vsphere.vmconfig import target_layout

        job = self.job
        # The backup: the chain up to the requested point; from a repository agent the VM
        # config, disks and extent tables come over the wire (metadata only).
        if job.repository:
            from vmrestore.mover.repo_source import open_repository_chain

            chain = open_repository_chain(job.repository, job.token_file)
            if getattr(chain, "tls", False) and job.repository.startswith("repo://"):
                chain.close()  # the data path hands plain sockets to the core: refuse now
                raise UsageError(f"{job.repository}: the repository agent requires TLS; "
                                 "use repos://HOST:PORT/PATH")
        else:
            chain = open_chain(job.backup)
        self._full_chain = chain
        self.chain = chain.at(job.point) if job.point else chain
        self.report.point = self.chain.point.name
        # Named before the layout is checked, so a report of a refused job says which VM.
        self.report.vm_name = job.name or str(self.chain.vm_config.get("name") or "")
        self.layout = target_layout(self.chain.vm_config, self.chain.manifest, job)
        self.report.vm_name = self.layout.name
        for t in self.layout.disks:
            d = self.report.disk(t.index)
            d.label, d.capacity, d.provisioning, d.datastore = (t.label, t.capacity,
                                                                t.provisioning, t.datastore)
            d.file = t.file_name

        # Job state: one run at a time; --resume picks up the ledger.
        self.state = JobState(state_dir_for(job, self.chain.point.id), job, self.layout.name)
        self.state.lock()
        if job.resume or (self.resume_if_found and self.state.exists()):
            job.resume = True
            self.state.load()
            self.report.resumed = True
            self.say(f"resuming job {self.state.id} from phase {self.state.doc.phase}")
        elif self.state.exists():
            old = self.state.peek()
            if old.created.vm is not None:
                raise UsageError(
                    f"an interrupted restore of VM {self.layout.name!r} exists (state "
                    f"{self.state.path}, status {old.status}): rerun with --resume, or "
                    "remove the VM and that file")
            self.state.start()
        else:
            self.state.start()

        # Infrastructure: a proxy with a free task slot (the site's proxy VM is the default
        # proxy's VM).
        site = self.site = self._site()
        target = site.target
        infra = (infra_mod.load_infra(job.infra) if job.infra else
                 infra_mod.default_infra(site.proxy_vm))
        self._take_slot(infra)

        # vCenter/ESXi.
        self.report.vcenter = target.url
        self.session = connect(target)
        if site.hostd is None:
            raise UsageError(f"no host data services known for {target.url} (set "
                             "VMRESTORE_HOSTD_URL and VMRESTORE_HOSTD_TOKEN_FILE, see "
                             "docs/restore.md)")
        self.hostd = site.hostd
        if job.resume:
            self._release_attachments()  # stale exports / hot-adds of the killed run

        # VixDiskLib, when it writes the disks: the user's, or the site's (the lab: vddk_sim).
        self._vddk_libdir: str | None = None
        self._vddk_password_file: str | None = None
        if job.disk_library == "vddk":
            from vmrestore import vddk

            libdir = job.vddk_libdir or os.environ.get(vddk.LIBDIR_ENV)
            if not libdir and site.vddk_libdir:
                libdir = site.vddk_libdir
                os.environ.update(site.vddk_env)
                if site.vddk_note:
                    self.say(site.vddk_note)
            # Refused here, not in phase 4; InitEx now, on the main thread (VMware's rule).
            self._vddk_lib = vddk.Library.load(libdir)
            self._vddk_libdir = libdir
            self._vddk_password_file = job.password_file or site.vddk_password_file

        # Data movers (repository side + proxy side), connected.
        if self._movers is None:
            from vmrestore.mover.session import default_session

            self._movers = default_session()
        self._movers.open()

        # Every named object must exist before anything is created.
        s = self.session
        self.dc = s.datacenter(job.datacenter or site.datacenter)
        self.report.datacenter = self.dc.name
        if job.original:
            self._locate_original()
        dss = {name: s.datastore(self.dc, name) for name in self.layout.datastores}
        self.ds_types = {name: ds.summary.type for name, ds in dss.items()}
        for n in self.layout.nics if not job.keep_config else ():
            s.network(self.dc, n.network)
        self._folder = s.folder(self.dc, job.folder)
        self._host = (self.original.vm.runtime.host if self.original is not None else
                      s.host(self.dc, job.host, dss[self.layout.datastore]))
        for name, ds in dss.items():
            if ds not in self._host.datastore:
                raise VSphereError(f"host {self._host.name} does not mount datastore {name}")
        self._pool = s.resource_pool(self.dc, self._host, job.resource_pool)
        self.report.host = self._host.name
        if not job.resume and not job.original and \
                s.find_vm(self.dc, self.layout.name) is not None:
            raise VSphereError(f"a VM named {self.layout.name!r} already exists in datacenter "
                               f"{self.dc.name} (choose another with --name)")

        # Transport per disk (an impossible explicit choice is refused here).
        self.luns = self._luns()
        facts = [infra_mod.DiskFacts(t.index, t.datastore, t.provisioning,
                                     self.ds_types.get(t.datastore, "OTHER"),
                                     self.luns.get(t.datastore))
                 for t in self.layout.disks]
        decisions = self._proxy_vm_present(self._choose_transports(infra, facts))
        infra_mod.check_source(job.repository, job.disk_library, decisions)
        for dec in decisions:
            self.decisions[dec.disk] = dec
            if job.disk_library == "vddk":
                dec.reason += "; written by VixDiskLib"
            rd = self.report.disk(dec.disk)
            rd.transport, rd.reason = dec.mode, dec.reason
        modes = ", ".join(f"disk {d}: {x.mode}" for d, x in sorted(self.decisions.items()))
        self.say(f"phase 1 initialize: proxy {self.report.proxy}, {s.about} at {target.url}, "
                 f"movers {self._movers.name}; {modes}")
        return f"proxy {self.report.proxy}; {modes}"

    def _proxy_vm_present(self, decisions: list[infra_mod.Decision]
                          ) -> list[infra_mod.Decision]:
        """HotAdd attaches disks to the proxy VM: it must exist, or hotadd is impossible.

        An explicit --transport hotadd is refused; an auto choice becomes nbd, saying why.
        """
        # A plan's VM (fleet) has no single proxy: each disk's proxy is chosen per task.
        if not any(d.mode == "hotadd" for d in decisions) or self.proxy is None or \
                not self.proxy.vm:
            return decisions
        if self.session.find_vm(self.dc, self.proxy.vm) is not None:
            return decisions
        why = (f"proxy VM {self.proxy.vm!r} (proxy {self.proxy.name}) not found in datacenter "
               f"{self.dc.name}")
        if self.job.transport == "hotadd":
            raise UsageError(f"transport hotadd refused: {why} (fix the infrastructure file, "
                             "or use --transport nbd)")
        return [infra_mod.Decision(d.disk, "nbd", f"auto: {why}; nbd") if d.mode == "hotadd"
                else d for d in decisions]

    def _take_slot(self, infra: infra_mod.Infra) -> None:
        """One proxy task slot for the whole job (a plan's runner assigns proxies per disk)."""
        job = self.job
        self.slot = infra_mod.acquire_slot(infra, infra_mod.slot_dir(), job.proxy,
                                           job.transport)
        self.proxy = self.slot.proxy
        self.report.proxy = f"{self.proxy.name} (slot {self.slot.index + 1}/{self.proxy.slots})"

    def _choose_transports(self, infra: infra_mod.Infra,
                           facts: list[infra_mod.DiskFacts]) -> list[infra_mod.Decision]:
        return infra_mod.select_transports(self.job.transport, self.proxy, facts)

    def _locate_original(self) -> None:
        """--original: the VM to roll back, checked (disks, power) before anything changes."""
        from vmrestore import original as orig

        rec = self.state.doc.original if self.job.resume else None
        o = orig.locate(self.session, self.dc, self.chain.vm_config, self.layout, self.job,
                        msgspec.structs.asdict(rec) if rec is not None else None)
        self.original = o
        self.report.vm_name, self.report.vm_moref = o.name, o.moref
        self.report.original = {**o.as_dict(), "mode": "quick rollback" if
                                self.job.quick_rollback else "overwrite every block",
                                "config": "kept" if self.job.keep_config else "backup's",
                                "config_changes": []}
        for t in self.layout.disks:
            d = self.report.disk(t.index)
            d.datastore, d.file, d.provisioning = t.datastore, t.file_name, t.provisioning
        self.state.doc.original = OriginalRecord(
            moref=o.moref, name=o.name, found_by=o.found_by,
            files=[d.file_name for d in o.disks], snapshot=rec.snapshot if rec else None,
            powered_off=rec.powered_off if rec else False)
        if o.replace:
            self._plan_new_disks(rec)
        self.state.save()
        self.say(f"original VM {o.name} ({o.moref}) found by {o.found_by}: {o.power_state}, "
                 f"{len(o.disks)} disk(s) " + (f"replaced with new ones (--full): "
                                               f"{'; '.join(o.replace)}" if o.replace else
                                               "matching the backup"))

    def _plan_new_disks(self, old_rec: OriginalRecord | None) -> None:
        """--full: every backup disk goes to a new file (the interrupted run's, on resume),
        recorded in the ledger before it exists; the VM's disks are recorded to be put back."""
        from vmrestore import original as orig

        o, rec = self.original, self.state.doc.original
        if old_rec is not None and old_rec.new_disks:
            rec.new_disks, rec.old_disks, rec.swap = (old_rec.new_disks, old_rec.old_disks,
                                                      old_rec.swap)
        else:
            token = secrets.token_hex(4)
            rec.new_disks = [NewDisk(t.index, orig.new_disk_path(o.vm, o.disks, t.index,
                                                                 t.datastore, token))
                             for t in self.layout.disks]
            rec.old_disks = [OldDisk(d.file_name, d.key, d.controller_key, d.unit, d.capacity,
                                     d.provisioning) for d in o.disks]
        paths = {n.disk: n.path for n in rec.new_disks}
        for t in self.layout.disks:
            t.file_name = paths[t.index]
            self.report.disk(t.index).file = t.file_name
        self.report.original["mode"] = "replace the disks (--full)"
        self.report.original["replaced"] = [
            *(f"disk {t.index}: {o.disks[t.index].file_name} "
              f"({o.disks[t.index].capacity} bytes) -> {t.file_name} ({t.capacity} bytes)"
              if t.index < len(o.disks) else f"disk {t.index}: added {t.file_name} "
              f"({t.capacity} bytes)" for t in self.layout.disks),
            *(f"removed {d.file_name} ({d.capacity} bytes)"
              for d in o.disks[len(self.layout.disks):])]

    def _luns(self) -> dict[str, str]:
        """Datastore -> the LUN behind it, as the host reports (SAN candidates)."""
        try:
            info = self.hostd.info()
        except HostServiceError as e:
            log.info("host info unavailable: %s", e)
            return {}
        out = {}
        for d in info.get("datastores", []):
            if isinstance(d, dict) and d.get("lun"):
                out[d["name"]] = d["lun"]
        for name, lun in (info.get("luns") or info.get("san_luns") or {}).items() \
                if isinstance(info.get("luns") or info.get("san_luns"), dict) else []:
            out.setdefault(name, lun)
        return out

    # --- phase 2 ----------------------------------------------------------------------

    def restore_config(self) -> str:
        from vmrestore.vsphere.vmconfig import create_vm

        if self.original is not None:
            return self._config_original()
        created = self.state.doc.created
        if self.job.resume and created.vm is not None:
            rec = created.vm
            self.vm = self._our_vm(rec)
            if self.vm is None:
                created.vm = None
                self.state.save()
                raise VSphereError(f"--resume: VM {rec.name} ({rec.moref or 'being created'}) "
                                   "of the interrupted run no longer exists")
            rec.moref = self.vm._moId
            self.state.save()
            self.report.vm_moref = self.vm._moId
            self.report.phases["config"].status = "resumed"
            return f"VM {rec.name} ({self.vm._moId}) from the interrupted run"
        L = self.layout
        self._make_dirs(created)
        # Recorded before CreateVM: the token it writes into the VM's extraConfig is how a
        # VM of this name is recognised as ours (a racer may create one of the same name).
        created.vm = VMRecord(name=L.name, token=secrets.token_hex(16))
        self.state.save()
        try:
            home = f"[{L.datastore}] {L.name}"
            self.vm = create_vm(self.session, self.dc, L, self._folder, self._pool, self._host,
                                owner_token=created.vm.token,
                                vm_path=f"{home}/{L.name}.vmx" if home in created.dirs else None)
        except VSphereError:
            # A create that failed half-way may still have registered the VM: ours only
            # if it carries our token; a name collision is this job's failure, nothing more.
            self.vm = self._our_vm(created.vm)
            if self.vm is None:
                created.vm = None
            else:
                created.vm.moref = self.vm._moId
            self.state.save()
            raise
        created.vm.moref = self.vm._moId
        self.state.save()
        self.report.vm_moref = self.vm._moId
        nets = ", ".join(f"{n.source_network}->{n.network}" if n.source_network != n.network
                         else n.network for n in L.nics) or "no NIC"
        fmts = ", ".join(f"disk {t.index} {t.provisioning} on {t.datastore}" for t in L.disks)
        self.say(f"phase 2 config: registered VM {L.name} ({self.vm._moId}) on "
                 f"{self._host.name}: {L.num_cpus} vCPU, {L.memory_mb} MB, {fmts}; {nets}")
        return f"VM {L.name} ({self.vm._moId}); {fmts}; networks {nets}"

    def _config_original(self) -> str:
        """Phase 2 of --original: the VM exists; power it off if allowed, say what the
        configuration will get back (applied in phase 5, once the data is right)."""
        from vmrestore import original as orig
        from vmrestore.vsphere import power

        o, rec = self.original, self.state.doc.original
        self.vm = o.vm
        parts = []
        if o.vm.runtime.powerState != "poweredOff":
            self.say(f"phase 2 config: VM {o.name} is {o.vm.runtime.powerState}: powering it "
                     "off (--force)")
            power.power_off(self.session, o.vm)
            rec.powered_off = True
            self.state.save()
            parts.append(f"powered off (was {o.power_state})")
        else:
            self.say(f"phase 2 config: VM {o.name} is powered off")
        if self.job.keep_config:
            parts.append("configuration kept (--keep-config)")
        else:
            changes = orig.config_changes(o.vm, self.layout)
            self.report.original["config_changes"] = changes
            parts.append("configuration to restore: " + ("; ".join(changes) or "no change"))
        self.say(f"phase 2 config: {', '.join(parts)}")
        return f"VM {o.name} ({o.moref}); " + ", ".join(parts)

    def _make_dirs(self, created: Created) -> None:
        """Make the VM's directory on each disk datastore. Only a directory this call made
        is recorded as ours (FileAlreadyExists: someone else's, or an earlier VM's, never
        deleted by our rollback)."""
        from pyVmomi import vim

        fm = self.session.content.fileManager
        for ds in self.layout.datastores:
            path = f"[{ds}] {self.layout.name}"
            if path in created.dirs:
                continue
            try:
                fm.MakeDirectory(name=path, datacenter=self.dc, createParentDirectories=False)
            except vim.fault.FileAlreadyExists:
                continue
            created.dirs.append(path)
            self.state.save()

    # --- phase 3 ----------------------------------------------------------------------

    def create_snapshot(self) -> str:
        from vmrestore.vsphere import snapshots

        self._begin_vddk_access()  # VMware: before the snapshot is taken
        vvol = sorted(ds for ds in self.layout.datastores if self.ds_types.get(ds) == "VVOL")
        if vvol:
            self.report.phases["snapshot"].status = "skipped"
            self.report.snapshot = f"not taken: datastore {', '.join(vvol)} is VVOL"
            self.say(f"phase 3 snapshot: not taken, datastore {', '.join(vvol)} is VVOL "
                     "(VDDK limitation)")
            return self.report.snapshot
        if self.original is not None and self.original.replace:
            self.report.phases["snapshot"].status = "skipped"
            self.report.snapshot = ("not taken: --full writes new disk files; the VM's own are "
                                    "untouched until they are swapped in phase 5")
            self.say(f"phase 3 snapshot: {self.report.snapshot}")
            return self.report.snapshot
        if self.original is not None:
            return self._safety_snapshot()
        if snapshots.has_snapshot(self.vm):
            self.report.phases["snapshot"].status = "resumed"
            self.report.snapshot = "taken (earlier run)"
            return "snapshot exists from the interrupted run"
        snapshots.create(self.session, self.vm, "vmrestore: keeps the VM off its base disks "
                         "while they are written")
        self.state.doc.created.snapshot = True
        self.state.save()
        self.report.snapshot = "taken"
        self.say(f"phase 3 snapshot: created {snapshots.SNAPSHOT_NAME} on {self.layout.name}")
        return f"snapshot {snapshots.SNAPSHOT_NAME} created"

    def _safety_snapshot(self) -> str:
        from vmrestore import original as orig
        from vmrestore.vsphere import disks as vdisks

        rec = self.state.doc.original
        if rec.snapshot:
            self.report.phases["snapshot"].status = "resumed"
            self.report.snapshot = "safety snapshot taken (earlier run)"
            return f"safety snapshot {rec.snapshot} from the interrupted run"
        rec.snapshot = orig.take_safety_snapshot(self.session, self.vm, self.hostd, rec.files)
        self.state.save()
        # The VM now runs on the snapshot's deltas: the rollback writes those (current) files.
        now = sorted(vdisks.vm_disks(self.vm), key=lambda d: (d.controller_key, d.unit))
        for t, d in zip(self.layout.disks, now, strict=True):
            t.file_name = d.file_name
        self.report.snapshot = "safety snapshot taken"
        self.say(f"phase 3 snapshot: safety snapshot {orig.SAFETY_SNAPSHOT} of {self.vm.name}: "
                 "a failure reverts to it")
        return f"safety snapshot {orig.SAFETY_SNAPSHOT} ({rec.snapshot})"

    # --- phase 4 ----------------------------------------------------------------------

    def _disk_written(self, base: str, mode: str, rd: Any, out: Any) -> None:
        """A disk task ended well: the host's view made current, its report line filled."""
        if mode == "san":  # written under the host's file system: make its view current
            self.hostd.sync_disk(base)
        rd.transport = mode
        rd.status = "ok"
        rd.bytes_written, rd.bytes_zeroed, rd.bytes_skipped = (
            out.bytes_written, out.bytes_zeroed, out.bytes_skipped)
        rd.resumed_from = out.resumed_bytes
        rd.wire_bytes = out.wire_bytes
        rd.seconds = out.seconds
        rd.busy = role_busy(mode, out.busy)
        rd.timeline = out.timeline

    @staticmethod
    def _done_before(rd: Any, st: Any) -> bool:
        """A disk the interrupted run finished: reported as skipped, not written again."""
        if st.status != "done":
            return False
        rd.status = "skipped"
        rd.history.append("written by the interrupted run")
        rd.transport = st.transport or rd.transport
        return True

    def transport_data(self) -> str:
        from vmrestore.vsphere import disks as vdisks

        todo: list[tuple[Any, str, Any, DiskStatus]] = []
        for t in self.layout.disks:
            rd = self.report.disk(t.index)
            st = self.state.disk(t.index)
            if self._done_before(rd, st):
                continue
            if self.original is not None and self.original.replace:
                rd.file = t.file_name
                self._new_disk_file(t)
                todo.append((t, t.file_name, rd, st))
                continue
            if self.original is not None:
                # The original VM's current file (the safety snapshot's delta): a revert
                # drops every write of the rollback. The disk exists: nothing to prepare.
                rd.file = t.file_name
                todo.append((t, t.file_name, rd, st))
                continue
            vd = vdisks.disk_for_file(self.vm, t.file_name)
            base = vd.base_file
            if base != vd.file_name:
                self.say(f"disk {t.index}: VM runs on delta {vd.file_name}; writing base {base}")
            rd.file = base
            # What a real host did when it created the disk; a no-op against real ESXi.
            self.hostd.prepare_disk(base, t.capacity, t.provisioning)
            todo.append((t, base, rd, st))
        width = self._run_disks(todo)
        total = sum(d.bytes_written + d.bytes_zeroed for d in self.report.disks)
        return (f"{len(self.layout.disks)} disk(s), {total / (1 << 20):.1f} MiB moved"
                + (f", {width} at a time" if width > 1 else ""))

    def _run_disks(self, todo: list[tuple[Any, str, Any, DiskStatus]]) -> int:
        """Run the disks' tasks, several at once up to the proxy's free task slots.

        The job holds one slot; each further disk running at the same time takes
        another free slot of the same proxy for the data phase. The first failure
        cancels the others (their checkpoints stay: a --resume continues them) and
        is the one raised. Returns how many ran at once.
        """
        import threading
        from concurrent.futures import ThreadPoolExecutor

        extra = []
        # VixDiskLib's Open/Close want one thread at a time (VMware's rule): serial there.
        if len(todo) > 1 and self.slot is not None and self.job.disk_library != "vddk":
            extra = infra_mod.acquire_more(self.slot, infra_mod.slot_dir(), len(todo) - 1)
        width = 1 + len(extra)
        try:
            if width == 1:
                for item in todo:
                    self._restore_one(*item)
                return 1
            self._cancel_disks = threading.Event()
            failed: list[BaseException] = []

            def one(item: tuple[Any, str, Any, DiskStatus]) -> None:
                if self._cancel_disks.is_set():
                    return
                try:
                    self._restore_one(*item)
                except BaseException as e:
                    failed.append(e)
                    self._cancel_disks.set()

            with ThreadPoolExecutor(width, thread_name_prefix="disk") as pool:
                futures = [pool.submit(one, item) for item in todo]
                try:
                    for f in futures:  # short waits: Ctrl-C reaches this thread at once
                        while not f.done():
                            with contextlib.suppress(TimeoutError):
                                f.result(timeout=0.2)
                except KeyboardInterrupt:
                    self._cancel_disks.set()
                    raise
            if failed:
                first = [e for e in failed if not isinstance(e, Interrupted)] or failed
                raise first[0]
            return width
        finally:
            for lease in extra:
                lease.release()

    def _new_disk_file(self, t: Any) -> None:
        """--full: create backup disk t's new file (ledger first), sized and provisioned."""
        from vmrestore import original as orig

        nd = next(n for n in self.state.doc.original.new_disks if n.disk == t.index)
        if not nd.created:
            if self.job.resume:  # the killed run may have made it: ours by its name
                orig.delete_disk_file(self.session, self.dc, nd.path)
            try:
                orig.create_disk_file(self.session, self.dc, nd.path, t.capacity,
                                      t.provisioning)
            except VSphereError as e:
                if e.fault == "FileAlreadyExists":  # someone else's: never ours to delete
                    self.state.doc.original.new_disks.remove(nd)
                    self.state.save()
                raise
            nd.created = True
            self.state.save()
        self.hostd.prepare_disk(nd.path, t.capacity, t.provisioning)

    @property
    def _in_place(self) -> bool:
        """--original writing the VM's own disks (not --full's new files)."""
        return self.original is not None and not self.original.replace

    def _restore_one(self, t: Any, base: str, rd: Any, st: DiskStatus) -> None:
        from vmrestore.disktask import DiskTask
        from vmrestore.jobstate import read_checkpoint

        dec = self.decisions[t.index]
        modes = [dec.mode, *dec.fallback]
        ckpt_path = self.state.checkpoint_path(t.index)
        cancel = getattr(self, "_cancel_disks", None)
        last_err: VmrError | None = None
        for attempt, mode in enumerate(modes):
            ck = read_checkpoint(ckpt_path)
            if ck is not None and not (attempt == 0 and self.job.resume and
                                       (st.transport or mode) == mode):
                ckpt_path.unlink()   # another transport or a fresh run: start the disk over
                ck = None
            # The attempt number fences a run that outlives its successor: the driver
            # refuses to write under a checkpoint a later attempt holds, the host revokes
            # a lower attempt's export or hot-add. It is in the ledger before the attach:
            # a run killed between the host's hot-add and its first checkpoint left an
            # attachment the ledger may not name, and only a higher attempt revokes it.
            fence = st.next_attempt(ck)
            st.status, st.transport = "running", mode
            self.state.save()
            task = None
            if self.display is not None:
                task = self.display.task(f"disk {t.index} ({mode})", total=t.capacity)
            try:
                att = self._attach(t, base, mode, attempt=fence)
                try:
                    dtask = DiskTask(
                        job_id=self.state.id, vm=self.layout.name, disk=t.index,
                        source=self._point_source(), target=att.uri, transport=mode,
                        checkpoint=str(ckpt_path), attempt=fence,
                        settings=self.job.task_settings(
                            target_zeroed=not self._in_place,
                            compare=self._in_place and self.job.quick_rollback,
                            stall=self.faults["stall"]))
                    if ck is not None and ck.prefix:
                        self.say(f"disk {t.index}: resuming at plan entry {ck.prefix} "
                                 f"({ck.bytes_done / (1 << 20):.1f} MiB already durable)")
                    out = self._movers.restore_disk(
                        dtask, (lambda p, _t=task: p.durable or _t.update(completed=p.done))
                        if task else None, cancel)
                finally:
                    att.release()
            except (TransportError, HostServiceError, VSphereError) as e:
                if task is not None:
                    task.done()
                last_err = e
                if attempt + 1 < len(modes):
                    note = f"{mode} failed ({e}); fell back to {modes[attempt + 1]}"
                    rd.history.append(note)
                    self.say(f"disk {t.index}: {note}")
                    continue
                raise
            if task is not None:
                task.done()
            self._disk_written(base, mode, rd, out)
            if self._in_place:
                rd.rollback = self._rollback_figures(t, out)
            st.status, st.transport = "done", mode
            self.state.save()
            self.say(f"disk {t.index}: {mode}, {rd.bytes_written / (1 << 20):.1f} MiB written, "
                     f"{rd.bytes_zeroed / (1 << 20):.1f} MiB zeroed, "
                     f"{rd.bytes_skipped / (1 << 20):.1f} MiB skipped, {rd.mbps:.1f} MB/s")
            return
        raise last_err or TransportError(f"disk {t.index}: no transport left")

    def _rollback_figures(self, t: Any, out: Any) -> dict[str, Any]:
        """What the rollback of one disk did, next to what a full overwrite would do."""
        fig = {"mode": "quick rollback" if self.job.quick_rollback else "overwrite",
               "blocks_compared": out.compared_entries,
               "blocks_differing": out.differing_entries,
               "blocks_written": (out.differing_entries if self.job.quick_rollback
                                  else out.entries - out.start_entry),
               "bytes_read": out.compare_read_bytes, "known_zero_bytes": out.known_zero_bytes,
               "bytes_written": out.bytes_written + out.bytes_zeroed,
               "bytes_same": out.bytes_same, "seconds": round(out.seconds, 3),
               "full_overwrite_bytes": t.capacity}
        if self.job.quick_rollback:
            self.say(f"disk {t.index}: quick rollback compared {out.compared_entries} blocks "
                     f"({out.compare_read_bytes / (1 << 20):.1f} MiB read, "
                     f"{out.known_zero_bytes / (1 << 20):.1f} MiB known zero), "
                     f"{out.differing_entries} differed: "
                     f"{fig['bytes_written'] / (1 << 20):.1f} MiB written of "
                     f"{t.capacity / (1 << 20):.1f} MiB a full overwrite writes")
        return fig

    def _point_source(self) -> str:
        """What the proxy-side mover reads: the chosen point's file, or its repo:// URL."""
        if not self.job.repository:
            return str(self.chain.point.path)
        from vmrestore.mover.client import RepoURL

        u = RepoURL.parse(self.job.repository)
        url = str(RepoURL(u.host, u.port, self.chain.point.path, u.tls, u.ca))
        return url + (f"?ca={u.ca}" if u.ca else "")

    def _attach(self, t: Any, base: str, mode: str, proxy: infra_mod.Proxy | None = None,
                attempt: int | None = None) -> _Attachment:
        """Make the base disk writable from the proxy by `mode`; recorded for rollback.

        ``proxy`` (default: the job's) is whose VM a hot-add goes to; ``attempt`` fences
        the host's export or hot-add (docs/lab.md): a lower attempt's is revoked first.
        """
        proxy = proxy or self.proxy
        if mode in self.faults["transports"]:
            raise TransportError(f"disk {t.index}: transport {mode} failed "
                                 "(fault injected by VMRESTORE_FAULT, test only)")
        if self.job.disk_library == "vddk":
            return self._vddk_target(base, mode)
        h = self.hostd
        if mode in ("nbd", "nbdssl"):
            ex = h.export_nbd(base, tls=mode == "nbdssl", attempt=attempt)
            self.state.attach("export", ex.id, t.index)

            def rel_export() -> None:
                h.unexport_nbd(ex.id)
                self.state.detach("export", ex.id)

            return _Attachment(self._nbd_uri(ex), rel_export, f"export {ex.id}")
        if mode == "hotadd":
            att = self._hotadd_attacher(proxy).attach(base, attempt)
            kind = "hotadd" if att.ref else "hotadd-scsi"
            ref = att.ref or att.device
            self.state.attach(kind, ref, t.index)

            def rel_hotadd() -> None:
                att.release()
                self.state.detach(kind, ref)

            return _Attachment(att.device, rel_hotadd, att.note)
        if mode == "san":
            em = h.extent_map(base)
            path = self.state.dir / f"{self.state.stem}.disk{t.index}.extents.json"
            path.write_text(json.dumps({"version": 1, "lun": em.lun, "size": em.size,
                                        "extents": [list(e) for e in em.extents]}))

            def rel_map() -> None:
                with contextlib.suppress(OSError):
                    path.unlink()

            return _Attachment(self._san_uri(em, path), rel_map, f"LUN {em.lun}")
        raise UsageError(f"unknown transport {mode!r}")

    def _vddk_target(self, base: str, mode: str) -> _Attachment:
        """VixDiskLib does the transport itself: hand it the VM, the base disk and the mode."""
        from vmrestore.job import parse_vcenter
        from vmrestore.transport import vddk_uri

        _, host, port, _ = parse_vcenter(self.report.vcenter)
        uri = vddk_uri.build(host, base, self.vm._moId, self.session.target.user, port=port,
                             transports=(mode,), thumbprint=self.job.thumbprint,
                             password_file=self._vddk_password_file,
                             new=not self._in_place,
                             libdir=self._vddk_libdir, endpoint=self._vddk_endpoint(),
                             caller_access=True)
        return _Attachment(uri, lambda: None, f"VixDiskLib {mode}")

    def _hotadd_attacher(self, proxy: infra_mod.Proxy | None) -> Any:
        """The proxy's way to get a hot-added disk (transport/hotadd.py): via the host data
        services (the lab), or in this proxy VM's own SCSI subsystem."""
        from vmrestore.transport import hotadd

        vm_name = proxy.vm if proxy else None
        if proxy is None or proxy.hotadd == "hostd":
            return hotadd.LabAttacher(self.hostd, vm_name)
        from pyVmomi import vim

        vm = next((v for v in self.session.objects(vim.VirtualMachine) if v.name == vm_name),
                  None)
        if vm is None:
            raise VSphereError(f"proxy VM {vm_name!r} not found at {self.report.vcenter}")
        return hotadd.ScsiAttacher(vm, self.session.wait)

    def _vddk_endpoint(self) -> str:
        """'esx' when connected straight to a host (no PrepareForAccess there)."""
        return "esx" if self.session.content.about.apiType == "HostAgent" else "vcenter"

    def _begin_vddk_access(self) -> None:
        """PrepareForAccess for the VM (vCenter only), held until the snapshot is removed."""
        if self.job.disk_library != "vddk" or getattr(self, "_vddk_access", None) is not None:
            return
        from vmrestore import vddk
        from vmrestore.transport import vddk_uri

        uri = self._vddk_target("[-] -.vmdk", "nbd").uri  # the connection part only
        self._vddk_access = vddk.Access(self._vddk_lib, vddk_uri.parse(uri).spec, "vmrestore")
        self._vddk_access.begin()

    def _end_vddk_access(self) -> None:
        """EndAccess (after the snapshot's removal, or on the way out); failures only logged."""
        acc = getattr(self, "_vddk_access", None)
        if acc is not None:
            self._vddk_access = None
            acc.__exit__(None, None, None)

    @staticmethod
    def _nbd_uri(ex: Any) -> str:
        return ex.uri

    @staticmethod
    def _san_uri(em: Any, map_path: Path) -> str:
        return f"san:{em.lun}?map={map_path}"

    # --- phase 5 ----------------------------------------------------------------------

    def commit(self) -> str:
        from vmrestore.vsphere import power, snapshots

        if self.original is not None:
            return self._commit_original()
        parts = []
        if snapshots.has_snapshot(self.vm):
            snapshots.remove_all(self.session, self.vm)
            if snapshots.has_snapshot(self.vm):
                raise VSphereError(f"VM {self.layout.name}: snapshot still present after commit")
            self.report.snapshot = "committed (removed)"
            parts.append("snapshot committed")
            self.say(f"phase 5 commit: snapshot of {self.layout.name} committed")
        self._end_vddk_access()  # VMware: after the snapshot is removed
        if self.job.power_on:
            power.power_on(self.session, self.vm)
            self.report.powered_on = True
            parts.append("powered on")
            self.say(f"phase 5 commit: {self.layout.name} powered on")
        self.state.doc.status = "done"
        self.state.save()
        return ", ".join(parts) or "nothing to commit"

    def _commit_original(self) -> str:
        """The data is right: restore the configuration, merge the safety snapshot."""
        from vmrestore import original as orig
        from vmrestore.vsphere import power

        rec, parts = self.state.doc.original, []
        if rec.new_disks:
            self._swap_disks(rec)
            parts.append(f"{len(rec.new_disks)} new disk(s) swapped in")
        if not self.job.keep_config:
            changes = orig.apply_config(self.session, self.dc, self.vm, self.layout)
            self.report.original["config_changes"] = changes
            parts.append("configuration restored: " + ("; ".join(changes) or "no change"))
        if rec.snapshot:
            orig.remove_safety_snapshot(self.session, self.vm, rec.snapshot, self.hostd,
                                        rec.files)
            rec.snapshot = None
            self.state.save()
            self.report.snapshot = "safety snapshot removed (merged)"
            parts.append("safety snapshot removed")
        if self.job.power_on:
            power.power_on(self.session, self.vm)
            self.report.powered_on = True
            parts.append("powered on")
        rec.powered_off = False
        if rec.old_disks and rec.swap in ("done", "committed"):
            parts.append(self._delete_old_disks(rec))
        self.state.doc.status = "done"
        self.state.save()
        self.say(f"phase 5 commit: {self.vm.name}: {', '.join(parts) or 'nothing to do'}")
        return ", ".join(parts) or "nothing to commit"

    def _swap_disks(self, rec: OriginalRecord) -> None:
        """--full: one ReconfigVM detaches the VM's disks (files kept) and attaches the new,
        written and verified ones; recorded first, so a failure from here swaps back."""
        from vmrestore import original as orig

        if rec.swap == "committed":  # resumed while the old files were being deleted
            return
        rec.swap = "running"
        self.state.save()
        orig.swap_disks(self.session, self.vm, rec.old_disks,
                        [(n.path, self.layout.disks[n.disk]) for n in rec.new_disks])
        rec.swap = "done"
        self.state.save()
        self.say(f"phase 5 commit: VM {self.vm.name} now runs on "
                 f"{', '.join(n.path for n in rec.new_disks)}")
        if "swap" in self.faults["after"]:
            raise InjectedFault("fault injected after the disk swap (VMRESTORE_FAULT, "
                                "test only)")

    def _delete_old_disks(self, rec: OriginalRecord) -> str:
        """--full, last step: the replaced disks' files. The VM is right whatever happens
        here, so the new disks stay; a file that cannot be deleted is named, not undone."""
        from vmrestore import original as orig

        rec.swap = "committed"  # the new disks are the VM's now: never rolled back
        self.state.save()
        deleted, left = [], []
        for o in list(rec.old_disks):
            try:
                orig.delete_disk_file(self.session, self.dc, o.path)
                deleted.append(o.path)
            except VSphereError as e:
                left.append(f"{o.path} ({e})")
            rec.old_disks.remove(o)
            self.state.save()
        self.report.original["deleted"] = deleted
        if left:
            self.report.original["left"] = left
            self.say(f"phase 5 commit: old disk file(s) not deleted: {'; '.join(left)}")
        return f"{len(deleted)} old disk file(s) deleted" + (f", {len(left)} left" if left
                                                              else "")
