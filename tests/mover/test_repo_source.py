"""The core's repository-agent source (ext/core/source_repo.c) through restore-disk repo://.

The agent runs in its own process; the proxy side is this process (or the
CLI in a subprocess). Targets: a new file and a real nbdkit export. Faults:
the agent killed and restarted mid-restore, a byte flipped on the wire, the
agent gone for good, refusals.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import threading
import time
from typing import Any

import pytest
from mover_helpers import TOKEN, copy_with_bad_extent
from test_faults import FlippingRelay

from support import need_tool, run_cli
from vmrestore.errors import ChecksumError, MoverError, TransportError, UsageError
from vmrestore.restore_disk import restore_disk


def test_cli_repo_to_file_byte_identical(sample, agent_factory, token_file, tmp_path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    out = tmp_path / "r.img"
    p = run_cli("restore-disk", agent.url(), "--disk", "0", "--to", str(out),
                "--token-file", str(token_file), "--json", "-q", check=True)
    res = json.loads(p.stdout)
    assert filecmp.cmp(out, disk, shallow=False)
    assert res["source"] == "repository" and res["reconnects"] == 0
    assert res["bytes_written"] + res["bytes_skipped"] + res["bytes_zeroed"] == res["capacity"]
    # compressed on the wire: stored extents + a few frames, less than the data written
    assert res["stored_bytes"] < res["wire_bytes"] < res["bytes_written"]
    assert res["wire_ratio"] < 1.0


def test_repo_to_nbdkit_target(sample, agent_factory, tmp_path, monkeypatch) -> None:
    need_tool("nbdkit")
    bk, disk = sample
    agent = agent_factory(bk.parent)
    image = tmp_path / "nbd.img"
    with open(image, "wb") as f:
        f.truncate(disk.stat().st_size)
    monkeypatch.setenv("VMRESTORE_REPO_TOKEN", TOKEN)
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid"
    srv = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-P", str(pidfile), "-U",
                            str(sock), "file", str(image)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and srv.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pidfile.exists(), "nbdkit did not start"
        res = restore_disk(agent.url(), 0, f"nbd+unix:///?socket={sock}", connections=3)
    finally:
        srv.terminate()
        srv.wait(10)
    assert res.writer == "nbd" and res.settings["connections"] == 3
    assert filecmp.cmp(image, disk, shallow=False)


def test_older_point_over_several_readers(sample, agent_factory, token_file, tmp_path) -> None:
    """Two reader threads, two connections each: the chunks interleave, the bytes do not."""
    from vmrestore.repository.reader import open_chain
    from vmrestore.repository.reference import restore_disk_py

    bk, _ = sample
    agent = agent_factory(bk.parent)
    expected = tmp_path / "ref.img"
    restore_disk_py(open_chain(bk / "full.vmrb"), 0, str(expected))
    out = tmp_path / "r.img"
    res = restore_disk(agent.url(), 0, str(out), point="full.vmrb", token_file=str(token_file),
                       readers=2, connections=2)
    assert res.settings["readers"] == 2
    assert filecmp.cmp(out, expected, shallow=False)


def test_agent_killed_and_restarted_mid_restore(sample, agent_factory, token_file,
                                                tmp_path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent, ["--bwlimit", "4"])  # 4 MB/s: a few seconds of data
    out = tmp_path / "r.img"
    killed = threading.Event()

    def progress(p: Any) -> None:
        if not killed.is_set() and p.done > 0 and not p.durable:
            killed.set()
            agent.kill()
            time.sleep(0.3)
            agent.start()   # same port

    res = restore_disk(agent.url(), 0, str(out), token_file=str(token_file), retries=8,
                       progress=progress, progress_interval=0.05)
    assert killed.is_set(), "the restore finished before the agent could be killed"
    assert res.reconnects >= 1
    assert res.bytes_written + res.bytes_skipped == res.capacity
    assert filecmp.cmp(out, disk, shallow=False)


def test_agent_gone_names_disk_and_offset(sample, agent_factory, token_file, tmp_path) -> None:
    bk, _ = sample
    agent = agent_factory(bk.parent, ["--bwlimit", "4"])

    def progress(p: Any) -> None:
        if p.done > 0:
            agent.kill()

    with pytest.raises(TransportError) as ei:
        restore_disk(agent.url(), 0, str(tmp_path / "r.img"), token_file=str(token_file),
                     retries=2, progress=progress, progress_interval=0.05)
    msg = str(ei.value)
    assert msg.startswith("disk 0:") and "disk offset" in msg and "reconnects failed" in msg


@pytest.mark.parametrize("at", [300_000, 2_000_000])
def test_flipped_byte_on_the_wire_is_caught(sample, agent_factory, token_file, tmp_path,
                                            at: int) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    relay = FlippingRelay(agent.port, at=at)
    try:
        out = tmp_path / "r.img"
        res = restore_disk(f"repo://127.0.0.1:{relay.port}/vm1/inc1.vmrb", 0, str(out),
                           token_file=str(token_file), connections=1)
        assert relay.flipped == 1
        assert res.refetches + res.reconnects >= 1
        assert filecmp.cmp(out, disk, shallow=False)
    finally:
        relay.close()


def test_bad_stored_data_is_a_checksum_error(sample, agent_factory, token_file,
                                             tmp_path) -> None:
    bk, _ = sample
    root = tmp_path / "root" / "vm1"
    e = copy_with_bad_extent(bk, root, 2, at=100, xor=0x01)
    agent = agent_factory(root.parent)
    with pytest.raises(ChecksumError) as ei:
        restore_disk(agent.url(), 0, str(tmp_path / "r.img"), token_file=str(token_file))
    assert f"block {int(e['block'])}" in str(ei.value) and "disk 0" in str(ei.value)


def test_tls_url_and_missing_token_are_usage_errors(sample, agent_factory, tmp_path,
                                                    monkeypatch) -> None:
    bk, _ = sample
    agent = agent_factory(bk.parent)
    monkeypatch.delenv("VMRESTORE_REPO_TOKEN", raising=False)
    with pytest.raises(UsageError, match="token"):
        restore_disk(agent.url(), 0, str(tmp_path / "a.img"))
    # over TLS the batch loop writes local files and devices only: an NBD target is refused
    p = run_cli("restore-disk", agent.url(scheme="repos"), "--disk", "0", "--to",
                "nbd://127.0.0.1:1/x")
    assert p.returncode == 2 and "TLS" in p.stderr
    assert not (tmp_path / "a.img").exists() and not (tmp_path / "b.img").exists()


def test_orchestrator_session_with_a_repository(sample, agent_factory, tmp_path,
                                                monkeypatch) -> None:
    """InProcessMovers (the orchestrator's default) restores a repo:// DiskTask on the core."""
    from vmrestore.mover.repo_source import open_repository_chain
    from vmrestore.mover.session import DiskTask, InProcessMovers

    bk, disk = sample
    agent = agent_factory(bk.parent)
    monkeypatch.setenv("VMRESTORE_REPO_TOKEN", TOKEN)
    chain = open_repository_chain(agent.url())
    try:
        assert len(chain.points) == 2
    finally:
        chain.close()
    out = tmp_path / "r.img"
    seen: list[int] = []
    s = InProcessMovers()
    s.open()
    try:
        o = s.restore_disk(DiskTask(disk=0, source=agent.url(), target=str(out),
                                    transport="hotadd", checkpoint=str(tmp_path / "ck")),
                           lambda p: seen.append(p.done))
    finally:
        s.close()
    assert filecmp.cmp(out, disk, shallow=False)
    assert o.bytes_written + o.bytes_skipped + o.bytes_zeroed == disk.stat().st_size
    assert seen and seen[-1] == disk.stat().st_size
    assert (tmp_path / "ck").exists()


def test_chain_metadata_read_survives_an_agent_connection_lost(sample, agent_factory,
                                                               monkeypatch) -> None:
    """The agent's connection lost while phase 1 reads the chain (an agent restart):
    read again under the retry rule, not a traceback; a lasting loss keeps its own error."""
    from vmrestore.mover import repo_source
    from vmrestore.repository import reader

    bk, _disk = sample
    agent = agent_factory(bk.parent)
    monkeypatch.setenv("VMRESTORE_REPO_TOKEN", TOKEN)
    real = reader.open_chain
    lost = {"left": 1}

    def flaky(src):
        if lost["left"]:
            lost["left"] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(src)

    monkeypatch.setattr(reader, "open_chain", flaky)
    chain = repo_source.open_repository_chain(agent.url())
    try:
        assert len(chain.points) == 2 and lost["left"] == 0
    finally:
        chain.close()

    lost["left"] = 99
    monkeypatch.setattr(repo_source, "RETRIES", 1)
    with pytest.raises(MoverError, match=r"reading vm1/inc1\.vmrb: .*Connection reset by peer"):
        repo_source.open_repository_chain(agent.url())
    assert lost["left"] == 97  # the first try and one retry
