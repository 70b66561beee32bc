"""restore-disk to a new file under signals, kill -9 and a racing second run.

SIGTERM and SIGHUP stop it like Ctrl-C (exit 130, one message naming the signal);
no run that did not finish leaves a file under the target's name; kill -9 leaves a
hidden partial file and a checkpoint that `--resume` continues to a byte-identical
disk; a second run for the same target while the first lives is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core_helpers import backup

MiB = 1 << 20
RATE = "128M"  # --max-rate of the runs a test stops: 256 MiB in 2 s


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 256 MiB incompressible disk and its backup (codec none: quick to make). Unlimited,
    it restores in under 0.2 s here, faster than a test can see a checkpoint and signal:
    the runs a test interrupts are held to RATE, so they last about two seconds."""
    d = tmp_path_factory.mktemp("signals")
    img = d / "disk.img"
    with open(img, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    return img, backup(img, d / "b.vmrb", "--codec", "none")


def _default_signals() -> None:
    """In the child: the signals these tests send at their defaults, whatever the test
    runner inherited (under `nohup` SIGHUP is ignored, and vmrestore rightly keeps it so)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _start(bk: Path | str, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmrestore", "restore-disk", str(bk),
                             "--disk", "0", "--to", str(out), "-q", "--threads", "1",
                             "--connections", "1", "--checkpoint-every", "0.1",
                             "--max-rate", RATE, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _wait_checkpoint(proc: subprocess.Popen[str], out: Path) -> dict:
    state = out.with_name(f".{out.name}.vmrestore-resume")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            doc = json.loads(state.read_text())
            if doc["entry"] > 0:
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint before the run ended: {proc.communicate()}")


def _leftovers(d: Path, out: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{out.name}"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_stops_like_ctrl_c_and_nothing_looks_restored(
        tmp_path: Path, big: tuple[Path, Path], sig: signal.Signals) -> None:
    _img, bk = big
    out = tmp_path / "new.img"
    proc = _start(bk, out)
    _wait_checkpoint(proc, out)
    proc.send_signal(sig)
    _o, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("vmrestore: ")
              and "interrupted" in ln]
    assert len(errors) == 1, err
    if sig != signal.SIGINT:
        assert sig.name in errors[0]
    assert not out.exists()  # never a file that looks restored
    # progress was recorded: the partial file is kept for --resume, and said so
    assert "--resume" in err
    assert _leftovers(tmp_path, out) == [f".{out.name}.vmrestore-partial",
                                         f".{out.name}.vmrestore-resume"]


def test_kill9_then_resume_is_byte_identical(tmp_path: Path, big: tuple[Path, Path]) -> None:
    img, bk = big
    out = tmp_path / "new.img"
    proc = _start(bk, out)
    ckpt = _wait_checkpoint(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not out.exists()
    assert ckpt["entry"] > 0
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--to", str(out), "--resume", "--json", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["target"] == str(out)
    # it continued from the recorded checkpoint, not from the start of the plan
    assert 0 < res["start_entry"] < res["entries"]
    assert out.read_bytes() == img.read_bytes()
    assert _leftovers(tmp_path, out) == []


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path, big: tuple[Path, Path]) -> None:
    _img, bk = big
    out = tmp_path / "new.img"
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--to", str(out), "--resume", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nothing to resume" in r.stderr, r.stderr
    proc = _start(bk, out)
    _wait_checkpoint(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # another disk index than the killed run's
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--point", bk.name, "--to", str(out), "--resume", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must ask for the same" in r.stderr, r.stderr
    # the partial file replaced by another one
    partial = out.with_name(f".{out.name}.vmrestore-partial")
    other = partial.with_name("other")
    other.write_bytes(b"x")
    other.replace(partial)  # renamed over it: a new inode (unlink + create may reuse the old one)
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--to", str(out), "--resume", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6 and "replaced since" in r.stderr, r.stderr
    # without --resume a fresh run replaces a dead run's leftovers and succeeds
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                        "0", "--to", str(out), "-q"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path, out) == []


def test_second_run_for_the_same_target_is_refused_while_the_first_lives(
        tmp_path: Path, big: tuple[Path, Path]) -> None:
    img, bk = big
    out = tmp_path / "new.img"
    first = _start(bk, out)
    _wait_checkpoint(first, out)
    os.kill(first.pid, signal.SIGSTOP)  # alive, but making no progress meanwhile
    try:
        second = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk),
                                 "--disk", "0", "--to", str(out), "-q"],
                                capture_output=True, text=True, timeout=60)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _o, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 6 and "another restore is writing it" in second.stderr
    assert out.read_bytes() == img.read_bytes()
    assert _leftovers(tmp_path, out) == []


def test_kill9_then_resume_from_a_repository_agent(tmp_path: Path,
                                                   big: tuple[Path, Path]) -> None:
    """The same through repo://: the checkpoint names the URL, the point id comes over the
    wire, and --resume pulls only the rest of the disk from the agent."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mover"))
    from mover_helpers import TOKEN, AgentProc

    img, bk = big
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    agent = AgentProc(bk.parent, tok).start()
    try:
        url = agent.url(bk.name)
        out = tmp_path / "new.img"
        proc = _start(url, out, "--token-file", str(tok))
        ckpt = _wait_checkpoint(proc, out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert ckpt["backup"] == url and not out.exists()
        r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", url, "--disk",
                            "0", "--to", str(out), "--resume", "--token-file", str(tok),
                            "--json", "-q"], capture_output=True, text=True, timeout=120)
    finally:
        agent.stop()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["start_entry"] > 0
    assert out.read_bytes() == img.read_bytes()
    assert _leftovers(tmp_path, out) == []
