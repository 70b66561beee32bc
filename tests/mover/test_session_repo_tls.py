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
