"""Helpers and fixtures of the plan tests (tests/fleet/): a 3-proxy lab, sample backups.

``fleet_lab`` is its own lab (one per session; the session lab has one proxy VM), each
proxy VM with a network namespace for its worker (``lab.raw["proxy_netns"]``);
``fleet_backups`` are four sample VMs of 2-4 disks of 64-256 MiB, mostly zero
(so a 20-VM plan moves a few hundred MiB of data), backed up once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import need, need_root, need_tool

MiB = 1 << 20
# Disk sizes of the four sample VMs (2, 3, 4 and 3 disks).
SHAPES = {"a": (64, 256), "b": (128, 64, 192), "c": (64, 96, 128, 256), "d": (256, 64, 128)}


@dataclass
class SampleVm:
    name: str
    backup: Path
    images: list[Path]


@pytest.fixture(scope="session")
def fleet_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from vmrestore.lab import lab as labmod
    from vmrestore.lab.build import GOVMOMI_SIM
    from vmrestore.lab.client import load_lab

    need_root()
    need_tool("go", "nbdkit", "losetup", "mkfs.ext4", "mount")
    need(GOVMOMI_SIM.is_dir(), "govmomi sources missing (golang-github-vmware-govmomi-dev)")
    d: Path = tmp_path_factory.mktemp("fleetlab")
    try:
        need_tool("ip")
        labmod.up(d, hosts=4, proxies=3, datastores=1, san_size=128 << 20, netns=True)
        yield load_lab(d)
    finally:
        labmod.down(d)


@pytest.fixture(scope="session")
def fleet_backups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SampleVm]:
    from vmrestore.sample import sample_vm_config, write_sample_disk

    root = tmp_path_factory.mktemp("fleet-backups")
    out = {}
    for seed, (name, sizes) in enumerate(SHAPES.items(), start=1):
        d = root / name
        d.mkdir()
        images = []
        for i, mib in enumerate(sizes):
            p = d / f"disk{i}.img"
            write_sample_disk(str(p), mib * MiB, seed=seed * 100 + i, mix=(0.94, 0.03, 0.03))
            images.append(p)
        cfg = d / "vm.json"
        cfg.write_text(json.dumps(sample_vm_config(name, [m * MiB for m in sizes], seed)))
        subprocess.run([sys.executable, "-m", "vmrestore", "backup", "create",
                        *[a for p in images for a in ("--disk", str(p))], "--vm-config",
                        str(cfg), "-o", str(d / "full.vmrb"), "-q"], check=True)
        out[name] = SampleVm(name, d / "full.vmrb", images)
    return out


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte equality of two (sparse) files, reading only where either has data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    size = a.stat().st_size
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        ranges = sorted(_data_ranges(fa, size) + _data_ranges(fb, size))
        pos = 0
        for start, end in ranges:
            start = max(start, pos)
            while start < end:
                n = min(end - start, 8 << 20)
                if os.pread(fa, n, start) != os.pread(fb, n, start):
                    return False
                start += n
            pos = max(pos, end)
        return True
    finally:
        os.close(fa)
        os.close(fb)
