"""Helpers for the repository tests (format, backup, chain, plan, verify): disks and backups."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmrestore.repository.create import create_backup
from vmrestore.repository.reader import open_chain, open_point
from vmrestore.repository.reference import restore_disk_py

MIB = 1 << 20


def make_disk(path: Path, size: int, seed: int, block_size: int = MIB,
              zero_every: int = 3) -> bytes:
    """A disk with zero blocks, random blocks, compressible blocks and a repeated block."""
    rng = np.random.default_rng(seed)
    buf = np.zeros(size, np.uint8)
    nblocks = -(-size // block_size)
    for b in range(nblocks):
        start = b * block_size
        end = min(size, start + block_size)
        if b % zero_every == 0:
            continue
        if b % 2:
            buf[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8)
        else:
            buf[start:end] = np.frombuffer((b"log line %d " % b) * (block_size // 8 + 1),
                                           np.uint8)[: end - start]
    if nblocks > 4:  # a repeat: block 4 = block 1 (dedup)
        n = min(size - 4 * block_size, block_size)
        buf[4 * block_size:4 * block_size + n] = buf[block_size:block_size + n]
    data = buf.tobytes()
    path.write_bytes(data)
    return data


def flip_byte(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def restored(backup: Path | str, disk: int, out: Path) -> bytes:
    chain = open_chain(backup)
    try:
        restore_disk_py(chain, disk, str(out))
    finally:
        chain.close()
    return out.read_bytes()


def backup(disks: list[Path], out: Path, **kw) -> dict:
    return create_backup([str(d) for d in disks], str(out), **kw)


def extent_offset(backup_path: Path | str, index: int = 0) -> int:
    p = open_point(backup_path)
    try:
        return int(p.extents["offset"][index])
    finally:
        p.close()


__all__ = ["MIB", "backup", "extent_offset", "flip_byte", "make_disk", "restored"]
