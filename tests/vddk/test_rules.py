"""VMware's VixDiskLib rules, each held by the strict vddk_sim and followed by vmrestore.vddk.

docs/vddk.md ("VMware's rules") lists the rules; each test names the one it shows.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest
from vddk_helpers import MIB, backed_up_disk, sim_env

from vmrestore import vddk
from vmrestore.errors import TargetError, VddkError

SIZE = 8 * MIB


@pytest.fixture
def source(tmp_path):
    return backed_up_disk(tmp_path, SIZE, seed=5)


def in_threads(fn, n: int = 2) -> list[Exception]:
    """Run fn(0..n-1) in n threads at once; the exceptions they raised."""
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except Exception as e:  # collected for the caller's assert
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


def _py(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)


# -- library search path ----------------------------------------------------------


def test_cli_reexecutes_with_the_search_path(sim):
    env = sim_env(sim)
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run([sys.executable, "-m", "vmrestore", "vddk", "info", "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["search_path"].startswith("LD_LIBRARY_PATH holds")


def test_in_process_load_preloads_the_companion(lib):
    assert "companions loaded by path: libvixDiskLibVim.so.8" in lib.report()["search_path"]


def test_companion_missing_fails_init_with_the_reason(sim, tmp_path):
    """Without the companion, InitEx fails as VMware's does, and the error says why."""
    import shutil

    d = tmp_path / "vddk" / "lib64"
    d.mkdir(parents=True)
    shutil.copy(vddk.sim_library(), d / "libvixDiskLib.so.8")  # no companion beside it
    proc = _py(f"from vmrestore import vddk; vddk.Library.load({str(d.parent)!r})",
               sim_env(sim))
    assert proc.returncode != 0
    assert "VixError 1" in proc.stderr and "libvixDiskLibVim.so.8" in proc.stderr
    assert "LD_LIBRARY_PATH" in proc.stderr


# -- InitEx: main thread, thread-safe loggers -----------------------------------------


def test_init_from_another_thread_is_refused(sim):
    code = ("import threading\nfrom vmrestore import vddk\nout = []\n"
            "def f():\n    try:\n        vddk.Library.load()\n    except Exception as e:\n"
            "        out.append(str(e))\n"
            "t = threading.Thread(target=f); t.start(); t.join(); print(out[0])")
    proc = _py(code, sim_env(sim))
    assert "must be initialized from the main thread" in proc.stdout, proc.stderr


def test_library_log_reaches_python_logging(lib, sim, caplog):
    caplog.set_level(logging.DEBUG, logger="vmrestore.vddk.lib")
    sim.disk(size=MIB)
    with lib.connect(vddk.ConnectSpec()) as conn, conn.open(str(sim.ds / "vm1" / "disk.vmdk")):
        pass
    assert any("opened" in r.getMessage() and "transport file" in r.getMessage()
               for r in caplog.records)


# -- PrepareForAccess / EndAccess ----------------------------------------------------------


def test_esxi_direct_skips_prepare_for_access(sim, source, monkeypatch):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_HOST", "esx")
    vddk.restore_disk_vddk(bk, 0, sim.uri(endpoint="esx"), libdir=sim.libdir)
    assert flat.read_bytes() == data
    calls = sim.calls()
    assert "VixDiskLib_PrepareForAccess" not in calls and "VixDiskLib_EndAccess" not in calls
    with pytest.raises(VddkError) as ei:  # told it is vCenter, the host refuses
        vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)
    assert ei.value.code == 6 and "ESXi host" in str(ei.value)


def test_prepare_is_retried_when_methods_are_already_disabled(lib, sim, source):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    spec = vddk.ConnectSpec(server="esx1", user="root", password="secret", vmx_spec="moref=vm-1")
    lib.prepare_for_access(spec)  # a session that never called EndAccess
    vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)
    assert flat.read_bytes() == data
    calls = sim.calls()
    i = calls.index("VixDiskLib_PrepareForAccess", 1)
    assert calls[i:i + 3] == ["VixDiskLib_PrepareForAccess", "VixDiskLib_EndAccess",
                              "VixDiskLib_PrepareForAccess"]


def test_end_access_failure_neither_fails_nor_masks(sim, source, monkeypatch, caplog):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_FAIL", "end:1+:1")
    vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir)  # finished: not failed
    assert flat.read_bytes() == data
    assert any("VixDiskLib_EndAccess" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_FAIL", "write:2:8,end:1+:1")
    with pytest.raises(VddkError) as ei:  # the write's error, not EndAccess's
        vddk.restore_disk_vddk(bk, 0, sim.uri(vm="vm-2"), libdir=sim.libdir)
    assert ei.value.code == 8
    assert sim.calls()[-1] == "VixDiskLib_Cleanup"
    monkeypatch.delenv("VMRESTORE_VDDK_SIM_FAIL")
    lib = vddk.Library.load(sim.libdir)
    for vm in ("vm-1", "vm-2"):  # re-enable what the failed EndAccess calls left disabled
        lib.end_access(vddk.ConnectSpec(server="esx1", user="root", password="secret",
                                        vmx_spec=f"moref={vm}"))


# -- connect params, serialized session calls ---------------------------------------------


def test_null_connect_params_are_refused_zeroed_ones_work(lib, sim):
    out = lib.ffi.new("VixDiskLibConnection *")
    assert lib.lib.VixDiskLib_ConnectEx(lib.ffi.NULL, b"\0", lib.ffi.NULL, lib.ffi.NULL,
                                        out) == 3
    with lib.connect(vddk.ConnectSpec()) as conn:  # zeroed params, specType VMX
        assert conn.handle is not None


def test_unserialized_opens_collide_serialized_ones_do_not(lib, sim, monkeypatch):
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_SESSION_DELAY_US", "20000")
    paths = [str(sim.disk(f"d{i}", size=MIB)[1]).replace("-flat", "") for i in range(2)]
    with lib.connect(vddk.ConnectSpec()) as conn:
        results: list[int] = []
        handles = [lib.ffi.new("VixDiskLibHandle *") for _ in paths]

        def raw_open(i: int) -> None:  # what a caller without the lock does
            results.append(int(lib.lib.VixDiskLib_Open(conn.handle, paths[i].encode(), 0,
                                                       handles[i])))

        assert in_threads(raw_open) == []
        assert sorted(results) == [0, 1]  # one refused: VixError 1
        for h in handles:
            if h[0] != lib.ffi.NULL:
                lib.lib.VixDiskLib_Close(h[0])
        assert in_threads(lambda i: conn.open(paths[i]).close()) == []


def test_parallel_disk_restores_share_the_library(sim, source):
    bk, data = source
    flats = [sim.disk(f"d{i}", size=SIZE)[1] for i in range(2)]
    vddk.Library.load(sim.libdir)  # InitEx on the main thread
    assert in_threads(lambda i: vddk.restore_disk_vddk(
        bk, 0, sim.uri(f"vm1/d{i}.vmdk"), libdir=sim.libdir)) == []
    assert all(f.read_bytes() == data for f in flats)


# -- NFC buffers --------------------------------------------------------------------------


def test_oversized_request_fails_with_the_nfc_text(lib, sim):
    path, _ = sim.disk(size=4 * MIB)
    spec = vddk.ConnectSpec(server="esx1", user="root", password="secret",
                            vmx_spec="moref=vm-1", transports=("nbd",))
    with lib.connect(spec) as conn, conn.open(path) as disk:
        disk.write(0, b"\1" * MIB)  # within the budget
        with pytest.raises(VddkError) as ei:
            disk.write(0, b"\1" * (2 * MIB))
    assert "Failed to allocate the requested 2097176 bytes" in str(ei.value)


def test_in_flight_bytes_are_bounded_to_the_nfc_budget(sim, source, monkeypatch):
    bk, data = source
    _, flat = sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_NFC_MEMORY", str(3 * MIB))
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_LATENCY_US", "2000")
    with pytest.raises(VddkError, match="Failed to allocate the requested"):
        vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir, max_inflight=8 * MIB)
    vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir, max_inflight=2 * MIB)
    assert flat.read_bytes() == data


# -- errors -----------------------------------------------------------------------------


def test_failed_part_reports_its_own_offset(sim, source, monkeypatch):
    bk, _ = source
    sim.disk(size=SIZE)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_WORKERS", "1")
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_CALLBACKS", "inline")  # calls in order
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_FAIL", "write:2:8")  # the 2nd 256 KiB part
    with pytest.raises(VddkError) as ei:
        vddk.restore_disk_vddk(bk, 0, sim.uri(), libdir=sim.libdir, max_request=256 * 1024,
                               queue_depth=1)
    assert "of 262144 bytes at offset 262144 failed" in str(ei.value)


def test_writer_open_failure_is_a_typed_one_line_error(sim):
    path = sim.ds / "vm1"
    vddk.create_sim_disk(path, "empty", 512)
    (path / "empty-flat.vmdk").write_bytes(b"")
    (path / "empty.vmdk").write_text((path / "empty.vmdk").read_text().replace("RW 1 ", "RW 0 "))
    with pytest.raises(TargetError) as ei, vddk.open_writer(sim.uri("vm1/empty.vmdk"), 0,
                                                            libdir=sim.libdir):
        pass
    assert "\n" not in str(ei.value) and "size of 0 bytes" in str(ei.value)


@pytest.mark.parametrize("command", [["vddk", "restore-disk"], ["restore-disk"]])
def test_one_vddk_failure_one_exit_code(sim, source, command):
    bk, _ = source
    sim.disk(size=SIZE)
    env = sim_env(sim)
    env["VMRESTORE_VDDK_SIM_FAIL"] = "write:2:8"
    proc = subprocess.run([sys.executable, "-m", "vmrestore", *command, str(bk),
                           "--to", sim.uri(), "-q", "--disk", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 10, proc.stderr
    assert "VixError 8" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
