"""Shared fixtures of the bench/ suites (pytest-benchmark per stage, run with `pytest bench`).

Sizes stay small by default so the suites are quick on a shared machine;
set VMRESTORE_BENCH_SIZE (e.g. 1G) for real numbers. The skip/fail helpers
are the test suite's own (tests/support.py), so a missing tool skips locally
and fails in CI exactly as in tests/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # `from support import need` works from bench/ too
    sys.path.insert(0, str(ROOT / "tests"))

from support import need, need_root, need_tool, run_cli  # noqa: E402

__all__ = ["need", "need_root", "need_tool", "run_cli"]


@pytest.fixture
def cli():
    """The real `vmrestore` command in a subprocess (same as tests/conftest.py's)."""
    return run_cli


@pytest.fixture(scope="session")
def compare() -> ModuleType:
    """bench/compare.py as a module (sample generator, timed runner, servers, verify)."""
    from vmrestore.commands import bench

    return bench._load()


@pytest.fixture(scope="session")
def bench_size() -> int:
    """Logical disk size for the suites: VMRESTORE_BENCH_SIZE, default 64 MiB."""
    from vmrestore.commands import bench

    return int(bench._load().parse_size(os.environ.get("VMRESTORE_BENCH_SIZE", "64M")))


@pytest.fixture(scope="session")
def sample_disk(tmp_path_factory: pytest.TempPathFactory, compare: ModuleType,
                bench_size: int) -> Iterator[Path]:
    """One sample image (40% zero / 30% text-like / 30% random 1 MiB blocks), shared."""
    path = tmp_path_factory.mktemp("bench") / "sample.raw"
    compare.make_sample(path, bench_size, seed=1)
    yield path
    path.unlink(missing_ok=True)
