"""A target that stops answering (SIGSTOP of a real nbdkit): every wait is bounded.

The server's kernel still accepts connections and buffers requests, so nothing
fails on its own: only the writer's deadlines (``timeout=`` in the URI) and
Ctrl-C end the run. Each case asserts the exit code, one error line, and time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core_helpers import MiB, Nbdkit, backup, make_image, nbdkit, wait_written


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[bytes, Path]:
    data = make_image(tmp_path / "disk.img", 24, block_size=MiB, seed=43)
    return data, backup(tmp_path / "disk.img", tmp_path / "b.vmrb")


@contextlib.contextmanager
def stopped(srv: Nbdkit) -> Iterator[None]:
    """SIGSTOP the server; always continue it afterwards (so it can be stopped)."""
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmrestore", "restore-disk", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _writing(srv: Nbdkit, bk: Path, target: Path, uri_extra: str = "") -> subprocess.Popen[str]:
    """A restore-disk into srv, once it has written data (so it is mid-restore)."""
    proc = _popen(str(bk), "--disk", "0", "--to", srv.uri + uri_extra, "-q",
                  "--connections", "1", "--queue-depth", "2")
    wait_written(target, proc)
    assert proc.poll() is None, proc.communicate()
    return proc


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vmrestore: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_server_stopped_mid_restore_fails_in_bounded_time(
        tmp_path: Path, backed_up: tuple[bytes, Path]) -> None:
    data, bk = backed_up
    target = tmp_path / "t.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, "--filter=delay", "delay-write=150ms") as srv:
        proc = _writing(srv, bk, target, "&timeout=2&retries=1")
        with stopped(srv):
            t0 = time.monotonic()
            _out, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
    # one request deadline, one reconnect whose handshake gets no answer, slack
    assert took < 15, took
    assert proc.returncode == 7, err  # TransportError
    line = _one_error_line(err)
    assert "did not answer in 2 s" in line, line


def test_server_stopped_before_connect_is_a_timeout(tmp_path: Path) -> None:
    target = tmp_path / "t.img"
    target.write_bytes(bytes(4 * MiB))
    from vmrestore.errors import TransportError
    from vmrestore.transport.uri import open_target

    with nbdkit(tmp_path, target, tcp=True) as srv, stopped(srv):
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="did not answer in 1 s"):
            open_target(srv.uri + "?timeout=1", 4 * MiB)
        assert time.monotonic() - t0 < 5


def test_ctrl_c_stops_a_restore_stuck_on_a_silent_server(
        tmp_path: Path, backed_up: tuple[bytes, Path]) -> None:
    data, bk = backed_up
    target = tmp_path / "t.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, "--filter=delay", "delay-write=150ms") as srv:
        proc = _writing(srv, bk, target)  # default timeout (30 s): only Ctrl-C ends it quickly
        with stopped(srv):
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
    assert took < 10, took
    assert proc.returncode == 130, err
    assert "interrupted" in _one_error_line(err)


def test_ctrl_c_stops_a_connect_nobody_answers(tmp_path: Path,
                                               backed_up: tuple[bytes, Path]) -> None:
    data, bk = backed_up
    target = tmp_path / "t.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, tcp=True) as srv, stopped(srv):
        proc = _popen(str(bk), "--disk", "0", "--to", srv.uri, "-q")
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    assert took < 10, took
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_closing_a_job_ends_a_checkpoint_flush_stuck_on_a_silent_server(tmp_path: Path) -> None:
    """A checkpoint thread's flush waits on a stopped server: close() cancels it and returns."""
    from core_helpers import synth_plan
    from vmrestore import pipeline as pl
    from vmrestore.errors import Interrupted

    data = make_image(tmp_path / "disk.img", 24, block_size=MiB, seed=44)
    src = tmp_path / "src.bin"
    plan = synth_plan(data, src)
    target = tmp_path / "t.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, "--filter=delay", "delay-write=150ms") as srv:
        w = pl.Writer.open_nbd(srv.uri, len(data))  # default timeout: 30 s
        try:
            job = pl.Job(plan, [str(src)], w, settings=pl.Settings(lanes=1, queue_depth=2))
            job.start()
            deadline = time.monotonic() + 30
            while job.counters().bytes_written == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.counters().bytes_written > 0
            raised: list[BaseException] = []

            def checkpoint() -> None:
                try:
                    job.flush()
                except BaseException as e:
                    raised.append(e)

            with stopped(srv):
                t = threading.Thread(target=checkpoint)
                t.start()
                time.sleep(0.5)
                assert t.is_alive()  # the flush waits for the server
                t0 = time.monotonic()
                job.close()
                took = time.monotonic() - t0
                t.join(10)
            assert not t.is_alive()
            assert took < 10, took
            assert len(raised) == 1 and isinstance(raised[0], Interrupted), raised
            with pytest.raises(Interrupted):
                job.flush()  # after close: the job's error, not a silent success
        finally:
            w.close()


def test_ctrl_c_during_a_reconnect_drain_ends_within_the_grace(
        tmp_path: Path, backed_up: tuple[bytes, Path]) -> None:
    """A write answered ESHUTDOWN starts a reconnect, which first lets the old connection
    answer what it owes (up to 5 s); a Ctrl-C meanwhile ends that wait after 1 s."""
    data, bk = backed_up
    target = tmp_path / "t.img"
    target.write_bytes(bytes(len(data)))
    # the error filter sits nearest the client: an injected ESHUTDOWN comes back at
    # once, every other write waits 20 s in the delay filter behind it
    with nbdkit(tmp_path, target, "--filter=error", "--filter=delay", "error=ESHUTDOWN",
                "error-pwrite-rate=50%", "delay-write=20") as srv:
        proc = _popen(str(bk), "--disk", "0", "--to", srv.uri, "-q",
                      "--connections", "1", "--queue-depth", "4")
        time.sleep(1.5)  # start-up (~0.2 s), the first ESHUTDOWN, then the drain (5 s bound)
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert took < 3, took  # the drain's own bound held it ~3.7 s here (checked)
