"""Never destroy what is not ours: chain files, a racer's target file (docs/errors.md, Ownership).

Real backups and real restore-disk / backup create runs: the refusals are
checked through the CLI (one line, exit 2, the file untouched, --force or not),
the race for one new target file both deterministically (the racer's file
appears exactly between our check and our create) and with two real processes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_helpers import MiB, backup, make_image
from vmrestore import ownership


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full point, an incremental on it, and the disk they were made from (never changed)."""
    tmp_path = tmp_path_factory.mktemp("ownership")
    img = tmp_path / "disk.img"
    make_image(img, 4, seed=7)
    p0 = backup(img, tmp_path / "p0.vmrb")
    with open(img, "r+b") as f:
        f.write(b"\x42" * MiB)
    p1 = backup(img, tmp_path / "p1.vmrb", parent=p0)
    return {"img": img, "p0": p0, "p1": p1}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _refused(capsys: pytest.CaptureFixture[str], *argv: str, words: str) -> None:
    """Run the command (in-process, the real CLI entry): exit 2, one line naming why."""
    from vmrestore import cli

    capsys.readouterr()
    rc = cli.main([*argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_restore_never_writes_into_its_own_chain(tmp_path: Path, chain: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p0, p1 = chain["p0"], chain["p1"]
    before = {p: _digest(p) for p in (p0, p1)}
    hard = tmp_path / "hard.img"
    os.link(p0, hard)
    sym = tmp_path / "sym.img"
    sym.symlink_to(p0)
    why = "a file of the backup chain"
    for t in (str(p0), str(p1), f"file://{p0}", str(hard), str(sym)):
        _refused(capsys, "restore-disk", str(p1), "--disk", "0", "--to", t, "--force", "-q",
                 words=why)
    # an earlier point read from the latest: the file named is protected as well
    _refused(capsys, "restore-disk", str(p1), "--disk", "0", "--point", p0.name, "--to", str(p1),
             "--force", "-q", words=why)
    assert {p: _digest(p) for p in (p0, p1)} == before


def test_backup_create_never_replaces_its_parent_or_a_source(
        tmp_path: Path, chain: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    img, p0, p1 = chain["img"], chain["p0"], chain["p1"]
    before = {p: _digest(p) for p in (img, p0, p1)}
    link = tmp_path / "link.vmrb"
    link.symlink_to(p1)
    for out, why in ((p1, "chain it extends"), (p0, "chain it extends"),
                     (link, "chain it extends"), (img, "a disk this backup reads")):
        _refused(capsys, "backup", "create", "--disk", str(img), "--parent", str(p1), "-o",
                 str(out), "--force", "-q", words=why)
    _refused(capsys, "backup", "create", "--disk", str(img), "-o", str(img), "--force", "-q",
             words="a disk this backup reads")
    assert {p: _digest(p) for p in (img, p0, p1)} == before


def test_the_loser_of_a_race_for_a_new_target_removes_nothing(
        tmp_path: Path, chain: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The racer's file appears between our 'does it exist' and our create (O_EXCL)."""
    from vmrestore import cli
    from vmrestore.commands import restore_disk as cmd

    out = tmp_path / "new.img"
    winner = b"winner's disk" * 1000
    real = cmd._new_local_file

    def racer_creates(target: str) -> Path | None:
        path = real(target)        # the loser saw no file...
        out.write_bytes(winner)    # ...and the winner created it right then
        return path

    monkeypatch.setattr(cmd, "_new_local_file", racer_creates)
    rc = cli.main(["restore-disk", str(chain["p1"]), "--disk", "0", "--to", str(out), "-q"])
    assert rc == 6  # the path is taken: this run's failure
    assert out.read_bytes() == winner


def test_two_real_restores_racing_for_one_new_file(tmp_path: Path,
                                                   chain: dict[str, Path]) -> None:
    """Whoever reports success finds its file in place, byte-identical to the disk."""
    out = tmp_path / "race.img"
    argv = [sys.executable, "-m", "vmrestore", "restore-disk", str(chain["p1"]), "--disk", "0",
            "--to", str(out), "-q"]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0, results               # one of them wins...
    assert codes[1] in (0, 6), results          # ...the other wins too (serialised) or is refused
    assert out.read_bytes() == chain["img"].read_bytes()


def test_removal_is_by_identity_not_by_name(tmp_path: Path) -> None:
    mine = tmp_path / "t.img"
    fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    st = os.fstat(fd)
    os.close(fd)
    ident = ownership.record_created(str(mine), st.st_dev, st.st_ino)
    assert ident is not None and ownership.created_here(mine) == ident
    os.unlink(mine)
    mine.write_bytes(b"someone else's")  # same name, another file
    assert not ownership.remove_if_ours(ident)
    assert mine.read_bytes() == b"someone else's"
    # and what is still ours goes
    fd = os.open(tmp_path / "u.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    st = os.fstat(fd)
    os.close(fd)
    assert ownership.remove_if_ours(ownership.record_created(str(tmp_path / "u.img"),
                                                             st.st_dev, st.st_ino))
    assert not (tmp_path / "u.img").exists()


def test_a_loop_device_over_a_chain_file_is_that_file(tmp_path: Path,
                                                      chain: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A hot-add of the backup itself (a loop device over it) is refused like the file."""
    from core_helpers import loop_device

    p0, p1 = chain["p0"], chain["p1"]
    before = _digest(p0)
    with loop_device(p0) as dev:
        _refused(capsys, "restore-disk", str(p1), "--disk", "0", "--to", dev, "-q",
                 words="a file of the backup chain")
    assert _digest(p0) == before
