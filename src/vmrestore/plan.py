"""The restore plan: what the core must do for one disk, as one numpy array.

Python decides, C moves bytes. The planner (repository side) resolves a
restore point's chain into one record per action; the core (ext/core) walks
the array with the GIL released. The record layout is a C struct, declared
identically in ext/core/pipeline.h (``struct vmr_plan_entry``); change both
together and bump PLAN_VERSION.

kind 0 (zero): the target range [dst_off, dst_off+length) must read as zeros.
               Adjacent zero blocks are merged into one run.
kind 1 (data): read ``stored_len`` bytes at ``src_off`` of source ``src``
               (index into the job's list of chain files), decompress with
               ``codec`` to exactly ``length`` bytes, check XXH3-128
               (xxh_lo, xxh_hi), then write them at ``dst_off``.
``block`` is the disk block index of the entry's first block (for errors
that name a block).
"""

from __future__ import annotations

import numpy as np

PLAN_VERSION = 1

KIND_ZERO = 0
KIND_DATA = 1

PLAN_DTYPE = np.dtype(
    [
        ("dst_off", "<u8"),
        ("length", "<u8"),
        ("src_off", "<u8"),
        ("xxh_lo", "<u8"),
        ("xxh_hi", "<u8"),
        ("block", "<u8"),
        ("stored_len", "<u4"),
        ("src", "<u2"),
        ("codec", "u1"),
        ("kind", "u1"),
    ]
)
assert PLAN_DTYPE.itemsize == 56


def compare_plan(plan: np.ndarray, block_size: int) -> np.ndarray:
    """The plan of a quick rollback (compare mode of the core): same work, finer grain.

    Zero runs are cut into ``block_size`` pieces, so that one non-zero block in
    a long run costs one block's zero request, not the run's; entries are put
    in disk order, so the target (read whole to compare) is read sequentially.
    Vector operations only: no loop per block.
    """
    bs = np.uint64(block_size)
    zero = plan[plan["kind"] == KIND_ZERO]
    data = plan[plan["kind"] != KIND_ZERO]
    pieces = ((zero["length"] + bs - np.uint64(1)) // bs).astype(np.int64)
    cut = np.repeat(zero, pieces)
    if len(cut):
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        k = (np.arange(len(cut), dtype=np.int64) - first).astype(np.uint64)
        rest = cut["length"] - k * bs
        cut["dst_off"] += k * bs
        cut["block"] += k
        cut["length"] = np.minimum(rest, bs)
    out = np.concatenate([data, cut])
    return out[np.argsort(out["dst_off"], kind="stable")]
