"""Agent and proxy in separate processes on loopback: restores, auth, refusals, TLS, clients."""

from __future__ import annotations

import filecmp
import json
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from mover_helpers import TOKEN, mover_job

from support import need_tool, run_cli
from vmrestore.errors import AuthenticationError, MoverError, RemoteError
from vmrestore.mover import protocol as P
from vmrestore.mover.client import Connection, RemoteSource, RepoURL
from vmrestore.mover.launcher import run_proxy_mover
from vmrestore.mover.protocol import E, T


def connect(agent, token: str = TOKEN, client: str | None = None, url: str | None = None):
    return Connection(RepoURL.parse(url or agent.url()), token.encode(), client)


def test_restore_byte_identical_through_proxy_mover(sample, agent_factory, token_file,
                                                    tmp_path: Path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    out = tmp_path / "restored.img"
    events: list[dict] = []
    res = run_proxy_mover(mover_job(agent.url(), token_file, out), on_event=events.append)
    assert res.ok, (res.errors, res.stderr)
    assert filecmp.cmp(out, disk, shallow=False)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and "disk_done" in kinds
    done = next(e for e in events if e["event"] == "disk_done")
    assert done["bytes_written"] + done["bytes_skipped"] + done["bytes_zeroed"] == done["capacity"]
    # Compressed on the wire: fewer bytes than the disk's data, more than the stored extents.
    assert done["stored_bytes"] <= done["wire_bytes"] < done["bytes_written"]
    assert res.result is not None and res.result["wire_ratio"] < 1.0


def test_restore_older_point_of_the_chain(sample, agent_factory, token_file, tmp_path) -> None:
    bk, _ = sample
    from vmrestore.repository.reader import open_chain
    from vmrestore.repository.reference import restore_disk_py

    agent = agent_factory(bk.parent)
    expected = tmp_path / "full-ref.img"
    restore_disk_py(open_chain(bk / "full.vmrb"), 0, str(expected))
    out = tmp_path / "full.img"
    job = mover_job(agent.url(), token_file, out)
    job["point"] = "full.vmrb"
    res = run_proxy_mover(job)
    assert res.ok, res.errors
    assert filecmp.cmp(out, expected, shallow=False)


def test_wrong_token_is_refused_and_logged(sample, agent_factory, tmp_path) -> None:
    bk, _ = sample
    agent = agent_factory(bk.parent)
    with pytest.raises(AuthenticationError):
        connect(agent, token="not-the-right-token-at-all")
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-right-token-at-all")
    res = run_proxy_mover(mover_job(agent.url(), bad, tmp_path / "x.img"))
    assert res.exit_code == MoverError.exit_code and res.status == "failed"
    assert res.errors[0]["kind"] == "AuthenticationError"
    assert not (tmp_path / "x.img").exists()
    assert agent.wait_log("wrong token?): nothing served")


def test_agent_never_serves_before_auth(sample, agent_factory) -> None:
    """A client that skips the handshake gets nothing: its OPEN is a protocol violation."""
    bk, _ = sample
    agent = agent_factory(bk.parent)
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
    s.sendall(P.frame(T.OPEN, 1, b"vm1/full.vmrb"))
    fr = P.read_frame(s)
    assert fr.type == T.ERROR and P.Error.decode(fr.payload).code == E.BAD_MESSAGE
    assert s.recv(1) == b""  # closed
    s.close()


def test_named_clients(sample, tmp_path) -> None:
    bk, _ = sample
    from mover_helpers import AgentProc

    tf = tmp_path / "clients"
    tf.write_text(f"proxy1 {TOKEN}\nproxy2 other-token-000000000000\n")
    a = AgentProc(bk.parent, tf).start()
    try:
        connect(a, client="proxy1").close()
        with pytest.raises(AuthenticationError):
            connect(a, client="proxy2")  # right name, wrong token
        with pytest.raises(AuthenticationError):
            connect(a, client="stranger")  # unknown client
        assert a.wait_log("unknown client 'stranger'")
        assert a.wait_log("client 'proxy2' hung up after the challenge")
    finally:
        a.stop()


def test_paths_outside_root_and_non_backups_refused(sample, agent_factory, tmp_path) -> None:
    bk, _ = sample
    root = tmp_path / "root"
    (root / "vm1").mkdir(parents=True)
    for n in ("full.vmrb", "inc1.vmrb"):
        os.link(bk / n, root / "vm1" / n)
    (root / "notes.vmrb").write_bytes(b"x" * 10000)
    (root / "escape.vmrb").symlink_to(bk / "full.vmrb")  # leads outside the root
    agent = agent_factory(root)
    with connect(agent) as c:
        for rel, code in [("../repo/vm1/full.vmrb", E.REFUSED_PATH),
                          ("/etc/passwd", E.REFUSED_PATH),
                          ("escape.vmrb", E.REFUSED_PATH),
                          ("vm1/missing.vmrb", E.NOT_FOUND),
                          ("notes.vmrb", E.NOT_A_BACKUP),
                          ("vm1", E.NOT_A_BACKUP)]:
            with pytest.raises(RemoteError) as ei:
                c.open(rel)
            assert ei.value.code == code, rel
        with pytest.raises(RemoteError) as ei:
            c.list("..")
        assert ei.value.code == E.REFUSED_PATH
        assert c.list("vm1") == ["full.vmrb", "inc1.vmrb"]
        f = c.open("vm1/full.vmrb")  # the connection still works after refusals
        with pytest.raises(RemoteError) as ei:
            c.read(f, f.size - 10, 11)  # past the end
        assert ei.value.code == E.BAD_RANGE
        with pytest.raises(RemoteError) as ei:  # outside the stored data region
            c.receive_extents(c.request_extents(f, [(0, 100)]), [(0, 100)],
                              memoryview(bytearray(100)))
        assert ei.value.code == E.BAD_RANGE
        rid = c.send(T.READ, P.Read(f.handle, 0, P.MAX_READ + 1).encode())  # over-long
        with pytest.raises(RemoteError) as ei:
            c.reply(rid, T.DATA)
        assert ei.value.code == E.TOO_LARGE
        assert len(c.read(f, 0, 4096)) == 4096


def test_malformed_message_closes_only_that_connection(sample, agent_factory) -> None:
    bk, _ = sample
    agent = agent_factory(bk.parent)
    good = connect(agent)
    bad = connect(agent)
    bad.sock.sendall(struct.pack("<2sBBIII", b"VM", T.EXTENTS, 0, 9, 1 << 30, 0))  # oversized
    fr = P.read_frame(bad.sock)
    assert fr.type == T.ERROR and P.Error.decode(fr.payload).code == E.BAD_MESSAGE
    assert bad.sock.recv(1) == b""
    garbage = connect(agent)
    garbage.sock.sendall(b"\xff" * 64)
    assert P.read_frame(garbage.sock).type == T.ERROR
    f = good.open("vm1/full.vmrb")  # the other connection is unaffected
    assert good.read(f, 0, 8) == b"VMRBAK\r\n"
    good.close()
    assert agent.wait_log("protocol violation")


def test_several_clients_at_once(sample, agent_factory, token_file, tmp_path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    results = {}

    def one(i: int) -> None:
        out = tmp_path / f"r{i}.img"
        results[i] = (run_proxy_mover(mover_job(agent.url(), token_file, out,
                                                connections=2)), out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res, out in results.values():
        assert res.ok, res.errors
        assert filecmp.cmp(out, disk, shallow=False)


def test_bad_job_is_reported_as_json(tmp_path) -> None:
    p = run_cli("proxy-mover", input='{"source": {}, "disks": []}')
    assert p.returncode == 2
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines[0]["event"] == "error" and lines[-1]["event"] == "result"
    assert lines[-1]["exit_code"] == 2 and "job.source" in lines[0]["message"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    need_tool("openssl")
    cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=vmrestore-agent", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_restore_and_refusals(sample, agent_factory, token_file, tmp_path) -> None:
    bk, disk = sample
    cert, key = _self_signed(tmp_path)
    tls_agent = agent_factory(bk.parent, ["--tls-cert", str(cert), "--tls-key", str(key)])
    out = tmp_path / "tls.img"
    res = run_proxy_mover(mover_job(tls_agent.url(scheme="repos") + f"?ca={cert}",
                                    token_file, out))
    assert res.ok, (res.errors, res.stderr)
    assert filecmp.cmp(out, disk, shallow=False)
    done = res.result
    assert done is not None
    # A plain repo:// client still gets TLS from an agent that requires it.
    with connect(tls_agent) as c:
        assert c.tls and c.open("vm1/full.vmrb").size > 0
    with pytest.raises(AuthenticationError):
        connect(tls_agent, token="wrong-token-but-long-enough")
    # Asking for TLS from an agent without a certificate: refused, never plain text.
    plain = agent_factory(bk.parent)
    with pytest.raises(RemoteError, match="TLS"):
        connect(plain, url=plain.url(scheme="repos"))


def test_planning_reads_only_metadata(sample, agent_factory) -> None:
    bk, _ = sample
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    agent = agent_factory(bk.parent)
    with connect(agent) as c:
        chain = open_chain(RemoteSource(c, "vm1/inc1.vmrb"))
        plan = build_plan(chain, 0)
        assert plan.sources == ["vm1/full.vmrb", "vm1/inc1.vmrb"]
        stored = sum((bk / n).stat().st_size for n in ("full.vmrb", "inc1.vmrb"))
        assert c.wire_bytes < stored / 10
