"""The lab comes up complete, and pyvmomi sees what the status says."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]


def _objects(si, kind):
    content = si.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def test_status_json_complete(lab, cli):
    proc = cli("lab", "status", "--json", "--dir", str(lab.dir), check=True)
    doc = json.loads(proc.stdout)
    assert doc["state"] == "up"
    for key in ("vcenter_url", "user", "password", "datacenter", "hosts", "clusters",
                "networks", "proxy_vm", "hostd_url", "datastores"):
        assert doc[key], key
    assert doc["password"] == (lab.dir / "password").read_text().strip()
    assert (lab.dir / "password").stat().st_mode & 0o777 == 0o600
    by_name = {d["name"]: d for d in doc["datastores"]}
    assert {n: d["type"] for n, d in by_name.items()} == {
        "ds-local": "VMFS", "ds-san": "VMFS", "ds-vvol": "VVOL"}
    assert by_name["ds-san"]["lun"].startswith("/dev/loop")
    for d in by_name.values():
        assert lab.dir in __import__("pathlib").Path(d["dir"]).parents


def test_pyvmomi_sees_the_inventory(lab, lab_si):
    from pyVmomi import vim

    hosts = _objects(lab_si, vim.HostSystem)
    assert len(hosts) >= 2
    assert sorted(h.name for h in hosts) == sorted(lab.hosts)
    dss = {d.name: d for d in _objects(lab_si, vim.Datastore)}
    assert {n: dss[n].summary.type for n in ("ds-local", "ds-san", "ds-vvol")} == {
        "ds-local": "VMFS", "ds-san": "VMFS", "ds-vvol": "VVOL"}
    for d in dss.values():
        assert len(d.host) == len(hosts), f"{d.name} is not mounted on every host"
        assert d.summary.url == str(lab.datastores[d.name].dir)
    nets = {n.name: n for n in _objects(lab_si, vim.Network)}
    assert {"VM Network", "Restore Network"} <= set(nets)
    for h in hosts:
        assert {"VM Network", "Restore Network"} <= {n.name for n in h.network}
    vms = {v.name: v for v in _objects(lab_si, vim.VirtualMachine)}
    proxy = vms[lab.proxy_vm]
    assert proxy.runtime.powerState == "poweredOn"
    assert any(isinstance(d, vim.vm.device.VirtualSCSIController)
               for d in proxy.config.hardware.device)


def test_bad_password_refused(lab):
    from pyVim.connect import SmartConnect
    from pyVmomi import vim

    args = lab.connect_args() | {"pwd": "wrong"}
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(**args)


def test_up_again_is_idempotent(lab, cli):
    before = json.loads((lab.dir / "lab.json").read_text())
    proc = cli("lab", "up", "--json", "--dir", str(lab.dir), check=True)
    after = json.loads(proc.stdout)
    assert after["state"] == "up"
    assert after["pids"] == before["pids"]
    assert after["vcenter_url"] == before["vcenter_url"]
