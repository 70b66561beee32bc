"""Build the restore plan of one disk from a chain: a few vector operations, no loop per block.

``build_plan(chain, disk) -> DiskPlan``. The plan (``vmrestore.plan.PLAN_DTYPE``)
holds first the zero runs (adjacent zero blocks merged, in disk order), then
the data entries sorted by (src, src_off) so each chain file is read
sequentially; blocks deduplicated onto one extent appear as entries with the
same (src, src_off), next to each other. ``src`` indexes ``DiskPlan.sources``,
which is the chain's file list (index = depth). Together the entries cover
the disk exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmrestore.plan import KIND_DATA, KIND_ZERO, PLAN_DTYPE
from vmrestore.repository import format as fmt
from vmrestore.repository.reader import Chain


@dataclass
class DiskPlan:
    """What the core must do to restore one disk.

    ``sources[i]`` is the path of chain file i (plan field ``src``); ``plan`` is
    a PLAN_DTYPE array; ``data_bytes``/``zero_bytes`` are the raw bytes the data
    entries and the zero runs cover (their sum is ``capacity``).
    """

    sources: list[str]
    plan: np.ndarray
    capacity: int
    block_size: int
    data_bytes: int
    zero_bytes: int
    disk: int = 0

    @property
    def data_entries(self) -> int:
        return int(np.count_nonzero(self.plan["kind"] == KIND_DATA))


def plan_from_map(kind: np.ndarray, point: np.ndarray, extent: np.ndarray,
                  extent_tables: list[np.ndarray], capacity: int,
                  block_size: int) -> np.ndarray:
    """The plan array from a resolved map (see Chain.resolved_map) and each point's extents."""
    n = len(kind)
    bs = np.uint64(block_size)
    cap = np.uint64(capacity)

    # Zero runs: starts where a zero block follows a non-zero one (or block 0).
    is_zero = kind == fmt.BLOCK_ZERO
    edges = np.diff(is_zero.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1).astype(np.uint64)
    ends = np.flatnonzero(edges == -1).astype(np.uint64)
    zeros = np.zeros(len(starts), PLAN_DTYPE)
    zeros["kind"] = KIND_ZERO
    zeros["block"] = starts
    zeros["dst_off"] = starts * bs
    zeros["length"] = np.minimum(ends * bs, cap) - starts * bs

    # Data entries: gather columns first (contiguous arrays are fast), sort once, then fill.
    blocks = np.flatnonzero(kind == fmt.BLOCK_DATA)
    pts = point[blocks]
    exts = extent[blocks]
    src_off = np.zeros(len(blocks), np.uint64)
    stored_len = np.zeros(len(blocks), np.uint32)
    codec = np.zeros(len(blocks), np.uint8)
    xxh = np.zeros((len(blocks), 2), np.uint64)
    for i, table in enumerate(extent_tables):
        sel = np.flatnonzero(pts == i) if len(extent_tables) > 1 else slice(None)
        e = exts[sel]
        src_off[sel] = table["offset"][e]
        stored_len[sel] = table["stored_len"][e]
        codec[sel] = table["codec"][e]
        xxh[sel] = table["xxh"][e]
    # (src, src_off) fits one u64 key: offsets are < 2**48 (256 TiB files); stable sort keeps
    # the blocks of a deduplicated extent in disk order.
    order = np.argsort((pts.astype(np.uint64) << np.uint64(48)) | src_off, kind="stable")
    blocks = blocks[order].astype(np.uint64)
    data = np.empty(len(blocks), PLAN_DTYPE)
    data["kind"] = KIND_DATA
    data["block"] = blocks
    data["dst_off"] = blocks * bs
    data["length"] = np.minimum(bs, cap - blocks * bs)
    data["src"] = pts[order]
    data["src_off"] = src_off[order]
    data["stored_len"] = stored_len[order]
    data["codec"] = codec[order]
    data["xxh_lo"] = xxh[order, 0]
    data["xxh_hi"] = xxh[order, 1]
    out = np.concatenate([zeros, data])
    assert n == 0 or len(out) > 0
    return out


def build_plan(chain: Chain, disk: int) -> DiskPlan:
    """The plan to restore ``disk`` as it is at the chain's last point."""
    info = chain.disk(disk)
    point, extent, kind = chain.resolved_map(disk)
    capacity, block_size = int(info["capacity"]), int(info["block_size"])
    plan = plan_from_map(kind, point, extent, [p.extents for p in chain.points], capacity,
                         block_size)
    is_data = plan["kind"] == KIND_DATA
    data_bytes = int(plan["length"][is_data].sum())
    return DiskPlan(sources=chain.paths, plan=plan, capacity=capacity, block_size=block_size,
                    data_bytes=data_bytes, zero_bytes=capacity - data_bytes, disk=disk)
