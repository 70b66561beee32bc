"""vddk:// URI parsing."""

from __future__ import annotations

import pytest

from vmrestore.errors import UsageError
from vmrestore.transport import vddk_uri


def test_full_form(tmp_path, monkeypatch):
    monkeypatch.delenv("VMRESTORE_VDDK_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    t = vddk_uri.parse(
        f"vddk://administrator%40vsphere.local@vc1:8443/ds-san/vm%20one/vm.vmdk?vm=vm-42"
        f"&transports=san,hotadd:nbd&thumbprint=AA:BB&password_file={pw}&new=1&nfc_port=902"
        "&snapshot=snapshot-3&libdir=/opt/vddk")
    s = t.spec
    assert (s.server, s.port, s.user, s.password) == ("vc1", 8443,
                                                      "administrator@vsphere.local", "s3cret")
    assert t.disk_path == "[ds-san] vm one/vm.vmdk"
    assert s.vmx_spec == "moref=vm-42"
    assert s.transports == ("san", "hotadd", "nbd")
    assert (s.thumbprint, s.nfc_host_port, s.snapshot) == ("AA:BB", 902, "snapshot-3")
    assert t.new_disk and not t.unbuffered and t.libdir == "/opt/vddk"


def test_password_from_env_and_bracket_path(monkeypatch):
    monkeypatch.setenv("VMRESTORE_VDDK_PASSWORD", "envpw")
    t = vddk_uri.parse("vddk://root@esx1/%5Bds1%5D%20vm/vm.vmdk?vm=moref=vm-7")
    assert t.spec.password == "envpw"
    assert t.disk_path == "[ds1] vm/vm.vmdk"
    assert t.spec.vmx_spec == "moref=vm-7"
    assert t.spec.transports == ()


def test_local_form():
    t = vddk_uri.parse("vddk:///var/lib/disks/a.vmdk?new=1")
    assert t.spec.server is None and t.disk_path == "/var/lib/disks/a.vmdk" and t.new_disk


@pytest.mark.parametrize(("uri", "what"), [
    ("nbd://x/y", "not a vddk"),
    ("vddk://root@esx1/ds1/vm/vm.vmdk", "vm=MOREF"),
    ("vddk://root@esx1/ds1?vm=vm-1", "DATASTORE"),
    ("vddk://root@esx1/ds1/vm/vm.txt?vm=vm-1", ".vmdk"),
    ("vddk://root@esx1/ds1/vm/vm.vmdk?vm=vm-1&transports=nbd:fast", "transport"),
    ("vddk://root@esx1/ds1/vm/vm.vmdk?vm=vm-1&color=blue", "unknown parameter"),
    ("vddk://root@esx1/ds1/vm/vm.vmdk?vm=vm-1&new=maybe", "new="),
    ("vddk://esx1/ds1/vm/vm.vmdk?vm=vm-1", "user"),
    ("vddk://", "no disk path"),
])
def test_bad_uris_name_the_problem(uri, what, monkeypatch):
    monkeypatch.setenv("VMRESTORE_VDDK_PASSWORD", "x")
    with pytest.raises(UsageError, match=what):
        vddk_uri.parse(uri)


def test_build_round_trips(tmp_path, monkeypatch):
    monkeypatch.delenv("VMRESTORE_VDDK_PASSWORD", raising=False)
    pw = tmp_path / "pw file"
    pw.write_text("x")
    uri = vddk_uri.build("vc1", "[ds san] my vm/my vm.vmdk", "vm-9", "admin@vsphere.local",
                         port=443, transports=("hotadd", "nbd"), thumbprint="AA:BB",
                         password_file=str(pw), new=True, libdir="/opt/vddk")
    t = vddk_uri.parse(uri)
    assert t.disk_path == "[ds san] my vm/my vm.vmdk"
    assert (t.spec.server, t.spec.port, t.spec.user) == ("vc1", 443, "admin@vsphere.local")
    assert t.spec.vmx_spec == "moref=vm-9" and t.spec.transports == ("hotadd", "nbd")
    assert t.spec.password == "x" and t.new_disk and t.libdir == "/opt/vddk"
    with pytest.raises(UsageError):
        vddk_uri.build("vc1", "vm/x.vmdk", "vm-9", "u")
