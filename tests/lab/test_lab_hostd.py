"""Host data services on the real lab: provisioning, NBD (plain + TLS-PSK), SAN maps, HotAdd."""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid

import pytest

from lab_helpers import create_vm, flat_file, need_tool
from vmrestore.errors import HostServiceError
from vmrestore.transport.extents import FIEMAP_EXTENT_UNWRITTEN, fiemap
from vmrestore.transport.host import HostServices

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _pattern(n: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "little") + os.urandom(60)) * (n // 64)


def test_prepare_disk_per_provisioning(lab, lab_si, host_services):
    vm, paths = create_vm(lab_si, lab, _name("prep"), "ds-local",
                          [(8 * MiB, "thin"), (8 * MiB, "thick-lazy"), (8 * MiB, "thick-eager")])
    thin, lazy, eager = (host_services.disk_info(p) for p in paths)
    assert thin.size == lazy.size == eager.size == 8 * MiB
    assert thin.allocated < 1 * MiB
    assert lazy.allocated >= 8 * MiB and eager.allocated >= 8 * MiB
    lazy_ext = fiemap(flat_file(lab, paths[1]))
    assert lazy_ext and all(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in lazy_ext)
    eager_ext = fiemap(flat_file(lab, paths[2]))
    assert sum(e.length for e in eager_ext) >= 8 * MiB
    assert not any(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in eager_ext)
    assert flat_file(lab, paths[2]).read_bytes() == bytes(8 * MiB)
    # The descriptor the simulator leaves empty is filled in.
    desc = flat_file(lab, paths[0]).with_name(flat_file(lab, paths[0]).name.replace("-flat", ""))
    assert 'RW 16384 VMFS' in desc.read_text()
    vm.Destroy_Task()


def test_prepare_disk_refusals(lab, lab_si, host_services):
    vm, (path,) = create_vm(lab_si, lab, _name("prepbad"), "ds-local", [(4 * MiB, "thin")])
    with pytest.raises(HostServiceError) as e:
        host_services.prepare_disk(path, 4 * MiB, "sparse")
    assert e.value.kind == "bad-request"
    with pytest.raises(HostServiceError) as e:
        host_services.prepare_disk(path, 1 * MiB, "thin")
    assert e.value.kind == "refused" and "shrunk" in str(e.value)
    with pytest.raises(HostServiceError) as e:
        host_services.prepare_disk("[ds-local] ../../etc/passwd", 4 * MiB, "thin")
    assert e.value.kind == "bad-request"
    with pytest.raises(HostServiceError) as e:
        host_services.disk_info("[no-such-ds] x/x.vmdk")
    assert e.value.kind == "not-found" and "no-such-ds" in str(e.value)
    vm.Destroy_Task()


def test_wrong_token_refused(lab):
    with pytest.raises(HostServiceError) as e:
        HostServices(lab.hostd_url, "wrong").info()
    assert e.value.kind == "unauthorized"


@pytest.mark.parametrize("tls", [False, True], ids=["nbd", "nbdssl"])
def test_nbd_export_read_write(lab, lab_si, host_services, tmp_path, tls):
    need_tool("nbdcopy", "nbdinfo")
    vm, (path,) = create_vm(lab_si, lab, _name("nbd"), "ds-local", [(8 * MiB, "thin")])
    exp = host_services.export_nbd(path, tls=tls)
    try:
        assert exp.size == 8 * MiB and exp.tls == tls
        if tls:
            assert exp.uri.startswith("nbds+unix://") and exp.psk_identity
            assert os.stat(exp.psk_file).st_mode & 0o777 == 0o600
            # Without TLS the server refuses the client.
            plain = f"nbd+unix:///?socket={exp.socket}"
            assert subprocess.run(["nbdinfo", plain], capture_output=True).returncode != 0
        info = subprocess.run(["nbdinfo", "--size", exp.uri], capture_output=True, text=True,
                              check=True)
        assert int(info.stdout) == 8 * MiB
        src = tmp_path / "src.img"
        data = _pattern(8 * MiB, 7)
        src.write_bytes(data)
        subprocess.run(["nbdcopy", str(src), exp.uri], check=True, capture_output=True)
        assert flat_file(lab, path).read_bytes() == data
        back = tmp_path / "back.img"
        subprocess.run(["nbdcopy", exp.uri, str(back)], check=True, capture_output=True)
        assert back.read_bytes() == data
        assert exp.id in {e.id for e in host_services.exports()}
    finally:
        host_services.unexport_nbd(exp.id)
    assert exp.id not in {e.id for e in host_services.exports()}
    assert not os.path.exists(exp.socket)
    assert subprocess.run(["nbdinfo", exp.uri], capture_output=True).returncode != 0
    vm.Destroy_Task()


def test_nbd_export_tcp_readonly(lab, lab_si, host_services, tmp_path):
    need_tool("nbdcopy", "nbdinfo")
    vm, (path,) = create_vm(lab_si, lab, _name("nbdtcp"), "ds-local", [(4 * MiB, "thick-eager")])
    exp = host_services.export_nbd(path, tls=True, readonly=True, transport="tcp")
    try:
        assert exp.uri.startswith("nbds://") and exp.host == "127.0.0.1" and exp.port
        src = tmp_path / "src.img"
        src.write_bytes(_pattern(4 * MiB, 3))
        proc = subprocess.run(["nbdcopy", str(src), exp.uri], capture_output=True)
        assert proc.returncode != 0   # read-only export
        back = tmp_path / "back.img"
        subprocess.run(["nbdcopy", exp.uri, str(back)], check=True, capture_output=True)
        assert back.read_bytes() == bytes(4 * MiB)
    finally:
        host_services.unexport_nbd(exp.id)
    vm.Destroy_Task()


def test_export_of_unprovisioned_disk_refused(lab, host_services):
    d = lab.datastores["ds-local"].dir / _name("empty")
    d.mkdir()
    (d / "e-flat.vmdk").touch()
    with pytest.raises(HostServiceError) as e:
        host_services.export_nbd(f"[ds-local] {d.name}/e.vmdk")
    assert e.value.kind == "refused" and "prepare_disk" in str(e.value)


def test_san_extent_map_eager_write_through_lun(lab, lab_si, host_services):
    vm, (path,) = create_vm(lab_si, lab, _name("san"), "ds-san", [(8 * MiB, "thick-eager")])
    m = host_services.extent_map(path)
    assert m.lun == lab.datastores["ds-san"].lun and m.size == 8 * MiB
    # Complete and in order: the extents tile the disk from 0 to its size.
    pos = 0
    for file_off, lun_off, length in m.extents:
        assert file_off == pos and length > 0 and lun_off >= 0
        pos += length
    assert pos == 8 * MiB
    data = _pattern(8 * MiB, 11)
    fd = os.open(m.lun, os.O_RDWR)
    try:
        for file_off, lun_off, length in m.extents:
            os.pwrite(fd, data[file_off:file_off + length], lun_off)
        os.fsync(fd)
    finally:
        os.close(fd)
    _drop_caches()
    assert flat_file(lab, path).read_bytes() == data
    vm.Destroy_Task()


def test_san_write_seen_after_sync_disk(lab, lab_si, host_services):
    """Without a global drop_caches: the host's sync_disk makes the file show the LUN writes."""
    vm, (path,) = create_vm(lab_si, lab, _name("sansync"), "ds-san", [(4 * MiB, "thick-eager")])
    flat = flat_file(lab, path)
    m = host_services.extent_map(path)
    assert flat.read_bytes() == bytes(4 * MiB)   # now in the page cache
    data = _pattern(4 * MiB, 12)
    fd = os.open(m.lun, os.O_RDWR)
    try:
        for file_off, lun_off, length in m.extents:
            os.pwrite(fd, data[file_off:file_off + length], lun_off)
        os.fsync(fd)
    finally:
        os.close(fd)
    host_services.sync_disk(path)
    assert flat.read_bytes() == data
    vm.Destroy_Task()


@pytest.mark.parametrize("prov", ["thin", "thick-lazy"])
def test_san_extent_map_refused_unless_eager(lab, lab_si, host_services, prov):
    vm, (path,) = create_vm(lab_si, lab, _name("sanno"), "ds-san", [(4 * MiB, prov)])
    with pytest.raises(HostServiceError) as e:
        host_services.extent_map(path)
    assert e.value.kind == "refused"
    assert ("thin" if prov == "thin" else "unwritten") in str(e.value)
    vm.Destroy_Task()


def test_san_extent_map_refused_off_san(lab, lab_si, host_services):
    vm, (path,) = create_vm(lab_si, lab, _name("nosan"), "ds-local", [(4 * MiB, "thick-eager")])
    with pytest.raises(HostServiceError) as e:
        host_services.extent_map(path)
    assert e.value.kind == "refused" and "not on a SAN" in str(e.value)
    vm.Destroy_Task()


def _proxy_disks(si, lab):
    from pyVmomi import vim

    vm = si.content.searchIndex.FindByInventoryPath(f"{lab.vm_folder}/{lab.proxy_vm}")
    return {d.backing.fileName: d for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)}


def _loops():
    return subprocess.run(["losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-FILE"],
                          capture_output=True, text=True, check=True).stdout


def test_hot_add_and_remove(lab, lab_si, host_services):
    vm, (path,) = create_vm(lab_si, lab, _name("hot"), "ds-san", [(8 * MiB, "thin")])
    flat = flat_file(lab, path)
    data = _pattern(8 * MiB, 5)
    flat.write_bytes(data)
    h = host_services.hot_add(path)
    try:
        assert h.device.startswith("/dev/loop") and h.size == 8 * MiB
        assert f"{h.device} {flat}" in _loops()
        with open(h.device, "rb") as f:
            assert f.read() == data
        disk = _proxy_disks(lab_si, lab)[path]
        assert disk.key == h.disk_key and disk.unitNumber == h.unit_number != 7
        # A second hot-add of the same disk is refused.
        with pytest.raises(HostServiceError) as e:
            host_services.hot_add(path)
        assert e.value.kind == "refused"
        new = _pattern(8 * MiB, 6)
        fd = os.open(h.device, os.O_WRONLY)
        try:
            os.pwrite(fd, new, 0)
        finally:
            os.close(fd)
    finally:
        host_services.hot_remove(h.id)
    assert h.device not in _loops().split()
    assert path not in _proxy_disks(lab_si, lab)
    assert flat.exists() and flat.read_bytes() == new
    assert h.id not in {x.id for x in host_services.hot_adds()}
    vm.Destroy_Task()


def test_export_whose_nbdkit_died_is_released(lab, lab_si, host_services):
    import json
    import signal

    vm, (path,) = create_vm(lab_si, lab, _name("dead"), "ds-local", [(4 * MiB, "thin")])
    exp = host_services.export_nbd(path)
    state = json.loads((lab.dir / "hostd" / "state.json").read_text())
    os.kill(state["exports"][exp.id]["pid"], signal.SIGKILL)
    assert subprocess.run(["nbdinfo", exp.uri], capture_output=True).returncode != 0
    host_services.unexport_nbd(exp.id)
    assert exp.id not in {e.id for e in host_services.exports()}
    vm.Destroy_Task()


def test_unknown_ids_not_found(host_services):
    for call in (host_services.unexport_nbd, host_services.hot_remove):
        with pytest.raises(HostServiceError) as e:
            call("nosuchid")
        assert e.value.kind == "not-found" and "nosuchid" in str(e.value)


def test_unreachable_service_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HostServiceError) as e:
        HostServices(f"http://127.0.0.1:{port}", "t", timeout=5).info()
    assert e.value.kind == "unreachable" and str(port) in str(e.value)


def _writable_within(dev: str, seconds: float) -> bool:
    import time

    from vmrestore.lab import loopdev

    deadline = time.monotonic() + seconds
    while loopdev.is_read_only(dev):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_attempt_fencing_revokes_the_stale_attachment(lab, lab_si, host_services):
    """A higher attempt revokes a lower one's export and hot-add before it gets its own;
    a lower attempt is refused; an fd the stale writer still holds cannot write."""
    vm, (path,) = create_vm(lab_si, lab, _name("fence"), "ds-local", [(4 * MiB, "thin")])
    h1 = host_services.hot_add(path, attempt=1)
    fd = os.open(h1.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        ex2 = host_services.export_nbd(path, attempt=2)
        assert ex2.attempt == 2
        assert h1.id not in {x.id for x in host_services.hot_adds()}
        with pytest.raises(OSError):  # the stale writer's open device is read-only now
            os.pwrite(fd, b"b" * 4096, 4096)
    finally:
        os.close(fd)
    # Once the stale writer lets go, the device number is writable again for its next
    # user (the read-only flag outlives the binding), without waiting for another call.
    assert _writable_within(h1.device, 5.0), f"{h1.device} stayed read-only"
    with pytest.raises(HostServiceError) as e:
        host_services.export_nbd(path, attempt=1)
    assert e.value.kind == "stale"
    ex3 = host_services.export_nbd(path, attempt=3)
    assert ex2.id not in {x.id for x in host_services.exports()}
    host_services.unexport_nbd(ex3.id)
    (fence,) = [f for f in host_services.fences() if f["datastore_path"] == path]
    assert fence["attempt"] == 3
    log = fence["log"]
    assert [(e["attempt"], e["kind"]) for e in log] == [(1, "hotadd"), (2, "export"),
                                                        (3, "export")]
    for a, b in itertools.pairwise(log):  # each revoked before the next was granted
        assert a["revoked"] is not None and a["revoked"] <= b["granted"]
    assert flat_file(lab, path).read_bytes()[:8192] == b"a" * 4096 + bytes(4096)
    vm.Destroy_Task()
