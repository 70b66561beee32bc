"""A second lab beside the session one: up, use, down leaves no process, loop device or mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab_helpers import create_vm, need_root, need_tool

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20


def _leftovers(d: Path) -> list[str]:
    """Processes (not zombies), loop devices and mounts that refer to the lab dir d."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(d) in cmd and state != "Z" and "pytest" not in cmd:
            found.append(f"process {p.name}: {cmd}")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(d) in line]
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                            text=True).stdout
    found += [f"mount {m}" for m in mounts.splitlines() if m.startswith(str(d))]
    return found


@pytest.fixture
def second_lab(tmp_path, lab):  # the session lab is up too: they must coexist
    need_root()
    need_tool("nbdinfo")
    d = tmp_path / "lab2"
    yield d
    from vmrestore.lab import lab as labmod

    labmod.down(d)


def _si(info):
    from pyVim.connect import SmartConnect

    return SmartConnect(**info.connect_args())


def test_second_lab_coexists_and_down_leaves_nothing(second_lab, lab, cli):
    from vmrestore.lab.client import load_lab
    from vmrestore.transport.host import HostServices

    proc = cli("lab", "up", "--json", "--dir", str(second_lab), "--san-size", "256M", check=True)
    doc = json.loads(proc.stdout)
    assert doc["vcenter_url"] != lab.vcenter_url and doc["hostd_url"] != lab.hostd_url
    by = {d["name"]: d for d in doc["datastores"]}
    assert by["ds-san"]["lun"] != lab.datastores["ds-san"].lun
    info = load_lab(second_lab)
    si = _si(info)
    _vm, paths = create_vm(si, info, "busy", "ds-san", [(4 * MiB, "thick-eager"),
                                                         (4 * MiB, "thin")])
    hs = HostServices.from_lab(info)
    hs.export_nbd(paths[0], tls=True)
    hs.export_nbd(paths[1])
    hs.hot_add(paths[1])
    assert _leftovers(second_lab), "the lab should be visible while up"

    proc = cli("lab", "down", "--dir", str(second_lab), check=True)
    assert "detached" in proc.stdout
    assert _leftovers(second_lab) == []
    assert not second_lab.exists()
    # The session lab is untouched.
    assert cli("lab", "status", "--dir", str(lab.dir)).returncode == 0
    status = cli("lab", "status", "--json", "--dir", str(second_lab))
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "down"


def test_down_after_crash_cleans_up(second_lab, cli):
    """hostd and vcsim killed -9 with an export and a hot-add live: down still cleans all."""
    from vmrestore.lab.client import load_lab
    from vmrestore.transport.host import HostServices

    cli("lab", "up", "--dir", str(second_lab), "--san-size", "256M", check=True)
    info = load_lab(second_lab)
    _vm, paths = create_vm(_si(info), info, "crash", "ds-local", [(4 * MiB, "thin")])
    from vmrestore.lab import loopdev

    _vm2, (fenced_path,) = create_vm(_si(info), info, "fenced", "ds-local", [(4 * MiB, "thin")])
    hs = HostServices.from_lab(info)
    hs.export_nbd(paths[0])
    hs.hot_add(paths[0])
    # A stale writer holds a hot-added device when a higher attempt fences it.
    stale = hs.hot_add(fenced_path, attempt=1)
    fd = os.open(stale.device, os.O_WRONLY)
    try:
        hs.export_nbd(fenced_path, attempt=2)
        for pid in info.raw["pids"].values():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        os.close(fd)  # unbound now, and nobody left in hostd to make it writable
    assert loopdev.is_read_only(stale.device) and not loopdev.is_bound(stale.device)
    status = cli("lab", "status", "--json", "--dir", str(second_lab))
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "broken"
    proc = cli("lab", "down", "--dir", str(second_lab), check=True)
    assert _leftovers(second_lab) == []
    assert not loopdev.is_read_only(stale.device), proc.stdout
    assert f"made the fenced {stale.device} writable again" in proc.stdout


def test_up_without_root_is_a_clear_error(tmp_path, monkeypatch):
    from vmrestore.errors import LabError
    from vmrestore.lab import lab as labmod

    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    d = tmp_path / "nolab"
    with pytest.raises(LabError, match="needs root"):
        labmod.up(d)
    assert not (d / "lab.json").exists() and not (d / "run.json").exists()
