"""Helpers and the ``backup`` fixture for the restore tests (tests/restore/).

- ``backup``: a sample VM (disk 0 thick-eager, disk 1 thin, 16 MiB each, one NIC on
  "VM Network") backed up as a full + one incremental; ``backup.full_images`` /
  ``backup.images`` are the disk images at each point.
- ``restore_cli(lab, *args, env=..., state_dir=...)``: runs the real CLI with ``--json``
  and returns (CompletedProcess, report dict or None).
- ``assert_restored`` (bytes + API), ``assert_nothing_left`` (VM, dirs, exports, state).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab_helpers import flat_file

MIB = 1 << 20
DISK_SIZE = 16 * MIB


@dataclass
class Backup:
    dir: Path
    full: Path
    inc: Path
    full_images: list[Path]
    images: list[Path]


@pytest.fixture(scope="session")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    from vmrestore.sample import change_blocks, write_sample_vm

    d = tmp_path_factory.mktemp("restore-backup")
    paths, cfg = write_sample_vm(str(d), DISK_SIZE, seed=7, disks=2, name="web01")
    full = d / "full.vmrb"
    _cli("backup", "create", *[a for p in paths for a in ("--disk", p)], "--vm-config", cfg,
         "-o", str(full), "-q")
    full_images = []
    for p in paths:
        keep = Path(p).with_suffix(".full.img")
        shutil.copyfile(p, keep)
        full_images.append(keep)
    for i, p in enumerate(paths):
        change_blocks(p, 3, seed=100 + i)
    inc = d / "inc1.vmrb"
    _cli("backup", "create", *[a for p in paths for a in ("--disk", p)], "--parent", str(full),
         "-o", str(inc), "-q")
    return Backup(d, full, inc, full_images, [Path(p) for p in paths])


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vmrestore", *args], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if p.returncode != 0 and args[0] != "restore":
        raise AssertionError(f"vmrestore {' '.join(args)}: {p.returncode}\n{p.stderr}")
    return p


def lab_env(labinfo: Any, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VMRESTORE_FAULT", None)
    env["VMRESTORE_LAB_DIR"] = str(labinfo.dir)
    env["VMRESTORE_PROGRESS"] = "plain"
    env.update(extra)
    return env


def restore_cli(labinfo: Any, *args: str, env: dict[str, str] | None = None,
                state_dir: Path | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                         dict[str, Any] | None]:
    argv = ["restore", *args, "--json"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    p = _cli(*argv, env=env or lab_env(labinfo))
    try:
        report = json.loads(p.stdout) if p.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    return p, report


def drop_caches() -> None:
    """SAN writes go to the LUN under the filesystem: read the files back, not the cache."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def vm_disks(si: Any, name: str) -> list[Any]:
    from pyVmomi import vim

    vm = find_vm(si, name)
    assert vm is not None, f"VM {name} not found"
    return sorted((d for d in vm.config.hardware.device
                   if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.unitNumber)


def find_vm(si: Any, name: str) -> Any:
    from pyVmomi import vim, vmodl

    view = si.content.viewManager.CreateContainerView(si.content.rootFolder,
                                                      [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            try:
                if vm.name == name:
                    return vm
            except vmodl.fault.ManagedObjectNotFound:  # removed meanwhile by another run
                continue
        return None
    finally:
        view.Destroy()


def snapshot_tasks(si: Any, vm: Any) -> int:
    """How many CreateSnapshot tasks vCenter saw for this VM (its recent task list).

    Reads only two TaskInfo fields through the property collector: the full
    TaskInfo of some simulator tasks does not deserialize (docs/design.md, Lab notes).
    """
    from pyVmomi import vim, vmodl

    pc = si.content.propertyCollector
    tasks = list(si.content.taskManager.recentTask)
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=t) for t in tasks],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(
            type=vim.Task, pathSet=["info.descriptionId", "info.entityName"])])
    n = 0
    for obj in pc.RetrieveContents([spec]) if tasks else []:
        props = {p.name: p.val for p in obj.propSet}
        if props.get("info.descriptionId") == "VirtualMachine.createSnapshot" and \
                props.get("info.entityName") in (vm._moId, vm.name):
            n += 1
    return n


def assert_nothing_left(labinfo: Any, hostd: Any, si: Any, name: str,
                        state_dir: Path | None = None) -> None:
    """No VM, no directory on any datastore, no export or hot-add, no job state."""
    assert find_vm(si, name) is None, f"VM {name} left behind"
    for ds in labinfo.datastores.values():
        assert not (ds.dir / name).exists(), f"{ds.dir / name} left behind"
    assert not [e for e in hostd.exports() if f"] {name}/" in str(e)], "export left"
    assert not [h for h in hostd.hot_adds() if f"] {name}/" in h.datastore_path], \
        "hot-add left"
    if state_dir is not None and state_dir.exists():
        left = [p.name for p in state_dir.iterdir()]
        assert not left, f"job state left: {left}"


_n = itertools.count()


def unique(prefix: str) -> str:
    """A VM name no other test (or run) uses."""
    return f"{prefix}-{os.getpid()}-{next(_n)}"


def assert_restored(labinfo: Any, si: Any, name: str, images: list[Path],
                    provisioning: list[str], network: str = "Restore Network") -> None:
    from pyVmomi import vim

    vm = find_vm(si, name)
    assert vm is not None, f"VM {name} not registered"
    assert not vm.rootSnapshot and not vm.layoutEx.snapshot, "snapshot left on the VM"
    nics = [d for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [n.backing.deviceName for n in nics] == [network]
    disks = vm_disks(si, name)
    assert len(disks) == len(images)
    got_prov = ["thin" if d.backing.thinProvisioned else
                "thick-eager" if d.backing.eagerlyScrub else "thick-lazy" for d in disks]
    assert got_prov == provisioning
    drop_caches()
    for d, img in zip(disks, images, strict=True):
        assert d.capacityInBytes == img.stat().st_size
        f = flat_file(labinfo, d.backing.fileName)
        assert f.read_bytes() == img.read_bytes(), f"{f} differs from {img}"
        if d.backing.thinProvisioned:
            assert f.stat().st_blocks * 512 < f.stat().st_size, f"thin {f} not sparse"


def kill_mid_disk(args: list[str], env: dict[str, str], state: Path) -> dict:
    """Start a restore, kill -9 it once disk 0 has a durable mid-disk checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "vmrestore", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        ckpt = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(state.glob("restore-*.disk0.ckpt"))
            if found:
                try:
                    data = json.loads(found[0].read_text())
                except (OSError, ValueError):
                    data = {}
                if 0 < data.get("prefix", 0) < data.get("entries", 0):
                    ckpt = data
                    break
            time.sleep(0.05)
        assert ckpt is not None, "no mid-disk checkpoint seen before the run ended"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return ckpt
