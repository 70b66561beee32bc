"""The VDDK writer over vddk_sim against the native file writer: overhead, queue depth, buffer size.

    .venv/bin/python -m pytest bench/test_bench_vddk.py --benchmark-only -s
    VMRESTORE_BENCH_SIZE=1G ... for real numbers

- side by side (one run): the same plan into the same flat file, once through
  the core's file writer (buffered, and O_DIRECT for reference) and once
  through VixDiskLib_WriteAsync into vddk_sim (which pwrites that file from its
  worker threads). Both skip zero runs (a new disk), so both write the same
  bytes; the difference is the VDDK path's overhead (target: within 10%).
- sweeps: requests in flight (queue depth) and bytes per WriteAsync, the two
  defaults of vmrestore.vddk (DEFAULT_QUEUE_DEPTH, DEFAULT_MAX_REQUEST), with
  a per-request latency added in the sim (as a network transport has) so that
  requests in flight matter.
Nothing here asserts a speed: numbers go to the benchmark's extra_info and,
with -s, to a table on stdout.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.core_helpers import MiB, make_image, synth_plan

from vmrestore import vddk
from vmrestore.restore_disk import run_plan

LATENCY_US = 200  # per request in the sweeps: a fast LAN round trip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, bench_size: int) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("vddk-bench")
    blocks = max(8, bench_size // MiB)
    data = make_image(d / "disk.img", blocks, seed=3)
    plan = synth_plan(data, d / "src.bin", codec="lz4")
    (d / "disk.img").unlink()
    ds = d / "ds1"
    libdir = vddk.sim_libdir(d / "sim")
    saved = {k: os.environ.get(k) for k in ("VMRESTORE_VDDK_SIM_DATASTORES",
                                             "VMRESTORE_VDDK_PASSWORD",
                                             "VMRESTORE_VDDK_SIM_LATENCY_US")}
    os.environ["VMRESTORE_VDDK_SIM_DATASTORES"] = f"ds1={ds}"
    os.environ["VMRESTORE_VDDK_PASSWORD"] = "bench"
    os.environ.pop("VMRESTORE_VDDK_SIM_LATENCY_US", None)
    yield {"dir": d, "plan": plan, "size": len(data), "ds": ds, "libdir": libdir,
           "src": str(d / "src.bin")}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _fresh_disk(env: dict[str, Any]) -> Path:
    """A new thin disk (descriptor + empty sparse flat file): reads as zeros."""
    vddk.create_sim_disk(env["ds"] / "vm1", "disk", env["size"])
    return env["ds"] / "vm1" / "disk-flat.vmdk"


def _uri(env: dict[str, Any], **q: str) -> str:
    query = {"vm": "vm-1", "transports": "nbd", "new": "1", "libdir": str(env["libdir"]), **q}
    return "vddk://bench@esx1/ds1/vm1/disk.vmdk?" + "&".join(f"{k}={v}" for k, v in query.items())


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_side_by_side_vddk_vs_file(env: dict[str, Any], benchmark: Any) -> None:
    """One run: native file writer vs VDDK writer, same plan, same target file."""
    plan, size, src = env["plan"], env["size"], env["src"]
    rounds = 5
    times: dict[str, list[float]] = {"file (buffered)": [], "file (O_DIRECT)": [], "vddk": []}
    expected = None
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        flat = _fresh_disk(env)
        times["file (buffered)"].append(_timed(lambda f=flat: run_plan(
            plan, [src], str(f), capacity=size, force=True, target_zeroed=True, direct=False)))
        if expected is None:
            expected = flat.read_bytes()
        flat = _fresh_disk(env)
        times["file (O_DIRECT)"].append(_timed(lambda f=flat: run_plan(
            plan, [src], str(f), capacity=size, force=True, target_zeroed=True, direct=True)))
        flat = _fresh_disk(env)
        times["vddk"].append(_timed(lambda: run_plan(
            plan, [src], _uri(env), capacity=size, queue_depth=vddk.DEFAULT_QUEUE_DEPTH)))
        assert flat.read_bytes() == expected  # same bytes through both writers
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = (best["vddk"] / best["file (buffered)"] - 1) * 100
    print(f"\nside by side, {size / MiB:.0f} MiB disk, {rounds} rounds (min / median s, MB/s):")
    for k in times:
        print(f"  {k:<16} {best[k]:.3f} / {med[k]:.3f}  {size / 1e6 / best[k]:8.1f} MB/s")
    print(f"  vddk overhead vs buffered file writer: {overhead:+.1f}% (min), "
          f"{(med['vddk'] / med['file (buffered)'] - 1) * 100:+.1f}% (median)")
    benchmark.extra_info.update({k: round(v, 4) for k, v in best.items()})
    benchmark.extra_info["vddk_overhead_pct"] = round(overhead, 1)
    flat = _fresh_disk(env)
    benchmark.pedantic(lambda: run_plan(plan, [src], _uri(env), capacity=size), rounds=1)


def _vddk_run(env: dict[str, Any], queue_depth: int, max_request: int) -> float:
    from vmrestore import pipeline as pl

    _fresh_disk(env)
    t0 = time.perf_counter()
    with vddk.open_writer(_uri(env), env["size"], max_request=max_request) as vw, \
            pl.Job(env["plan"], [env["src"]], vw.writer,
                   settings=pl.Settings(queue_depth=queue_depth)) as job:
        job.run(None, 0.25)
    return time.perf_counter() - t0


@pytest.mark.parametrize("queue_depth", [1, 4, 16, 32])
def test_queue_depth(env: dict[str, Any], benchmark: Any, queue_depth: int,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_LATENCY_US", str(LATENCY_US))
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_WORKERS", "16")
    s = benchmark.pedantic(lambda: _vddk_run(env, queue_depth, vddk.DEFAULT_MAX_REQUEST),
                           rounds=2)
    benchmark.extra_info["MB/s"] = round(env["size"] / 1e6 / s, 1)


@pytest.mark.parametrize("max_request", [256 << 10, 1 << 20, 2 << 20, 4 << 20],
                         ids=["256K", "1M", "2M", "4M"])
def test_request_size(env: dict[str, Any], benchmark: Any, max_request: int,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_LATENCY_US", str(LATENCY_US))
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_WORKERS", "16")
    s = benchmark.pedantic(lambda: _vddk_run(env, vddk.DEFAULT_QUEUE_DEPTH, max_request),
                           rounds=2)
    benchmark.extra_info["MB/s"] = round(env["size"] / 1e6 / s, 1)


def test_plan_is_mixed(env: dict[str, Any]) -> None:
    """The sample has data and zero runs, so 'skip zeros' is exercised on both sides."""
    kinds = np.unique(env["plan"]["kind"])
    assert len(kinds) == 2
