"""The lab's vCenter over TLS (its own CA) and its standalone ESXi endpoint.

--ca-file, --thumbprint (SHA-1 and SHA-256) and --insecure against the lab's
https vCenter; a wrong thumbprint refused in phase 1 before any credential is
sent; a full restore straight to an ESXi host (no cluster, no folders, no
PrepareForAccess), through the native writers and through VixDiskLib.
"""

from __future__ import annotations

import pytest

from restore_helpers import assert_restored, find_vm, lab_env, restore_cli, unique

pytestmark = [pytest.mark.lab, pytest.mark.root]


def _login(lab, tmp_path, url: str, *opts: str, password: str | None = None):
    pw = tmp_path / "pw"
    pw.write_text((password or lab.password) + "\n")
    return ["--vcenter", url, "--user", lab.user, "--password-file", str(pw), *opts]


def _esx_si(lab):
    from urllib.parse import urlsplit

    from pyVim.connect import SmartConnect

    u = urlsplit(lab.esx_url)
    return SmartConnect(host=u.hostname, port=u.port, user=lab.user, pwd=lab.password,
                        sslContext=lab.ssl_context())


def test_https_vcenter_with_the_lab_ca(lab, lab_si, backup, tmp_path) -> None:
    assert lab.vcenter_url.startswith("https://")
    name = unique("r-tls-ca")
    p, _ = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--transport", "nbd", "--network-map",
                         "VM Network=Restore Network",
                         *_login(lab, tmp_path, lab.vcenter_url, "--ca-file", str(lab.ca_file)),
                         state_dir=tmp_path / "s")
    assert p.returncode == 0, p.stderr
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])


@pytest.mark.parametrize("how", ["sha1", "sha256", "insecure"])
def test_thumbprints_and_insecure_connect(lab, how) -> None:
    from vmrestore.vsphere.connect import Target, connect

    tp = lab.raw["thumbprints"]
    t = Target(lab.vcenter_url, lab.user, lab.password,
               thumbprint=tp[how] if how != "insecure" else None, insecure=how == "insecure")
    with connect(t) as s:
        assert "VirtualCenter" in s.about


def test_untrusted_certificate_is_refused(lab, backup, tmp_path) -> None:
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--datastore", "ds-local",
                         "--name", unique("r-tls-untrusted"),
                         *_login(lab, tmp_path, lab.vcenter_url), state_dir=tmp_path / "s")
    assert p.returncode == 8 and "not trusted" in p.stderr, p.stderr
    assert rep["failed_phase"] == "initialize"


def test_wrong_thumbprint_refused_before_credentials(lab, backup, tmp_path) -> None:
    """A wrong pin and a wrong password: the pin is what fails, so no login was tried."""
    wrong = "AB:" * 31 + "AB"  # a SHA-256 the lab's certificate does not have
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--datastore", "ds-local",
                         "--name", unique("r-tls-pin"),
                         *_login(lab, tmp_path, lab.vcenter_url, "--thumbprint", wrong,
                                 password="wrong-password"), state_dir=tmp_path / "s")
    assert p.returncode == 8, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert f"expected SHA256 {wrong}" in err
    assert f"presents {lab.raw['thumbprints']['sha256']}" in err
    assert "credentials not sent" in err and "bad credentials" not in p.stderr
    assert rep["failed_phase"] == "initialize"


@pytest.mark.parametrize("library", ["native", "vddk"])
def test_restore_straight_to_an_esxi_host(lab, backup, tmp_path, library) -> None:
    if not lab.esx_url:
        pytest.skip("the lab runs no ESXi endpoint (lab up --esx)")
    name = unique(f"r-esx-{library}")
    trace = tmp_path / "vddk-trace.log"
    # VixDiskLib's stand-in plays a host: PrepareForAccess there would fail the restore.
    env = lab_env(lab, VMRESTORE_VDDK_SIM_HOST="esx", VMRESTORE_VDDK_SIM_TRACE=str(trace))
    extra: list[str] = []
    if library == "vddk":  # a library named on the command line: the CLI re-executes itself
        from vmrestore import vddk

        env.update(vddk.sim_env_for_lab(lab))
        extra = ["--vddk-libdir", str(vddk.sim_libdir(tmp_path / "vddk"))]
    p, rep = restore_cli(lab, "--backup", str(backup.inc), "--name", name, "--datastore",
                         "ds-local", "--transport", "nbd", "--disk-library", library,
                         "--network-map", "VM Network=Restore Network", *extra,
                         *_login(lab, tmp_path, lab.esx_url, "--ca-file", str(lab.ca_file)),
                         env=env, state_dir=tmp_path / "s")
    assert p.returncode == 0, p.stderr
    if library == "vddk":  # the library saw its lib64 on the search path it started with
        init = next(x for x in trace.read_text().splitlines() if x.startswith("VixDiskLib_Init"))
        assert f"LD_LIBRARY_PATH={tmp_path / 'vddk' / 'lib64'}" in init
    assert rep["vm"]["datacenter"] == "ha-datacenter"
    assert rep["vm"]["host"] == lab.raw["esx"]["host"]
    si = _esx_si(lab)
    try:
        assert si.content.about.apiType == "HostAgent"
        assert_restored(lab, si, name, backup.images, ["thick-eager", "thin"])
        if library == "vddk":
            calls = trace.read_text()
            assert "VixDiskLib_Open" in calls and "PrepareForAccess" not in calls
        from pyVmomi import vim

        vm = find_vm(si, name)
        task = vm.Destroy_Task()
        while task.info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
            pass
    finally:
        from pyVim.connect import Disconnect

        Disconnect(si)
