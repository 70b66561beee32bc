"""Restore to the original location: the VM the backup was taken of, rolled back in place.

The orchestrator's phases stay the same; this module holds what differs when
the destination is the VM that went wrong instead of a new one (no block I/O):

- :func:`locate` (phase 1): find the VM by the backup's identity (instance
  UUID, then name; ``--original-vm MOREF`` picks one), refuse an ambiguous
  match naming the candidates, refuse disks that do not match the backup
  (count, capacity) naming the difference, refuse a powered-on VM without
  ``--force``; the layout's disks then point at the VM's own files.
- :func:`config_changes` / :func:`apply_config` (phase 2 decides, phase 5
  applies): the backed-up CPU, memory and NICs (type, network) against the
  VM's, as a list of readable changes and one ReconfigVM.
- the **safety snapshot** (:func:`take_safety_snapshot`, :func:`revert`,
  :func:`remove_safety_snapshot`): taken before any byte is written, so a
  rollback that fails reverts to it and the VM is left as it was; removed
  (its delta merged) once the data and configuration are right. Not on VVOL.

- ``--full`` (:func:`new_disk_path`, :func:`create_disk_file`, :func:`swap_disks`,
  :func:`swap_back`, :func:`delete_disk_file`): disks that differ from the
  backup's are replaced by new files written in full, swapped in by one
  ReconfigVM at the end; the old files are deleted last (docs/restore.md).

The data phase writes the VM's *current* disk files (a delta while the safety
snapshot exists), so that reverting the snapshot drops every write made by
the rollback. The lab's simulator keeps no deltas, so its host data services
keep a copy of each disk at the snapshot (``disk_snapshot``; a no-op on a
real host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmrestore.errors import UsageError, VSphereError

SAFETY_SNAPSHOT = "vmrestore-rollback-safety"


@dataclass
class Original:
    """The VM being rolled back, as phase 1 found it."""

    vm: Any
    moref: str
    name: str
    found_by: str                    # "instance UUID ...", "name ...", "--original-vm ..."
    power_state: str                 # as found: poweredOn / poweredOff / suspended
    disks: list[Any] = field(default_factory=list)   # vsphere.disks.VmDisk, backup order
    replace: list[str] = field(default_factory=list)  # --full: how the disks differ

    def as_dict(self) -> dict[str, Any]:
        return {"moref": self.moref, "name": self.name, "found_by": self.found_by,
                "power_state": self.power_state}


def _vms_with(session: Any, dc: Any, path: str, value: str) -> list[Any]:
    """Every VM of the datacenter whose property ``path`` equals value (one collector call:
    FindAllByUuid is not offered everywhere, and a name may be taken in several folders)."""
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    view = session.content.viewManager.CreateContainerView(dc.vmFolder, [vim.VirtualMachine],
                                                           True)
    try:
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="v", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=[path])])
        return [o.obj for o in session.content.propertyCollector.RetrieveContents([spec])
                if o.propSet and o.propSet[0].val == value]
    finally:
        view.Destroy()


def _where(vm: Any) -> str:
    """vm-42 (folder/path/name), for messages that list candidates."""
    parts = [vm.name]
    p = vm.parent
    while p is not None and getattr(p, "name", None) not in (None, "vm"):
        parts.insert(0, p.name)
        p = getattr(p, "parent", None)
    return f"{vm._moId} ({'/'.join(parts)})"


def find_vm(session: Any, dc: Any, vm_config: dict[str, Any], name: str | None,
            moref: str | None) -> tuple[Any, str]:
    """The VM the backup was taken of: (vm, how it was found). Refuses 0 or >1 matches."""
    if moref:
        vm = session.vm_by_moref(moref)
        try:
            vm.name  # noqa: B018 - raises when the moref does not exist
        except Exception:
            raise VSphereError(f"--original-vm {moref}: no such VM in {dc.name}") from None
        return vm, f"--original-vm {moref}"
    uuid = str(vm_config.get("instance_uuid") or "")
    if uuid and not name:
        found = _vms_with(session, dc, "config.instanceUuid", uuid)
        if len(found) == 1:
            return found[0], f"instance UUID {uuid}"
        if len(found) > 1:
            raise VSphereError(
                f"restore --original refused: {len(found)} VMs have the backup's instance "
                f"UUID {uuid}: {', '.join(_where(v) for v in found)}; pick one with "
                "--original-vm MOREF")
    want = name or str(vm_config.get("name") or "")
    if not want:
        raise UsageError("restore --original: the backup names no VM; give --name or "
                         "--original-vm")
    found = _vms_with(session, dc, "name", want)
    if not found:
        what = f"instance UUID {uuid} nor " if uuid and not name else ""
        raise VSphereError(f"restore --original: no VM with the backup's {what}name {want!r} "
                           f"in datacenter {dc.name} (restore to a new VM without --original)")
    if len(found) > 1:
        raise VSphereError(
            f"restore --original refused: {len(found)} VMs are named {want!r} in datacenter "
            f"{dc.name}: {', '.join(_where(v) for v in found)}; pick one with "
            "--original-vm MOREF")
    return found[0], f"name {want!r}"


def disk_differences(layout_disks: list[Any], vm_disks: list[Any]) -> list[str]:
    """What keeps the VM's disks from taking the backup's in place (empty: they match)."""
    out = []
    if len(layout_disks) != len(vm_disks):
        out.append(f"the backup has {len(layout_disks)} disk(s), the VM {len(vm_disks)}")
    for t, d in zip(layout_disks, vm_disks, strict=False):
        if t.capacity != d.capacity:
            out.append(f"disk {t.index} ({d.label}): backup {t.capacity} bytes, VM "
                       f"{d.capacity} bytes")
    return out


def locate(session: Any, dc: Any, vm_config: dict[str, Any], layout: Any, job: Any,
           state: dict[str, Any] | None = None) -> Original:
    """Phase 1 of ``--original``: find and check the VM; point the layout at its disks.

    ``state``: the job state's ``original`` record of an interrupted run (resume):
    the VM is the one recorded there, whatever its name is now.
    """
    from vmrestore.vsphere.disks import vm_disks
    from vmrestore.vsphere.snapshots import has_snapshot

    if state and state.get("moref"):
        vm, how = find_vm(session, dc, vm_config, None, state["moref"])
        how = f"the interrupted run ({state.get('found_by', how)})"
    else:
        vm, how = find_vm(session, dc, vm_config, job.name, job.original_vm)
    disks = sorted(vm_disks(vm), key=lambda d: (d.controller_key, d.unit))
    diff = disk_differences(layout.disks, disks)
    if not diff and state and state.get("new_disks"):  # resumed after --full's swap
        diff = ["the interrupted --full run's new disks"]
    if diff and not job.full:
        raise UsageError(f"restore --original refused: VM {vm.name} ({vm._moId}) does not have "
                         f"the backup's disks: {'; '.join(diff)} (give --full to replace them "
                         "with new disks, or restore to a new VM)")
    if diff and not (state and state.get("new_disks")) and has_snapshot(vm):
        raise UsageError(f"restore --original --full refused: VM {vm.name} ({vm._moId}) has "
                         "snapshots, which keep its disks: remove them first (its disk files "
                         "are deleted once replaced)")
    if diff and _controller(vm, [d.controller_key for d in disks]) is None:
        raise UsageError(f"restore --original --full refused: VM {vm.name} ({vm._moId}) has no "
                         "disk controller to attach the backup's disks to")
    power = str(vm.runtime.powerState)
    if power != "poweredOff" and not job.force and not (state and state.get("powered_off")):
        raise UsageError(f"restore --original refused: VM {vm.name} ({vm._moId}) is {power}; "
                         "a rollback overwrites its disks, so it must be off: give --force to "
                         "power it off first")
    layout.name = vm.name
    if diff:  # --full: new files next to the VM's (names given by the orchestrator's ledger)
        home = str(vm.config.files.vmPathName)
        for t in layout.disks:
            t.datastore = (disks[t.index].datastore if t.index < len(disks)
                           else home[1:home.index("]")])
        layout.datastore = layout.disks[0].datastore if layout.disks else layout.datastore
        return Original(vm, vm._moId, vm.name, how, power, disks, diff)
    for t, d in zip(layout.disks, disks, strict=True):
        t.datastore = d.datastore
        t.file_name = d.file_name
        t.provisioning = d.provisioning
    if disks:
        layout.datastore = disks[0].datastore
    return Original(vm, vm._moId, vm.name, how, power, disks)


# ------------------------------------------------------------------ configuration


def _nics(vm: Any) -> list[Any]:
    from pyVmomi import vim

    return [d for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _nic_type(dev: Any) -> str:
    from vmrestore.vsphere.vmconfig import _NICS

    for name, cls in _NICS.items():
        if type(dev).__name__.endswith(cls):
            return name
    return type(dev).__name__


def _nic_network(dev: Any) -> str:
    b = dev.backing
    return str(getattr(b, "deviceName", None) or getattr(getattr(b, "network", None), "name", "")
               or getattr(getattr(b, "port", None), "portgroupKey", ""))


def config_changes(vm: Any, layout: Any) -> list[str]:
    """What restoring the backup's configuration changes on the VM, one line per change."""
    hw = vm.config.hardware
    out = []
    if hw.numCPU != layout.num_cpus:
        out.append(f"CPU {hw.numCPU} -> {layout.num_cpus}")
    if hw.memoryMB != layout.memory_mb:
        out.append(f"memory {hw.memoryMB} MB -> {layout.memory_mb} MB")
    nics = _nics(vm)
    for i, n in enumerate(layout.nics):
        if i >= len(nics):
            out.append(f"add NIC {n.label} ({n.type}) on {n.network}")
            continue
        have_type, have_net = _nic_type(nics[i]), _nic_network(nics[i])
        if have_type != n.type:
            out.append(f"NIC {i + 1}: {have_type} -> {n.type} (replaced, on {n.network})")
        elif have_net != n.network:
            out.append(f"NIC {i + 1} network {have_net} -> {n.network}")
    for dev in nics[len(layout.nics):]:
        out.append(f"remove NIC {dev.deviceInfo.label if dev.deviceInfo else dev.key} "
                   f"on {_nic_network(dev)}")
    return out


def apply_config(session: Any, dc: Any, vm: Any, layout: Any) -> list[str]:
    """Give the VM the backup's CPU, memory and NICs; returns what changed (none: no call)."""
    from pyVmomi import vim

    from vmrestore.vsphere.vmconfig import _NICS, nic_backing

    changes = config_changes(vm, layout)
    if not changes:
        return []
    dev_changes = []
    nics = _nics(vm)
    for i, n in enumerate(layout.nics):
        net = session.network(dc, n.network)
        if i < len(nics) and _nic_type(nics[i]) == n.type:
            if _nic_network(nics[i]) != n.network:
                nics[i].backing = nic_backing(vim, net)
                dev_changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit",
                                                                   device=nics[i]))
            continue
        if i < len(nics):
            dev_changes.append(vim.vm.device.VirtualDeviceSpec(operation="remove",
                                                               device=nics[i]))
        cls = getattr(vim.vm.device, _NICS[n.type])
        dev_changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=cls(
            key=-(3000 + i), backing=nic_backing(vim, net), addressType="generated",
            deviceInfo=vim.Description(label=n.label, summary=n.network),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=True, allowGuestControl=True, connected=False))))
    for dev in nics[len(layout.nics):]:
        dev_changes.append(vim.vm.device.VirtualDeviceSpec(operation="remove", device=dev))
    spec = vim.vm.ConfigSpec(numCPUs=layout.num_cpus, memoryMB=layout.memory_mb,
                             deviceChange=dev_changes)
    session.wait(vm.ReconfigVM_Task(spec=spec), f"reconfigure VM {vm.name}")
    return changes


# ------------------------------------------------------------------ safety snapshot


def take_safety_snapshot(session: Any, vm: Any, hostd: Any, files: list[str]) -> str:
    """Snapshot the VM before the rollback writes; returns the snapshot's moref."""
    task = vm.CreateSnapshot_Task(
        name=SAFETY_SNAPSHOT, description="vmrestore: the VM as it was before the rollback; "
        "reverted to if the rollback fails, removed when it succeeds", memory=False,
        quiesce=False)
    session.wait(task, f"create safety snapshot of VM {vm.name}")
    snap = session.task_result(task)
    for f in files:
        hostd.disk_snapshot(f, "keep")
    return str(snap._moId)


def _snapshot(session: Any, moref: str) -> Any:
    from pyVmomi import vim

    return vim.vm.Snapshot(moref, session.si._stub)


def revert(session: Any, vm: Any, moref: str, hostd: Any, files: list[str]) -> None:
    """Back to the VM as it was at the safety snapshot, then drop the snapshot."""
    snap = _snapshot(session, moref)
    session.wait(snap.RevertToSnapshot_Task(), f"revert VM {vm.name} to its safety snapshot")
    for f in files:
        hostd.disk_snapshot(f, "revert")
    session.wait(snap.RemoveSnapshot_Task(removeChildren=False),
                 f"remove the safety snapshot of VM {vm.name}")


def remove_safety_snapshot(session: Any, vm: Any, moref: str, hostd: Any,
                           files: list[str]) -> None:
    """The rollback succeeded: merge the snapshot's delta (the new data) into the disks."""
    snap = _snapshot(session, moref)
    session.wait(snap.RemoveSnapshot_Task(removeChildren=False),
                 f"remove the safety snapshot of VM {vm.name}")
    for f in files:
        hostd.disk_snapshot(f, "drop")


# ------------------------------------------------------------------ --full: new disks


def new_disk_path(vm: Any, disks: list[Any], index: int, datastore: str, token: str) -> str:
    """Where backup disk ``index`` is written: a fresh name next to the VM's disk it replaces
    (else in the VM's home directory), carrying the job's token (``NAME_vmrN_TOKEN.vmdk``)."""
    from vmrestore.vsphere.disks import split_ds_path

    ref = disks[index].file_name if index < len(disks) else str(vm.config.files.vmPathName)
    rel = split_ds_path(ref)[1]
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    return f"[{datastore}] {folder}{vm.name}_vmr{index}_{token}.vmdk"


def create_disk_file(session: Any, dc: Any, path: str, capacity: int, provisioning: str) -> None:
    """A new, unattached virtual disk of the backup's capacity and provisioning."""
    from pyVmomi import vim

    spec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(
        diskType={"thin": "thin", "thick-lazy": "preallocated"}.get(provisioning,
                                                                     "eagerZeroedThick"),
        adapterType="lsiLogic", capacityKb=capacity // 1024)
    vdm = session.content.virtualDiskManager
    session.wait(vdm.CreateVirtualDisk_Task(name=path, datacenter=dc, spec=spec),
                 f"create disk {path}")


def delete_disk_file(session: Any, dc: Any, path: str) -> bool:
    """Delete a virtual disk (descriptor and extents); False when it was not there."""
    vdm = session.content.virtualDiskManager
    try:
        session.wait(vdm.DeleteVirtualDisk_Task(name=path, datacenter=dc), f"delete disk {path}")
    except VSphereError as e:
        if e.fault == "FileNotFound":
            return False
        raise
    return True


def _controller(vm: Any, disk_controllers: list[int]) -> int | None:
    """The controller an added disk goes to: the first disk's, else the first SCSI one."""
    from pyVmomi import vim

    if disk_controllers:
        return int(disk_controllers[0])
    return next((d.key for d in vm.config.hardware.device
                 if isinstance(d, vim.vm.device.VirtualSCSIController)), None)


def _attached(vm: Any) -> dict[str, Any]:
    """The VM's disk devices by file name."""
    from pyVmomi import vim

    return {d.backing.fileName: d for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)}


def _disk_device(vim: Any, path: str, capacity: int, provisioning: str, controller: int,
                 unit: int, key: int) -> Any:
    return vim.vm.device.VirtualDisk(
        key=key, controllerKey=controller, unitNumber=unit, capacityInBytes=capacity,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", fileName=path, thinProvisioned=provisioning == "thin",
            eagerlyScrub=provisioning == "thick-eager"))


def _reconfigure_disks(session: Any, vm: Any, remove: list[str],
                       add: list[tuple[str, int, str, int | None, int | None]], what: str) -> None:
    """One ReconfigVM: detach the disks backed by ``remove`` (their files kept), attach
    ``add`` (path, capacity, provisioning, controller, unit; None: a free unit on the VM's
    disk controller). Files already in the wanted state are left alone (a repeat is a no-op)."""
    from pyVmomi import vim

    have = _attached(vm)
    changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=have[p])
               for p in remove if p in have]
    gone = {have[p].key for p in remove if p in have}
    used = {(d.controllerKey, d.unitNumber) for d in vm.config.hardware.device
            if d.key not in gone and getattr(d, "controllerKey", None) is not None}
    default = _controller(vm, [d.controllerKey for d in have.values() if d.key not in gone]
                          or [d.controllerKey for d in have.values()])
    for i, (path, cap, prov, ctrl, unit) in enumerate(add):
        if path in have:
            continue
        if ctrl is None or unit is None or (ctrl, unit) in used:
            ctrl = default
            unit = next(u for u in range(64) if u != 7 and (ctrl, u) not in used)
        used.add((ctrl, unit))
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation="add", device=_disk_device(vim, path, cap, prov, ctrl, unit, -(4000 + i))))
    if changes:
        session.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)),
                     f"{what} of VM {vm.name}")


def swap_disks(session: Any, vm: Any, old: list[Any], new: list[tuple[str, Any]]) -> None:
    """Detach the VM's old disks (files kept) and attach the new ones, each on the old
    disk's controller and unit where there was one. ``new``: (path, layout disk)."""
    slots = {i: (o.controller_key, o.unit) for i, o in enumerate(old)}
    _reconfigure_disks(session, vm, [o.path for o in old],
                       [(p, t.capacity, t.provisioning, *slots.get(t.index, (None, None)))
                        for p, t in new], "swap the disks")


def swap_back(session: Any, vm: Any, old: list[Any], new_paths: list[str]) -> None:
    """Undo :func:`swap_disks`, wholly or from halfway: the old disks where they were."""
    _reconfigure_disks(session, vm, new_paths,
                       [(o.path, o.capacity, o.provisioning, o.controller_key, o.unit)
                        for o in old], "put the old disks back")
