"""The local writer on real block devices (loop) and the SAN writer at FIEMAP extents."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from core_helpers import MiB, drop_caches, loop_device, make_image, mounted, synth_plan
from support import need_tool
from vmrestore.errors import TargetError
from vmrestore.plan import KIND_ZERO
from vmrestore.restore_disk import run_plan
from vmrestore.transport.extents import written_map
from vmrestore.transport.uri import read_extent_map, write_extent_map


def test_block_device_target(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 12, seed=21)
    plan = synth_plan(data, tmp_path / "src.bin")
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"\x77" * (len(data) + 2 * MiB))  # larger than the disk, dirty
    with loop_device(backing) as dev:
        res = run_plan(plan, [str(tmp_path / "src.bin")], dev, capacity=len(data),
                       force=False)  # a block device needs no --force
        with open(dev, "rb") as f:
            got = f.read(len(data) + 2 * MiB)
    assert got[:len(data)] == data
    assert got[len(data):] == b"\x77" * (2 * MiB)  # nothing past the disk touched
    assert res.bytes_zeroed == int(plan["length"][plan["kind"] == KIND_ZERO].sum())
    assert res.notes == []  # O_DIRECT worked on the loop device


def test_block_device_smaller_is_refused(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 4, seed=22)
    plan = synth_plan(data, tmp_path / "src.bin")
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"\x33" * (len(data) - MiB))
    with loop_device(backing) as dev:
        with pytest.raises(TargetError, match="smaller than the disk"):
            run_plan(plan, [str(tmp_path / "src.bin")], dev, capacity=len(data))
    assert backing.read_bytes() == b"\x33" * (len(data) - MiB)


def _eager_zeroed_disk_on_ext4(tmp_path: Path, size: int) -> tuple[Path, Path]:
    need_tool("mkfs.ext4", "filefrag")
    lun = tmp_path / "lun.img"
    lun.write_bytes(b"")
    subprocess.run(["truncate", "-s", str(size + 32 * MiB), str(lun)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(lun)], check=True)
    return lun, tmp_path / "mnt"


def test_san_writes_at_fiemap_extents(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 10, seed=23, tail=4096)
    plan = synth_plan(data, tmp_path / "src.bin")
    lun, mnt = _eager_zeroed_disk_on_ext4(tmp_path, len(data))
    with loop_device(lun) as dev:
        with mounted(dev, mnt):
            disk = mnt / "vm-flat.vmdk"
            with open(disk, "wb") as f:  # eager-zeroed: every byte written
                for _ in range(len(data) // MiB):
                    f.write(bytes(MiB))
                f.write(bytes(len(data) % MiB))
            subprocess.run(["sync"], check=True)
            ext = written_map(disk)  # (file offset, device offset, length)
            map_path = tmp_path / "map.json"
            write_extent_map(map_path, dev, len(data), ext)
            res = run_plan(plan, [str(tmp_path / "src.bin")], f"san:{dev}?map={map_path}",
                           capacity=len(data))
            drop_caches()
            got = disk.read_bytes()
    assert res.writer == "san" and res.transport == "san"
    assert got == data
    assert len(read_extent_map(map_path)["extents"]) == len(ext)


def test_san_refuses_thin_disk(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 4, seed=24)
    plan = synth_plan(data, tmp_path / "src.bin")
    lun = tmp_path / "lun.img"
    lun.write_bytes(bytes(8 * MiB))
    map_path = tmp_path / "map.json"
    # a thin disk: the second MiB has no extent
    map_path.write_text(json.dumps({"version": 1, "lun": str(lun), "size": len(data),
                                    "extents": [[0, 0, MiB], [2 * MiB, 2 * MiB,
                                                              len(data) - 2 * MiB]]}))
    with pytest.raises(TargetError, match=f"first uncovered offset {MiB}"):
        run_plan(plan, [str(tmp_path / "src.bin")], f"san:?map={map_path}",
                 capacity=len(data))
    assert lun.read_bytes() == bytes(8 * MiB)


def test_san_on_a_file_lun(tmp_path: Path) -> None:
    """A LUN that is a plain file, extents shuffled: every block lands where the map says."""
    data = make_image(tmp_path / "disk.img", 6, seed=25)
    plan = synth_plan(data, tmp_path / "src.bin")
    lun = tmp_path / "lun.img"
    lun.write_bytes(b"\xee" * (8 * MiB))
    n = len(data) // MiB
    order = [5, 0, 3, 1, 4, 2][:n]
    ext = [(i * MiB, (order[i] + 1) * MiB, MiB) for i in range(n)]
    map_path = tmp_path / "map.json"
    write_extent_map(map_path, str(lun), len(data), ext)
    run_plan(plan, [str(tmp_path / "src.bin")], f"san:{lun}?map={map_path}",
             capacity=len(data))
    raw = lun.read_bytes()
    for v, lo, ln in ext:
        assert raw[lo:lo + ln] == data[v:v + ln]
    assert raw[:MiB] == b"\xee" * MiB  # outside the map: untouched
