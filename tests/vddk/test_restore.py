"""Restores through the core's VDDK writer over vddk_sim: byte-identical, and faults."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from vddk_helpers import MIB, backed_up_disk, sim_env

from vmrestore import vddk
from vmrestore.errors import TargetError, VddkError

SIZE = 24 * MIB


@pytest.fixture
def source(tmp_path):
    """A backup of a 24 MiB disk and its bytes."""
    return backed_up_disk(tmp_path, SIZE, seed=11)


def test_restore_new_disk_byte_identical_and_skips_zeros(sim, source):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    r = vddk.restore_disk_vddk(bk, 0, sim.uri(new="1"), libdir=sim.libdir)
    assert flat.read_bytes() == data
    assert r.transport == "nbd"
    assert r.bytes_skipped > 0 and r.bytes_zeroed == 0
    assert r.bytes_written + r.bytes_skipped == SIZE
    calls = sim.calls()
    assert calls.index("VixDiskLib_PrepareForAccess") < calls.index("VixDiskLib_Open")
    assert calls.index("VixDiskLib_Flush") < calls.index("VixDiskLib_Close")
    assert calls.index("VixDiskLib_Disconnect") < calls.index("VixDiskLib_EndAccess")
    assert calls[-1] == "VixDiskLib_Cleanup"  # after every session, after EndAccess


def test_restore_over_old_data_writes_the_zeros(sim, source):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    flat.write_bytes(b"\xee" * SIZE)  # not a new disk: zero runs must be written
    r = vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)
    assert flat.read_bytes() == data
    assert r.bytes_skipped == 0
    assert r.bytes_written == SIZE


@pytest.mark.parametrize(("queue_depth", "max_request", "workers"),
                         [(1, 2 * MIB, 1), (32, 64 * 1024, 4), (4, 256 * 1024, 2)])
def test_queue_depth_and_request_splitting(sim, source, monkeypatch, queue_depth, max_request,
                                           workers):
    bk, data = source
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_WORKERS", str(workers))
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_LATENCY_US", "100")
    _, flat = sim.disk(size=SIZE)
    flat.write_bytes(b"\x01" * SIZE)
    vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir, queue_depth=queue_depth,
                           max_request=max_request)
    assert flat.read_bytes() == data


def test_san_mode_on_a_thick_disk(sim, source):
    bk, data = source
    _, flat = sim.disk(size=SIZE, thick=True)
    r = vddk.restore_disk_vddk(bk, 0, sim.uri(transports="san:nbd"), libdir=sim.libdir)
    assert r.transport == "san"
    assert flat.read_bytes() == data


def test_local_file_form(sim, source):
    bk, data = source
    _desc, flat = sim.disk(size=SIZE)
    local = sim.ds / "vm1" / "disk.vmdk"
    r = vddk.restore_disk_vddk(bk, 0, f"vddk://{local}?new=1", libdir=sim.libdir)
    assert r.transport == "file"
    assert flat.read_bytes() == data
    assert "VixDiskLib_PrepareForAccess" not in sim.calls()


def test_target_smaller_is_refused_before_writing(sim, source):
    bk, _ = source
    _, flat = sim.disk(size=SIZE - MIB)
    with pytest.raises(TargetError, match="needs"):
        vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)
    assert flat.read_bytes() == bytes(SIZE - MIB)
    assert "VixDiskLib_Cleanup" in sim.calls()


@pytest.mark.parametrize(("fault", "code", "names_offset"), [
    ("write:3:8", 8, True),            # disk full on the 3rd write
    ("write:2+:14011", 14011, True),   # connection lost from the 2nd write on
    ("open:1:4", 4, False),
    ("connect:1:26", 26, False),
    ("flush:1:16002", 16002, False),
    ("prepare:1:3014", 3014, False),
])
def test_each_fault_is_a_clear_error_and_cleanup_runs(sim, source, monkeypatch, fault, code,
                                                      names_offset):
    bk, _ = source
    sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_FAIL", fault)
    with pytest.raises(VddkError) as ei:
        vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)
    assert ei.value.code == code
    msg = str(ei.value)
    assert f"VixError {code}" in msg
    if names_offset:
        assert "[ds1] vm1/disk.vmdk" in msg
        assert re.search(r"at offset \d+", msg)
    assert sim.calls()[-1] == "VixDiskLib_Cleanup"
    if code != 3014:  # the access bracket is closed even after a failure
        assert "VixDiskLib_EndAccess" in sim.calls()


def test_cli_restore_disk(sim, source):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    proc = subprocess.run([sys.executable, "-m", "vmrestore", "vddk", "restore-disk", str(bk),
                           "--to", sim.uri(new="1"), "--json", "-q"],
                          capture_output=True, text=True, env=sim_env(sim), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["transport"] == "nbd" and out["bytes_written"] + out["bytes_skipped"] == SIZE
    assert flat.read_bytes() == data


@pytest.mark.parametrize("command", [["vddk", "restore-disk"], ["restore-disk", "--disk", "0"]])
def test_cli_fault_is_one_line_exit_10(sim, source, command):
    """One VixDiskLib write failure, one exit code (10) from both commands that can meet it."""
    bk, _ = source
    sim.disk(size=SIZE)
    env = sim_env(sim)
    env["VMRESTORE_VDDK_SIM_FAIL"] = "write:5:8"
    proc = subprocess.run([sys.executable, "-m", "vmrestore", *command, str(bk),
                           "--to", sim.uri(libdir=str(sim.libdir)), "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "VixError 8" in lines[0] and "[ds1] vm1/disk.vmdk" in lines[0]


def test_restore_disk_api_takes_vddk_uris(sim, source):
    """transport.uri's OPENERS hook: the shared restore_disk() writes through the VDDK writer."""
    from vmrestore.restore_disk import restore_disk

    bk, data = source
    _, flat = sim.disk(size=SIZE)
    r = restore_disk(str(bk), 0, sim.uri(new="1", libdir=str(sim.libdir)))
    assert r.writer == "vddk"
    assert flat.read_bytes() == data
    calls = sim.calls()
    assert calls.index("VixDiskLib_Close") < calls.index("VixDiskLib_EndAccess")
    assert calls[-1] == "VixDiskLib_Cleanup"  # after every session, after EndAccess


def test_restore_disk_api_failure_runs_cleanup(sim, source, monkeypatch):
    from vmrestore.errors import VmrError
    from vmrestore.restore_disk import restore_disk

    bk, _ = source
    sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_FAIL", "write:2:8")
    with pytest.raises(VmrError, match=r"VixError 8") as ei:
        restore_disk(str(bk), 0, sim.uri(libdir=str(sim.libdir)))
    assert isinstance(ei.value, VddkError) and ei.value.code == 8  # same class as vddk restore-disk
    assert sim.calls()[-1] == "VixDiskLib_Cleanup"


def test_cli_quick_rollback_reads_through_the_disk_handle(sim, source):
    """restore-disk --quick-rollback --to vddk://: VixDiskLib_Read on the writer's handle
    finds the changed blocks; only they are written and the disk ends byte-identical."""
    from vmrestore.restore_disk import restore_disk

    bk, data = source
    _, flat = sim.disk(size=SIZE)
    restore_disk(str(bk), 0, sim.uri(new="1", libdir=str(sim.libdir)))
    assert flat.read_bytes() == data
    changed = bytearray(data)
    for off in (3 * MIB + 4096, 7 * MIB, 20 * MIB - 512):  # blocks 3, 7 and 19
        changed[off:off + 512] = bytes(x ^ 0xA5 for x in changed[off:off + 512])
    flat.write_bytes(changed)
    proc = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                           "0", "--to", sim.uri(libdir=str(sim.libdir)), "--quick-rollback",
                           "--json", "-q"],
                          capture_output=True, text=True, env=sim_env(sim), timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["compared_entries"] == SIZE // MIB
    assert doc["differing_entries"] == 3
    assert doc["bytes_written"] + doc["bytes_zeroed"] == 3 * MIB
    assert flat.read_bytes() == data
    # the compare really reads through VixDiskLib: a failed Read is the run's one-line error
    flat.write_bytes(changed)
    env = {**sim_env(sim), "VMRESTORE_VDDK_SIM_FAIL": "read:4:16002"}
    proc = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk",
                           "0", "--to", sim.uri(libdir=str(sim.libdir)), "--quick-rollback",
                           "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 10 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "VixDiskLib_Read" in proc.stderr and "VixError 16002" in proc.stderr
