"""The NBD writer (libnbd) against a real nbdkit: unix socket, TCP, multi-conn, zeroing."""

from __future__ import annotations

from pathlib import Path

import pytest

from core_helpers import MiB, allocated, make_image, nbdkit, synth_plan
from vmrestore.errors import TargetError, TransportError, UsageError
from vmrestore.plan import KIND_ZERO
from vmrestore.restore_disk import run_plan
from vmrestore.transport.uri import open_target, parse_target


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("lanes", [1, 3])
def test_nbd_restore_byte_identical(tmp_path: Path, tcp: bool, lanes: int) -> None:
    data = make_image(tmp_path / "disk.img", 16, tail=8192, seed=11)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(b"\xaa" * len(data))  # garbage: zero runs must really be zeroed
    with nbdkit(tmp_path, target, tcp=tcp) as srv:
        res = run_plan(plan, [str(tmp_path / "src.bin")], srv.uri, capacity=len(data),
                       lanes=lanes, queue_depth=4)
    assert target.read_bytes() == data
    assert res.writer == "nbd" and res.transport == "nbd"
    assert res.settings["lanes"] == lanes  # nbdkit file offers multi-conn
    assert res.bytes_zeroed == int(plan["length"][plan["kind"] == KIND_ZERO].sum())
    # write_zeroes may trim (nbdkit file punches holes): zero runs are not allocated
    assert allocated(target) < len(data)


def test_nbd_target_zeroed_skips_zero_runs(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 10, seed=12)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target) as srv:
        res = run_plan(plan, [str(tmp_path / "src.bin")], srv.uri, capacity=len(data),
                       target_zeroed=True)
    assert target.read_bytes() == data
    assert res.bytes_zeroed == 0 and res.bytes_skipped > 0


def test_nbd_export_smaller_is_refused(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 4, seed=13)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(b"\x11" * (len(data) - MiB))
    with nbdkit(tmp_path, target) as srv:
        with pytest.raises(TargetError, match="smaller than the disk"):
            run_plan(plan, [str(tmp_path / "src.bin")], srv.uri, capacity=len(data))
    assert target.read_bytes() == b"\x11" * (len(data) - MiB)


def test_nbd_no_server_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        open_target(f"nbd+unix:///?socket={tmp_path}/none.sock", MiB)


def test_nbd_without_multi_conn_uses_one_connection(tmp_path: Path) -> None:
    data = make_image(tmp_path / "disk.img", 6, seed=14)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, "--filter=multi-conn", "multi-conn-mode=disable") as srv:
        res = run_plan(plan, [str(tmp_path / "src.bin")], srv.uri, capacity=len(data),
                       lanes=4)
    assert res.settings["lanes"] == 1
    assert target.read_bytes() == data


def test_nbd_uri_forms() -> None:
    s = parse_target("nbd+unix:///exp?socket=/run/x.sock&connections=4&retries=5")
    assert s.kind == "nbd" and s.nbd_uri == "nbd+unix:///exp?socket=/run/x.sock"
    assert s.options == {"connections": "4", "retries": "5"}
    s = parse_target("nbds://alice@host:10809/disk?tls-psk-file=/k.psk")
    assert s.tls and s.transport == "nbdssl" and "tls-psk-file=/k.psk" in (s.nbd_uri or "")
    assert parse_target("/dev/sdb").kind == "file"
    assert parse_target("file:///dev/sdb").path == "/dev/sdb"
    assert parse_target("san:/dev/loop3?map=/m.json").map_path == "/m.json"
    for bad in ("nbd+unix:///x", "nbd:///x", "ftp://x/y", "san:/dev/x", "file://host/x", ""):
        with pytest.raises(UsageError):
            parse_target(bad)


def test_nbd_request_size_splits_writes(tmp_path: Path) -> None:
    """request-size=64: every 1 MiB block goes out as 16 writes, the bytes still land."""
    import re

    data = make_image(tmp_path / "disk.img", 6, tail=4096, seed=13)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(b"\xaa" * len(data))
    log = tmp_path / "nbdkit.log"
    with nbdkit(tmp_path, target, "--filter=log", f"logfile={log}") as srv:
        res = run_plan(plan, [str(tmp_path / "src.bin")], srv.uri + "&request-size=64",
                       capacity=len(data), queue_depth=4)
    assert target.read_bytes() == data
    sizes = [int(c, 16) for c in re.findall(r"Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)",
                                            log.read_text())]
    assert sizes and max(sizes) == 64 << 10
    assert sum(sizes) == res.bytes_written


def test_nbd_split_write_failure_is_reported_once(tmp_path: Path) -> None:
    """A part answered with EIO fails its block with a target error naming an offset."""
    data = make_image(tmp_path / "disk.img", 4, seed=14)
    plan = synth_plan(data, tmp_path / "src.bin")
    target = tmp_path / "target.img"
    target.write_bytes(bytes(len(data)))
    with nbdkit(tmp_path, target, "--filter=error", "error-pwrite=EIO",
                "error-pwrite-rate=100%") as srv, pytest.raises(TargetError,
                                                                match=r"disk offset \d+"):
        run_plan(plan, [str(tmp_path / "src.bin")], srv.uri + "&request-size=256&retries=1",
                 capacity=len(data), queue_depth=2)
