"""pytest-benchmark of planning: a 2 TiB disk of 1 MiB blocks over a 4-point chain.

    .venv/bin/python -m pytest bench/test_bench_plan.py --benchmark-only

The plan is built with a few vector passes (docs/design.md: about 0.5 s for
2 TiB); tests/test_plan.py checks that no Python loop runs per block, this
file measures the time.
"""

from __future__ import annotations

import numpy as np
import pytest

from vmrestore.repository import format as fmt
from vmrestore.repository.plan import plan_from_map

MIB = 1 << 20


@pytest.fixture(scope="module")
def two_tib_map() -> tuple:
    nblocks = 2 * 1024 * 1024
    rng = np.random.default_rng(3)
    kind = rng.choice([0, 1], nblocks, p=[0.4, 0.6]).astype(np.uint8)
    point = rng.integers(0, 4, nblocks).astype(np.uint16)
    extent = np.zeros(nblocks, np.uint64)
    tables = []
    for p in range(4):
        sel = np.flatnonzero((point == p) & (kind == 1))
        t = np.zeros(len(sel), fmt.EXTENT_DTYPE)
        t["offset"] = np.arange(len(sel), dtype=np.uint64) * MIB
        t["raw_len"] = MIB
        t["stored_len"] = MIB
        extent[sel] = rng.permutation(len(sel))
        tables.append(t)
    return kind, point, extent, tables, nblocks


def test_plan_two_tib(benchmark, two_tib_map) -> None:
    kind, point, extent, tables, nblocks = two_tib_map
    plan = benchmark.pedantic(plan_from_map, args=(kind, point, extent, tables, nblocks * MIB, MIB),
                              rounds=3, iterations=1)
    assert int(plan["length"].sum()) == nblocks * MIB
