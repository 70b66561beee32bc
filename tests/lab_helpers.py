"""The `lab` fixture: a real embedded vSphere lab (vcsim + hostd + SAN loop LUN) for tests.

Use it from any test folder's conftest.py::

    from lab_helpers import lab, lab_si, host_services  # noqa: F401  (re-exported fixtures)

`lab` is session-scoped: one lab per test session, brought up in a pytest tmp
dir (so it never collides with a demo lab in ./.lab) and torn down at the end,
also when tests fail. It yields a vmrestore.lab.client.LabInfo:

- ``lab.dir``                       the lab directory (``status --json`` is ``lab.raw``)
- ``lab.vcenter_url``, ``lab.user``, ``lab.password``, ``lab.password_file``
- ``lab.connect_args()``            kwargs for pyVim.connect.SmartConnect (https, the lab's CA)
- ``lab.ca_file``, ``lab.raw["thumbprints"]``  the lab CA (``--ca-file``), SHA-1/SHA-256 pins
- ``lab.esx_url``, ``lab.raw["esx"]``  the standalone ESXi endpoint (same datastores)
- ``lab.target()``                  a vsphere.connect.Target for the vCenter (or a URL given)
- ``lab.datacenter`` "DC0", ``lab.cluster`` "DC0_C0", ``lab.resource_pool``, ``lab.vm_folder``
- ``lab.hosts`` (2), ``lab.networks`` ["VM Network", "Restore Network"], ``lab.proxy_vm``
- ``lab.datastores["ds-local"|"ds-san"|"ds-vvol"]`` → DatastoreInfo(name, type, dir, lun)
- ``lab.hostd_url`` / ``lab.hostd_token``: use ``HostServices.from_lab(lab)``

Tests share the lab: give every VM/disk you create a unique name and remove
it (or leave it; the lab dir is deleted at the end). Skips without root, Go
or nbdkit (fails in CI, where VMRESTORE_REQUIRE_ALL=1). Environment:
VMRESTORE_TEST_LAB_DIR=DIR reuses a lab that is already up in DIR (not torn down).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import need, need_root, need_tool, run_cli  # noqa: F401


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from vmrestore.lab import lab as labmod
    from vmrestore.lab.build import GOVMOMI_SIM
    from vmrestore.lab.client import load_lab

    reuse = os.environ.get("VMRESTORE_TEST_LAB_DIR")
    if reuse:
        yield load_lab(reuse)
        return
    need_root()
    need_tool("go", "nbdkit", "losetup", "mkfs.ext4", "mount")
    need(GOVMOMI_SIM.is_dir(), "govmomi sources missing (golang-github-vmware-govmomi-dev)")
    d: Path = tmp_path_factory.mktemp("lab")
    try:
        labmod.up(d, san_size=512 << 20, esx=True)
        yield load_lab(d)
    finally:
        labmod.down(d)
    left = labmod.lab_processes(d) + labmod.lab_loops(d) + labmod.lab_mounts(d)
    assert not left, f"lab down left {left}"


@pytest.fixture(scope="session")
def lab_si(lab: Any) -> Iterator[Any]:
    """A pyvmomi ServiceInstance logged in to the lab's vCenter."""
    from pyVim.connect import Disconnect, SmartConnect

    si = SmartConnect(**lab.connect_args())
    yield si
    Disconnect(si)


@pytest.fixture(scope="session")
def host_services(lab: Any) -> Any:
    """The lab's host data services client (vmrestore.transport.host.HostServices)."""
    from vmrestore.transport.host import HostServices

    return HostServices.from_lab(lab)


def create_vm(si: Any, lab: Any, name: str, datastore: str,
              disks: list[tuple[int, str]]) -> tuple[Any, list[str]]:
    """Create a powered-off VM with disks through the API, as a restore would; provision them.

    disks: (capacity in bytes, provisioning thin|thick-lazy|thick-eager). Returns
    the VM and its disks' datastore paths. The disk files are given their
    capacity through the host data services' prepare_disk.
    """
    import time

    from pyVmomi import vim

    from vmrestore.transport.host import HostServices

    content = si.content
    pool = content.searchIndex.FindByInventoryPath(lab.resource_pool)
    folder = content.searchIndex.FindByInventoryPath(lab.vm_folder)
    ctrl = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0,
                                                   sharedBus="noSharing")
    changes = [vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl)]
    for i, (capacity, prov) in enumerate(disks):
        disk = vim.vm.device.VirtualDisk(
            key=-(i + 1), controllerKey=1000, unitNumber=i, capacityInKB=capacity // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{datastore}]", diskMode="persistent",
                thinProvisioned=prov == "thin", eagerlyScrub=prov == "thick-eager"))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                                       device=disk))
    spec = vim.vm.ConfigSpec(name=name, guestId="otherGuest", deviceChange=changes,
                             files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"))
    task = folder.CreateVM_Task(spec, pool)
    while task.info.state in ("queued", "running"):
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error
    vm = task.info.result
    paths = [d.backing.fileName for d in vm.config.hardware.device
             if isinstance(d, vim.vm.device.VirtualDisk)]
    hs = HostServices.from_lab(lab)
    for path, (capacity, prov) in zip(paths, disks, strict=True):
        hs.prepare_disk(path, capacity, prov)
    return vm, paths


def flat_file(lab: Any, datastore_path: str) -> Path:
    """The local flat file behind a datastore path in the lab (for checking results)."""
    ds, _, rel = datastore_path.partition("] ")
    p = lab.datastores[ds.lstrip("[")].dir / rel
    return p.with_name(p.name.removesuffix(".vmdk") + "-flat.vmdk")
