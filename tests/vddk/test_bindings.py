"""The cffi bindings round-trip against vddk_sim: connect, open, info, I/O, blocks, errors."""

from __future__ import annotations

import os

import pytest
from vddk_helpers import MIB

from vmrestore import vddk
from vmrestore.errors import UsageError, VddkError


def remote(**kw) -> vddk.ConnectSpec:
    base = dict(server="esx1", user="root", password="secret", vmx_spec="moref=vm-1",
                transports=("nbd",))
    base.update(kw)
    return vddk.ConnectSpec(**base)


def test_connect_open_info_and_io(lib, sim):
    path, flat = sim.disk(size=8 * MIB)
    with lib.connect(remote()) as conn, conn.open(path) as disk:
        assert disk.transport_mode == "nbd"
        info = disk.info()
        assert info.capacity_sectors == 8 * MIB // 512
        assert info.size == 8 * MIB
        assert info.adapter == "lsilogic"
        assert info.num_links == 1
        assert info.bios_geometry[1:] == (255, 63)
        payload = os.urandom(64 * 1024)
        disk.write(2048, payload)
        assert disk.read(2048, len(payload) // 512) == payload
        disk.flush()
    # the data landed in the flat file beside the descriptor, at sector 2048
    with open(flat, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(payload)) == payload
    assert {"VixDiskLib_ConnectEx", "VixDiskLib_Open", "VixDiskLib_Close",
            "VixDiskLib_Disconnect"} <= set(sim.calls())


def test_local_connection_uses_file_mode(lib, sim):
    _path, flat = sim.disk(size=MIB)
    with lib.connect(vddk.ConnectSpec()) as conn, conn.open(str(flat)) as disk:
        assert disk.transport_mode == "file"
        disk.write(0, b"\x42" * 512)
    assert flat.read_bytes()[:512] == b"\x42" * 512


def test_allocated_blocks_follow_the_data(lib, sim):
    path, _flat = sim.disk(size=16 * MIB)
    with lib.connect(remote()) as conn, conn.open(path) as disk:
        assert list(disk.allocated_blocks(2048)) == []
        disk.write(2048 * 3, b"x" * 4096)           # inside chunk 3 (1 MiB chunks)
        disk.write(2048 * 10 + 100, b"y" * 512)     # inside chunk 10
        blocks = list(disk.allocated_blocks(2048))
    # rounded out to whole chunks, in sectors; the FS may allocate a little more
    assert blocks[0][0] <= 2048 * 3 < blocks[0][0] + blocks[0][1]
    covered = set()
    for off, n in blocks:
        assert off % 2048 == 0 and n % 2048 == 0
        covered.update(range(off // 2048, (off + n) // 2048))
    assert {3, 10} <= covered
    assert len(covered) < 16


def test_errors_carry_code_and_library_text(lib, sim):
    sim.disk()
    with lib.connect(remote()) as conn:
        with pytest.raises(VddkError) as ei:
            conn.open("[ds1] vm1/missing.vmdk")
    assert ei.value.code == 4
    assert ei.value.text == "The file was not found"
    assert "VixDiskLib_Open [ds1] vm1/missing.vmdk" in str(ei.value)


def test_read_only_and_out_of_range(lib, sim):
    path, _ = sim.disk(size=MIB)
    with lib.connect(remote()) as conn:
        with conn.open(path, vddk.FLAG_READ_ONLY) as disk:
            with pytest.raises(VddkError) as ei:
                disk.write(0, b"\0" * 512)
            assert ei.value.code == 11
        with conn.open(path) as disk:
            with pytest.raises(VddkError) as ei:
                disk.write(MIB // 512, b"\0" * 512)
            assert ei.value.code == 16007
            with pytest.raises(UsageError):
                disk.write(0, b"\0" * 100)


def test_unknown_datastore_and_bad_transport(lib, sim):
    with lib.connect(remote()) as conn:
        with pytest.raises(VddkError) as ei:
            conn.open("[nope] vm1/disk.vmdk")
        assert ei.value.code == 25
    with pytest.raises(UsageError, match="unknown VDDK transport"):
        lib.connect(remote(transports=("carrier-pigeon",)))


@pytest.mark.parametrize(
    ("transports", "thick", "vmx", "offered", "expect"),
    [
        (("san", "hotadd", "nbd"), True, "moref=vm-1", None, "san"),
        (("san", "hotadd", "nbd"), False, "moref=vm-1", None, "hotadd"),   # thin: no SAN
        (("san", "hotadd", "nbd"), False, None, None, "nbd"),              # no VM: no HotAdd
        (("nbdssl", "nbd"), False, "moref=vm-1", None, "nbdssl"),
        (("san", "nbdssl", "nbd"), True, "moref=vm-1", "nbd", "nbd"),      # host offers nbd only
    ],
)
def test_transport_selection_rules(lib, sim, monkeypatch, transports, thick, vmx, offered,
                                   expect):
    if offered:
        monkeypatch.setenv("VMRESTORE_VDDK_SIM_TRANSPORTS", offered)
    path, _ = sim.disk(size=MIB, thick=thick)
    with lib.connect(remote(transports=transports, vmx_spec=vmx)) as conn, \
            conn.open(path) as disk:
        assert disk.transport_mode == expect


def test_no_usable_transport_is_an_error(lib, sim):
    path, _ = sim.disk(size=MIB)  # thin: SAN refused
    with lib.connect(remote(transports=("san",))) as conn:
        with pytest.raises(VddkError) as ei:
            conn.open(path)
    assert ei.value.code == 6


def test_credentials_and_thumbprint_checked(lib, sim, monkeypatch):
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_PASSWORD", "right")
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_THUMBPRINT", "AA:BB")
    with pytest.raises(VddkError) as ei:
        lib.connect(remote(password="wrong", thumbprint="AA:BB"))
    assert ei.value.code == 35
    with pytest.raises(VddkError) as ei:
        lib.connect(remote(password="right", thumbprint="CC:DD"))
    assert ei.value.code == 30201
    lib.connect(remote(password="right", thumbprint="aa:bb")).close()


def test_access_bracket_and_cleanup_are_traced(lib, sim):
    spec = remote()
    with lib.access(spec, "vmrestore-test"):
        pass
    assert lib.cleanup(spec) == (0, 0)
    assert sim.calls()[-3:] == ["VixDiskLib_PrepareForAccess", "VixDiskLib_EndAccess",
                                "VixDiskLib_Cleanup"]


def test_writer_args_are_addresses_of_the_loaded_library(lib, sim):
    path, _ = sim.disk(size=MIB)
    with lib.connect(remote()) as conn, conn.open(path) as disk:
        args = disk.writer_args()
    assert set(args) == {"handle", "WriteAsync", "Write", "Wait", "Flush", "GetErrorText",
                         "FreeErrorText", "Read"}
    assert all(isinstance(v, int) and v for v in args.values())


def test_report_lists_every_function(lib):
    report = lib.report()
    assert report["transport_modes"][0] == "file"
    assert all(report["features"].values())
    assert {f["name"] for f in report["functions"]} == {f.name for f in lib.functions}
    assert all(f["present"] for f in report["functions"])


def test_sim_env_for_lab_maps_datastores():
    from pathlib import Path
    from types import SimpleNamespace

    lab = SimpleNamespace(user="administrator@vsphere.local", password="pw", datastores={
        "ds-local": SimpleNamespace(dir=Path("/lab/ds-local")),
        "ds-san": SimpleNamespace(dir=Path("/lab/ds-san"))})
    env = vddk.sim_env_for_lab(lab)
    assert env["VMRESTORE_VDDK_SIM_DATASTORES"] == "ds-local=/lab/ds-local,ds-san=/lab/ds-san"
    assert env["VMRESTORE_VDDK_SIM_USER"] == "administrator@vsphere.local"
