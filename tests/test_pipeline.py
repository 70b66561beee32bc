"""The C pipeline on plans synthesized here (no repository code): bytes, counters, errors."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_helpers import MiB, allocated, make_image, synth_plan
from vmrestore import pipeline as pl
from vmrestore.errors import ChecksumError, SourceError, TargetError
from vmrestore.plan import KIND_DATA, KIND_ZERO
from vmrestore.restore_disk import run_plan


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_restore_is_byte_identical(tmp_path: Path, codec: str) -> None:
    data = make_image(tmp_path / "disk.img", 12, tail=4096)
    plan = synth_plan(data, tmp_path / "src.bin", codec=codec)
    out = tmp_path / "out.img"
    res = run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data),
                   force=False)
    assert out.read_bytes() == data
    zero_bytes = int(plan["length"][plan["kind"] == KIND_ZERO].sum())
    assert res.bytes_written == len(data) - zero_bytes
    assert res.bytes_skipped == zero_bytes  # a new file is sparse: zeros skipped
    assert res.completed_prefix == len(plan) == res.entries
    # the new file stays sparse where the disk is zero
    assert allocated(out) <= len(data) - zero_bytes + 64 * 1024


def test_zero_runs_are_zeroed_on_existing_target(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 10)
    plan = synth_plan(data, tmp_path / "src.bin")
    out = tmp_path / "out.img"
    out.write_bytes(b"\xff" * len(data))  # garbage where zeros must appear
    res = run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data), force=True)
    assert out.read_bytes() == data
    assert res.bytes_zeroed == int(plan["length"][plan["kind"] == KIND_ZERO].sum()) > 0
    assert res.bytes_skipped == 0
    # zeroing punched holes: the file is sparse again
    assert allocated(out) < len(data)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.sampled_from(["zero", "rand", "text"]), min_size=1, max_size=12),
       bs_log=st.integers(16, 18), tail=st.sampled_from([0, 512, 4096]),
       codec=st.sampled_from(["zstd", "lz4", "none"]), seed=st.integers(0, 1000))
def test_random_plans_roundtrip(tmp_path: Path, blocks: list[str], bs_log: int, tail: int,
                                codec: str, seed: int) -> None:
    bs = 1 << bs_log
    rng = np.random.default_rng(seed)
    parts = [bytes(bs) if k == "zero" else
             rng.integers(0, 256, bs, dtype=np.uint8).tobytes() if k == "rand" else
             (b"abc%d " % seed) * (bs // 8) + bytes(bs - (bs // 8) * len(b"abc%d " % seed))
             for k in blocks]
    data = b"".join(parts) + rng.integers(0, 256, tail, dtype=np.uint8).tobytes()
    d = tmp_path / f"case{seed}-{bs_log}-{len(blocks)}-{codec}-{tail}"
    d.mkdir(exist_ok=True)
    plan = synth_plan(data, d / "src.bin", block_size=bs, codec=codec)
    out = d / "out.img"
    out.unlink(missing_ok=True)
    run_plan(plan, [str(d / "src.bin")], str(out), capacity=len(data), force=False,
             threads=1 + seed % 3, lanes=1 + seed % 2, buffers=2 + seed % 5)
    assert out.read_bytes() == data


def test_checksum_mismatch_stops_before_writing_and_names_block(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 8, seed=3)
    plan = synth_plan(data, tmp_path / "src.bin")
    data_idx = np.flatnonzero(plan["kind"] == KIND_DATA)
    bad = int(data_idx[len(data_idx) // 2])
    plan[bad]["xxh_lo"] ^= 1
    out = tmp_path / "out.img"
    with pytest.raises(ChecksumError) as ei:
        run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data), force=False,
                 disk=3)
    msg = str(ei.value)
    assert f"block {int(plan[bad]['block'])}" in msg
    assert f"disk offset {int(plan[bad]['dst_off'])}" in msg
    assert msg.startswith("disk 3")
    off = int(plan[bad]["dst_off"])
    # the bad block was never written: the (sparse) target reads zeros there
    assert out.read_bytes()[off:off + MiB] == bytes(MiB)


def test_corrupt_stored_bytes_are_a_checksum_error(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 6, seed=4)
    src = tmp_path / "src.bin"
    plan = synth_plan(data, src)
    raw = bytearray(src.read_bytes())
    i = int(np.flatnonzero(plan["kind"] == KIND_DATA)[0])
    raw[int(plan[i]["src_off"]) + int(plan[i]["stored_len"]) // 2] ^= 0x40
    src.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=str(src)):
        run_plan(plan, [str(src)], str(tmp_path / "out.img"), capacity=len(data),
                 force=False)


def test_missing_and_truncated_sources(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 6, seed=5)
    src = tmp_path / "src.bin"
    plan = synth_plan(data, src)
    with pytest.raises(SourceError, match=r"nope\.bin"):
        run_plan(plan, [str(tmp_path / "nope.bin")], str(tmp_path / "o1.img"),
                 capacity=len(data), force=False)
    src.write_bytes(src.read_bytes()[:100])
    with pytest.raises(SourceError, match="unexpected end of file"):
        run_plan(plan, [str(src)], str(tmp_path / "o2.img"), capacity=len(data), force=False)


def test_target_smaller_is_refused_before_writing(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 4, seed=6)
    plan = synth_plan(data, tmp_path / "src.bin")
    out = tmp_path / "small.img"
    out.write_bytes(b"\x55" * (len(data) - 4096))
    with pytest.raises(TargetError, match="smaller than the disk"):
        run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data), force=True)
    assert out.read_bytes() == b"\x55" * (len(data) - 4096)


def test_existing_file_needs_force(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 2, seed=7)
    plan = synth_plan(data, tmp_path / "src.bin")
    out = tmp_path / "out.img"
    out.write_bytes(b"x")
    with pytest.raises(TargetError, match="exists"):
        run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data), force=False)
    assert out.read_bytes() == b"x"


def test_resume_from_prefix_gives_same_bytes(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 12, seed=8)
    plan = synth_plan(data, tmp_path / "src.bin")
    out = tmp_path / "out.img"
    k = len(plan) // 2
    r1 = run_plan(plan[:k], [str(tmp_path / "src.bin")], str(out), capacity=len(data),
                  force=False)
    assert r1.completed_prefix == k
    run_plan(plan[k:], [str(tmp_path / "src.bin")], str(out), capacity=len(data))
    assert out.read_bytes() == data


def test_flush_and_prefix_while_running(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 48, block_size=256 * 1024, seed=9)
    plan = synth_plan(data, tmp_path / "src.bin", block_size=256 * 1024)
    out = tmp_path / "out.img"
    seen: list[int] = []
    flushed = threading.Event()
    stop = threading.Event()

    def checkpointer(job: pl.Job) -> None:
        while not stop.is_set():
            p = job.completed_prefix()
            job.flush(timeout=10)
            flushed.set()
            seen.append(p)

    threads: list[threading.Thread] = []

    def on_start(job: pl.Job) -> None:
        t = threading.Thread(target=checkpointer, args=(job,))
        t.start()
        threads.append(t)

    res = run_plan(plan, [str(tmp_path / "src.bin")], str(out), capacity=len(data),
                   force=False, threads=1, buffers=2, on_start=on_start, interval=0.01)
    stop.set()
    for t in threads:
        t.join(10)
    assert flushed.is_set()
    assert seen == sorted(seen) and all(0 <= p <= len(plan) for p in seen)
    assert res.completed_prefix == len(plan)
    assert out.read_bytes() == data


def test_counters_are_consistent(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 10, seed=10)
    src = tmp_path / "src.bin"
    plan = synth_plan(data, src)
    w = pl.Writer.open_file(str(tmp_path / "out.img"), len(data), pl.F_CREATE)
    try:
        with pl.Job(plan, [str(src)], w) as job:
            c = job.run()
    finally:
        w.close()
    is_data = plan["kind"] == KIND_DATA
    assert c.bytes_read == int(plan["stored_len"][is_data].sum()) == src.stat().st_size
    assert c.bytes_decompressed == int(plan["length"][is_data].sum()) == c.bytes_written
    assert c.bytes_done == len(data) == c.bytes_total
    assert c.entries_done == c.completed_prefix == c.entries_total == len(plan)
    assert not c.running and c.elapsed_ns > 0
    assert set(c.busy) == {"read", "decompress", "write"}


def _interrupt_at_call(k: int) -> Callable[..., object]:
    """A trace function raising KeyboardInterrupt at the k-th Python call (as a Ctrl-C may)."""
    calls = 0

    def trace(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1
            if calls == k:
                sys.settrace(None)
                raise KeyboardInterrupt
    return trace


@pytest.mark.parametrize("call", ["counters", "flush", "completed_prefix"])
def test_a_ctrl_c_at_any_point_of_a_call_never_leaves_close_waiting(
        tmp_path: Path, call: str) -> None:
    """A Ctrl-C is raised at the next bytecode, wherever that is; close() must still return.

    The interrupt is raised at each Python call inside job.<call>() in turn; a
    use count kept in Python code could be left raised there and close() would
    wait for it forever.
    """
    data = make_image(tmp_path / "disk.img", 4, seed=12)
    src = tmp_path / "src.bin"
    plan = synth_plan(data, src)
    interrupted = 0
    for k in range(1, 200):
        out = tmp_path / f"out{k}.img"
        w = pl.Writer.open_file(str(out), len(data), pl.F_CREATE)
        job = pl.Job(plan, [str(src)], w)
        job.run()
        sys.settrace(_interrupt_at_call(k))
        try:
            getattr(job, call)()
            done = True
        except KeyboardInterrupt:
            interrupted += 1
            done = False
        finally:
            sys.settrace(None)
        closer = threading.Thread(target=job.close, daemon=True)
        closer.start()
        closer.join(10)
        w.close()
        assert not closer.is_alive(), f"close() hangs after a Ctrl-C at call {k} of {call}()"
        assert job.counters().completed_prefix == len(plan)  # the final counters stay
        job.flush()  # a job that ended well: nothing to flush, no error
        if done:
            break
    assert interrupted > 0, f"{call}() makes no Python call: nothing was interrupted"
