"""The restored VM's virtual disks as vSphere sees them: provisioning, base files, paths.

The data phase must write to a disk's *base* file, the parent behind any
snapshot delta (writes to a delta would vanish when the snapshot is
removed). The base is found by following ``backing.parent`` to its end, as on
a real host; in the lab the simulator does not switch to deltas, so the base
is the same file, but the code path is the real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vmrestore.errors import VSphereError

_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")


def split_ds_path(ds_path: str) -> tuple[str, str]:
    """'[ds] dir/f.vmdk' -> ('ds', 'dir/f.vmdk')."""
    m = _DS_PATH.match(ds_path)
    if not m:
        raise VSphereError(f"not a datastore path: {ds_path!r}")
    return m.group("ds"), m.group("path")


def flat_path(ds_path: str) -> str:
    """The data extent of a flat VMDK: 'x.vmdk' -> 'x-flat.vmdk' (same datastore)."""
    ds, path = split_ds_path(ds_path)
    if path.endswith("-flat.vmdk"):
        return ds_path
    return f"[{ds}] {path[:-5] if path.endswith('.vmdk') else path}-flat.vmdk"


def provisioning_of(backing: Any) -> str:
    """thin / thick-lazy / thick-eager from a FlatVer2 backing's flags."""
    if getattr(backing, "thinProvisioned", False):
        return "thin"
    return "thick-eager" if getattr(backing, "eagerlyScrub", False) else "thick-lazy"


@dataclass
class VmDisk:
    """One virtual disk of the VM: its device key and both the current and base file."""

    key: int
    label: str
    capacity: int
    provisioning: str
    file_name: str  # what the VM runs on now (a delta while a snapshot exists)
    base_file: str  # the snapshot's parent: where restore writes
    datastore: str  # of the base file
    controller_key: int
    unit: int


def base_file(backing: Any) -> str:
    """Follow backing.parent to the bottom of the chain: the base disk."""
    b = backing
    seen = 0
    while getattr(b, "parent", None) is not None:
        b = b.parent
        seen += 1
        if seen > 255:  # vSphere allows 255 deltas; more is a loop
            raise VSphereError(f"disk chain of {backing.fileName} is longer than 255")
    return b.fileName


def vm_disks(vm: Any) -> list[VmDisk]:
    """The VM's virtual disks in device order, with their base files resolved."""
    from pyVmomi import vim

    out = []
    for dev in vm.config.hardware.device:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        base = base_file(dev.backing)
        out.append(VmDisk(
            key=dev.key, label=dev.deviceInfo.label if dev.deviceInfo else str(dev.key),
            capacity=int(dev.capacityInBytes or dev.capacityInKB * 1024),
            provisioning=provisioning_of(dev.backing), file_name=dev.backing.fileName,
            base_file=base, datastore=split_ds_path(base)[0],
            controller_key=dev.controllerKey, unit=dev.unitNumber or 0))
    return out


def disk_for_file(vm: Any, file_name: str) -> VmDisk:
    """The VM disk whose base (or current) file is `file_name` (the one we created)."""
    for d in vm_disks(vm):
        if file_name in (d.base_file, d.file_name):
            return d
    raise VSphereError(f"VM {vm.name} has no disk backed by {file_name}")
