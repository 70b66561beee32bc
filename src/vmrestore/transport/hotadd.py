"""HotAdd: make a target disk a block device on the proxy, and find that device.

Two ways behind one interface (:class:`Attacher`: ``attach(datastore_path)`` ->
:class:`Attached` with the device and ``release()``):

* :class:`LabAttacher` -- the lab's host data services reconfigure the proxy VM
  and attach the disk file as a loop device (``hostd``, docs/lab.md).
* :class:`ScsiAttacher` -- a real proxy VM. vSphere's reconfigure adds the disk
  to one of the proxy's SCSI controllers at a free unit; the guest sees a new
  SCSI disk only after a bus rescan, under a name nobody can predict (sdb,
  sdk, ...). It is found the way a proxy must find it, by what the reconfigure
  assigned: the disk's UUID (with ``disk.EnableUUID = TRUE`` the guest sees it
  as the disk's NAA WWID ``6000c29...``: ``/dev/disk/by-id/wwn-0x<uuid>`` and
  ``/sys/class/scsi_disk/H:C:T:L/device/wwid``), else the controller and unit
  (``H:0:<unit>:0`` on the SCSI host of that controller, the hosts of one driver
  taken in bus-number order), checked against the capacity. It waits for the
  device (bounded), and on release deletes it from the guest
  (``/sys/class/scsi_disk/H:C:T:L/device/delete``) before the reconfigure
  removes the disk (the file stays).

:class:`SysfsFinder` does the guest side over a root directory (``/`` on a
proxy; a temp dir laid out like sysfs and /dev in the tests).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmrestore.errors import TransportError

# vSphere SCSI controller class -> the Linux driver that binds it (scsi_host proc_name).
DRIVERS = {
    "ParaVirtualSCSIController": "vmw_pvscsi",
    "VirtualLsiLogicController": "mptspi",
    "VirtualLsiLogicSASController": "mptsas",
    "VirtualBusLogicController": "BusLogic",
}
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Slot:
    """Where the reconfigure put the disk on the proxy, and what identifies it."""

    controller: str        # vSphere class name, e.g. "ParaVirtualSCSIController"
    bus_number: int        # the controller's busNumber (SCSI controller N)
    unit_number: int       # the disk's unit on it (the SCSI target id)
    uuid: str | None       # backing.uuid "6000C29x-...", None if not known
    capacity: int          # bytes
    buses: tuple[int, ...] = ()  # busNumbers of the proxy's controllers of this kind

    @property
    def wwid(self) -> str | None:
        """The NAA identifier the guest reads (disk.EnableUUID): 6000c29... lowercase hex."""
        return self.uuid.replace("-", "").replace(" ", "").lower() if self.uuid else None

    def label(self) -> str:
        return (f"SCSI controller {self.bus_number} unit {self.unit_number}"
                + (f" (uuid {self.uuid})" if self.uuid else ""))


@dataclass
class Attached:
    """A disk attached to the proxy: write to ``device``, then ``release()``.

    ``ref`` is the host data services' hot-add id when they made it (a ledger can
    release it after a crash), None for a SCSI hot-add of this proxy."""

    device: str
    release: Callable[[], None]
    note: str = ""
    ref: str | None = None


class Attacher(Protocol):
    def attach(self, datastore_path: str, attempt: int | None = None) -> Attached: ...


@dataclass
class SysfsFinder:
    """The guest's view: SCSI hosts and disks under ``root``/sys, device nodes under /dev."""

    root: Path = Path("/")
    wait_seconds: float = WAIT_SECONDS
    poll_seconds: float = POLL_SECONDS
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    def hosts(self, driver: str) -> list[int]:
        """SCSI host numbers bound to driver, ascending (probe order = bus order)."""
        out = []
        for h in (self.sys / "class" / "scsi_host").glob("host*"):
            with contextlib.suppress(OSError, ValueError):
                if (h / "proc_name").read_text().strip() == driver:
                    out.append(int(h.name[4:]))
        return sorted(out)

    def rescan(self, driver: str) -> None:
        """Ask the controllers' hosts to scan for new targets, as after a hot-add."""
        for n in self.hosts(driver):
            with contextlib.suppress(OSError):
                (self.sys / "class" / "scsi_host" / f"host{n}" / "scan").write_text("- - -\n")

    def _disks(self) -> list[tuple[str, Path]]:
        base = self.sys / "class" / "scsi_disk"
        return sorted((d.name, d) for d in base.glob("*:*:*:*")) if base.is_dir() else []

    def _block(self, disk_dir: Path) -> Path | None:
        """/dev/sdX of a scsi_disk entry (its device/block/<name>), if the node exists."""
        blocks = sorted((disk_dir / "device" / "block").glob("*"))
        if not blocks:
            return None
        dev = self.root / "dev" / blocks[0].name
        return dev if dev.exists() else None

    def _size(self, disk_dir: Path) -> int | None:
        blocks = sorted((disk_dir / "device" / "block").glob("*"))
        try:
            return int((blocks[0] / "size").read_text()) * 512 if blocks else None
        except (OSError, ValueError):
            return None

    def by_uuid(self, slot: Slot) -> tuple[str, Path] | None:
        """(H:C:T:L, /dev/sdX) of the disk whose WWID is the slot's UUID."""
        if not slot.wwid:
            return None
        for name, d in self._disks():
            try:
                wwid = (d / "device" / "wwid").read_text().strip().lower()
            except OSError:
                continue
            if wwid.removeprefix("naa.") == slot.wwid:
                dev = self._block(d)
                if dev is not None:
                    return name, dev
        link = self.root / "dev" / "disk" / "by-id" / f"wwn-0x{slot.wwid}"
        if link.exists():  # udev's name for it; H:C:T:L then from the node's name
            dev = self.root / "dev" / Path(os.readlink(link)).name
            for name, d in self._disks():
                if self._block(d) == dev:
                    return name, dev
        return None

    def by_address(self, slot: Slot) -> tuple[str, Path] | None:
        """(H:C:T:L, /dev/sdX) at the slot's controller and unit, checked by capacity."""
        driver = DRIVERS.get(slot.controller)
        buses = sorted(slot.buses or (slot.bus_number,))
        hosts = self.hosts(driver) if driver else []
        if slot.bus_number not in buses or len(hosts) < len(buses):
            return None
        host = hosts[buses.index(slot.bus_number)]
        name = f"{host}:0:{slot.unit_number}:0"
        d = self.sys / "class" / "scsi_disk" / name
        if not d.is_dir() or self._size(d) != slot.capacity:
            return None
        with contextlib.suppress(OSError):  # a WWID that is another disk's: not ours
            wwid = (d / "device" / "wwid").read_text().strip().lower().removeprefix("naa.")
            if slot.wwid and wwid != slot.wwid:
                return None
        dev = self._block(d)
        return (name, dev) if dev is not None else None

    def find(self, slot: Slot) -> tuple[str, Path] | None:
        """By UUID (disk.EnableUUID), else by controller and unit (checked by capacity)."""
        return self.by_uuid(slot) or self.by_address(slot)

    def wait(self, slot: Slot) -> tuple[str, Path]:
        """Rescan, then poll until the disk appears; TransportError after wait_seconds."""
        driver = DRIVERS.get(slot.controller, "")
        deadline = time.monotonic() + self.wait_seconds
        while True:
            self.rescan(driver)
            found = self.find(slot)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"hot-added disk at {slot.label()} did not appear in the proxy within "
                    f"{self.wait_seconds:.0f} s (is disk.EnableUUID set on the proxy VM?)")
            self.sleep(self.poll_seconds)

    def release(self, hctl: str) -> None:
        """Delete the SCSI device from the guest before the disk leaves the VM."""
        with contextlib.suppress(FileNotFoundError):
            (self.sys / "class" / "scsi_disk" / hctl / "device" / "delete").write_text("1\n")


class LabAttacher:
    """The lab: hostd reconfigures the proxy VM and attaches the file as a loop device."""

    def __init__(self, hostd: Any, proxy_vm: str | None) -> None:
        self.hostd, self.proxy_vm = hostd, proxy_vm

    def attach(self, datastore_path: str, attempt: int | None = None) -> Attached:
        ha = self.hostd.hot_add(datastore_path, self.proxy_vm, attempt=attempt)
        return Attached(ha.device, lambda: self.hostd.hot_remove(ha.id),
                        f"hot-added as {ha.device}", ha.id)


class ScsiAttacher:
    """A real proxy VM: reconfigure through vSphere, find the new SCSI disk in the guest."""

    def __init__(self, vm: Any, wait_task: Callable[[Any, str], Any],
                 finder: SysfsFinder | None = None) -> None:
        self.vm, self.wait_task = vm, wait_task
        self.finder = finder or SysfsFinder()

    def _controller(self) -> Any:
        from pyVmomi import vim

        ctrls = [d for d in self.vm.config.hardware.device
                 if isinstance(d, vim.vm.device.VirtualSCSIController)]
        if not ctrls:
            raise TransportError(f"proxy VM {self.vm.name} has no SCSI controller for hot-add")
        return ctrls

    def attach(self, datastore_path: str, attempt: int | None = None) -> Attached:
        from pyVmomi import vim

        ctrls = self._controller()
        devices = self.vm.config.hardware.device
        for ctrl in sorted(ctrls, key=lambda c: c.busNumber):
            used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctrl.key}
            free = [u for u in range(16) if u != 7 and u not in used]  # 7: the controller
            if free:
                break
        else:
            raise TransportError(f"proxy VM {self.vm.name}: every SCSI controller is full")
        disk = vim.vm.device.VirtualDisk(
            key=-1, controllerKey=ctrl.key, unitNumber=free[0],
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=datastore_path, diskMode="independent_persistent"))
        add = vim.vm.device.VirtualDeviceSpec(operation="add", device=disk)
        self.wait_task(self.vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[add])),
                       f"hot-add of {datastore_path} to {self.vm.name}")
        # What the reconfigure actually assigned (not what we asked): the device by backing.
        added = next((d for d in self.vm.config.hardware.device
                      if isinstance(d, vim.vm.device.VirtualDisk)
                      and d.backing.fileName == datastore_path), None)
        if added is None:
            raise TransportError(f"hot-add of {datastore_path}: {self.vm.name} does not show it")
        owner = next(c for c in ctrls if c.key == added.controllerKey)
        kind = type(owner).__name__.rsplit(".", 1)[-1]
        slot = Slot(kind, owner.busNumber, added.unitNumber,
                    getattr(added.backing, "uuid", None), int(added.capacityInBytes or 0),
                    tuple(c.busNumber for c in ctrls if type(c) is type(owner)))

        def remove() -> None:
            rm = vim.vm.device.VirtualDeviceSpec(operation="remove", device=added)
            self.wait_task(self.vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[rm])),
                           f"hot-remove of {datastore_path} from {self.vm.name}")

        try:
            hctl, dev = self.finder.wait(slot)
        except BaseException:
            remove()
            raise

        def release() -> None:
            self.finder.release(hctl)
            remove()

        return Attached(str(dev), release, f"hot-added at {slot.label()} as {dev} [{hctl}]")
