"""How a finished `vmrestore` process ends: restore-disk skips the interpreter's
teardown (cli._exit_now) but loses no output, no log line and no exit handler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from core_helpers import MiB, backup, make_image
from vmrestore import cli


def _buffered_env() -> dict[str, str]:
    """Block-buffered stdout (a pipe, no PYTHONUNBUFFERED): output only reaches it if flushed."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def test_a_finished_restore_disk_flushes_its_json_and_its_log(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = make_image(image, 6)
    vmrb = backup(image, tmp_path / "disk.vmrb")
    log = tmp_path / "run.log"
    out = tmp_path / "out.raw"
    r = subprocess.run([sys.executable, "-m", "vmrestore", "--log-file", str(log), "restore-disk",
                        str(vmrb), "--disk", "0", "--to", str(out), "--json", "-q"],
                       capture_output=True, text=True, timeout=120, env=_buffered_env())
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # the whole document, not a cut-off buffer
    assert summary["capacity"] == 6 * MiB and summary["verified_blocks"] > 0
    assert out.read_bytes() == data
    last = log.read_text().splitlines()[-1]  # the run's last log line made it to the file
    assert "restore-disk done: disk 0 ->" in last and f"{summary['verified_blocks']} blocks" in last


def test_quick_exit_runs_the_exit_handlers_and_flushes_stdout() -> None:
    code = ("import atexit, sys\n"
            "from vmrestore import cli\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "sys.stdout.write('before exit;')\n"
            "cli._exit_now(3)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=_buffered_env())
    assert r.returncode == 3, r.stderr
    assert r.stdout == "before exit;handler ran\n"


def test_quick_exit_waits_as_usual_while_a_thread_still_works() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=False)
    worker.start()
    try:
        cli._exit_now(0)  # returns: the normal exit will wait for the worker
    finally:
        stop.set()
        worker.join()
