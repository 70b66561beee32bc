"""Failures in each phase roll back; a kill -9 mid-data resumes to byte-identical disks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from restore_helpers import (
    assert_nothing_left,
    assert_restored,
    find_vm,
    kill_mid_disk,
    lab_env,
    restore_cli,
    unique,
)

pytestmark = [pytest.mark.lab, pytest.mark.root]

PHASES = ["initialize", "config", "snapshot", "data", "commit"]


@pytest.mark.parametrize("phase", PHASES)
def test_fault_in_each_phase_rolls_back(lab, lab_si, host_services, backup, tmp_path,
                                        phase: str) -> None:
    name = unique(f"f-{phase}")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--disk-datastore", "1=ds-san", "--transport", "hotadd",
                         env=lab_env(lab, VMRESTORE_FAULT=f"phase:{phase}"), state_dir=tmp_path)
    assert p.returncode != 0
    assert f"fault injected at the start of phase {phase}" in p.stderr
    assert "Traceback" not in p.stderr
    assert rep["status"] == "failed" and rep["failed_phase"] == phase
    statuses = {ph["name"]: ph["status"] for ph in rep["phases"]}
    assert statuses[phase] == "failed"
    if phase in ("snapshot", "data", "commit"):
        assert any("destroyed VM" in r for r in rep["rollback"]), rep["rollback"]
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path)


def test_keep_on_failure_then_resume(lab, lab_si, host_services, backup, tmp_path) -> None:
    name = unique("f-keep")
    args = ["--backup", str(backup.inc), "--name", name, "--datastore", "ds-local",
            "--transport", "nbd", "--network-map", "VM Network=Restore Network"]
    p, rep = restore_cli(lab, *args, "--keep-on-failure",
                         env=lab_env(lab, VMRESTORE_FAULT="phase:data"), state_dir=tmp_path)
    assert p.returncode != 0 and rep["failed_phase"] == "data"
    assert find_vm(lab_si, name) is not None and rep["kept"]
    # Without --resume the kept job is pointed out, not overwritten.
    p2, _ = restore_cli(lab, *args, state_dir=tmp_path)
    assert p2.returncode == 2 and "--resume" in p2.stderr
    p3, rep3 = restore_cli(lab, *args, "--resume", state_dir=tmp_path)
    assert p3.returncode == 0, p3.stderr
    assert rep3["resumed"] and rep3["phases"][1]["status"] == "resumed"
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])


def test_transport_failure_falls_back_to_nbd(lab, lab_si, backup, tmp_path) -> None:
    name = unique("f-fallback")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--network-map", "VM Network=Restore Network",
                         env=lab_env(lab, VMRESTORE_FAULT="transport:hotadd"),
                         state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    for d in rep["disks"]:
        assert d["transport"] == "nbd"
        assert any("hotadd failed" in h and "fell back to nbd" in h for h in d["history"])
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])


def test_explicit_transport_failure_does_not_fall_back(lab, lab_si, host_services, backup,
                                                       tmp_path) -> None:
    name = unique("f-nofallback")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--transport", "hotadd",
                         env=lab_env(lab, VMRESTORE_FAULT="transport:hotadd"),
                         state_dir=tmp_path)
    assert p.returncode == 7 and rep["failed_phase"] == "data"
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["nbd", "hotadd"])
def test_kill9_in_data_phase_then_resume(lab, lab_si, host_services, backup, tmp_path,
                                         transport: str) -> None:
    name = unique(f"k-{transport}")
    state = tmp_path / "state"
    args = ["restore", "--backup", str(backup.inc), "--name", name, "--datastore",
            "ds-local", "--transport", transport, "--network-map",
            "VM Network=Restore Network", "--state-dir", str(state)]
    env = lab_env(lab, VMRESTORE_FAULT="stall:data:0.5")
    kill_mid_disk(args, env, state)
    assert find_vm(lab_si, name) is not None  # kill -9: nothing could roll back

    p, rep = restore_cli(lab, *args[1:], "--resume")
    assert p.returncode == 0, p.stderr
    assert rep["resumed"]
    d0 = rep["disks"][0]
    assert d0["resumed_from"] > 0 or d0["status"] == "skipped", rep["disks"]
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    assert not [h for h in host_services.hot_adds() if f"] {name}/" in h.datastore_path]
    assert not list(state.glob("restore-*"))
    # every disk the resumed run attached got a higher attempt than the killed run's
    # (kept in the ledger before the attach): the host revoked whatever the killed run
    # still held, even a hot-add made after its last ledger write
    for f in host_services.fences():
        if f"] {name}/" in f["datastore_path"] and len(f["log"]) > 1:
            attempts = [e["attempt"] for e in f["log"]]
            assert attempts == sorted(set(attempts)), f


@pytest.mark.slow
def test_sigterm_in_data_phase_rolls_back(lab, lab_si, host_services, backup, tmp_path) -> None:
    name = unique("k-term")
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmrestore", "restore", "--backup", str(backup.inc), "--name",
         name, "--datastore", "ds-local", "--transport", "hotadd", "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=lab_env(lab, VMRESTORE_FAULT="stall:data:0.5"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None \
            and not list(state.glob("restore-*.disk0.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "rolled back" in out
    assert_nothing_left(lab, host_services, lab_si, name, state)


def test_auto_with_thick_lazy_disks_does_not_pick_san(lab, lab_si, backup, tmp_path) -> None:
    """SAN writes only eager-zeroed disks (a thick-lazy disk has unwritten extents the host
    does not map): auto no longer tries san and fails over, it picks another mode and says
    why in phase 1."""
    name = unique("f-lazy")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-san", "--disk-format", "thick-lazy", "--network-map",
                         "VM Network=Restore Network", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    for d in rep["disks"]:
        assert d["transport"] in ("hotadd", "nbd")
        assert "thick-lazy" in d["reason"] and "eager-zeroed" in d["reason"]
        assert not any("san failed" in h for h in d["history"])
    assert_restored(lab, lab_si, name, backup.images, ["thick-lazy", "thick-lazy"])
