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
