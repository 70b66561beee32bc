"""Job state, checkpoints, fault-hook parsing and the report: the pieces rollback and resume
rely on, tested without a lab."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vmrestore import jobstate
from vmrestore.errors import UsageError
from vmrestore.job import RestoreJob
from vmrestore.orchestrator import parse_faults
from vmrestore.plan import PLAN_DTYPE
from vmrestore.report import DiskReport, Report, format_table, from_dict


def test_atomic_write_replaces_whole_file(tmp_path) -> None:
    p = tmp_path / "f.json"
    jobstate.atomic_write(p, b"one")
    jobstate.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]  # no temp file left
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_checkpoint_round_trip(tmp_path) -> None:
    plan = np.zeros(5, PLAN_DTYPE)
    plan["length"] = 1 << 20
    ck = jobstate.Checkpoint(1, 3, 5, jobstate.plan_digest(plan), 3 << 20)
    path = tmp_path / "d.ckpt"
    jobstate.write_checkpoint(path, ck)
    back = jobstate.read_checkpoint(path)
    assert back == ck
    assert jobstate.read_checkpoint(tmp_path / "none.ckpt") is None
    other = plan.copy()
    other["length"][0] = 4096
    assert jobstate.plan_digest(other) != ck.digest


def test_bad_checkpoint_is_a_clear_error(tmp_path) -> None:
    p = tmp_path / "d.ckpt"
    p.write_text("{not json")
    with pytest.raises(UsageError, match="unreadable"):
        jobstate.read_checkpoint(p)
    p.write_text(json.dumps({"version": 99}))
    with pytest.raises(UsageError, match="version"):
        jobstate.read_checkpoint(p)


def test_state_lifecycle_and_resume_identity(tmp_path) -> None:
    job = RestoreJob(backup=str(tmp_path / "b.vmrb"), name="vm1", state_dir=str(tmp_path))
    st = jobstate.JobState(tmp_path, job, "vm1")
    st.lock()
    st.start()
    st.doc.created.vm = jobstate.VMRecord(name="vm1", moref="vm-1", token="t0")
    st.attach("export", "e1", 0)
    st.save()
    st.unlock()

    again = RestoreJob(backup=str(tmp_path / "b.vmrb"), name="vm1", state_dir=str(tmp_path),
                       resume=True, json=True)
    st2 = jobstate.JobState(tmp_path, again, "vm1")
    assert st2.path == st.path  # same job: run flags do not change its id
    d = st2.load()
    assert d.created.vm == jobstate.VMRecord(name="vm1", moref="vm-1", token="t0")
    assert d.attachments == [jobstate.Attachment("export", "e1", 0)]
    st2.detach("export", "e1")
    assert st2.load().attachments == []

    other = RestoreJob(backup=str(tmp_path / "b.vmrb"), name="vm1", datastore="ds2")
    st3 = jobstate.JobState(tmp_path, other, "vm1")
    assert st3.path != st.path
    with pytest.raises(UsageError, match="no interrupted restore"):
        st3.load()

    jobstate.write_checkpoint(st.checkpoint_path(0), jobstate.Checkpoint(0, 1, 2, "x"))
    st.remove()
    assert not st.path.exists() and not st.checkpoint_path(0).exists()


def test_state_of_an_earlier_build_still_loads_and_a_bad_field_is_named(tmp_path) -> None:
    """Version 1 files written before the ledger was typed (no token), and a forged one."""
    job = RestoreJob(backup="b", name="vm1")
    st = jobstate.JobState(tmp_path, job, "vm1")
    old = {"version": 1, "identity": json.loads(json.dumps(job.identity())), "status": "failed",
           "phase": "data", "created": {"vm": {"moref": "vm-7", "name": "vm1"}, "dirs": [],
                                        "snapshot": True},
           "attachments": [{"kind": "hotadd", "id": "h1", "disk": 1}],
           "disks": {"0": {"status": "done", "transport": "nbd"}}, "started": 1.0, "pid": 1}
    st.path.write_text(json.dumps(old))
    d = st.load()
    assert d.created.vm.moref == "vm-7" and d.created.vm.token == ""
    assert d.disks["0"].transport == "nbd" and d.attachments[0].disk == 1
    old["attachments"] = [{"kind": "hotadd", "id": "h1", "disk": "one"}]
    st.path.write_text(json.dumps(old))
    with pytest.raises(UsageError, match=r"attachments\[0\]\.disk"):
        st.load()


def test_one_run_of_a_job_at_a_time(tmp_path) -> None:
    job = RestoreJob(backup="b", name="vm1")
    a = jobstate.JobState(tmp_path, job, "vm1")
    b = jobstate.JobState(tmp_path, job, "vm1")
    a.lock()
    with pytest.raises(UsageError, match="another run"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


def test_state_dir_default_next_to_backup(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("VMRESTORE_STATE_DIR", raising=False)
    job = RestoreJob(backup=str(tmp_path / "x" / "b.vmrb"))
    assert jobstate.state_dir_for(job) == tmp_path / "x" / ".vmrestore"
    monkeypatch.setenv("VMRESTORE_STATE_DIR", str(tmp_path / "env"))
    assert jobstate.state_dir_for(job) == tmp_path / "env"
    job.state_dir = str(tmp_path / "opt")
    assert jobstate.state_dir_for(job) == tmp_path / "opt"


def test_parse_faults() -> None:
    f = parse_faults("phase:data, transport:san,stall:data:0.25,after:swap")
    assert f == {"phases": {"data"}, "transports": {"san"}, "stall": 0.25, "after": {"swap"}}
    assert parse_faults(None) == {"phases": set(), "transports": set(), "stall": 0.0,
                                  "after": set()}
    for bad in ("phase:nope", "boom", "stall:config:1", "after:data"):
        with pytest.raises(UsageError, match="VMRESTORE_FAULT"):
            parse_faults(bad)


def _report() -> Report:
    r = Report(vm_name="web02", vm_moref="vm-7", backup="/b/inc.vmrb", point="inc.vmrb",
               proxy="local (slot 1/4)", snapshot="committed (removed)", status="ok",
               seconds=1.5)
    for p in r.phases.values():
        p.status, p.seconds = "ok", 0.1
    r.disks.append(DiskReport(0, "Hard disk 1", 16 << 20, "thick-eager", "ds-san",
                              "[ds-san] web02/web02.vmdk", "san", "auto: all thick",
                              bytes_written=10 << 20, bytes_skipped=6 << 20, seconds=0.5,
                              busy={"source": 0.2, "proxy": 0.5, "network": 0.0,
                                    "target": 0.9}))
    return r


def test_report_json_round_trip_and_table() -> None:
    r = _report()
    d = r.as_dict()
    assert d["report_version"] == 1 and d["disks"][0]["mb_per_s"] == pytest.approx(21.0, 0.01)
    again = from_dict(json.loads(json.dumps(d)))
    assert again.as_dict() == d
    t = format_table(r)
    assert "5 commit snapshot" in t and "san" in t and "20%/50%/0%/90%" in t
    assert "OK in 1.5 s" in t


def test_report_table_of_a_failure_names_phase_and_rollback() -> None:
    r = _report()
    r.status, r.failed_phase, r.error = "failed", "data", "disk 1: nbd export gone"
    r.rollback = ["destroyed VM web02 (vm-7) with its disks and snapshot"]
    t = format_table(r)
    assert "FAILED in phase data: disk 1: nbd export gone" in t
    assert "rolled back: destroyed VM web02" in t


def test_report_table_lists_the_replaced_disks() -> None:
    r = _report()
    r.original = {"name": "web02", "moref": "vm-7", "found_by": "name 'web02'",
                  "mode": "replace the disks (--full)", "config": "backup's",
                  "config_changes": [], "replaced": [
                      "disk 0: [ds] web02/web02.vmdk (8 bytes) -> [ds] web02/x.vmdk (16 bytes)",
                      "removed [ds] web02/web02_1.vmdk (8 bytes)"],
                  "left": ["[ds] web02/web02_1.vmdk (locked)"]}
    t = format_table(r)
    assert "  replaced: disk 0: [ds] web02/web02.vmdk (8 bytes) -> [ds] web02/x.vmdk" in t
    assert "  replaced: removed [ds] web02/web02_1.vmdk" in t
    assert "old disk file not deleted: [ds] web02/web02_1.vmdk (locked)" in t
    assert "rolled back to the restore point with new disks" in t


def test_busy_mapping_by_transport() -> None:
    from vmrestore.timeline import role_busy

    stage = {"read": 0.1, "decompress": 0.4, "write": 0.8}
    assert role_busy("nbd", stage) == {"source": 0.1, "proxy": 0.4, "network": 0.8,
                                       "target": 0.0}
    assert role_busy("hotadd", stage)["target"] == 0.8
    assert role_busy("san", stage)["network"] == 0.0


def test_restore_help_is_instant_and_lists_options() -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "vmrestore", "restore", "--help"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert p.returncode == 0
    for opt in ("--backup", "--point", "--vcenter", "--password-file", "--disk-datastore",
                "--disk-format", "--network-map", "--power-on", "--transport", "--proxy",
                "--infra", "--resume", "--keep-on-failure", "--json", "JOB.yaml"):
        assert opt in p.stdout


def test_no_vcenter_and_no_lab_is_a_clear_error(tmp_path) -> None:
    import subprocess
    import sys

    from vmrestore.sample import write_sample_vm

    paths, cfg = write_sample_vm(str(tmp_path), 1 << 20, seed=3, disks=2, name="small")
    bk = tmp_path / "b.vmrb"
    run = [sys.executable, "-m", "vmrestore"]
    subprocess.run([*run, "backup", "create", "--disk", paths[0], "--disk", paths[1],
                    "--vm-config", cfg, "-o", str(bk), "-q"], check=True, timeout=120)
    env = dict(os.environ, VMRESTORE_LAB_DIR=str(tmp_path / "no-lab"))
    p = subprocess.run([*run, "restore", "--backup", str(bk), "--datastore", "ds",
                        "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "no --vcenter given and no lab is up" in p.stderr and "Traceback" not in p.stderr
    assert "FAILED in phase initialize" in p.stdout
    assert not list((tmp_path / "state").glob("restore-*"))
