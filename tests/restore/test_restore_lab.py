"""Full VM restores into the real lab (vcsim + hostd + loop LUN + nbdkit), through the CLI.

Each restore's disks are read back from the datastore directories and compared byte
for byte with the backed-up images; the VM is checked through the vSphere API.
"""

from __future__ import annotations

import pytest

from restore_helpers import (
    assert_nothing_left,
    assert_restored,
    find_vm,
    lab_env,
    restore_cli,
    snapshot_tasks,
    unique,
)

pytestmark = [pytest.mark.lab, pytest.mark.root]
CASES = {
    # transport: (extra args, expected provisioning, expected mode per disk)
    "san": (["--datastore", "ds-san", "--disk-format", "thick-eager"],
            ["thick-eager", "thick-eager"], ["san", "san"]),
    "hotadd": (["--datastore", "ds-local"], ["thick-eager", "thin"], ["hotadd", "hotadd"]),
    "nbd": (["--datastore", "ds-local", "--disk-datastore", "1=ds-san"],
            ["thick-eager", "thin"], ["nbd", "nbd"]),
    "nbdssl": (["--datastore", "ds-san"], ["thick-eager", "thin"], ["nbdssl", "nbdssl"]),
    "auto": (["--datastore", "ds-san", "--power-on"], ["thick-eager", "thin"],
             ["hotadd", "hotadd"]),
}


@pytest.mark.parametrize("transport", list(CASES))
def test_restore_each_transport(lab, lab_si, backup, tmp_path, transport: str) -> None:
    extra, prov, modes = CASES[transport]
    name = unique(f"r-{transport}")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--transport",
                         transport, "--network-map", "VM Network=Restore Network", *extra,
                         state_dir=tmp_path / "state")
    assert p.returncode == 0, p.stderr
    assert rep is not None and rep["status"] == "ok"
    assert [d["transport"] for d in rep["disks"]] == modes
    assert all(d["reason"] for d in rep["disks"])
    assert [ph["status"] for ph in rep["phases"]] == ["ok"] * 5
    assert rep["vm"]["name"] == name
    assert_restored(lab, lab_si, name, backup.images, prov)
    vm = find_vm(lab_si, name)
    assert snapshot_tasks(lab_si, vm) == 1, "the restore should have taken one snapshot"
    if "--power-on" in extra:
        assert vm.runtime.powerState == "poweredOn" and rep["vm"]["powered_on"]
    else:
        assert vm.runtime.powerState == "poweredOff"
    # Every disk: bytes accounted for (written + zeroed + skipped = capacity).
    for d in rep["disks"]:
        assert d["bytes_written"] + d["bytes_zeroed"] + d["bytes_skipped"] == d["capacity"]
        assert set(d["busy"]) == {"source", "proxy", "network", "target"}
        # ... and its timeline: samples up to the same totals, busy in the right role
        tl = d["timeline"]
        assert tl["t"] and tl["written"][-1] == d["bytes_written"], tl
        assert tl["zeroed"][-1] + tl["skipped"][-1] == d["bytes_zeroed"] + d["bytes_skipped"]
        role = "network" if d["transport"] in ("nbd", "nbdssl") else "target"
        assert tl["busy_s"][role][-1] > 0
    assert not list((tmp_path / "state").glob("restore-*"))  # job state gone once done


def test_auto_on_thick_disks_picks_san(lab, lab_si, backup, tmp_path) -> None:
    name = unique("r-autosan")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-san", "--disk-format", "thick-eager", "--network-map",
                         "VM Network=Restore Network", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [d["transport"] for d in rep["disks"]] == ["san", "san"]
    assert "every disk is thick" in rep["disks"][0]["reason"]
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thick-eager"])


def test_restore_earlier_point(lab, lab_si, backup, tmp_path) -> None:
    name = unique("r-point")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--point", "full.vmrb", "--name",
                         name, "--datastore", "ds-local", "--transport", "nbd",
                         state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert rep["point"] == "full.vmrb"
    assert_restored(lab, lab_si, name, backup.full_images, ["thick-eager", "thin"],
                    network="VM Network")


def test_vvol_datastore_takes_no_snapshot(lab, lab_si, backup, tmp_path) -> None:
    name = unique("r-vvol")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-vvol", "--network-map", "VM Network=Restore Network",
                         state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    snap = next(ph for ph in rep["phases"] if ph["name"] == "snapshot")
    assert snap["status"] == "skipped" and "VVOL" in snap["detail"]
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    assert snapshot_tasks(lab_si, find_vm(lab_si, name)) == 0


def test_job_file(lab, lab_si, backup, tmp_path) -> None:
    name = unique("r-job")
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nbackup: {backup.inc}\nname: {name}\ndatastore: ds-local\n"
                   "transport: nbd\nnetwork_map:\n  VM Network: Restore Network\n"
                   f"state_dir: {tmp_path / 'state'}\nmax_rate: 8M\n")
    p, rep = restore_cli(lab, str(job))
    assert p.returncode == 0, p.stderr
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    # max_rate reached each disk's core: its last data block was let through no earlier
    # than (data before it) / 8 MiB/s after the start (a lower bound sleeping guarantees).
    for d in rep["disks"]:
        assert d["seconds"] >= (d["bytes_written"] - (1 << 20)) / (8 << 20) * 0.95, d
        # and the report says what held it back (busy role "throttle", its timeline column)
        assert d["busy"].get("throttle", 0) > 0.3, d["busy"]
        assert d["timeline"]["busy_s"]["throttle"][-1] > 0


def test_table_output_without_json(lab, backup, tmp_path) -> None:
    import subprocess
    import sys

    name = unique("r-table")
    p = subprocess.run([sys.executable, "-m", "vmrestore", "restore", "--backup",
                        str(backup.inc), "--name", name, "--datastore", "ds-local",
                        "--state-dir", str(tmp_path)], capture_output=True, text=True,
                       env=lab_env(lab), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "4 transport data" in p.stdout and "MB/s" in p.stdout and "OK in" in p.stdout
    assert "phase 2 config" in p.stderr  # plain progress lines on a non-TTY


# --- refusals: clear errors, nothing left behind ------------------------------------------


def test_bad_credentials(lab, lab_si, host_services, backup, tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("not-the-password\n")
    name = unique("r-badcred")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--vcenter", lab.vcenter_url, "--user", lab.user,
                         "--password-file", str(pw), "--ca-file", str(lab.ca_file),
                         state_dir=tmp_path / "s")
    assert p.returncode == 8
    assert "bad credentials" in p.stderr and "Traceback" not in p.stderr
    assert rep["failed_phase"] == "initialize"
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path / "s")


def test_unreachable_vcenter(lab, lab_si, host_services, backup, tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--datastore", "ds-local",
                       "--vcenter", "http://127.0.0.1:1/sdk", "--user", "u",
                       "--password-file", str(pw), state_dir=tmp_path)
    assert p.returncode == 8 and "cannot reach" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--datastore", "nope"], "datastore 'nope' not found"),
    (["--datastore", "ds-local", "--datacenter", "DC-nope"], "datacenter 'DC-nope' not found"),
    (["--datastore", "ds-local", "--network-map", "VM Network=Nope"], "network 'Nope' not found"),
    (["--datastore", "ds-local", "--folder", "no/such"], "folder 'no/such' not found"),
    (["--datastore", "ds-local", "--host", "esx-nope"], "host 'esx-nope' not found"),
    (["--datastore", "ds-local", "--resource-pool", "rp-nope"], "resource pool 'rp-nope'"),
])
def test_missing_objects(lab, lab_si, host_services, backup, tmp_path, args, message) -> None:
    name = unique("r-missing")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, *args,
                         state_dir=tmp_path)
    assert p.returncode == 8, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert rep["failed_phase"] == "initialize"
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path)


def test_san_with_thin_disk_refused(lab, lab_si, host_services, backup, tmp_path) -> None:
    name = unique("r-santhin")
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                       "ds-san", "--transport", "san", state_dir=tmp_path)
    assert p.returncode == 2
    assert "transport san refused: disk 1 would be thin" in p.stderr
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path)


def test_name_clash(lab, lab_si, host_services, backup, tmp_path) -> None:
    name = unique("r-clash")
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                       "ds-local", "--transport", "nbd", state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    vm = find_vm(lab_si, name)
    p2, rep2 = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                           "ds-san", state_dir=tmp_path)
    assert p2.returncode == 8 and "already exists" in p2.stderr
    assert rep2["failed_phase"] == "initialize"
    same = find_vm(lab_si, name)
    assert same is not None and same._moId == vm._moId  # the existing VM is untouched
    assert not (lab.datastores["ds-san"].dir / name).exists()


def test_proxy_mover_subprocess(lab, lab_si, backup, tmp_path) -> None:
    """The same restore with the proxy side as `vmrestore proxy-mover` subprocesses, the two
    disks at once (the default proxy's 4 slots are free: slots of this test only)."""
    name = unique("r-subproc")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--transport", "nbd", "--network-map",
                         "VM Network=Restore Network",
                         env=lab_env(lab, VMRESTORE_MOVER="subprocess",
                                     VMRESTORE_SLOT_DIR=str(tmp_path / "slots")),
                         state_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "movers proxy-mover subprocess" in " ".join(rep["events"])
    data = next(ph for ph in rep["phases"] if ph["name"] == "data")
    assert data["detail"].endswith("2 at a time"), data
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])


@pytest.mark.parametrize("transport, extra", [
    ("nbd", ["--datastore", "ds-local"]),
    ("san", ["--datastore", "ds-san", "--disk-format", "thick-eager"]),
])
def test_disk_library_vddk(lab, lab_si, backup, tmp_path, transport, extra) -> None:
    """--disk-library vddk: VixDiskLib (vddk_sim on the lab) writes the base disks."""
    name = unique(f"r-vddk-{transport}")
    trace = tmp_path / "vddk-trace.log"
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--transport",
                         transport, "--disk-library", "vddk", "--network-map",
                         "VM Network=Restore Network", *extra, state_dir=tmp_path,
                         env=lab_env(lab, VMRESTORE_VDDK_SIM_TRACE=str(trace)))
    assert p.returncode == 0, p.stderr
    assert all("VixDiskLib" in d["reason"] and d["transport"] == transport
               for d in rep["disks"])
    # One PrepareForAccess for the VM before any disk session (it precedes the snapshot),
    # one EndAccess after every disk's session (it follows the snapshot's removal).
    calls = [line.split()[0] for line in trace.read_text().splitlines()]
    assert calls.count("VixDiskLib_PrepareForAccess") == 1
    assert calls.count("VixDiskLib_EndAccess") == 1
    assert calls.index("VixDiskLib_PrepareForAccess") < calls.index("VixDiskLib_ConnectEx")
    assert calls.index("VixDiskLib_EndAccess") > max(
        i for i, c in enumerate(calls) if c == "VixDiskLib_Cleanup")
    prov = ["thick-eager", "thick-eager"] if transport == "san" else ["thick-eager", "thin"]
    assert_restored(lab, lab_si, name, backup.images, prov)


def test_disk_library_vddk_missing_library(lab, lab_si, host_services, backup,
                                           tmp_path) -> None:
    name = unique("r-vddk-missing")
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--disk-library", "vddk", "--vddk-libdir",
                         str(tmp_path / "no-vddk"), state_dir=tmp_path / "s")
    assert p.returncode == 10 and "libvixDiskLib" in p.stderr
    assert rep["failed_phase"] == "initialize"
    assert_nothing_left(lab, host_services, lab_si, name, tmp_path / "s")
