"""Two runs on the same names and targets (ownership races of restores are in
tests/test_ownership.py and the restore tests; these are the others)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

MiB = 1 << 20


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmrestore", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _disk(path: Path, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def test_two_backups_racing_for_one_output(tmp_path: Path) -> None:
    """Each writes its own temp file and renames: the output is one of them, whole."""
    a, b = _disk(tmp_path / "a.img", 1), _disk(tmp_path / "b.img", 2)
    out = tmp_path / "same.vmrb"
    procs = [_cli("backup", "create", "--disk", str(tmp_path / n), "-o", str(out), "-q",
                  "--force") for n in ("a.img", "b.img")]
    codes = [p.wait(120) for p in procs]
    errs = [p.stderr.read() if p.stderr else "" for p in procs]
    assert codes.count(0) >= 1 and all(c in (0, 6) for c in codes), errs
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(out), "--disk",
                        "0", "--to", str(tmp_path / "r.img"), "-q"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.img").read_bytes() in (a, b)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_backup_replaced_while_a_restore_reads_it(tmp_path: Path) -> None:
    """A restore reads the file it opened: a new backup renamed over it changes nothing."""
    a = _disk(tmp_path / "a.img", 3)
    _disk(tmp_path / "b.img", 4)
    out = tmp_path / "p.vmrb"
    assert _cli("backup", "create", "--disk", str(tmp_path / "a.img"), "-o", str(out),
                "-q").wait(120) == 0
    reader = _cli("restore-disk", str(out), "--disk", "0", "--to", str(tmp_path / "r.img"),
                  "-q", "--threads", "1", "--connections", "1")
    writer = _cli("backup", "create", "--disk", str(tmp_path / "b.img"), "-o", str(out), "-q",
                  "--force")
    assert writer.wait(120) == 0, writer.stderr.read() if writer.stderr else ""
    rc = reader.wait(120)
    err = reader.stderr.read() if reader.stderr else ""
    if rc == 0:  # it opened the old file before the rename (or the new one after)
        assert (tmp_path / "r.img").read_bytes() in (a, (tmp_path / "b.img").read_bytes())
    else:  # never a mix: at worst one clear error
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r.img").exists()
