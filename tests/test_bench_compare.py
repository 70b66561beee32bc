"""Smoke tests of `vmrestore bench compare`: every tool's output byte-checked, table produced.

Small (32 MiB, one run) so it stays fast on the shared machine; it checks the
harness, never the speed. The vmrestore rows need `restore-disk`; the
peer rows run with whatever is installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from support import need, need_root, need_tool, run_cli
from vmrestore.errors import UsageError

PEERS = ("nbdkit", "qemu-img", "qemu-nbd", "nbdcopy", "/usr/bin/time", "losetup")


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    from vmrestore.commands import bench

    return bench._load()


def _leftovers(workdir: Path) -> list[str]:
    """Processes or loop devices still holding anything under `workdir`."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmd and "pytest" not in cmd:
            left.append(f"pid {pid}: {cmd}")
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [line for line in out.splitlines() if str(workdir) in line]
    return left


def test_parse_size(compare: ModuleType) -> None:
    assert compare.parse_size("32M") == 32 << 20
    assert compare.parse_size("2G") == 2 << 30
    assert compare.parse_size("16GiB") == 16 << 30
    assert compare.parse_size(str(1 << 20)) == 1 << 20
    for bad in ("0", "12345", "2X", "-1G"):
        with pytest.raises(UsageError):
            compare.parse_size(bad)


def test_target_ratios_met_and_missed(compare: ModuleType) -> None:
    def row(key: str, best: float, cache: str = "warm") -> dict[str, object]:
        return {"key": key, "best_s": best, "peak_rss_kib": 100 << 10, "cache": cache}

    fast = [row("nbd/vmrestore", 1.0), row("nbd/qemu-img", 3.0), row("nbd/nbdcopy-qemu-nbd", 2.5),
            row("nbd/nbdcopy-raw", 0.9), row("loop/vmrestore", 1.0), row("loop/qemu-img", 2.0),
            row("loop/dd-raw", 1.1)]
    got = compare._targets(fast, ("warm",))
    status = {t["target"]: t["status"] for t in got}
    assert list(status.values()) == ["met", "met", "missed", "met", "met"]
    nbd_peer = got[0]
    assert nbd_peer["against"] == "nbd/nbdcopy-qemu-nbd" and nbd_peer["ratio"] == 0.4
    cold = [dict(r, cache="cold", best_s=r["best_s"] * (3 if "vmrestore" in r["key"] else 1))
            for r in fast]
    both = compare._targets(fast + cold, ("warm", "cold"))
    assert [(t["case"], t["status"]) for t in both if "compressed" in t["target"]] == [
        ("warm", "met"), ("cold", "missed"), ("warm", "met"), ("cold", "missed")]
    assert [t["case"] for t in both if "nbdcopy --flush" in t["target"]] == ["warm"]
    near = compare._targets([row("nbd/vmrestore", 1.13), row("nbd/nbdcopy-raw", 1.125)], ("warm",))
    flush = next(t for t in near if "nbdcopy --flush" in t["target"])
    assert flush["status"] == "missed" and flush["ratio"] == 1.004  # not a "1.0" that reads as met
    partial = compare._targets([row("nbd/qemu-img", 3.0)], ("warm",))
    assert {t["status"] for t in partial} == {"n/a"}


def test_sample_mix(compare: ModuleType, tmp_path: Path) -> None:
    import numpy as np

    raw = tmp_path / "s.raw"
    compare._fallback_sample(raw, 20 << 20, seed=3)
    data = np.fromfile(raw, dtype=np.uint8).reshape(20, 1 << 20)
    zero = ~data.any(axis=1)
    text = ~zero & (data.max(axis=1) < 128)
    assert (zero.sum(), text.sum(), (~zero & ~text).sum()) == (8, 6, 6)


def test_verify_names_first_bad_byte(compare: ModuleType, tmp_path: Path) -> None:
    raw, tgt = tmp_path / "a.raw", tmp_path / "b.img"
    payload = os.urandom(3 << 20)
    raw.write_bytes(payload)
    tgt.write_bytes(payload)
    compare.verify_target(tgt, raw, len(payload))
    flipped = bytearray(payload)
    flipped[(2 << 20) + 77] ^= 1
    tgt.write_bytes(bytes(flipped))
    with pytest.raises(compare.Mismatch, match=rf"offset {(2 << 20) + 77} \(block 2\)"):
        compare.verify_target(tgt, raw, len(payload))


def test_compare_smoke_every_row_verified(compare: ModuleType, tmp_path: Path) -> None:
    need_root()
    need_tool(*PEERS)
    proc = run_cli("bench", "compare", "--size", "32M", "--runs", "1", "--json",
                   "--workdir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert list(report["cases"]) == ["warm", "cold"]
    every = {(r["cache"], r["key"]) for r in report["results"]}
    assert every == {(c, k.key) for c in ("warm", "cold") for k in compare.build_cases()}
    rows = {r["key"]: r for r in report["results"] if r["cache"] == "cold"}
    ran = [r for r in rows.values() if not r["skipped"]]
    for r in ran:
        assert not r["error"], r
        assert r["verified"] == 1 and len(r["seconds"]) == 1, r
        assert r["best_s"] > 0 and r["mb_s"] > 0 and r["peak_rss_kib"] > 0, r
        assert r["best_cpu_s"] is not None and r["best_cpu_s"] >= 0, r
        assert (r["best_target_cpu_s"] is not None) == (r["target"] == "nbd"), r
    assert rows["nbd/nbdcopy-qemu-nbd"]["server_peak_rss_kib"] > 0
    assert {"nbd/qemu-img", "nbd/nbdcopy-qemu-nbd", "nbd/nbdcopy-raw", "loop/qemu-img",
            "loop/dd-raw"} <= {r["key"] for r in ran}
    table = compare.render(report)
    warm = {r["key"]: r for r in report["results"] if r["cache"] == "warm"}
    for r in ran:
        assert f"| {r['target']} | {r['tool']} | {warm[r['key']]['best_s']:.2f} |" in table
        assert f" {r['best_s']:.2f} | " in table
    assert "warm: s" in table and "cold: s" in table and "caches dropped" in table
    assert "| issue 12 target | case |" in table
    # one untimed warm-up round of every tool that runs, both cases, not counted in any row
    assert report["warmup"] == 1 and "after 1 untimed warm-up round(s) of every tool" in table
    for r in ran:
        for cache in ("warm", "cold"):
            assert re.search(rf"warm-up {cache} {re.escape(r['key'])} +1: +[0-9.]+ s "
                             r"\(not counted\)", proc.stderr), (cache, r["key"])
    # one target group at a time: every NBD line (warm-up and timed) before any loop line
    groups = re.findall(r"^bench: (?:warm-up )?(?:warm|cold) (nbd|loop)/", proc.stderr, re.M)
    assert groups == sorted(groups, key=("nbd", "loop").index) and set(groups) == {"nbd", "loop"}
    # inside a group: the warm-up's cold runs, its warm runs, every timed warm run, then
    # every timed cold run; so no timed warm run follows a cache drop
    for g in ("nbd", "loop"):
        seq = re.findall(rf"^bench: (warm-up )?(warm|cold) {g}/", proc.stderr, re.M)
        phases = [("warm-up " if w else "") + c for w, c in seq]
        order = ["warm-up cold", "warm-up warm", "warm", "cold"]
        assert phases == sorted(phases, key=order.index) and set(phases) == set(order), phases
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "disk.raw").exists()  # cleaned up without --keep
    need(not report["image"]["vmrestore"], f"vmrestore rows: {report['image']['vmrestore']}")
    assert rows["nbd/vmrestore"]["ratio_to_vmrestore"] == 1.0
    assert report["image"]["vmrb_bytes"] > 0
    assert all(t["status"] in ("met", "missed") for t in report["targets"])


def test_compare_ctrl_c_cleans_up(tmp_path: Path) -> None:
    need_root()
    need_tool(*PEERS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmrestore", "bench", "compare", "--size", "64M", "--runs", "50",
         "--no-drop-caches", "--only", "loop", "--only", "nbd/nbdcopy-qemu-nbd",
         "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            if " run 1:" in line or not line:
                break
        assert " run 1:" in seen, seen
        time.sleep(0.05)  # land somewhere inside the next run
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


def test_rss_report_small(tmp_path: Path) -> None:
    need_tool("nbdkit", "/usr/bin/time")
    proc = run_cli("bench", "rss", "--sizes", "8M,16M", "--data-every", "4", "--json",
                   "--workdir", str(tmp_path), timeout=300)
    if "not available yet" in proc.stderr:
        need(False, proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert [(r["size"], r["target"]) for r in results] == [
        (8 << 20, "file"), (8 << 20, "nbd"), (16 << 20, "file"), (16 << 20, "nbd")]
    assert all(r["verified"] and r["peak_rss_kib"] > 0 for r in results)
    assert _leftovers(tmp_path) == []
