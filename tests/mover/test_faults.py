"""Faults between the movers: agent killed and restarted, bytes flipped on the wire, bad data."""

from __future__ import annotations

import filecmp
import socket
import threading
import time
from pathlib import Path

from mover_helpers import copy_with_bad_extent, mover_job

from vmrestore.mover.launcher import ProxyMover


class FlippingRelay:
    """A TCP relay between proxy and agent that flips one byte of the agent's stream, once.

    The byte at `at` of the first connection that carries that many bytes is
    XORed: deep enough to fall in the stored extents of a data connection.
    """

    def __init__(self, agent_port: int, at: int, times: int = 1) -> None:
        self.agent_port = agent_port
        self.at = at
        self.left = times
        self.lock = threading.Lock()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.flipped = 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            a = socket.create_connection(("127.0.0.1", self.agent_port))
            self.socks += [c, a]
            threading.Thread(target=self._pump, args=(c, a, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(a, c, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if flip and seen <= self.at < seen + len(data):
                    with self.lock:
                        if self.left > 0:
                            self.left -= 1
                            self.flipped += 1
                            b = bytearray(data)
                            b[self.at - seen] ^= 0x10
                            data = bytes(b)
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            s.close()


def test_agent_killed_and_restarted_mid_restore(sample, agent_factory, token_file,
                                                tmp_path: Path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent, ["--bwlimit", "4"])  # 4 MB/s: a few seconds of data
    out = tmp_path / "r.img"
    job = mover_job(agent.url(), token_file, out, connections=2, retries=8)
    killed = False
    events = []
    with ProxyMover(job) as pm:
        for ev in pm.events():
            events.append(ev)
            if not killed and ev["event"] == "progress" and ev["completed_prefix"] > 0:
                agent.kill()
                killed = True
                time.sleep(0.5)
                agent.start()  # same port
    res = pm.result
    assert killed, "the restore finished before the agent could be killed"
    assert res is not None and res.ok, (res.errors if res else None, res.stderr if res else "")
    assert filecmp.cmp(out, disk, shallow=False)
    done = next(e for e in events if e["event"] == "disk_done")
    assert done["reconnects"] >= 1
    assert done["bytes_written"] + done["bytes_skipped"] == done["capacity"]


def test_agent_gone_for_good_is_a_clear_error(sample, agent_factory, token_file, tmp_path) -> None:
    bk, _ = sample
    agent = agent_factory(bk.parent, ["--bwlimit", "4"])
    job = mover_job(agent.url(), token_file, tmp_path / "r.img", connections=1, retries=2)
    with ProxyMover(job) as pm:
        for ev in pm.events():
            if ev["event"] == "progress" and ev["completed_prefix"] > 0 and agent.proc:
                agent.kill()
                agent.proc = None
    res = pm.result
    assert res is not None and res.exit_code == 7 and res.status == "failed"
    assert res.errors[0]["kind"] == "TransportError"
    assert "reconnects failed" in res.errors[0]["message"] or "cannot reach" in res.errors[0][
        "message"]


def test_flipped_byte_on_the_wire_is_refetched(sample, agent_factory, token_file,
                                               tmp_path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    relay = FlippingRelay(agent.port, at=300_000)
    try:
        out = tmp_path / "r.img"
        url = f"repo://127.0.0.1:{relay.port}/vm1/inc1.vmrb"
        with ProxyMover(mover_job(url, token_file, out, connections=1)) as pm:
            events = list(pm.events())
        res = pm.result
        assert res is not None and res.ok, (res.errors, res.stderr)
        assert relay.flipped == 1
        assert filecmp.cmp(out, disk, shallow=False)
        done = next(e for e in events if e["event"] == "disk_done")
        assert done["refetches"] + done["reconnects"] >= 1
    finally:
        relay.close()


def test_bad_stored_data_is_reported_with_block(sample, agent_factory, token_file,
                                                tmp_path) -> None:
    bk, _ = sample
    root = tmp_path / "root" / "vm1"
    e = copy_with_bad_extent(bk, root, 3)
    agent = agent_factory(root.parent)
    with ProxyMover(mover_job(agent.url(), token_file, tmp_path / "r.img")) as pm:
        list(pm.events())
    res = pm.result
    assert res is not None and res.exit_code == 4, (res.errors, res.stderr)
    msg = res.errors[0]["message"]
    assert f"block {int(e['block'])}" in msg and "disk 0" in msg
