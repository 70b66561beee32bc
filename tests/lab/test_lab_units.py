"""Lab logic without a running lab: extent maps on local files, status files, the build cache."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from lab_helpers import need, need_tool
from vmrestore.errors import LabError
from vmrestore.lab.client import default_lab_dir, lab_is_up, load_lab
from vmrestore.transport.extents import ExtentMapError, fiemap, written_map

MiB = 1 << 20


def _fiemap_works(path) -> bool:
    try:
        fiemap(path)
        return True
    except OSError:
        return False


def test_written_map_eager_file(tmp_path):
    p = tmp_path / "eager.img"
    p.write_bytes(os.urandom(2 * MiB))
    need(_fiemap_works(p), "filesystem without FIEMAP")
    m = written_map(p)
    assert m[0][0] == 0 and sum(n for _, _, n in m) == 2 * MiB
    pos = 0
    for off, dev, n in m:
        assert off == pos and dev > 0 and n > 0
        pos += n


def test_written_map_refuses_holes_and_unwritten(tmp_path):
    thin = tmp_path / "thin.img"
    with open(thin, "wb") as f:
        f.truncate(2 * MiB)
    need(_fiemap_works(thin), "filesystem without FIEMAP")
    with pytest.raises(ExtentMapError, match="hole at offset 0"):
        written_map(thin)
    partial = tmp_path / "partial.img"
    with open(partial, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(2 * MiB)
    with pytest.raises(ExtentMapError, match=f"hole at offset {MiB}"):
        written_map(partial)
    lazy = tmp_path / "lazy.img"
    fd = os.open(lazy, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 2 * MiB)
    finally:
        os.close(fd)
    with pytest.raises(ExtentMapError, match="unwritten"):
        written_map(lazy)


def test_load_lab_without_lab(tmp_path):
    with pytest.raises(LabError, match="no lab is up"):
        load_lab(tmp_path)
    assert not lab_is_up(tmp_path)


def test_load_lab_wrong_version(tmp_path):
    (tmp_path / "lab.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(LabError, match="version 99"):
        load_lab(tmp_path)


def test_default_lab_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VMRESTORE_LAB_DIR", str(tmp_path / "x"))
    assert default_lab_dir() == tmp_path / "x"
    monkeypatch.delenv("VMRESTORE_LAB_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_lab_dir() == tmp_path / ".lab"


def test_status_of_no_lab(tmp_path, cli):
    proc = cli("lab", "status", "--json", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["state"] == "down"
    proc = cli("lab", "down", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 0 and "no lab" in proc.stdout


@pytest.mark.slow
def test_vcsim_build_is_cached():
    need_tool("go")
    from vmrestore.lab.build import GOVMOMI_SIM, vcsim_binary

    need(GOVMOMI_SIM.is_dir(), "govmomi sources missing")
    first = vcsim_binary()
    assert vcsim_binary() == first and os.access(first, os.X_OK)
    proc = subprocess.run([str(first), "-h"], capture_output=True, text=True, timeout=30)
    assert "-ds-vvol" in proc.stderr


@pytest.mark.root
def test_attach_gives_a_writable_device_where_a_fence_left_the_number_read_only(tmp_path):
    """blockdev --setro outlives losetup -d: the next attach of that number must clear it."""
    from lab_helpers import need_root
    from vmrestore.lab import loopdev

    need_root()
    need_tool("losetup", "blockdev")
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    for p in (first, second):
        with open(p, "wb") as f:
            f.truncate(MiB)
    dev = loopdev.attach(first, "attaching", LabError)
    try:
        assert loopdev.fence(dev) and loopdev.is_read_only(dev)
    finally:
        loopdev.detach(dev, LabError)
    assert not loopdev.is_bound(dev)
    # The hazard is real on this kernel: the unbound device is still read-only.
    assert loopdev.is_read_only(dev), "blockdev --setro did not outlive the detach"
    dev2 = loopdev.attach(second, "attaching", LabError)
    try:
        assert dev2 == dev, f"expected the freed {dev} back (first free), got {dev2}"
        assert not loopdev.is_read_only(dev2)
        fd = os.open(dev2, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"w" * 4096, 0) == 4096
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        loopdev.detach(dev2, LabError)
    assert second.read_bytes()[:4096] == b"w" * 4096


@pytest.mark.root
def test_unfence_unbound_leaves_bound_devices_fenced(tmp_path):
    from lab_helpers import need_root
    from vmrestore.lab import loopdev

    need_root()
    need_tool("losetup", "blockdev")
    img = tmp_path / "held.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    dev = loopdev.attach(img, "attaching", LabError)
    try:
        loopdev.fence(dev)
        assert loopdev.unfence_unbound([dev]) == {dev}
        assert loopdev.is_read_only(dev)
    finally:
        loopdev.detach(dev, LabError)
    assert loopdev.unfence_unbound([dev]) == set()
    assert not loopdev.is_read_only(dev)
