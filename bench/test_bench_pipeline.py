"""pytest-benchmark suites of the restore pipeline, per stage (small by default).

    .venv/bin/python -m pytest bench/test_bench_pipeline.py --benchmark-only
    VMRESTORE_BENCH_SIZE=1G ... for real numbers

- decompress+verify: the codec + XXH3 stage alone (the C calls, one block each)
- file writer: the whole pipeline into a new file (sparse: zero runs skipped)
  and into an existing file (zero runs punched)
- nbd writer: the whole pipeline into nbdkit's memory plugin over a unix socket
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.core_helpers import MiB, Nbdkit, make_image, synth_plan

from vmrestore import core
from vmrestore.plan import KIND_DATA
from vmrestore.restore_disk import run_plan


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, bench_size: int) -> tuple[Path, object, int]:
    d = tmp_path_factory.mktemp("pipeline")
    blocks = max(8, bench_size // MiB)
    data = make_image(d / "disk.img", blocks, seed=7)
    plan = synth_plan(data, d / "src.bin")
    (d / "disk.img").unlink()
    return d, plan, len(data)


def test_decompress_verify(benchmark, sample) -> None:
    d, plan, _size = sample
    src = (d / "src.bin").read_bytes()
    data_entries = plan[plan["kind"] == KIND_DATA]
    out = bytearray(MiB)

    def run() -> int:
        n = 0
        for e in data_entries:
            off, ln = int(e["src_off"]), int(e["stored_len"])
            core.decompress_into(memoryview(src)[off:off + ln], out, int(e["codec"]))
            assert core.xxh3_128(out) == (int(e["xxh_lo"]), int(e["xxh_hi"]))
            n += MiB
        return n

    n = benchmark(run)
    benchmark.extra_info["MB/s"] = round(n / 1e6 / benchmark.stats.stats.min, 1)


@pytest.mark.parametrize("existing", [False, True], ids=["new-sparse", "existing"])
def test_file_writer(benchmark, sample, existing: bool) -> None:
    d, plan, size = sample
    out = d / "out.img"

    def setup() -> None:
        out.unlink(missing_ok=True)
        if existing:
            with open(out, "wb") as f:
                f.truncate(size)

    def run():
        return run_plan(plan, [str(d / "src.bin")], str(out), capacity=size)

    res = benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info.update({"MB/s": round(size / 1e6 / benchmark.stats.stats.min, 1),
                                 "busy_pct": res.as_dict()["busy_pct"]})


@pytest.mark.parametrize("queue_depth", [4, 16])
def test_nbd_writer(benchmark, sample, queue_depth: int) -> None:
    d, plan, size = sample
    srv = Nbdkit(d, f"size={size}", plugin="memory")  # type: ignore[arg-type]
    try:
        res = benchmark.pedantic(
            lambda: run_plan(plan, [str(d / "src.bin")], srv.uri, capacity=size,
                             queue_depth=queue_depth), rounds=3)
    finally:
        srv.stop()
    benchmark.extra_info.update({"MB/s": round(size / 1e6 / benchmark.stats.stats.min, 1),
                                 "busy_pct": res.as_dict()["busy_pct"]})
