"""The plan document: parsing, refusals naming the place, defaults, tiers; the report table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmrestore.errors import UsageError
from vmrestore.fleet.plan import load_plan
from vmrestore.fleet.report import (
    AttemptLine,
    DiskLine,
    PhaseLine,
    VmLine,
    format_table,
    summarize,
)


def _plan(tmp_path: Path, doc: dict, name: str = "plan.yaml") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_plan_defaults_tiers_and_relative_paths(tmp_path):
    p = _plan(tmp_path, {"version": 1, "defaults": {"disk_format": "thin", "datastore": "ds1"},
                         "limits": {"nbd_per_host": 8, "datastores": {"ds1": 3}},
                         "vms": [{"name": "a", "backup": "bk/a.vmrb", "tier": 0},
                                 {"name": "b", "backup": "/abs/b.vmrb", "datastore": "ds2"}]})
    plan = load_plan(p)
    a, b = plan.vms
    assert (a.name, a.tier, b.tier) == ("a", 0, 1)
    assert a.job.backup == str(tmp_path / "bk/a.vmrb") and b.job.backup == "/abs/b.vmrb"
    assert a.job.disk_format == b.job.disk_format == "thin"
    assert (a.job.datastore, b.job.datastore) == ("ds1", "ds2")
    assert plan.doc.limits.nbd_per_host == 8 and plan.doc.limits.datastores == {"ds1": 3}
    assert plan.state_path.parent == tmp_path / ".vmrestore-plan"
    # The digest changes with what the plan restores, so a resume runs the same plan.
    p2 = _plan(tmp_path, {"version": 1, "vms": [{"name": "a", "backup": "bk/a.vmrb"}]}, "p2.yaml")
    assert load_plan(p2).digest != plan.digest


@pytest.mark.parametrize("doc, words", [
    ({"version": 2, "vms": []}, "plan version 1"),
    ({"version": 1, "vms": []}, "'vms' is empty"),
    ({"version": 1, "vms": [{"backup": "x"}], "colour": 1}, "colour"),
    ({"version": 1, "vms": [{"backup": "x"}]}, "vms[0]: field 'name' is required"),
    ({"version": 1, "vms": [{"name": "a", "backup": "x", "tier": -1}]}, "'tier'"),
    ({"version": 1, "vms": [{"name": "a", "backup": "x"}, {"name": "a", "backup": "y"}]},
     "already used by vms[0]"),
    ({"version": 1, "vms": [{"name": "a", "backup": "x", "resume": True}]}, "given to the plan"),
    ({"version": 1, "vms": [{"name": "a", "backup": "x", "disk_format": "fat"}]},
     "vms[0] (a): field 'disk_format'"),
    ({"version": 1, "defaults": {"name": "x"}, "vms": [{"name": "a", "backup": "x"}]},
     "'defaults.name'"),
    ({"version": 1, "limits": {"nbd_per_host": "many"}, "vms": [{"name": "a", "backup": "x"}]},
     "nbd_per_host"),
])
def test_plan_refusals_name_the_place(tmp_path, doc, words):
    with pytest.raises(UsageError) as e:
        load_plan(_plan(tmp_path, doc))
    assert words in str(e.value) and "plan file" in str(e.value)


def test_report_totals_slot_use_and_table():
    disk = DiskLine(disk=0, file="[ds] a/a.vmdk", capacity=100 << 20, status="ok",
                    transport="hotadd", proxy="p2",
                    attempts=[AttemptLine(1, "p1", "hotadd", "lost"),
                              AttemptLine(2, "p2", "hotadd", "ok", 40)],
                    bytes_written=30 << 20, bytes_zeroed=0, bytes_skipped=50 << 20)
    ok = VmLine(name="a", tier=0, status="ok", rto=4.0, seconds=3.5,
                phases=[PhaseLine("initialize", "ok", 0.5, 1.0)], disks=[disk])
    bad = VmLine(name="b", tier=1, status="failed", rto=None, seconds=1.0, failed_phase="data",
                 error="boom", error_type="ChecksumError")
    earlier = VmLine(name="c", tier=1, status="ok", rto=2.0, seconds=2.0, earlier_run=True,
                     disks=[disk])
    use = {"p1": {"slots": 2, "busy_slot_seconds": 2.0, "peak": 1, "attempts": 1, "lost": 1},
           "p2": {"slots": 2, "busy_slot_seconds": 4.0, "peak": 2, "attempts": 1, "lost": 0}}
    r = summarize("plan.yaml", "embedded", 5.0, [ok, bad, earlier], use, [], False)
    assert (r.status, r.vms_ok, r.vms_failed) == ("failed", 2, 1)
    assert r.bytes_written == 30 << 20  # the earlier run's VM is not counted again
    assert r.mb_per_s == round((30 << 20) / 5.0 / 1e6, 1)
    assert [p.utilization for p in r.proxies] == [0.2, 0.4]
    text = format_table(r)
    assert "0:hotadd@p2x2" in text and "failed in data: boom" in text
    assert "restored by an earlier run" in text
    assert r.as_dict()["vms"][0]["disks"][0]["attempts"][1]["start_entry"] == 40
