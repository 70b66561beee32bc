"""Quick rollback in the core: the compare stage (ext/core/compare.c) over file, NBD and a
loop device, the compare plan, refusals, and the compare path under ASan."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from core_helpers import (
    ASAN_OPTIONS,
    MiB,
    backup,
    build_asan_driver,
    loop_device,
    make_image,
    nbdkit,
    synth_plan,
)
from vmrestore.errors import TargetError, UsageError
from vmrestore.plan import KIND_DATA, KIND_ZERO, PLAN_DTYPE, compare_plan
from vmrestore.restore_disk import restore_disk

BLOCKS = 24


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    tmp = tmp_path_factory.mktemp("qr")
    data = make_image(tmp / "disk.img", BLOCKS, seed=5)
    return data, backup(tmp / "disk.img", tmp / "b.vmrb")


def _drift(data: bytes, seed: int = 1) -> tuple[bytearray, set[int]]:
    """The disk after some time: a few random writes plus a silently corrupted range.

    Returns the changed image and the set of block indexes that changed.
    """
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    changed = set()
    for blk in rng.choice(BLOCKS, 3, replace=False):
        off = int(blk) * MiB + int(rng.integers(0, MiB - 4096))
        b[off:off + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        changed.add(int(blk))
    # a range flipped under the guest (no write it knows about), across a block boundary
    start = 11 * MiB - 700
    b[start:start + 1400] = bytes(x ^ 0x5A for x in b[start:start + 1400])
    changed |= {10, 11}
    return b, changed


def _check(r, changed: set[int], data: bytes, target: Path) -> None:
    assert r.quick_rollback
    assert r.compared_entries == BLOCKS
    assert r.differing_entries == len(changed)
    assert r.bytes_written + r.bytes_zeroed == len(changed) * MiB
    assert r.bytes_same == (BLOCKS - len(changed)) * MiB
    assert target.read_bytes() == data


def test_compare_plan_cuts_zero_runs_and_sorts_by_offset() -> None:
    plan = np.zeros(3, PLAN_DTYPE)
    plan[0] = (8 * MiB, MiB, 0, 1, 2, 8, 100, 0, 2, KIND_DATA)
    plan[1] = (0, 3 * MiB + 512, 0, 0, 0, 0, 0, 0, 0, KIND_ZERO)
    plan[2] = (5 * MiB, MiB, 100, 3, 4, 5, 100, 0, 2, KIND_DATA)
    out = compare_plan(plan, MiB)
    assert list(out["dst_off"]) == [0, MiB, 2 * MiB, 3 * MiB, 5 * MiB, 8 * MiB]
    assert list(out["length"]) == [MiB, MiB, MiB, 512, MiB, MiB]
    assert list(out["block"]) == [0, 1, 2, 3, 5, 8]
    assert list(out["kind"]) == [KIND_ZERO] * 4 + [KIND_DATA] * 2
    assert int(out["length"].sum()) == int(plan["length"].sum())


def test_file_target_only_differing_blocks_written(tmp_path: Path,
                                                   point: tuple[bytes, Path]) -> None:
    data, bk = point
    changed, blocks = _drift(data)
    target = tmp_path / "t.img"
    target.write_bytes(changed)
    r = restore_disk(str(bk), 0, str(target), compare=True)
    _check(r, blocks, data, target)
    assert r.compare_read_bytes == BLOCKS * MiB  # a full copy has no holes to skip
    again = restore_disk(str(bk), 0, str(target), compare=True)
    assert again.differing_entries == 0 and again.bytes_written == again.bytes_zeroed == 0


def test_nbd_target_with_holes(tmp_path: Path, point: tuple[bytes, Path]) -> None:
    """Over NBD; the target's zero runs are holes, answered by block status (not read)."""
    data, bk = point
    changed, blocks = _drift(data, seed=2)
    target = tmp_path / "t.img"
    with open(target, "wb") as f:  # sparse where the disk is zero
        for i in range(BLOCKS):
            blk = bytes(changed[i * MiB:(i + 1) * MiB])
            if blk.count(0) != MiB:
                f.seek(i * MiB)
                f.write(blk)
        f.truncate(len(changed))
    with nbdkit(tmp_path, target) as srv:
        r = restore_disk(str(bk), 0, srv.uri, compare=True)
    _check(r, blocks, data, target)
    zero_blocks = sum(1 for i in range(BLOCKS) if data[i * MiB:(i + 1) * MiB].count(0) == MiB
                      and i not in blocks)
    assert r.known_zero_bytes == zero_blocks * MiB
    assert r.compare_read_bytes == (BLOCKS - zero_blocks) * MiB


def test_loop_device_target(tmp_path: Path, point: tuple[bytes, Path]) -> None:
    """HotAdd's read side: the loop device read with O_DIRECT sees writes made to its file."""
    data, bk = point
    backing = tmp_path / "flat.img"
    backing.write_bytes(data)
    with loop_device(backing) as dev:
        changed, blocks = _drift(data, seed=3)
        backing.write_bytes(changed)  # straight into the datastore file, under the device
        r = restore_disk(str(bk), 0, dev, compare=True)
    _check(r, blocks, data, backing)


def test_refusals(tmp_path: Path, point: tuple[bytes, Path]) -> None:
    _data, bk = point
    with pytest.raises(TargetError, match="does not exist"):
        restore_disk(str(bk), 0, str(tmp_path / "missing.img"), compare=True)
    (tmp_path / "t.img").write_bytes(bytes(BLOCKS * MiB))
    with pytest.raises(UsageError, match="target-zeroed"):
        restore_disk(str(bk), 0, str(tmp_path / "t.img"), compare=True, target_zeroed=True)


def test_cli_quick_rollback_json(tmp_path: Path, point: tuple[bytes, Path]) -> None:
    import json
    import sys

    data, bk = point
    changed, blocks = _drift(data, seed=4)
    target = tmp_path / "t.img"
    target.write_bytes(changed)
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--to", str(target), "--quick-rollback", "--json", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["differing_entries"] == len(blocks) and doc["compared_entries"] == BLOCKS
    assert target.read_bytes() == data


@pytest.mark.slow
def test_compare_under_asan(tmp_path: Path) -> None:
    """Compare mode of the C pipeline under ASan+LSan: file and NBD read sides."""
    data = make_image(tmp_path / "disk.img", 20, block_size=256 * 1024, seed=42, tail=512)
    plan = synth_plan(data, tmp_path / "src.bin", block_size=256 * 1024)
    plan = compare_plan(plan, 256 * 1024)
    (tmp_path / "plan.bin").write_bytes(plan.tobytes())
    exe = build_asan_driver(tmp_path)
    env = {**os.environ, "ASAN_OPTIONS": ASAN_OPTIONS, "VMR_ASAN_COMPARE": "1"}
    bad = bytearray(data)
    bad[5 * 256 * 1024 + 7] ^= 1
    bad[0:4096] = b"\x07" * 4096  # block 0 is a zero block
    bad[-10:] = b"x" * 10         # the short tail block
    common = [str(tmp_path / "plan.bin"), str(tmp_path / "src.bin")]
    target = tmp_path / "o.img"
    target.write_bytes(bad)
    r = subprocess.run([str(exe), *common, str(target), str(len(data))],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "differ=3" in r.stdout, r.stdout
    assert target.read_bytes() == data
    shutil.copy(tmp_path / "o.img", tmp_path / "n.img")
    (tmp_path / "n.img").write_bytes(bad)
    with nbdkit(tmp_path, tmp_path / "n.img") as srv:
        r = subprocess.run([str(exe), *common, "-", str(len(data)), "-1", srv.uri],
                           capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "differ=3" in r.stdout, r.stdout
    assert (tmp_path / "n.img").read_bytes() == data
    assert "ERROR: AddressSanitizer" not in r.stderr


def test_san_target_read_at_its_extents(tmp_path: Path, point: tuple[bytes, Path]) -> None:
    """SAN's read side: the LUN is read where the extent map says (shuffled, in 2 MiB pieces
    that straddle blocks), and only the blocks that differ are written back there."""
    from vmrestore.transport.uri import write_extent_map

    data, bk = point
    changed, blocks = _drift(data, seed=5)
    lun = tmp_path / "lun.img"
    piece = 2 * MiB
    n = len(data) // piece
    order = list(np.random.default_rng(9).permutation(n))
    ext = [(i * piece, (int(order[i]) + 1) * piece, piece) for i in range(n)]
    raw = bytearray(b"\xee" * ((n + 1) * piece))
    for v, lo, ln in ext:
        raw[lo:lo + ln] = changed[v:v + ln]
    lun.write_bytes(bytes(raw))
    map_path = tmp_path / "map.json"
    write_extent_map(map_path, str(lun), len(data), ext)
    r = restore_disk(str(bk), 0, f"san:{lun}?map={map_path}", compare=True)
    assert r.compared_entries == BLOCKS and r.differing_entries == len(blocks)
    out = lun.read_bytes()
    for v, lo, ln in ext:
        assert out[lo:lo + ln] == data[v:v + ln]
    assert out[:piece] == b"\xee" * piece  # outside the map: untouched
