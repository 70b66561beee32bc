"""The restored VM's layout: backup config + amendments, decided before vCenter is touched."""

from __future__ import annotations

import pytest

from vmrestore.errors import FormatError, UsageError
from vmrestore.job import RestoreJob
from vmrestore.sample import sample_vm_config
from vmrestore.vsphere.vmconfig import target_layout

MIB = 1 << 20


def manifest(caps: list[int]) -> dict:
    return {"disks": [{"index": i, "capacity": c, "block_size": MIB, "blocks": c // MIB}
                      for i, c in enumerate(caps)]}


CFG = sample_vm_config("web01", [8 * MIB, 16 * MIB])
MAN = manifest([8 * MIB, 16 * MIB])


def test_same_format_keeps_backup_provisioning() -> None:
    L = target_layout(CFG, MAN, RestoreJob(backup="b", datastore="ds-local"))
    assert L.name == "web01" and L.datastore == "ds-local"
    assert [d.provisioning for d in L.disks] == ["thick-eager", "thin"]
    assert [d.capacity for d in L.disks] == [8 * MIB, 16 * MIB]
    assert [d.file_name for d in L.disks] == ["[ds-local] web01/web01.vmdk",
                                              "[ds-local] web01/web01_1.vmdk"]
    assert [(n.network, n.source_network) for n in L.nics] == [("VM Network", "VM Network")]


def test_amendments() -> None:
    job = RestoreJob(backup="b", name="web02", datastore="ds-local", disk_format="thin",
                     disk_datastores={1: "ds-san"},
                     network_map={"VM Network": "Restore Network"})
    L = target_layout(CFG, MAN, job)
    assert L.name == "web02" and L.source_name == "web01"
    assert [d.provisioning for d in L.disks] == ["thin", "thin"]
    assert [d.source_provisioning for d in L.disks] == ["thick-eager", "thin"]
    assert [d.datastore for d in L.disks] == ["ds-local", "ds-san"]
    assert L.disks[1].file_name == "[ds-san] web02/web02_1.vmdk"
    assert L.datastores == ["ds-local", "ds-san"]
    assert L.nics[0].network == "Restore Network"


def test_backup_datastore_used_when_no_amendment() -> None:
    L = target_layout(CFG, MAN, RestoreJob(backup="b"))
    assert L.datastore == "datastore1"


def test_network_map_source_must_be_used() -> None:
    with pytest.raises(UsageError, match=r"no NIC .* uses network 'Nope'"):
        target_layout(CFG, MAN, RestoreJob(backup="b", network_map={"Nope": "X"}))


def test_disk_datastore_for_missing_disk() -> None:
    with pytest.raises(UsageError, match="no disk 5"):
        target_layout(CFG, MAN, RestoreJob(backup="b", disk_datastores={5: "ds"}))


def test_bad_backup_config_is_a_format_error() -> None:
    bad = dict(CFG, disks=[dict(CFG["disks"][0], controller="floppy")])
    with pytest.raises(FormatError, match="controller"):
        target_layout(bad, manifest([8 * MIB]), RestoreJob(backup="b"))


def test_config_without_disks_derived_from_manifest() -> None:
    L = target_layout({"name": "x"}, MAN, RestoreJob(backup="b", datastore="ds"))
    assert [d.provisioning for d in L.disks] == ["thin", "thin"] and L.nics == []


def test_scsi_unit_7_skipped() -> None:
    disks = [dict(CFG["disks"][1], index=i, unit=i) for i in range(9)]
    L = target_layout(dict(CFG, disks=disks), manifest([MIB] * 9),
                      RestoreJob(backup="b", datastore="ds"))
    assert [d.unit for d in L.disks] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
