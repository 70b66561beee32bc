"""The restored VM's configuration: the backup's VM config plus the user's amendments.

Two steps, kept apart on purpose. :func:`target_layout` is pure (no
pyvmomi): it decides the name, datastores, disk provisioning and networks
from the backup's JSON config and the job, and refuses inconsistent input
(a network map whose source no NIC uses, a disk index that does not exist).
:func:`config_spec` turns a layout into a ``vim.vm.ConfigSpec`` against the
live inventory, and :func:`create_vm` registers it. Unit tests cover the
first; the lab tests cover the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmrestore.errors import FormatError, UsageError, VSphereError

PROVISIONINGS = ("thin", "thick-lazy", "thick-eager")

_CONTROLLERS = {
    "pvscsi": "ParaVirtualSCSIController",
    "lsilogic": "VirtualLsiLogicController",
    "lsilogic-sas": "VirtualLsiLogicSASController",
    "buslogic": "VirtualBusLogicController",
    "nvme": "VirtualNVMEController",
    "sata": "VirtualAHCIController",
}
_NICS = {
    "vmxnet3": "VirtualVmxnet3",
    "vmxnet2": "VirtualVmxnet2",
    "e1000": "VirtualE1000",
    "e1000e": "VirtualE1000e",
    "pcnet32": "VirtualPCNet32",
}


@dataclass
class TargetDisk:
    index: int
    label: str
    capacity: int
    provisioning: str
    source_provisioning: str
    datastore: str
    controller: str
    bus: int
    unit: int
    file_name: str = ""  # "[ds] vm/vm_1.vmdk", set by target_layout


@dataclass
class TargetNic:
    label: str
    type: str
    network: str
    source_network: str


@dataclass
class TargetLayout:
    """What the restored VM will look like, decided before anything is created."""

    name: str
    source_name: str
    datastore: str  # VM home (the .vmx)
    guest_id: str
    num_cpus: int
    memory_mb: int
    firmware: str
    disks: list[TargetDisk] = field(default_factory=list)
    nics: list[TargetNic] = field(default_factory=list)

    @property
    def datastores(self) -> list[str]:
        return sorted({self.datastore, *(d.datastore for d in self.disks)})


def target_layout(vm_config: dict[str, Any], manifest: dict[str, Any], job: Any) -> TargetLayout:
    """Apply the job's amendments to the backed-up configuration (pure; no vCenter)."""
    cfg = dict(vm_config or {})
    src_name = str(cfg.get("name") or "restored-vm")
    name = job.name or src_name
    man_disks = {int(d["index"]): d for d in manifest.get("disks", [])}
    cfg_disks = cfg.get("disks") or [
        {"index": i, "label": d.get("label", f"Hard disk {i + 1}"), "capacity": d["capacity"],
         "provisioning": "thin"} for i, d in sorted(man_disks.items())]
    cfg_index = {int(d.get("index", i)) for i, d in enumerate(cfg_disks)}
    for n in job.disk_datastores:
        if n not in cfg_index:
            raise UsageError(f"--disk-datastore {n}=...: the backup has no disk {n} "
                             f"(disks: {', '.join(map(str, sorted(cfg_index)))})")

    home = job.datastore or next((d.get("datastore") for d in cfg_disks if d.get("datastore")),
                                 None)
    if not home:
        raise UsageError("restore: the backup's VM config names no datastore; give --datastore")

    disks: list[TargetDisk] = []
    used_units: set[tuple[str, int, int]] = set()
    for i, d in enumerate(cfg_disks):
        idx = int(d.get("index", i))
        if idx not in man_disks and man_disks:
            raise FormatError(f"backup VM config names disk {idx}, which the manifest lacks")
        capacity = int(man_disks[idx]["capacity"]) if man_disks else int(d["capacity"])
        src_prov = str(d.get("provisioning") or "thin")
        if src_prov not in PROVISIONINGS:
            raise FormatError(f"backup VM config: disk {idx} has provisioning {src_prov!r}")
        prov = src_prov if job.disk_format == "same" else job.disk_format
        ctrl = str(d.get("controller") or "pvscsi")
        if ctrl not in _CONTROLLERS:
            raise FormatError(f"backup VM config: disk {idx} has unknown controller {ctrl!r} "
                              f"(known: {', '.join(_CONTROLLERS)})")
        bus, unit = int(d.get("bus", 0)), int(d.get("unit", i))
        if ctrl != "nvme" and unit >= 7:
            unit += 1  # SCSI unit 7 is the controller itself
        if (ctrl, bus, unit) in used_units:
            raise FormatError(f"backup VM config: two disks on {ctrl} {bus}:{unit}")
        used_units.add((ctrl, bus, unit))
        ds = job.disk_datastores.get(idx) or job.datastore or d.get("datastore") or home
        disks.append(TargetDisk(idx, str(d.get("label") or f"Hard disk {idx + 1}"), capacity,
                                prov, src_prov, ds, ctrl, bus, unit))
    disks.sort(key=lambda t: t.index)
    for n, t in enumerate(disks):
        suffix = f"_{n}" if n else ""
        t.file_name = f"[{t.datastore}] {name}/{name}{suffix}.vmdk"

    nics: list[TargetNic] = []
    used_nets = set()
    for i, n in enumerate(cfg.get("nics") or []):
        src_net = str(n.get("network") or "VM Network")
        used_nets.add(src_net)
        ntype = str(n.get("type") or "vmxnet3")
        if ntype not in _NICS:
            raise FormatError(f"backup VM config: NIC {i} has unknown type {ntype!r}")
        nics.append(TargetNic(str(n.get("label") or f"Network adapter {i + 1}"), ntype,
                              job.network_map.get(src_net, src_net), src_net))
    for src in job.network_map:
        if src not in used_nets:
            uses = ", ".join(sorted(used_nets)) or "none"
            raise UsageError(f"--network-map {src}=...: no NIC of the backed-up VM uses "
                             f"network {src!r} (NICs use: {uses})")

    return TargetLayout(
        name=name, source_name=src_name, datastore=home,
        guest_id=str(cfg.get("guest_id") or "otherLinux64Guest"),
        num_cpus=int(cfg.get("num_cpus") or 1), memory_mb=int(cfg.get("memory_mb") or 512),
        firmware=str(cfg.get("firmware") or "bios"), disks=disks, nics=nics)


def disk_backing(vim: Any, t: TargetDisk) -> Any:
    """FlatVer2 backing with the provisioning flags vSphere reads:
    thin = thinProvisioned; thick-eager = eagerlyScrub; thick-lazy = neither."""
    return vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        diskMode="persistent", fileName=t.file_name,
        thinProvisioned=t.provisioning == "thin",
        eagerlyScrub=t.provisioning == "thick-eager")


def nic_backing(vim: Any, net: Any) -> Any:
    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
        conn = vim.dvs.PortConnection(portgroupKey=net.key,
                                      switchUuid=net.config.distributedVirtualSwitch.uuid)
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=conn)
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.name, network=net)


OWNER_KEY = "vmrestore.owner"  # extraConfig key: the creating job's token (docs/errors.md)


def config_spec(session: Any, dc: Any, layout: TargetLayout, owner_token: str = "",
                vm_path: str | None = None) -> Any:
    """A ConfigSpec that creates the VM with its controllers, NICs and (empty) disks.

    ``owner_token`` goes into extraConfig (vmrestore.owner): how the job that
    created the VM recognises it later, whatever else is called the same.
    ``vm_path``: the .vmx in a directory the job made itself; None lets vSphere
    pick a fresh directory on the home datastore.
    """
    from pyVmomi import vim

    for ds in layout.datastores:
        session.datastore(dc, ds)  # refuse a missing datastore by name, before anything exists
    nets = {n.network: session.network(dc, n.network) for n in layout.nics}

    changes = []
    ctrl_keys: dict[tuple[str, int], int] = {}
    key = -100
    for t in layout.disks:
        if (t.controller, t.bus) in ctrl_keys:
            continue
        cls = getattr(vim.vm.device, _CONTROLLERS[t.controller])
        kw: dict[str, Any] = {"key": key, "busNumber": t.bus}
        if issubclass(cls, vim.vm.device.VirtualSCSIController):
            kw["sharedBus"] = "noSharing"
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=cls(**kw)))
        ctrl_keys[(t.controller, t.bus)] = key
        key -= 1
    for t in layout.disks:
        disk = vim.vm.device.VirtualDisk(
            key=-(1000 + t.index), controllerKey=ctrl_keys[(t.controller, t.bus)],
            unitNumber=t.unit, capacityInBytes=t.capacity, backing=disk_backing(vim, t),
            deviceInfo=vim.Description(label=t.label, summary=t.label))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                                       device=disk))
    for i, n in enumerate(layout.nics):
        cls = getattr(vim.vm.device, _NICS[n.type])
        nic = cls(key=-(2000 + i), backing=nic_backing(vim, nets[n.network]),
                  addressType="generated",
                  deviceInfo=vim.Description(label=n.label, summary=n.network),
                  connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                      startConnected=True, allowGuestControl=True, connected=False))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return vim.vm.ConfigSpec(
        name=layout.name, guestId=layout.guest_id, numCPUs=layout.num_cpus,
        memoryMB=layout.memory_mb, firmware=layout.firmware,
        files=vim.vm.FileInfo(vmPathName=vm_path or f"[{layout.datastore}]"),
        annotation=f"Restored by vmrestore from a backup of {layout.source_name}",
        extraConfig=[vim.option.OptionValue(key=OWNER_KEY, value=owner_token)]
        if owner_token else [],
        deviceChange=changes)


def create_vm(session: Any, dc: Any, layout: TargetLayout, folder: Any, pool: Any,
              host: Any, owner_token: str = "", vm_path: str | None = None) -> Any:
    """Create and register the VM; a name already taken is refused before anything is made."""
    if session.find_vm(dc, layout.name) is not None:
        raise VSphereError(f"a VM named {layout.name!r} already exists in datacenter {dc.name} "
                           "(choose another with --name)")
    spec = config_spec(session, dc, layout, owner_token, vm_path)
    task = folder.CreateVM_Task(config=spec, pool=pool, host=host)
    session.wait(task, f"create VM {layout.name!r} on {host.name}")
    return session.task_result(task)
