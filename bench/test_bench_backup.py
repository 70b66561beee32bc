"""Backup create and verify throughput on the sample mix (40% zero / 30% text / 30% random).

Run: ``.venv/bin/python -m pytest bench/test_bench_backup.py`` (VMRESTORE_BENCH_SIZE sets
the disk size, default 64M). Each row records MB/s of source bytes and the stored ratio in
``extra_info`` (``--benchmark-json`` to keep them). Codecs compared: lz4, zstd-1, zstd-3
(the default), zstd-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmrestore import sample
from vmrestore.repository.create import create_backup
from vmrestore.repository.reader import open_chain
from vmrestore.repository.verify import verify_chain

CODECS = [("lz4", 0), ("zstd", 1), ("zstd", 3), ("zstd", 6)]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory, bench_size: int) -> Path:
    p = tmp_path_factory.mktemp("bb") / "sample.img"
    sample.write_sample_disk(str(p), bench_size, seed=1)
    return p


@pytest.mark.parametrize("codec,level", CODECS, ids=[f"{c}-{lv}" for c, lv in CODECS])
def test_create(benchmark, disk: Path, tmp_path: Path, codec: str, level: int,
                bench_size: int) -> None:
    out = tmp_path / "b.vmrb"

    def run() -> dict:
        return create_backup([str(disk)], str(out), codec=codec, level=level, force=True)

    s = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(
        stored_ratio=round(s["stored_bytes"] / bench_size, 4),
        mb_per_s=round(bench_size / benchmark.stats.stats.min / 1e6, 1))
    assert s["source_bytes"] == bench_size


@pytest.mark.parametrize("codec,level", CODECS[:3], ids=[f"{c}-{lv}" for c, lv in CODECS[:3]])
def test_verify(benchmark, disk: Path, tmp_path: Path, codec: str, level: int) -> None:
    out = tmp_path / "b.vmrb"
    s = create_backup([str(disk)], str(out), codec=codec, level=level, force=True)

    def run():
        chain = open_chain(out)
        try:
            return verify_chain(chain)
        finally:
            chain.close()

    res = benchmark.pedantic(run, rounds=3, iterations=1)
    assert res.ok
    benchmark.extra_info.update(
        raw_mb_per_s=round(res.raw_bytes / benchmark.stats.stats.min / 1e6, 1),
        stored_bytes=s["stored_bytes"])
