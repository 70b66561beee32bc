"""ScsiAttacher against the lab's vCenter: the reconfigure is real, the guest is a fake sysfs.

The proxy VM (vmr-proxy) gets the disk through ReconfigVM_Task; a fake kernel
(tests/test_hotadd.py's FakeKernel) answers the rescan by showing a SCSI disk
at the controller and unit the reconfigure assigned, as Linux would; release
deletes it from the guest and removes it from the VM (the file stays).
"""

from __future__ import annotations

import threading
import time

import pytest

from lab_helpers import create_vm
from restore_helpers import unique
from test_hotadd import FakeKernel
from vmrestore.transport.hotadd import ScsiAttacher, SysfsFinder

pytestmark = [pytest.mark.lab, pytest.mark.root]


def test_scsi_attacher_finds_the_disk_the_reconfigure_assigned(lab, lab_si, tmp_path) -> None:
    from pyVmomi import vim

    from vmrestore.vsphere.connect import connect

    _, paths = create_vm(lab_si, lab, unique("r-hotadd"), "ds-local", [(8 << 20, "thin")])
    kernel = FakeKernel(tmp_path)
    kernel.host(0, "ata_piix")
    kernel.host(2, "vmw_pvscsi")  # the proxy's only controller, bus 0
    with connect(lab.target()) as s:
        proxy = next(vm for vm in s.objects(vim.VirtualMachine) if vm.name == lab.proxy_vm)
        before = {d.key for d in proxy.config.hardware.device}

        def kernel_after_rescan() -> None:  # shows the new disk where vSphere put it
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "- - -" not in kernel.scanned(2):
                time.sleep(0.02)
            disk = next(d for d in proxy.config.hardware.device
                        if isinstance(d, vim.vm.device.VirtualDisk) and d.key not in before)
            kernel.disk(f"2:0:{disk.unitNumber}:0", "sdb", int(disk.capacityInBytes or 0))

        t = threading.Thread(target=kernel_after_rescan)
        t.start()
        try:
            att = ScsiAttacher(proxy, s.wait,
                               SysfsFinder(tmp_path, wait_seconds=20, poll_seconds=0.05)
                               ).attach(paths[0])
        finally:
            t.join()
        added = [d for d in proxy.config.hardware.device if d.key not in before]
        assert len(added) == 1 and added[0].backing.fileName == paths[0]
        unit = added[0].unitNumber
        assert unit not in (0, 7)  # the boot disk's and the controller's own
        assert att.device == str(tmp_path / "dev" / "sdb")
        assert f"SCSI controller 0 unit {unit}" in att.note
        att.release()
        assert kernel.deleted(f"2:0:{unit}:0") == "1\n"
        assert {d.key for d in proxy.config.hardware.device} == before
    assert (lab.datastores["ds-local"].dir / paths[0].split("] ", 1)[1]).exists()
