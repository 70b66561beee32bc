"""A real plan on the lab: 20 VMs over 3 proxy worker processes, one worker killed -9 mid-run.

Every disk is compared byte for byte with its source image; the host's fencing
record proves no disk was held by two attempts at once (each attempt's export
or hot-add revoked before the next one's was made); a VM with a corrupt
backup fails in phase 4 and rolls back alone while the others complete.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet_helpers import same_bytes
from lab_helpers import flat_file

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]

VICTIM = "vmr-proxy2"


def _corrupt_copy(src: Path, dst_dir: Path) -> Path:
    """The backup with one byte flipped in the middle of its stored blocks."""
    dst_dir.mkdir()
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(dst.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    return dst


def _run_plan(plan: Path, lab: Any, kill: str | None) -> tuple[int, dict[str, Any], list[dict]]:
    """Run `vmrestore restore --plan`; kill -9 proxy `kill`'s worker while it runs a disk."""
    env = {**os.environ, "VMRESTORE_LAB_DIR": str(lab.dir), "VMRESTORE_PROGRESS": "plain",
           # Each disk in eight slices with a durable checkpoint and a short pause after
           # each: the kill lands mid-disk and the successor resumes from a checkpoint.
           "VMRESTORE_FAULT": "stall:data:0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "vmrestore", "restore", "--plan", str(plan),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    snaps: list[dict] = []
    killed: list[int] = []
    other: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                snap = json.loads(line) if line.startswith('{"event"') else None
            except ValueError:
                snap = None
            if snap is None:
                other.append(line)
                continue
            snaps.append(snap)
            pid = snap.get("workers", {}).get(kill)
            if kill and not killed and pid and snap["slots"].get(kill, 0) >= 1 \
                    and snap["vms"]["done"] >= 2:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:  # restarted meanwhile: the next snapshot's pid
                    other.append(f"worker pid {pid} already gone\n")

    t = threading.Thread(target=read_stderr)
    t.start()
    assert proc.stdout is not None
    out = proc.stdout.read()  # stderr is the reader thread's alone (not communicate()'s)
    proc.wait(timeout=400)
    t.join()
    if kill:
        assert killed, "the worker was never seen running a disk: no kill happened"
    assert any(s["final"] for s in snaps), "".join(other)[-3000:]
    return proc.returncode, json.loads(out), snaps


def test_twenty_vms_over_three_proxies_with_a_worker_killed(fleet_lab, fleet_backups,
                                                           tmp_path):
    from vmrestore.transport.host import HostServices

    bad = _corrupt_copy(fleet_backups["a"].backup, tmp_path / "bad")
    shapes = itertools.cycle(sorted(fleet_backups))
    vms = []
    for i in range(20):
        s = next(shapes)
        vms.append({"name": f"plan-{s}{i:02d}", "backup": str(fleet_backups[s].backup),
                    "tier": 0 if i < 4 else 1,
                    **({"datastore": "ds-local2"} if i % 3 == 0 else {})})
    vms.append({"name": "plan-corrupt", "backup": str(bad), "tier": 1})
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps({"version": 1, "defaults": {"disk_format": "thin",
                                                           "datastore": "ds-local"},
                                "vms": vms}))
    rc, report, snaps = _run_plan(plan, fleet_lab, kill=VICTIM)

    # The corrupt VM failed in phase 4 and was rolled back; the plan says so (exit 12).
    assert rc == 12, report
    by_name = {v["name"]: v for v in report["vms"]}
    corrupt = by_name.pop("plan-corrupt")
    assert corrupt["status"] == "failed" and corrupt["failed_phase"] == "data"
    assert corrupt["error_type"] == "ChecksumError"
    assert any("destroyed VM plan-corrupt" in r for r in corrupt["rollback"])
    assert not (fleet_lab.datastores["ds-local"].dir / "plan-corrupt").exists()

    # Every other VM restored, every disk byte-identical to its source image.
    failed = {n: (v["failed_phase"], v["error"]) for n, v in by_name.items()
              if v["status"] != "ok"}
    assert len(by_name) == 20 and not failed, failed
    for name, v in by_name.items():
        images = fleet_backups[name[len("plan-")]].images
        assert [d["disk"] for d in v["disks"]] == list(range(len(images)))
        for d in v["disks"]:
            assert same_bytes(flat_file(fleet_lab, d["file"]), images[d["disk"]]), \
                f"{name} disk {d['disk']} differs from its source: {json.dumps(d)}"
        assert v["rto"] is not None and v["rto"] >= v["phases"][-1]["start"]

    # The killed worker's disk(s) were lost and finished on a later attempt.
    lost = [(v["name"], d) for v in by_name.values() for d in v["disks"]
            if any(a["outcome"] == "lost" for a in d["attempts"])]
    assert lost, "no disk attempt was lost with the killed worker"
    for _, d in lost:
        assert {a["proxy"] for a in d["attempts"] if a["outcome"] == "lost"} == {VICTIM}, \
            json.dumps({"disk": d, "events": report["events"]})
        assert d["attempts"][-1]["outcome"] == "ok"
    victim = next(p for p in report["proxies"] if p["name"] == VICTIM)
    assert victim["lost"] >= 1
    assert all(p["attempts"] > 0 and 0 < p["utilization"] <= 1 for p in report["proxies"]), \
        report["proxies"]
    assert report["mb_per_s"] > 0 and report["bytes_written"] > 0

    # No disk was held by two attempts at once: the host's fencing record.
    fences = {f["datastore_path"]: f for f in HostServices.from_lab(fleet_lab).fences()}
    for _, d in lost:
        log = sorted(fences[d["file"]]["log"], key=lambda e: e["attempt"])
        assert len(log) == len(d["attempts"]) >= 2
        for a, b in itertools.pairwise(log):
            assert a["attempt"] < b["attempt"]
            assert a["revoked"] is not None and a["revoked"] <= b["granted"], (d["file"], log)
    for f in fences.values():
        assert all(e["revoked"] is not None for e in f["log"]), f  # nothing left attached

    # The live view saw the plan: slots in use per proxy, VMs moving to done.
    assert any(sum(s["slots"].values()) >= 3 for s in snaps)
    final = [s for s in snaps if s["final"]]
    assert final and final[-1]["vms"]["done"] == 20 and final[-1]["vms"]["failed"] == 1, final
