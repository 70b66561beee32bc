"""NBD early writeback (flush-every=MiB): unwaited flushes while writing, bytes still exact.

Why: a server writing into its page cache otherwise syncs everything at our
final flush; the writer sends a flush every N MiB written so the target's
disk works while we decompress (docs/core.md). Counted with nbdkit's log
filter against a real nbdkit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core_helpers import MiB, backup, make_image, nbdkit, synth_plan, wait_written
from vmrestore import pipeline as pl
from vmrestore.errors import UsageError
from vmrestore.restore_disk import run_plan
from vmrestore.transport.uri import parse_target


def _flushes(log: Path) -> int:
    """Flush requests the server answered, from nbdkit's log filter."""
    return len(re.findall(r"\.\.\.Flush id=\d+ return=0", log.read_text()))


def _restore(tmp_path: Path, every: str, blocks: int = 12, lanes: int = 1) -> tuple[int, bool]:
    data = make_image(tmp_path / "disk.img", blocks, seed=21)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(b"\x5a" * len(data))
    log = tmp_path / "nbdkit.log"
    with nbdkit(tmp_path, target, "--filter=log", f"logfile={log}") as srv:
        run_plan(plan, [str(tmp_path / "src.bin")], f"{srv.uri}&flush-every={every}",
                 capacity=len(data), lanes=lanes, queue_depth=4)
    return _flushes(log), target.read_bytes() == data


def test_flush_every_sends_flushes_while_writing(tmp_path: Path) -> None:
    flushes, same = _restore(tmp_path, "1")
    assert same
    # the first acknowledged MiB starts an early flush (one in flight at a time, so how
    # many more follow depends on timing), then the final flush
    assert flushes >= 2


@pytest.mark.parametrize("lanes", [1, 2])
def test_flush_every_zero_flushes_once_per_connection(tmp_path: Path, lanes: int) -> None:
    flushes, same = _restore(tmp_path, "0", lanes=lanes)
    assert same
    assert flushes == lanes


def test_flush_every_counts_the_bytes_of_all_lanes(tmp_path: Path) -> None:
    """14 MiB of data over 2 lanes, flush-every=10: the bytes of both lanes count, so
    one early flush goes out before the two final ones. (The lanes take blocks from one
    queue, so how the 14 MiB split is up to timing; the count does not depend on it.)"""
    flushes, same = _restore(tmp_path, "10", blocks=24, lanes=2)
    assert same
    assert flushes >= 3


def test_flush_every_parsed_and_checked() -> None:
    assert parse_target("nbd+unix:///?socket=/s&flush-every=64").options == {"flush-every": "64"}
    assert parse_target("nbd+unix:///?socket=/s&flush-every=64").nbd_uri == (
        "nbd+unix:///?socket=/s")
    with pytest.raises(UsageError, match="flush-every= must be a number"):
        parse_target("nbd+unix:///?socket=/s&flush-every=x")
    assert pl.DEFAULT_NBD_FLUSH_EVERY_MIB > 0



def test_server_killed_with_early_flushes_in_flight(tmp_path: Path) -> None:
    """Server lost while early flushes are being sent (every MiB): bounded retries, exit 7."""
    make_image(tmp_path / "disk.img", 24, block_size=MiB, seed=23)
    bk = backup(tmp_path / "disk.img", tmp_path / "b.vmrb")
    target = tmp_path / "t.img"
    target.write_bytes(bytes(24 * MiB))
    with nbdkit(tmp_path, target, "--filter=delay", "delay-write=100ms",
                "delay-zero=100ms") as srv:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk", "0", "--to",
             f"{srv.uri}&retries=2&flush-every=1", "-q", "--queue-depth", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_written(target, proc)
        srv.kill()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err  # TransportError
    assert err.strip().splitlines()[-1].startswith("vmrestore: error: disk 0:")
    assert "Traceback" not in err
