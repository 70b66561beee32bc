"""One network namespace per proxy VM of the lab, so each proxy worker is its own "host".

``vmrestore lab up --proxies N --netns`` gives proxy i a namespace joined to
this one by a veth pair: ``10.232.K.(4i+1)`` on this side, ``10.232.K.(4i+2)``
inside, a default route back, loopback up. A proxy worker started inside
(``ip netns exec NS vmrestore proxy-worker --scheduler tcp://10.232.K.1:PORT``)
reaches the scheduler only through its veth; the disks it writes it reaches
as a proxy does in the lab: hot-added devices and NBD unix sockets (paths, so
visible in every namespace). K is the first /24 of 10.232.0.0/16 no interface
of this machine uses, so labs coexist. ``lab down`` deletes the namespaces
(their veth ends go with them).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from vmrestore.errors import LabError

PREFIX = "10.232"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p


def _free_subnet() -> int:
    used = _ip("-4", "-o", "addr", "show").stdout
    for k in range(256):
        if f" {PREFIX}.{k}." not in used:
            return k
    raise LabError(f"no free /24 left in {PREFIX}.0.0/16 for the lab's proxy namespaces")


def make(lab_dir: Path, proxies: list[str], record: Any) -> dict[str, dict[str, str]]:
    """Create a namespace per proxy; ``record(name)`` is called before each is made."""
    tag = hashlib.sha256(str(lab_dir).encode()).hexdigest()[:5]
    k = _free_subnet()
    out: dict[str, dict[str, str]] = {}
    for i, proxy in enumerate(proxies):
        ns, here, there = f"vmr{tag}p{i}", f"vmr{tag}{i}a", f"vmr{tag}{i}b"
        host_ip, ip = f"{PREFIX}.{k}.{4 * i + 1}", f"{PREFIX}.{k}.{4 * i + 2}"
        record(ns)
        _ip("netns", "add", ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", here)
        _ip("link", "set", here, "up")
        for cmd in (["addr", "add", f"{ip}/30", "dev", there], ["link", "set", there, "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", host_ip]):
            _ip("-n", ns, *cmd)
        out[proxy] = {"netns": ns, "ip": ip, "host_ip": host_ip}
    return out


def remove(names: list[str], actions: list[str]) -> None:
    for ns in names:
        with contextlib.suppress(LabError):
            if _ip("netns", "del", ns, check=False).returncode == 0:
                actions.append(f"deleted network namespace {ns}")


def scheduler_address(lab_doc: dict[str, Any]) -> str | None:
    """The address every proxy namespace reaches this machine at (for a scheduler)."""
    nets = lab_doc.get("proxy_netns") or {}
    first = next(iter(nets.values()), None)
    return first["host_ip"] if first else None
