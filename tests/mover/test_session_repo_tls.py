"""InProcessMovers with a repos:// (TLS) backup: the Python batch loop writes files and block
devices; any other target is refused with the reason."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest

from support import need_tool
from vmrestore.disktask import DiskTask, TaskSettings
from vmrestore.errors import UsageError
from vmrestore.jobstate import read_checkpoint
from vmrestore.mover.session import InProcessMovers


def test_tls_repository_in_process(sample, agent_factory, token_file, tmp_path: Path) -> None:
    need_tool("openssl")
    bk, disk = sample
    cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=vmrestore-agent", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    agent = agent_factory(bk.parent, ["--tls-cert", str(cert), "--tls-key", str(key)])
    url = agent.url(scheme="repos") + f"?ca={cert}"
    out, ck = tmp_path / "out.img", tmp_path / "d0.ckpt"
    movers = InProcessMovers()
    movers.open()
    res = movers.restore_disk(DiskTask(
        disk=0, source=url, target=str(out), transport="hotadd", checkpoint=str(ck),
        settings=TaskSettings(token_file=str(token_file), target_zeroed=False)))
    assert filecmp.cmp(out, disk, shallow=False)
    assert 0 < res.wire_bytes < disk.stat().st_size
    c = read_checkpoint(ck)
    assert c is not None and c.prefix == c.entries > 0
    with pytest.raises(UsageError, match="files and block devices"):
        movers.restore_disk(DiskTask(disk=0, source=url, target="nbd://127.0.0.1:1/x",
                                     transport="nbd",
                                     settings=TaskSettings(token_file=str(token_file))))


@pytest.mark.parametrize("scheme", ["repo", "repos"])
def test_max_rate_holds_a_repository_restore_back_and_says_so(
        sample, agent_factory, token_file, tmp_path: Path, scheme: str) -> None:
    """--max-rate / max_rate from a repository agent, plain (the core) and TLS (Python)."""
    bk, disk = sample
    extra: list[str] = []
    url_extra = ""
    if scheme == "repos":
        need_tool("openssl")
        cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=vmrestore-agent", "-keyout", str(key), "-out",
                        str(cert)], check=True, capture_output=True)
        extra, url_extra = ["--tls-cert", str(cert), "--tls-key", str(key)], f"?ca={cert}"
    agent = agent_factory(bk.parent, extra)
    rate = 4 << 20
    out = tmp_path / "out.img"
    movers = InProcessMovers()
    movers.open()
    res = movers.restore_disk(DiskTask(
        disk=0, source=agent.url(scheme=scheme) + url_extra, target=str(out),
        transport="hotadd",
        settings=TaskSettings(token_file=str(token_file), target_zeroed=False, max_rate=rate)))
    assert filecmp.cmp(out, disk, shallow=False)
    # unlimited, this disk takes well under 0.2 s; a batch may start only when the rate
    # allows the bytes before it (TLS batches are large: a loose bound)
    assert res.seconds >= 0.4 * res.bytes_written / rate, (res.seconds, res.bytes_written)
    assert res.settings["max_rate"] == rate
    assert res.busy.get("throttle", 0) > 0.2, res.busy
