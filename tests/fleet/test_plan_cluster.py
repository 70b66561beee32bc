"""A real cluster: `dask scheduler` + 3 `vmrestore proxy-worker` processes, each in its own
network namespace; the orchestrator killed -9 mid-plan, then `--resume` finishes the plan
from the plan and job states.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_helpers import same_bytes
from lab_helpers import flat_file

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(fleet_lab: Any, tmp_path: Path) -> Iterator[str]:
    """A Dask scheduler and one proxy-worker per lab proxy VM, each in the proxy's network
    namespace (it reaches the scheduler over its veth only), as an operator starts them."""
    from vmrestore.lab.netns import scheduler_address

    host = scheduler_address(fleet_lab.raw)
    assert host, "the lab has no proxy namespaces"
    port = _free_port()
    address = f"tcp://{host}:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host",
                               host, "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sched.log", "w"),
                              env=env)]
    try:
        for vm in fleet_lab.proxy_vms:
            ns = fleet_lab.raw["proxy_netns"][vm]["netns"]
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "vmrestore", "proxy-worker",
                 "--scheduler", address,
                 "--name", vm, "--slots", "2", "--vm", vm, "--transports", "hotadd,nbd"],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{vm}.log", "w"), env=env))
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _plan_cli(plan: Path, lab: Any, *args: str, fault: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "VMRESTORE_LAB_DIR": str(lab.dir), "VMRESTORE_PROGRESS": "plain",
           "VMRESTORE_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "vmrestore", "restore", "--plan", str(plan),
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_plan_on_a_real_cluster_survives_the_orchestrator_killed(fleet_lab, fleet_backups,
                                                                cluster, tmp_path):
    vms = [{"name": f"clu-{s}{i}", "backup": str(fleet_backups[s].backup)}
           for i, s in enumerate("cbd")]
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps({"version": 1, "defaults": {"disk_format": "thin",
                                                           "datastore": "ds-local"},
                                "max_vms": 2, "vms": vms}))
    # Slow disks (eight slices, a pause after each), killed once a VM is done and disks run.
    proc = _plan_cli(plan, fleet_lab, "--scheduler", cluster, fault="stall:data:0.25")
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            snap = json.loads(line)
            if snap["vms"]["done"] >= 1 and snap["disks_running"] >= 2:
                break
    else:
        pytest.fail(f"the plan ended before the kill: {proc.communicate()}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    state = list((tmp_path / ".vmrestore-plan").glob("plan-*.json"))
    assert len(state) == 1

    # A new run without --resume is refused; --resume finishes the plan on the same cluster.
    again = _plan_cli(plan, fleet_lab, "--scheduler", cluster)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "--resume" in err
    t0 = time.monotonic()
    res = _plan_cli(plan, fleet_lab, "--scheduler", cluster, "--resume")
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["resumed"] and report["cluster"] == f"Dask scheduler {cluster}"
    # Each proxy's worker sits at its namespace's address.
    for vm, n in fleet_lab.raw["proxy_netns"].items():
        assert f"{vm} (tcp://{n['ip']}:" in report["events"][0], report["events"][0]
    earlier = [v for v in report["vms"] if v["earlier_run"]]
    assert earlier and len(earlier) < len(vms)
    resumed_disks = [d for v in report["vms"] if not v["earlier_run"] for d in v["disks"]
                     if d["resumed_from"] > 0]
    assert resumed_disks, "no disk continued from the killed run's checkpoint"
    for v in report["vms"]:
        images = fleet_backups[v["name"][len("clu-")]].images
        assert v["status"] == "ok" and len(v["disks"]) == len(images)
        for d in v["disks"]:
            assert same_bytes(flat_file(fleet_lab, d["file"]), images[d["disk"]]), v["name"]
        if not v["earlier_run"]:
            assert {d["proxy"] for d in v["disks"]} <= set(fleet_lab.proxy_vms)
    assert not list((tmp_path / ".vmrestore-plan").glob("plan-*.json"))  # done: state removed
    assert time.monotonic() - t0 < 300
