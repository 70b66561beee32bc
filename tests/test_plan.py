"""The plan builder: covers every disk byte once, reads sequentially, stays vectorised."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from repo_helpers import MIB, backup, make_disk
from vmrestore.plan import KIND_DATA, KIND_ZERO, PLAN_DTYPE
from vmrestore.repository import format as fmt
from vmrestore.repository.plan import build_plan, plan_from_map
from vmrestore.repository.reader import open_chain


def _check_cover(plan: np.ndarray, capacity: int) -> None:
    """Entries, sorted by destination, tile [0, capacity) with no gap and no overlap."""
    order = np.argsort(plan["dst_off"], kind="stable")
    dst = plan["dst_off"][order]
    length = plan["length"][order]
    assert dst[0] == 0
    assert np.array_equal(dst[1:], (dst + length)[:-1])
    assert int(dst[-1] + length[-1]) == capacity


def _fake_map(nblocks: int, npoints: int, seed: int):
    rng = np.random.default_rng(seed)
    kind = rng.choice([0, 1], nblocks, p=[0.4, 0.6]).astype(np.uint8)
    point = rng.integers(0, npoints, nblocks).astype(np.uint16)
    tables = []
    extent = np.zeros(nblocks, np.uint64)
    for p in range(npoints):
        sel = np.flatnonzero((point == p) & (kind == 1))
        t = np.zeros(len(sel), fmt.EXTENT_DTYPE)
        t["offset"] = 4096 + np.arange(len(sel), dtype=np.uint64) * 500_000
        t["stored_len"] = 400_000
        t["raw_len"] = MIB
        t["codec"] = 2
        t["xxh"][:, 0] = np.arange(len(sel))
        extent[sel] = rng.permutation(len(sel))  # blocks reference extents in random order
        tables.append(t)
    return kind, point, extent, tables


def _python_lines(fn) -> int:
    """Python lines executed by fn(): constant for vectorised code, whatever the disk size."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_two_terabyte_disk_plans_without_a_python_loop_per_block() -> None:
    """Planning cost must not grow with blocks in Python: a 2 TiB disk runs the
    same Python lines as a 4 MiB one (the time itself is a benchmark's business)."""
    nblocks = 2 * 1024 * 1024  # 2 TiB of 1 MiB blocks
    kind, point, extent, tables = _fake_map(nblocks, 4, seed=3)
    plan = plan_from_map(kind, point, extent, tables, nblocks * MIB, MIB)
    assert plan.dtype == PLAN_DTYPE
    data = plan[plan["kind"] == KIND_DATA]
    assert len(data) == int((kind == 1).sum())
    _check_cover(plan, nblocks * MIB)
    # Reads in (src, src_off) order.
    key = data["src"].astype(np.uint64) << np.uint64(48) | data["src_off"]
    assert np.all(np.diff(key.astype(np.int64)) >= 0)

    small = _fake_map(4, 4, seed=3)
    lines_small = _python_lines(lambda: plan_from_map(*small, 4 * MIB, MIB))
    big = (kind, point, extent, tables)
    lines_big = _python_lines(lambda: plan_from_map(*big, nblocks * MIB, MIB))
    assert lines_big <= lines_small + 16, (lines_small, lines_big)


def test_zero_runs_are_merged_and_the_last_block_is_short() -> None:
    kind = np.array([0, 0, 1, 0, 0, 0, 1, 0], np.uint8)
    point = np.zeros(8, np.uint16)
    extent = np.zeros(8, np.uint64)
    extent[[2, 6]] = [1, 0]
    t = np.zeros(2, fmt.EXTENT_DTYPE)
    t["offset"] = [4096, 8192]
    t["raw_len"] = 65536
    capacity = 7 * 65536 + 512
    plan = plan_from_map(kind, point, extent, [t], capacity, 65536)
    zeros = plan[plan["kind"] == KIND_ZERO]
    assert zeros["block"].tolist() == [0, 3, 7]
    assert zeros["length"].tolist() == [2 * 65536, 3 * 65536, 512]
    data = plan[plan["kind"] == KIND_DATA]
    assert data["block"].tolist() == [6, 2]  # sorted by src_off, not by block
    _check_cover(plan, capacity)


def test_plan_of_a_real_chain(tmp_path: Path) -> None:
    size = 9 * 64 * 1024 + 1024
    make_disk(tmp_path / "d.img", size, seed=5, block_size=64 * 1024)
    backup([tmp_path / "d.img"], tmp_path / "full.vmrb", block_size=64 * 1024)
    chain = open_chain(tmp_path / "full.vmrb")
    dp = build_plan(chain, 0)
    assert dp.sources == [str(tmp_path / "full.vmrb")]
    assert (dp.capacity, dp.block_size) == (size, 64 * 1024)
    assert dp.data_bytes + dp.zero_bytes == size
    _check_cover(dp.plan, size)
    data = dp.plan[dp.plan["kind"] == KIND_DATA]
    # Block 4 repeats block 1: same extent, adjacent entries.
    src_off = {int(b): int(o) for b, o in zip(data["block"], data["src_off"], strict=True)}
    assert src_off[4] == src_off[1]
    assert np.all(data["length"] == np.minimum(64 * 1024, size - data["dst_off"]))
