"""backup create: round trips (property-based), the CLI, every bad input, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_helpers import MIB, backup, make_disk, restored
from support import need, need_root, need_tool
from vmrestore.errors import IncompleteBackupError
from vmrestore.repository.reader import open_chain, open_point

BLOCK_SIZES = [64 * 1024, 128 * 1024, 256 * 1024, 1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB]

# A disk described as segments: (what, length in 512-byte sectors).
segment = st.tuples(st.sampled_from(["zero", "random", "text", "repeat"]),
                    st.integers(min_value=1, max_value=6000))


def _build(segments: list[tuple[str, int]], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    parts: list[bytes] = []
    for what, sectors in segments:
        n = sectors * 512
        if what == "zero":
            parts.append(bytes(n))
        elif what == "random":
            parts.append(rng.bytes(n))
        elif what == "text":
            parts.append((b"the quick brown fox %d " % sectors * (n // 20 + 1))[:n])
        else:
            prev = b"".join(parts)
            parts.append((prev[-n:] if prev else bytes(n)).rjust(n, b"\0"))
    return b"".join(parts)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(segment, min_size=1, max_size=8),
       block_size=st.sampled_from(BLOCK_SIZES),
       codec=st.sampled_from(["zstd", "lz4", "none"]),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip(tmp_path: Path, segments, block_size: int, codec: str, seed: int) -> None:
    data = _build(segments, seed)
    disk = tmp_path / "disk.img"
    disk.write_bytes(data)
    out = tmp_path / "b.vmrb"
    s = backup([disk], out, codec=codec, block_size=block_size, force=True)
    nblocks = -(-len(data) // block_size)
    b = s["blocks"]
    assert b["zero"] + b["data"] + b["dedup"] == nblocks
    assert restored(out, 0, tmp_path / "r.img") == data


def test_zero_and_duplicate_blocks_are_not_stored(tmp_path: Path) -> None:
    d = tmp_path / "d.img"
    blk = np.random.default_rng(0).bytes(MIB)
    d.write_bytes(bytes(3 * MIB) + blk + blk + bytes(MIB) + blk)
    s = backup([d], tmp_path / "b.vmrb")
    assert s["blocks"] == {"zero": 4, "data": 1, "dedup": 2, "unchanged": 0}
    assert s["stored_bytes"] <= MIB + 64


def test_cli_create_json_and_inspect(cli, tmp_path: Path) -> None:
    d0, d1 = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(d0, 6 * MIB, seed=1)
    make_disk(d1, 3 * MIB + 512, seed=2)
    cfg = {"name": "web01", "guest_id": "otherLinux64Guest", "num_cpus": 2, "memory_mb": 4096,
           "firmware": "bios",
           "disks": [{"label": "Hard disk 1", "controller": "pvscsi", "bus": 0, "unit": 0,
                      "provisioning": "thick-eager", "datastore": "ds1"},
                     {"label": "Hard disk 2", "controller": "pvscsi", "bus": 0, "unit": 1,
                      "provisioning": "thin", "datastore": "ds1"}],
           "nics": [{"label": "Network adapter 1", "type": "vmxnet3", "network": "VM Network",
                     "mac": "00:50:56:aa:bb:cc"}]}
    (tmp_path / "vm.json").write_text(json.dumps(cfg))
    out = tmp_path / "full.vmrb"
    r = cli("backup", "create", "--disk", str(d0), "--disk", str(d1), "--vm-config",
            str(tmp_path / "vm.json"), "--codec", "lz4", "--block-size", "256K", "--json",
            "-o", str(out), check=True)
    s = json.loads(r.stdout)
    assert s["block_size"] == 256 * 1024 and s["codec"] == "lz4"
    assert sum(s["blocks"].values()) == 24 + 13
    assert s["seconds"] > 0 and s["mb_per_s"] > 0
    r = cli("inspect", str(out), "--json", check=True)
    info = json.loads(r.stdout)
    assert info["vm_config"]["name"] == "web01"
    assert [d["capacity"] for d in info["vm_config"]["disks"]] == [6 * MIB, 3 * MIB + 512]
    assert info["disks"][1]["blocks"] == 13
    assert info["chain"][0]["codecs"].keys() <= {"lz4", "none"}
    r = cli("inspect", str(out), check=True)
    assert "web01" in r.stdout and "thick-eager" in r.stdout and "VM Network" in r.stdout
    assert restored(out, 1, tmp_path / "r1.img") == d1.read_bytes()


def _one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vmrestore: error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    make_disk(d / "d.img", 4 * MIB, seed=9)
    backup([d / "d.img"], d / "full.vmrb")
    return d


def test_bad_source_size(cli, tmp_path: Path) -> None:
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    r = cli("backup", "create", "--disk", str(tmp_path / "odd.img"), "-o", str(tmp_path / "o"))
    _one_line_error(r, 5, "odd.img", "not a multiple of 512")
    assert sorted(os.listdir(tmp_path)) == ["odd.img"]


def test_unreadable_sources(cli, tmp_path: Path) -> None:
    r = cli("backup", "create", "--disk", str(tmp_path / "missing.img"), "-o",
            str(tmp_path / "o.vmrb"))
    _one_line_error(r, 5, "missing.img", "cannot open")
    (tmp_path / "dir.img").mkdir()
    r = cli("backup", "create", "--disk", str(tmp_path / "dir.img"), "-o",
            str(tmp_path / "o.vmrb"))
    _one_line_error(r, 5, "dir.img")
    assert not (tmp_path / "o.vmrb").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_output_exists(cli, small: Path) -> None:
    r = cli("backup", "create", "--disk", str(small / "d.img"), "-o", str(small / "full.vmrb"))
    _one_line_error(r, 6, "full.vmrb", "exists", "--force")
    before = (small / "full.vmrb").read_bytes()
    assert open_point(small / "full.vmrb")
    cli("backup", "create", "--disk", str(small / "d.img"), "-o", str(small / "f2.vmrb"),
        check=True)
    cli("backup", "create", "--disk", str(small / "d.img"), "-o", str(small / "f2.vmrb"),
        "--force", check=True)
    assert (small / "full.vmrb").read_bytes() == before


@pytest.mark.parametrize("size", ["3M", "32K", "16M", "1000", "abc"])
def test_bad_block_size(cli, small: Path, size: str) -> None:
    r = cli("backup", "create", "--disk", str(small / "d.img"), "--block-size", size, "-o",
            str(small / "bs.vmrb"))
    _one_line_error(r, 2)
    assert not (small / "bs.vmrb").exists()


def test_bad_vm_config(cli, small: Path, tmp_path: Path) -> None:
    (tmp_path / "vm.json").write_text("{not json")
    r = cli("backup", "create", "--disk", str(small / "d.img"), "--vm-config",
            str(tmp_path / "vm.json"), "-o", str(tmp_path / "x.vmrb"))
    _one_line_error(r, 2, "vm.json", "not valid JSON")


def _corrupt(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case,words", [
    ("truncated", ["incomplete"]),
    ("magic", ["not a vmrestore backup"]),
    ("version", ["version 9"]),
    ("index", ["checksum mismatch"]),
    ("empty", ["incomplete"]),
])
def test_bad_backup_files(cli, small: Path, tmp_path: Path, case: str, words: list[str]) -> None:
    from vmrestore.repository import format as fmt

    good = small / "full.vmrb"
    p = open_point(good)
    ext = next(s for s in p.sections if s.kind == fmt.SEC_EXTENTS)

    def edit(d: bytearray) -> None:
        if case == "truncated":
            del d[len(d) - 50:]
        elif case == "empty":
            del d[:]
        elif case == "magic":
            d[0:8] = b"NOTABACK"
        elif case == "version":
            d[-120:-118] = (9).to_bytes(2, "little")
            d[-16:] = fmt.checksum(bytes(d[-128:-16]))
        elif case == "index":
            d[ext.offset + 5] ^= 0xFF

    bad = _corrupt(good, tmp_path / f"{case}.vmrb", edit)
    for cmd in (["verify"], ["inspect"]):
        r = cli(*cmd, str(bad))
        _one_line_error(r, 3, f"{case}.vmrb", *words)
        assert r.stdout == ""
    r = cli("backup", "create", "--disk", str(small / "d.img"), "--parent", str(bad), "-o",
            str(tmp_path / "child.vmrb"))
    _one_line_error(r, 3, *words)
    assert not (tmp_path / "child.vmrb").exists()


def test_missing_and_mismatching_parent_through_cli(cli, tmp_path: Path) -> None:
    d = tmp_path / "d.img"
    make_disk(d, 2 * MIB, seed=4)
    cli("backup", "create", "--disk", str(d), "-o", str(tmp_path / "a.vmrb"), check=True)
    cli("backup", "create", "--disk", str(d), "--parent", str(tmp_path / "a.vmrb"), "-o",
        str(tmp_path / "b.vmrb"), check=True)
    cli("backup", "create", "--disk", str(d), "-o", str(tmp_path / "a.vmrb"), "--force",
        check=True)  # a different full under the parent's name
    r = cli("verify", str(tmp_path / "b.vmrb"))
    _one_line_error(r, 3, "b.vmrb", "a.vmrb", "not found")
    (tmp_path / "a.vmrb").unlink()
    r = cli("inspect", str(tmp_path / "b.vmrb"))
    _one_line_error(r, 3, "b.vmrb", "a.vmrb", "not found")


def test_kill_9_leaves_no_valid_looking_file(tmp_path: Path) -> None:
    """A writer killed mid-way leaves only a temp file that readers reject as incomplete."""
    d = tmp_path / "big.img"
    d.write_bytes(np.random.default_rng(5).bytes(48 * MIB))
    out = tmp_path / "b.vmrb"
    proc = subprocess.Popen([sys.executable, "-m", "vmrestore", "backup", "create", "--disk",
                             str(d), "--codec", "zstd", "--level", "19", "--threads", "1",
                             "-q", "-o", str(out)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        partial: list[Path] = []
        while time.monotonic() < deadline:
            partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")
                       and p.stat().st_size > 4096]
            if partial:
                break
            assert proc.poll() is None, "backup finished before it could be killed"
            time.sleep(0.02)
        assert partial, "no temp file appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    with pytest.raises(IncompleteBackupError):
        open_point(partial[0])
    with pytest.raises(IncompleteBackupError):
        open_chain(partial[0])
    # the next run for the same output removes what the killed one left (its pid is dead),
    # and never a partial file of a run still alive
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MIB))
    alive = tmp_path / f".b.vmrb.{os.getpid()}.partial"
    alive.write_bytes(b"a live run's")
    r = subprocess.run([sys.executable, "-m", "vmrestore", "backup", "create", "--disk",
                        str(small), "-q", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not partial[0].exists() and alive.exists()


def test_block_device_source(cli, tmp_path: Path) -> None:
    """A loop device as the source: size via BLKGETSIZE64, restored byte-identical."""
    need_root()
    need_tool("losetup")
    img = tmp_path / "lun.img"
    data = make_disk(img, 5 * MIB + 4096, seed=12)
    r = subprocess.run(["losetup", "--find", "--show", "--read-only", str(img)],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        out = tmp_path / "dev.vmrb"
        s = json.loads(cli("backup", "create", "--disk", dev, "--json", "-o", str(out),
                           check=True).stdout)
        assert s["disks"][0]["capacity"] == len(data)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert restored(out, 0, tmp_path / "r.img") == data


def test_ctrl_c_removes_the_temp_file(tmp_path: Path) -> None:
    d = tmp_path / "big.img"
    d.write_bytes(np.random.default_rng(6).bytes(48 * MIB))
    out = tmp_path / "b.vmrb"
    proc = subprocess.Popen([sys.executable, "-m", "vmrestore", "backup", "create", "--disk",
                             str(d), "--level", "19", "--threads", "1", "-q", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                p.name.endswith(".partial") for p in tmp_path.iterdir()):
            assert proc.poll() is None, "backup finished before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.img"]
