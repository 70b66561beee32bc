"""Two restores racing for one VM name: the loser fails and removes nothing of the winner's.

Against the real lab (vcsim + hostd). The race is made exact: the losing
restore runs in this process and has passed phase 1 (no VM of that name yet)
and made its directories when the winning restore, a real `vmrestore restore`
process, creates the VM, writes its disks (into the loser's directory on the
second datastore) and finishes. Then the loser's own CreateVM fails on the name.
Before the ledger was by identity, the loser looked the VM up by name and
destroyed the winner's, and deleted the directory holding the winner's disk.
"""

from __future__ import annotations

from typing import Any

import pytest

from restore_helpers import assert_restored, find_vm, lab_env, restore_cli, unique

pytestmark = [pytest.mark.lab, pytest.mark.root]


def test_the_loser_of_a_vm_name_race_destroys_nothing(lab, lab_si, backup, tmp_path,
                                                      monkeypatch) -> None:
    from vmrestore.commands.restore import default_site
    from vmrestore.errors import VSphereError
    from vmrestore.job import RestoreJob, validate
    from vmrestore.orchestrator import Orchestrator
    from vmrestore.vsphere import vmconfig

    name = unique("race")
    args = ["--backup", str(backup.inc), "--name", name, "--datastore", "ds-local",
            "--disk-datastore", "1=ds-san", "--transport", "nbd",
            "--network-map", "VM Network=Restore Network"]
    winner: dict[str, Any] = {}
    real_create = vmconfig.create_vm

    def the_winner_first(*a: Any, **kw: Any) -> Any:
        p, rep = restore_cli(lab, *args, state_dir=tmp_path / "winner")
        winner.update(rc=p.returncode, stderr=p.stderr, report=rep)
        return real_create(*a, **kw)

    monkeypatch.setattr(vmconfig, "create_vm", the_winner_first)
    for k, v in lab_env(lab).items():
        monkeypatch.setenv(k, v)
    # Task slots of this test only (the machine-wide slot dir is shared with other runs).
    monkeypatch.setenv("VMRESTORE_SLOT_DIR", str(tmp_path / "slots"))
    job = validate(RestoreJob(backup=str(backup.inc), name=name, datastore="ds-local",
                              disk_datastores={1: "ds-san"}, transport="nbd",
                              network_map={"VM Network": "Restore Network"},
                              state_dir=str(tmp_path / "loser")))
    rep = Orchestrator(job, site=default_site).run()

    assert winner["rc"] == 0, winner["stderr"]
    assert rep.status == "failed" and rep.failed_phase == "config"
    assert isinstance(rep.error, VSphereError) and "already exists" in str(rep.error)
    assert not any("destroyed VM" in r for r in rep.rollback), rep.rollback
    assert any("left [ds-san]" in r for r in rep.rollback), rep.rollback
    vm = find_vm(lab_si, name)
    assert vm is not None and vm._moId == winner["report"]["vm"]["moref"]
    # the winner's VM is whole: both disks byte-identical to the backed-up disks
    assert_restored(lab, lab_si, name, backup.images, ["thick-eager", "thin"])
    assert not list((tmp_path / "loser").glob("restore-*.json"))  # the loser's job ended
