"""The demo (README main command) and the sample generator it uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lab_helpers
from vmrestore import sample


@pytest.mark.lab
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    # The demo brings up its own lab (vcsim, loop LUN): root and the lab's tools needed.
    lab_helpers.need_root()
    lab_helpers.need_tool("go", "nbdkit", "losetup", "mkfs.ext4", "mount")
    r = subprocess.run([sys.executable, "-m", "vmrestore.demo", "--size", "16M", "--workdir",
                        str(tmp_path / "w"), "--lab-dir", str(tmp_path / "lab"), "--lab-down"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all disks identical" in r.stdout
    assert "4 transport data" in r.stdout and "OK in" in r.stdout  # the restore report
    assert (tmp_path / "w" / "vm-full.vmrb").exists() and (tmp_path / "w" / "vm-inc1.vmrb").exists()


def test_sample_mix_and_determinism(tmp_path: Path) -> None:
    counts = sample.write_sample_disk(str(tmp_path / "a.img"), 20 * sample.MIB + 512, seed=4)
    assert counts == {"zero": 8, "text": 6, "random": 7}
    sample.write_sample_disk(str(tmp_path / "b.img"), 20 * sample.MIB + 512, seed=4)
    a, b = (tmp_path / "a.img").read_bytes(), (tmp_path / "b.img").read_bytes()
    assert a == b and len(a) == 20 * sample.MIB + 512
    blocks = [a[i:i + sample.MIB] for i in range(0, len(a), sample.MIB)]
    kinds = sample.block_kinds(len(blocks), 4)
    for blk, k in zip(blocks, kinds, strict=True):
        assert (blk.count(0) == len(blk)) == (k == sample.KIND_ZERO)
        if k == sample.KIND_TEXT:
            assert max(blk) < 128  # text-like
    assert len({bytes(b) for b, k in zip(blocks, kinds, strict=True) if k}) == 13
    sample.write_sample_disk(str(tmp_path / "c.img"), 20 * sample.MIB + 512, seed=5)
    assert (tmp_path / "c.img").read_bytes() != a


def test_change_blocks_and_vm_config(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    sample.write_sample_disk(str(p), 10 * sample.MIB, seed=1)
    before = p.read_bytes()
    changed = sample.change_blocks(str(p), 4, seed=2)
    after = p.read_bytes()
    diff = {i // sample.MIB for i in np.flatnonzero(np.frombuffer(before, np.uint8)
                                                    != np.frombuffer(after, np.uint8))}
    assert diff <= set(changed) and len(changed) == 4
    paths, cfg = sample.write_sample_vm(str(tmp_path / "vm"), 2 * sample.MIB, seed=3)
    c = json.loads(Path(cfg).read_text())
    assert len(paths) == 2
    assert [d["provisioning"] for d in c["disks"]] == ["thick-eager", "thin"]
    assert c["nics"][0]["network"] == "VM Network"
