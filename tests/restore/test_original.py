"""Restore to the original VM (--original), quick rollback, in the lab.

A VM is restored, then its disks drift: a few writes at random offsets and a
range corrupted silently straight in the datastore file. A quick rollback must
write exactly those blocks and leave the disks byte-identical to the restore
point; a failure reverts to the safety snapshot; kill -9 + --resume continues
the compare from its checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lab_helpers import flat_file
from restore_helpers import (
    MIB,
    drop_caches,
    find_vm,
    kill_mid_disk,
    lab_env,
    restore_cli,
    unique,
    vm_disks,
)

pytestmark = [pytest.mark.lab, pytest.mark.root]


def _restored_vm(lab: Any, si: Any, backup: Any, tmp_path: Path, name: str,
                 *where: str) -> list[Path]:
    """A VM restored from the backup (NICs moved to "Restore Network"); its flat files."""
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--transport", "nbd",
                       "--network-map", "VM Network=Restore Network",
                       *(where or ("--datastore", "ds-local")), state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    return [flat_file(lab, d.backing.fileName) for d in vm_disks(si, name)]


def _wait(task: Any) -> None:
    while task.info.state in ("queued", "running"):
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error


def _power_on(vm: Any) -> None:
    _wait(vm.PowerOnVM_Task())


def _drift(files: list[Path], seed: int) -> dict[int, set[int]]:
    """Writes at random offsets (a few blocks per disk) and one silently corrupted range
    written straight into disk 0's datastore file, across a block boundary. Returns the
    changed 1 MiB blocks per disk."""
    rng = np.random.default_rng(seed)
    changed: dict[int, set[int]] = {}
    for i, f in enumerate(files):
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            for blk in rng.choice(size // MIB, 2, replace=False):
                off = int(blk) * MIB + int(rng.integers(0, MIB - 512))
                fh.seek(off)
                fh.write(rng.integers(1, 256, 512, dtype=np.uint8).tobytes())
                changed.setdefault(i, set()).add(int(blk))
            if i == 0:  # bit rot under the guest: flip a range spanning blocks 5 and 6
                fh.seek(6 * MIB - 300)
                old = fh.read(600)
                fh.seek(6 * MIB - 300)
                fh.write(bytes(b ^ 0xA5 for b in old))
                changed[0] |= {5, 6}
    drop_caches()
    return changed


def _same(files: list[Path], images: list[Path]) -> bool:
    drop_caches()
    return all(f.read_bytes() == img.read_bytes() for f, img in zip(files, images, strict=True))


def _only_changed_written(rep: dict, changed: dict[int, set[int]]) -> None:
    """Each disk's rollback figures: every block compared, exactly the changed ones written."""
    for d in rep["disks"]:
        fig = d["original"]
        want = changed.get(d["disk"], set())
        assert fig["blocks_differing"] == len(want), (d["disk"], fig, want)
        assert fig["bytes_written"] == len(want) * MIB
        assert fig["blocks_compared"] == 16 and fig["mode"] == "quick rollback"


def test_quick_rollback_writes_only_changed_blocks(lab, lab_si, host_services, backup,
                                                   tmp_path) -> None:
    name = unique("orig")
    files = _restored_vm(lab, lab_si, backup, tmp_path, name)
    assert _same(files, backup.images)
    changed = _drift(files, seed=11)
    _power_on(find_vm(lab_si, name))
    args = ["--backup", str(backup.inc), "--original", "--name", name, "--quick-rollback",
            "--transport", "nbd"]
    p, rep = restore_cli(lab, *args, state_dir=tmp_path)
    assert p.returncode == 2 and "--force" in p.stderr and "poweredOn" in p.stderr, p.stderr
    assert find_vm(lab_si, name).runtime.powerState == "poweredOn"  # refused: untouched

    p, rep = restore_cli(lab, *args, "--force", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _same(files, backup.images)
    assert rep["original"]["found_by"] == f"name {name!r}"
    assert rep["original"]["config_changes"] == ["NIC 1 network Restore Network -> VM Network"]
    _only_changed_written(rep, changed)
    vm = find_vm(lab_si, name)
    nics = [d for d in vm.config.hardware.device if hasattr(d, "macAddress")]
    assert [n.backing.deviceName for n in nics] == ["VM Network"]
    assert not vm.rootSnapshot, "safety snapshot left"
    assert vm.runtime.powerState == "poweredOff"
    assert "powered off" in rep["phases"][1]["detail"]


def test_quick_rollback_through_vixdisklib(lab, lab_si, host_services, backup,
                                          tmp_path) -> None:
    """--disk-library vddk: the compare reads through VixDiskLib (the writer's handle, vddk_sim
    on the lab) and writes only the changed blocks; the disks end byte-identical."""
    name = unique("orig-v")
    files = _restored_vm(lab, lab_si, backup, tmp_path, name)
    changed = _drift(files, seed=14)
    trace = tmp_path / "vddk-trace.log"
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--original", "--name", name,
                         "--quick-rollback", "--transport", "nbd", "--disk-library", "vddk",
                         state_dir=tmp_path,
                         env=lab_env(lab, VMRESTORE_VDDK_SIM_TRACE=str(trace)))
    assert p.returncode == 0, p.stderr
    assert _same(files, backup.images)
    _only_changed_written(rep, changed)
    assert all("VixDiskLib" in d["reason"] for d in rep["disks"])
    assert "VixDiskLib_Open" in trace.read_text()
    assert not find_vm(lab_si, name).rootSnapshot, "safety snapshot left"


def test_failed_rollback_reverts_to_safety_snapshot(lab, lab_si, host_services, backup,
                                                    tmp_path) -> None:
    name = unique("orig-f")
    files = _restored_vm(lab, lab_si, backup, tmp_path, name, "--datastore", "ds-san",
                         "--disk-format", "thick-eager")
    _drift(files, seed=12)
    before = [f.read_bytes() for f in files]
    # The data is fully rolled back (read and written at the LUN's extents) when the fault
    # hits: the revert must undo all of it.
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--original", "--name", name,
                         "--quick-rollback", "--transport", "san",
                         env=lab_env(lab, VMRESTORE_FAULT="phase:commit"), state_dir=tmp_path)
    assert p.returncode != 0 and rep["failed_phase"] == "commit", p.stderr
    assert any("reverted VM" in r for r in rep["rollback"]), rep["rollback"]
    assert sum(d["original"]["blocks_differing"] for d in rep["disks"]) > 0
    drop_caches()
    assert [f.read_bytes() for f in files] == before, "revert did not restore the disks"
    vm = find_vm(lab_si, name)
    assert vm is not None and not vm.rootSnapshot
    nics = [d for d in vm.config.hardware.device if hasattr(d, "macAddress")]
    assert [n.backing.deviceName for n in nics] == ["Restore Network"]  # config untouched
    assert not list(tmp_path.glob("restore-*.json")), "job state left after the revert"


@pytest.mark.parametrize("mover", ["in-process", "subprocess"])
def test_kill_mid_compare_then_resume(lab, lab_si, host_services, backup, tmp_path,
                                      mover: str) -> None:
    """kill -9 mid-compare, then --resume: the compare continues from the checkpoint (hotadd
    in-process; nbd through a proxy-mover subprocess that reports durable checkpoints)."""
    name = unique("orig-k")
    files = _restored_vm(lab, lab_si, backup, tmp_path, name)
    changed = _drift(files, seed=13)
    args = ["restore", "--backup", str(backup.inc), "--original", "--name", name,
            "--quick-rollback", "--transport", "hotadd" if mover == "in-process" else "nbd",
            "--state-dir", str(tmp_path), "--json"]
    ckpt = kill_mid_disk(args, lab_env(lab, VMRESTORE_FAULT="stall:data:0.5",
                                       VMRESTORE_MOVER=mover), tmp_path)
    p, rep = restore_cli(lab, *args[1:-3], "--resume", state_dir=tmp_path,
                         env=lab_env(lab, VMRESTORE_MOVER=mover))
    assert p.returncode == 0, p.stderr
    assert rep["resumed"]
    d0 = rep["disks"][0]
    assert d0["resumed_from"] > 0
    # only the entries after the checkpoint were compared again
    assert d0["original"]["blocks_compared"] == ckpt["entries"] - ckpt["prefix"]
    assert _same(files, backup.images)
    assert len(changed[0]) >= 2


def test_refusals_name_the_reason(lab, lab_si, host_services, backup, tmp_path) -> None:
    """Phase 1 refuses, before anything changes: no such VM, disks that differ, ambiguity."""
    from lab_helpers import create_vm

    name = unique("orig-r")
    base = ["--backup", str(backup.inc), "--original", "--transport", "nbd"]
    p, _ = restore_cli(lab, *base, "--name", name, state_dir=tmp_path)
    assert p.returncode == 8 and f"no VM with the backup's name {name!r}" in p.stderr, p.stderr
    create_vm(lab_si, lab, name, "ds-local", [(16 * MIB, "thin")])
    p, _ = restore_cli(lab, *base, "--name", name, state_dir=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "the backup has 2 disk(s), the VM 1" in p.stderr
    # a second VM of that name in another folder: ambiguous, both candidates named
    dc = lab_si.content.rootFolder.childEntity[0]
    folder = dc.vmFolder.CreateFolder(unique("other"))
    vm2, _ = create_vm(lab_si, lab, name + "-2", "ds-local", [(16 * MIB, "thin")])
    for task in (folder.MoveIntoFolder_Task([vm2]), vm2.Rename_Task(name)):
        while task.info.state in ("queued", "running"):
            time.sleep(0.02)
        assert task.info.state == "success", task.info.error
    p, _ = restore_cli(lab, *base, "--name", name, state_dir=tmp_path)
    assert p.returncode == 8 and "2 VMs are named" in p.stderr, p.stderr
    assert vm2._moId in p.stderr and "--original-vm" in p.stderr
    assert not list(tmp_path.glob("restore-*.json"))


def test_vvol_has_no_safety_snapshot(lab, lab_si, host_services, backup, tmp_path) -> None:
    """On VVOL no snapshot is taken; a failed rollback says the VM was not reverted."""
    name = unique("orig-v")
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                       "ds-vvol", "--transport", "nbd", "--network-map",
                       "VM Network=Restore Network", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--original", "--name", name,
                         "--quick-rollback", "--transport", "nbd",
                         env=lab_env(lab, VMRESTORE_FAULT="phase:commit"), state_dir=tmp_path)
    assert p.returncode != 0 and rep["failed_phase"] == "commit", p.stderr
    assert rep["phases"][2]["status"] == "skipped" and "VVOL" in rep["snapshot"]
    assert any("not reverted: no safety snapshot (VVOL)" in r for r in rep["rollback"])
    assert find_vm(lab_si, name) is not None


def test_found_by_instance_uuid_overwrite_keeps_identity(lab, lab_si, host_services, backup,
                                                         tmp_path) -> None:
    """A backup that records the VM's instance UUID finds it by that, whatever its name; the
    overwrite mode writes every block in place (same moref) and --keep-config keeps the NICs."""
    import json
    import subprocess
    import sys

    name = unique("orig-u")
    files = _restored_vm(lab, lab_si, backup, tmp_path, name)
    vm = find_vm(lab_si, name)
    cfg = json.loads((backup.dir / "vm.json").read_text())
    cfg.update(name="renamed-since", instance_uuid=vm.config.instanceUuid)
    (tmp_path / "vm.json").write_text(json.dumps(cfg))
    point = tmp_path / "uuid.vmrb"
    subprocess.run([sys.executable, "-m", "vmrestore", "backup", "create",
                    *[a for img in backup.images for a in ("--disk", str(img))],
                    "--vm-config", str(tmp_path / "vm.json"), "-o", str(point), "-q"],
                   check=True, capture_output=True, timeout=120)
    _drift(files, seed=15)
    p, rep = restore_cli(lab, "--backup", str(point), "--original", "--keep-config",
                         "--transport", "nbd", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert rep["original"]["found_by"] == f"instance UUID {vm.config.instanceUuid}"
    assert rep["vm"]["moref"] == vm._moId == find_vm(lab_si, name)._moId
    assert _same(files, backup.images)
    for d in rep["disks"]:
        assert d["original"]["mode"] == "overwrite"
        assert d["original"]["bytes_written"] == d["capacity"]  # zero runs written too
        assert d["bytes_skipped"] == 0
    assert rep["original"]["config"] == "kept" and rep["original"]["config_changes"] == []
    nics = [d for d in find_vm(lab_si, name).config.hardware.device
            if hasattr(d, "macAddress")]
    assert [n.backing.deviceName for n in nics] == ["Restore Network"]


def _vm_with_other_disks(lab: Any, si: Any, name: str,
                         disks: list[tuple[int, str]]) -> tuple[Any, list[Path], list[bytes]]:
    """A VM whose disks differ from the backup's, filled with its own data: (vm, flat files,
    their contents)."""
    from lab_helpers import create_vm

    vm, paths = create_vm(si, lab, name, "ds-local", disks)
    files = [flat_file(lab, p) for p in paths]
    rng = np.random.default_rng(21)
    for f in files:
        f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    drop_caches()
    return vm, files, [f.read_bytes() for f in files]


def test_full_replaces_disks_that_differ(lab, lab_si, host_services, backup, tmp_path) -> None:
    """--original --full: a VM with a disk of another capacity and one disk too many gets the
    backup's disks as new files; the same VM (moref, UUID), the old files deleted."""
    name = unique("orig-full")
    vm, old_files, _ = _vm_with_other_disks(lab, lab_si, name, [(16 * MIB, "thin"),
                                                               (32 * MIB, "thin"),
                                                               (8 * MIB, "thin")])
    moref, uuid = vm._moId, vm.config.instanceUuid
    args = ["--backup", str(backup.inc), "--original", "--full", "--name", name,
            "--transport", "nbd"]
    _wait(vm.CreateSnapshot_Task(name="user", memory=False, quiesce=False))
    p, _ = restore_cli(lab, *args, state_dir=tmp_path)  # its snapshots keep the old disks
    assert p.returncode == 2 and "has snapshots" in p.stderr, p.stderr
    _wait(vm.RemoveAllSnapshots_Task())
    p, rep = restore_cli(lab, *args, state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    vm = find_vm(lab_si, name)
    assert (vm._moId, vm.config.instanceUuid) == (moref, uuid) == (rep["vm"]["moref"], uuid)
    disks = vm_disks(lab_si, name)
    assert [d.capacityInBytes for d in disks] == [img.stat().st_size for img in backup.images]
    assert all("_vmr" in d.backing.fileName for d in disks)
    assert _same([flat_file(lab, d.backing.fileName) for d in disks], backup.images)
    assert [f for f in old_files if f.exists()] == [], "old disk files left"
    replaced = rep["original"]["replaced"]
    assert len(replaced) == 3 and replaced[2].startswith("removed "), replaced
    assert rep["original"]["mode"] == "replace the disks (--full)"
    assert len(rep["original"]["deleted"]) == 3
    assert "not taken" in rep["snapshot"] and not vm.rootSnapshot


def test_full_failure_after_the_swap_puts_the_old_disks_back(lab, lab_si, host_services,
                                                            backup, tmp_path) -> None:
    """A fault after the swap: the VM gets its own disks back, unchanged, on the same units;
    the new files are deleted (the backup has a disk more than the VM: one added, undone)."""
    name = unique("orig-full-f")
    vm, old_files, before = _vm_with_other_disks(lab, lab_si, name, [(16 * MIB, "thin")])
    old = [(d.backing.fileName, d.controllerKey, d.unitNumber) for d in vm_disks(lab_si, name)]
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--original", "--full", "--name",
                         name, "--transport", "nbd",
                         env=lab_env(lab, VMRESTORE_FAULT="after:swap"), state_dir=tmp_path)
    assert p.returncode != 0 and rep["failed_phase"] == "commit", p.stderr
    assert "fault injected after the disk swap" in p.stderr
    assert any("own disks back" in r for r in rep["rollback"]), rep["rollback"]
    new = [d["file"] for d in rep["disks"]]
    assert len(new) == 2 and all("_vmr" in f for f in new)
    assert sum(f"deleted new disk {f}" in rep["rollback"] for f in new) == 2, rep["rollback"]
    assert [(d.backing.fileName, d.controllerKey, d.unitNumber)
            for d in vm_disks(lab_si, name)] == old
    assert find_vm(lab_si, name)._moId == vm._moId
    drop_caches()
    assert [f.read_bytes() for f in old_files] == before
    assert not any(flat_file(lab, f).exists() or flat_file(lab, f).with_name(
        flat_file(lab, f).name.replace("-flat", "")).exists() for f in new)
    assert not list(tmp_path.glob("restore-*.json")), "job state left after the rollback"


def test_full_kept_after_the_swap_then_resume(lab, lab_si, host_services, backup,
                                              tmp_path) -> None:
    """--keep-on-failure after the swap, then --resume: the VM (now on the backup's disks)
    is recognised from the ledger, not rolled back in place; the old file is deleted."""
    name = unique("orig-full-r")
    vm, old_files, _ = _vm_with_other_disks(lab, lab_si, name, [(32 * MIB, "thin")])
    args = ["--backup", str(backup.inc), "--original", "--full", "--name", name,
            "--transport", "nbd", "--keep-on-failure"]
    p, rep = restore_cli(lab, *args, env=lab_env(lab, VMRESTORE_FAULT="after:swap"),
                         state_dir=tmp_path)
    assert p.returncode != 0 and rep["failed_phase"] == "commit", p.stderr
    assert old_files[0].exists()
    p, rep = restore_cli(lab, *args, "--resume", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert rep["original"]["mode"] == "replace the disks (--full)"
    assert all(d["status"] == "skipped" for d in rep["disks"])  # written by the first run
    disks = vm_disks(lab_si, name)
    assert find_vm(lab_si, name)._moId == vm._moId and len(disks) == 2
    assert _same([flat_file(lab, d.backing.fileName) for d in disks], backup.images)
    assert not old_files[0].exists()
