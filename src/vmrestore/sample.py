"""Sample disks and a sample VM for demos, tests and benchmarks, deterministic from a seed.

A sample disk is made of blocks (1 MiB by default) of three kinds, in a fixed
mix: 40% zero, 30% text-like (words from a small vocabulary: compresses about
like logs or source code), 30% random (incompressible). The same seed gives
the same bytes on every machine. Everything is numpy; no per-byte Python.

API: ``block_kinds``, ``write_sample_disk``, ``change_blocks`` (for
incrementals), ``sample_vm_config``, ``write_sample_vm``. Command line:
``python -m vmrestore.sample --workdir DIR [--size 256M] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

import numpy as np

MIB = 1 << 20
KIND_ZERO, KIND_TEXT, KIND_RANDOM = 0, 1, 2
DEFAULT_MIX = (0.4, 0.3, 0.3)


def block_kinds(nblocks: int, seed: int, mix: tuple[float, float, float] = DEFAULT_MIX
                ) -> np.ndarray:
    """Kind of each block: exactly round(mix * n) zero and text blocks, shuffled."""
    rng = np.random.default_rng([seed, 1])
    nz = round(mix[0] * nblocks)
    nt = min(nblocks - nz, round(mix[1] * nblocks))
    kinds = np.full(nblocks, KIND_RANDOM, np.uint8)
    kinds[:nz] = KIND_ZERO
    kinds[nz:nz + nt] = KIND_TEXT
    return rng.permutation(kinds)


def _text_pool(seed: int, size: int) -> np.ndarray:
    """About ``size`` bytes of text-like data: words of a 2000-word vocabulary, lines."""
    rng = np.random.default_rng([seed, 2])
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    p = 1.0 / np.arange(1, 27)
    p /= p.sum()
    lengths = rng.integers(2, 11, 2000)
    words = [letters[rng.choice(26, n, p=p)].tobytes() for n in lengths]
    vocab_p = 1.0 / np.arange(1, 2001) ** 1.1
    vocab_p /= vocab_p.sum()
    idx = rng.choice(2000, size // 5, p=vocab_p)
    seps = rng.choice([b" ", b" ", b" ", b" ", b" ", b" ", b", ", b".\n"], len(idx))
    text = b"".join(w + s for w, s in zip([words[i] for i in idx], seps, strict=True))
    while len(text) < size:
        text += text
    return np.frombuffer(text[:size], np.uint8)


def _block_bytes(kind: int, rng: np.random.Generator, pool: np.ndarray, n: int) -> bytes:
    if kind == KIND_RANDOM:
        return rng.bytes(n)
    start = int(rng.integers(0, len(pool) - n))
    return pool[start:start + n].tobytes()


def _open_target(path: str, size: int) -> tuple[int, bool]:
    """Open for writing; a regular file is (re)created sparse, a block device kept."""
    if os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
        return os.open(path, os.O_WRONLY), False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return fd, True


def write_sample_disk(path: str, size: int, seed: int = 0, block_size: int = MIB,
                      mix: tuple[float, float, float] = DEFAULT_MIX) -> dict[str, int]:
    """Write a sample disk of ``size`` bytes (multiple of 512); returns blocks per kind."""
    if size % 512:
        raise ValueError(f"sample disk size {size} is not a multiple of 512")
    n = -(-size // block_size)
    kinds = block_kinds(n, seed, mix)
    pool = _text_pool(seed, max(4 * block_size, 8 * MIB))
    rng = np.random.default_rng([seed, 3])
    fd, sparse = _open_target(path, size)
    try:
        zero = bytes(block_size)
        for b in range(n):
            length = min(block_size, size - b * block_size)
            k = int(kinds[b])
            if k == KIND_ZERO:
                if not sparse:
                    os.pwrite(fd, zero[:length], b * block_size)
                continue
            os.pwrite(fd, _block_bytes(k, rng, pool, length), b * block_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    counts = np.bincount(kinds, minlength=3)
    return {"zero": int(counts[0]), "text": int(counts[1]), "random": int(counts[2])}


def change_blocks(path: str, count: int, seed: int, block_size: int = MIB) -> list[int]:
    """Overwrite ``count`` distinct blocks with new data (what an incremental must store).

    Half of the changes become text-like, the rest random; one in five becomes
    zero. Returns the changed block indices, sorted.
    """
    size = os.path.getsize(path) if not stat.S_ISBLK(os.stat(path).st_mode) else None
    fd = os.open(path, os.O_WRONLY)
    try:
        if size is None:
            size = os.lseek(fd, 0, os.SEEK_END)
        n = -(-size // block_size)
        rng = np.random.default_rng([seed, 4])
        blocks = np.sort(rng.choice(n, min(count, n), replace=False))
        pool = _text_pool(seed + 7919, max(4 * block_size, 8 * MIB))
        for i, b in enumerate(blocks):
            length = min(block_size, size - int(b) * block_size)
            if i % 5 == 4:
                data = bytes(length)
            else:
                data = _block_bytes(KIND_TEXT if i % 2 else KIND_RANDOM, rng, pool, length)
            os.pwrite(fd, data, int(b) * block_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return [int(b) for b in blocks]


def sample_vm_config(name: str, capacities: list[int], seed: int = 0) -> dict[str, Any]:
    """A VM configuration (docs/format.md) for the sample disks.

    Disk 0 is thick-eager, every other disk thin; one vmxnet3 NIC on "VM Network".
    """
    rng = np.random.default_rng([seed, 5])
    mac = "00:50:56:" + ":".join(f"{int(x):02x}" for x in rng.integers(0, 256, 3))
    return {
        "name": name, "guest_id": "otherLinux64Guest", "num_cpus": 2, "memory_mb": 2048,
        "firmware": "bios",
        "disks": [{"index": i, "label": f"Hard disk {i + 1}", "controller": "pvscsi", "bus": 0,
                   "unit": i, "capacity": cap,
                   "provisioning": "thick-eager" if i == 0 else "thin",
                   "datastore": "datastore1"} for i, cap in enumerate(capacities)],
        "nics": [{"label": "Network adapter 1", "type": "vmxnet3", "network": "VM Network",
                  "mac": mac}],
    }


def write_sample_vm(workdir: str, size: int = 256 * MIB, seed: int = 1, disks: int = 2,
                    name: str = "sample-vm") -> tuple[list[str], str]:
    """Sample disks ``disk0.img``.. and ``vm.json`` in workdir; returns (disk paths, config)."""
    os.makedirs(workdir, exist_ok=True)
    paths = []
    for i in range(disks):
        p = os.path.join(workdir, f"disk{i}.img")
        write_sample_disk(p, size, seed=seed * 1000 + i)
        paths.append(p)
    cfg_path = os.path.join(workdir, "vm.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(sample_vm_config(name, [size] * disks, seed), f, indent=2)
    return paths, cfg_path


def main(argv: list[str] | None = None) -> int:
    from vmrestore.commands.backup import parse_size

    ap = argparse.ArgumentParser(prog="python -m vmrestore.sample",
                                 description="Write a sample VM (disks + vm.json) to a directory.")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", default="256M", help="size of each disk (default 256M)")
    ap.add_argument("--disks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="sample-vm")
    a = ap.parse_args(argv)
    paths, cfg = write_sample_vm(a.workdir, parse_size(a.size), a.seed, a.disks, a.name)
    print("\n".join([*paths, cfg]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
