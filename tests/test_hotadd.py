"""HotAdd device discovery on a proxy, against a fake sysfs (a temp dir laid out like /sys + /dev).

The "kernel" here is a helper that lays out what Linux shows for a SCSI disk:
/sys/class/scsi_host/hostN/{proc_name,scan}, /sys/class/scsi_disk/H:C:T:L/device/
{wwid,delete,block/sdX/size}, /dev/sdX and /dev/disk/by-id/wwn-0x<wwid>.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vmrestore.errors import TransportError
from vmrestore.transport.hotadd import Slot, SysfsFinder

PV = "ParaVirtualSCSIController"
UUID = "6000C298-1234-5678-9abc-def012345678"
WWID = "6000c29812345678" + "9abcdef012345678"
MIB = 1 << 20


class FakeKernel:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys" / "class"

    def host(self, n: int, driver: str) -> None:
        h = self.sys / "scsi_host" / f"host{n}"
        h.mkdir(parents=True, exist_ok=True)
        (h / "proc_name").write_text(driver + "\n")
        (h / "scan").write_text("")

    def disk(self, hctl: str, name: str, size: int, wwid: str | None = None,
             by_id: bool = True) -> None:
        d = self.sys / "scsi_disk" / hctl / "device"
        (d / "block" / name).mkdir(parents=True, exist_ok=True)
        (d / "block" / name / "size").write_text(f"{size // 512}\n")
        (d / "delete").write_text("")
        if wwid:
            (d / "wwid").write_text(f"naa.{wwid}\n")
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        (dev / name).write_text("")
        if wwid and by_id:
            ids = dev / "disk" / "by-id"
            ids.mkdir(parents=True, exist_ok=True)
            (ids / f"wwn-0x{wwid}").symlink_to(f"../../{name}")

    def scanned(self, n: int) -> str:
        return (self.sys / "scsi_host" / f"host{n}" / "scan").read_text()

    def deleted(self, hctl: str) -> str:
        return (self.sys / "scsi_disk" / hctl / "device" / "delete").read_text()


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    k = FakeKernel(tmp_path)
    k.host(0, "ata_piix")
    k.host(2, "vmw_pvscsi")     # SCSI controller 0 (the boot disk's)
    k.host(3, "vmw_pvscsi")     # SCSI controller 1
    k.disk("2:0:0:0", "sda", 16 * MIB, "6000c29800000000aaaaaaaaaaaaaaaa")  # boot disk
    return k


def finder(k: FakeKernel, seconds: float = 2.0) -> SysfsFinder:
    return SysfsFinder(k.root, wait_seconds=seconds, poll_seconds=0.02)


def test_found_by_uuid_wherever_the_kernel_put_it(kernel):
    kernel.disk("3:0:4:0", "sdc", 64 * MIB, "6000c298ffffffffffffffffffffffff")  # another
    kernel.disk("2:0:1:0", "sdb", 64 * MIB, WWID)
    hctl, dev = finder(kernel).wait(Slot(PV, 0, 1, UUID, 64 * MIB, (0, 1)))
    assert (hctl, dev) == ("2:0:1:0", kernel.root / "dev" / "sdb")


def test_found_by_uuid_through_by_id_link(kernel):
    # udev's link is there, the sysfs entry has no wwid file (older kernels)
    kernel.disk("3:0:2:0", "sdd", 64 * MIB)
    ids = kernel.root / "dev" / "disk" / "by-id"
    ids.mkdir(parents=True, exist_ok=True)
    (ids / f"wwn-0x{WWID}").symlink_to("../../sdd")
    assert finder(kernel).find(Slot(PV, 1, 2, UUID, 64 * MIB, (0, 1))) == \
        ("3:0:2:0", kernel.root / "dev" / "sdd")


def test_found_by_controller_and_unit_without_uuid(kernel):
    """EnableUUID off: bus 1 is the second pvscsi host (host3), unit 2 is target 2."""
    kernel.disk("2:0:2:0", "sdb", 64 * MIB)   # same unit on controller 0: not it
    kernel.disk("3:0:2:0", "sdc", 64 * MIB)
    slot = Slot(PV, 1, 2, None, 64 * MIB, (0, 1))
    assert finder(kernel).find(slot) == ("3:0:2:0", kernel.root / "dev" / "sdc")
    wrong_size = Slot(PV, 1, 2, None, 32 * MIB, (0, 1))
    assert finder(kernel).find(wrong_size) is None


def test_address_with_another_disks_uuid_is_not_ours(kernel):
    kernel.disk("3:0:2:0", "sdc", 64 * MIB, "6000c298ffffffffffffffffffffffff")
    assert finder(kernel).find(Slot(PV, 1, 2, UUID, 64 * MIB, (0, 1))) is None


def test_waits_for_the_rescan_then_finds_it(kernel):
    def kernel_after_rescan() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "- - -" not in kernel.scanned(3):
            time.sleep(0.01)
        time.sleep(0.2)  # the SCSI scan and udev take a while
        kernel.disk("3:0:1:0", "sde", 64 * MIB, WWID)

    t = threading.Thread(target=kernel_after_rescan)
    t.start()
    try:
        hctl, dev = finder(kernel).wait(Slot(PV, 1, 1, UUID, 64 * MIB, (0, 1)))
    finally:
        t.join()
    assert hctl == "3:0:1:0" and dev.name == "sde"
    assert "- - -" in kernel.scanned(2) and kernel.scanned(0) == ""  # only pvscsi hosts


def test_never_appears_is_a_bounded_clear_error(kernel):
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        finder(kernel, seconds=0.3).wait(Slot(PV, 1, 5, UUID, 64 * MIB, (0, 1)))
    assert time.monotonic() - t0 < 3
    msg = str(ei.value)
    assert "SCSI controller 1 unit 5" in msg and UUID in msg and "EnableUUID" in msg


def test_release_deletes_the_device_from_the_guest(kernel):
    kernel.disk("3:0:1:0", "sde", 64 * MIB, WWID)
    f = finder(kernel)
    hctl, _ = f.find(Slot(PV, 1, 1, UUID, 64 * MIB, (0, 1)))
    f.release(hctl)
    assert kernel.deleted(hctl) == "1\n"


def test_infra_proxy_says_how_hotadd_reaches_it(tmp_path):
    from vmrestore.errors import UsageError
    from vmrestore.infra import load_infra

    f = tmp_path / "infra.yaml"
    f.write_text("proxies:\n  - {name: p1, vm: proxy1, hotadd: scsi}\n  - {name: p2}\n")
    assert [p.hotadd for p in load_infra(f).proxies] == ["scsi", "hostd"]
    f.write_text("proxies:\n  - {name: p1, hotadd: guess}\n")
    with pytest.raises(UsageError, match=r"proxies\[0\]\.hotadd.*'guess'"):
        load_infra(f)
