"""Full VM restores whose backup lives on a repository agent in another process, and
kill -9 + --resume through the proxy-mover subprocess and the repo:// source.

The agent (`vmrestore repo-agent`) serves the sample backup's directory; the
restore plans over the wire (VM config, disks, extent tables) and the movers pull
the stored extents still compressed. Disks are compared byte for byte with the
backed-up images; the report must show the bytes on the wire against the logical
bytes, and a resumed run must write less than the whole disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.mover_helpers import TOKEN, AgentProc
from restore_helpers import (
    assert_restored,
    find_vm,
    kill_mid_disk,
    lab_env,
    restore_cli,
    unique,
)

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture
def agent(backup, tmp_path: Path) -> Iterator[tuple[AgentProc, Path]]:
    """A repository agent serving the sample backup's directory, and its token file."""
    tok = tmp_path / "agent.token"
    tok.write_text(TOKEN + "\n")
    a = AgentProc(backup.dir, tok).start()
    try:
        yield a, tok
    finally:
        a.stop()


@pytest.mark.parametrize("mover", ["in-process", "subprocess"])
def test_restore_from_repository_agent(lab, lab_si, backup, agent, tmp_path: Path,
                                       mover: str) -> None:
    a, tok = agent
    name = unique(f"repo-{mover}")
    xdg = tmp_path / "xdg"  # the default state dir of a repo:// restore lives under it
    env = lab_env(lab, VMRESTORE_MOVER=mover, XDG_STATE_HOME=str(xdg))
    env.pop("VMRESTORE_STATE_DIR", None)
    env.pop("VMRESTORE_REPO_TOKEN", None)
    url = a.url("inc1.vmrb")
    p, rep = restore_cli(lab, "--repository", url, "--token-file", str(tok), "--name", name,
                         "--datastore", "ds-local", "--transport", "nbd", "--network-map",
                         "VM Network=Restore Network", env=env)
    assert p.returncode == 0, p.stderr
    assert rep["status"] == "ok" and rep["backup"] == url and rep["point"] == "inc1.vmrb"
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    for d in rep["disks"]:
        logical = d["bytes_written"] + d["bytes_zeroed"] + d["bytes_skipped"]
        assert d["logical_bytes"] == logical == d["capacity"]
        # blocks crossed the network compressed (and zero runs not at all)
        assert 0 < d["wire_bytes"] < logical, d
        print(f"{mover} disk {d['disk']}: {d['wire_bytes']} bytes on the wire for {logical} "
              f"logical ({d['wire_bytes'] / logical:.3f}), written {d['bytes_written']}")
    # state under $XDG_STATE_HOME/vmrestore/repo-<hash>, gone once the job is done
    dirs = list((xdg / "vmrestore").glob("repo-*"))
    assert len(dirs) == 1 and not list(dirs[0].glob("restore-*")), dirs


def test_repository_and_backup_are_exclusive(lab, backup, agent, tmp_path: Path) -> None:
    a, tok = agent
    p, _ = restore_cli(lab, "--repository", a.url("inc1.vmrb"), "--backup", str(backup.inc),
                       "--name", unique("repo-both"), state_dir=tmp_path)
    assert p.returncode == 2 and "exactly one" in p.stderr, p.stderr
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--token-file", str(tok),
                       "--name", unique("repo-tok"), state_dir=tmp_path)
    assert p.returncode == 2 and "token_file" in p.stderr, p.stderr


def test_wrong_token_is_refused_before_anything_is_created(lab, lab_si, backup, agent,
                                                           tmp_path: Path) -> None:
    a, _ = agent
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token-0123456789abcdef\n")
    name = unique("repo-badtok")
    p, rep = restore_cli(lab, "--repository", a.url("inc1.vmrb"), "--token-file", str(bad),
                         "--name", name, "--datastore", "ds-local", state_dir=tmp_path / "st")
    assert p.returncode == 11, p.stderr  # MoverError: authentication refused
    assert rep["failed_phase"] == "initialize" and find_vm(lab_si, name) is None


@pytest.mark.slow
@pytest.mark.parametrize("source, mover", [("local", "subprocess"), ("repo", "in-process"),
                                           ("repo", "subprocess")])
def test_kill9_then_resume(lab, lab_si, host_services, backup, agent, tmp_path: Path,
                           source: str, mover: str) -> None:
    a, tok = agent
    name = unique(f"k-{source}-{mover}")
    state = tmp_path / "state"
    src = (["--repository", a.url("inc1.vmrb"), "--token-file", str(tok)] if source == "repo"
           else ["--backup", str(backup.inc)])
    args = ["restore", *src, "--name", name, "--datastore", "ds-local", "--transport", "nbd",
            "--network-map", "VM Network=Restore Network", "--state-dir", str(state)]
    ckpt = kill_mid_disk(args, lab_env(lab, VMRESTORE_MOVER=mover,
                                        VMRESTORE_FAULT="stall:data:0.5"), state)
    assert find_vm(lab_si, name) is not None  # kill -9: nothing could roll back
    time.sleep(0.5)  # a subprocess mover notices its parent died and stops
    p, rep = restore_cli(lab, *args[1:], "--resume", env=lab_env(lab, VMRESTORE_MOVER=mover))
    assert p.returncode == 0, p.stderr
    assert rep["resumed"]
    d0 = rep["disks"][0]
    assert d0["status"] == "ok", rep["disks"]
    assert d0["resumed_from"] >= ckpt["bytes_done"] > 0, (d0, ckpt)
    # the second run wrote only the rest of the disk
    moved = d0["bytes_written"] + d0["bytes_zeroed"] + d0["bytes_skipped"]
    assert moved == d0["capacity"] - d0["resumed_from"] and moved < d0["capacity"], d0
    if source == "repo":
        assert d0["wire_bytes"] > 0
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    assert not list(state.glob("restore-*"))
