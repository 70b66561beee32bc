"""Agent and proxy on two "hosts": network namespaces joined by a veth pair (10.x inside only)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from mover_helpers import AgentProc, mover_job

from support import need, need_root, need_tool
from vmrestore.mover.launcher import ProxyMover

SUBNET = "10.231.{}.{}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """(repo namespace, proxy namespace, repo address); removed after the test."""
    need_root()
    need_tool("ip")
    tag = f"vmrh6{os.getpid() % 100000}"
    repo_ns, proxy_ns = f"{tag}r", f"{tag}p"
    net = os.getpid() % 250 + 1
    made: list[str] = []
    try:
        for ns in (repo_ns, proxy_ns):
            r = _ip("netns", "add", ns)
            need(r.returncode == 0, f"cannot create network namespaces: {r.stderr.strip()}")
            made.append(ns)
        r = _ip("link", "add", f"{tag}a", "netns", repo_ns, "type", "veth", "peer", "name",
                f"{tag}b", "netns", proxy_ns)
        need(r.returncode == 0, f"cannot create a veth pair: {r.stderr.strip()}")
        for ns, dev, host in ((repo_ns, f"{tag}a", 1), (proxy_ns, f"{tag}b", 2)):
            for cmd in (["addr", "add", SUBNET.format(net, host) + "/24", "dev", dev],
                        ["link", "set", dev, "up"], ["link", "set", "lo", "up"]):
                r = _ip("-n", ns, *cmd)
                assert r.returncode == 0, r.stderr
        yield repo_ns, proxy_ns, SUBNET.format(net, 1)
    finally:
        for ns in made:
            _ip("netns", "del", ns)


def test_restore_across_namespaces(sample, token_file, tmp_path, two_hosts) -> None:
    bk, disk = sample
    repo_ns, proxy_ns, addr = two_hosts
    agent = AgentProc(bk.parent, token_file, prefix=["ip", "netns", "exec", repo_ns],
                      host=addr).start()
    try:
        out = tmp_path / "r.img"
        argv = ["ip", "netns", "exec", proxy_ns, sys.executable, "-m", "vmrestore",
                "proxy-mover"]
        with ProxyMover(mover_job(agent.url(), token_file, out), argv=argv) as pm:
            events = list(pm.events())
        res = pm.result
        assert res is not None and res.ok, (res.errors, res.stderr)
        assert filecmp.cmp(out, disk, shallow=False)
        done = next(e for e in events if e["event"] == "disk_done")
        assert done["wire_bytes"] < done["bytes_written"]
        # The agent saw the proxy's namespace address (not loopback): two "hosts" really.
        peer = addr.rsplit(".", 1)[0] + ".2:"
        assert agent.wait_log(f"from {peer}")
    finally:
        agent.stop()
