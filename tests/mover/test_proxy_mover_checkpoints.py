"""The proxy mover's durable checkpoints (docs/proxy-mover.md): checkpoint events while a
disk is written, a kill -9 of the mover, and a resume from the last checkpoint with
start_entry -- for a local backup and for a repository agent, into a real nbdkit."""

from __future__ import annotations

import filecmp
import os
import signal
from pathlib import Path

import pytest

from core_helpers import nbdkit
from vmrestore.mover.launcher import ProxyMover, run_proxy_mover


def _job(source: dict, uri: str, start: int = 0) -> dict:
    # one connection, one request in flight: a kill -9 then leaves nbdkit at most one reply
    # to send (nbdkit 1.32 aborts when a client vanishes while several threads still reply,
    # docs/core.md), so the resumed run finds the same server
    return {"version": 1, "job_id": "ckpt", "source": source,
            "disks": [{"disk": 0, "target": uri + "&connections=1", "start_entry": start,
                       "target_zeroed": True}],
            "settings": {"progress_interval": 0.05, "checkpoint_interval": 0.1,
                         "queue_depth": 1}}


@pytest.mark.parametrize("kind", ["local", "repo"])
def test_checkpoint_events_then_kill9_and_resume(sample, agent_factory, token_file,
                                                 tmp_path: Path, kind: str) -> None:
    bk, disk = sample
    if kind == "repo":
        agent = agent_factory(bk.parent)
        source = {"repository": agent.url(), "token_file": str(token_file)}
    else:
        source = {"backup": str(bk / "inc1.vmrb")}
    image = tmp_path / "target.img"
    with open(image, "wb") as f:
        f.truncate(disk.stat().st_size)
    # slow writes: the disk takes ~1.5 s, so several checkpoints happen mid-disk
    with nbdkit(tmp_path, image, "--filter=delay", "delay-write=100ms") as srv:
        seen: list[dict] = []
        with ProxyMover(_job(source, srv.uri)) as pm:
            for ev in pm.events():
                if ev["event"] == "checkpoint":
                    seen.append(ev)
                    if 0 < ev["prefix"] < ev["entries"] and len(seen) >= 2:
                        os.kill(pm.proc.pid, signal.SIGKILL)
                        break
        assert pm.result is not None and pm.result.status == "crashed"
        assert len(seen) >= 2, seen
        assert all(e["durable"] is True and e["disk"] == 0 for e in seen)
        prefixes = [e["prefix"] for e in seen]
        assert prefixes == sorted(set(prefixes)), prefixes  # strictly increasing
        last = seen[-1]
        assert 0 < last["bytes_done"] < disk.stat().st_size

        events: list[dict] = []
        res = run_proxy_mover(_job(source, srv.uri, start=last["prefix"]),
                              on_event=events.append)
        assert res.ok, (res.errors, res.stderr)
    assert filecmp.cmp(image, disk, shallow=False)
    done = next(e for e in events if e["event"] == "disk_done")
    assert done["resumed_bytes"] == last["bytes_done"]
    moved = done["bytes_written"] + done["bytes_zeroed"] + done["bytes_skipped"]
    assert moved == done["capacity"] - last["bytes_done"]  # only the rest was written
    ck = [e for e in events if e["event"] == "checkpoint"]
    assert ck and ck[-1]["prefix"] == ck[-1]["entries"] and ck[0]["prefix"] > last["prefix"]
    if kind == "repo":
        assert 0 < done["wire_bytes"]
