"""vSphere helpers that need no server: datastore paths, provisioning flags, base disks."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from vmrestore.errors import VSphereError
from vmrestore.vsphere import disks
from vmrestore.vsphere.connect import fault_text


def test_split_and_flat_paths() -> None:
    assert disks.split_ds_path("[ds-san] vm/vm_1.vmdk") == ("ds-san", "vm/vm_1.vmdk")
    assert disks.flat_path("[ds] vm/vm.vmdk") == "[ds] vm/vm-flat.vmdk"
    assert disks.flat_path("[ds] vm/vm-flat.vmdk") == "[ds] vm/vm-flat.vmdk"
    with pytest.raises(VSphereError, match="not a datastore path"):
        disks.split_ds_path("vm/vm.vmdk")


@pytest.mark.parametrize("thin, eager, prov", [
    (True, False, "thin"), (False, True, "thick-eager"), (False, False, "thick-lazy")])
def test_provisioning_flags(thin: bool, eager: bool, prov: str) -> None:
    assert disks.provisioning_of(NS(thinProvisioned=thin, eagerlyScrub=eager)) == prov


def test_base_file_follows_parents_to_the_bottom() -> None:
    base = NS(fileName="[ds] vm/vm.vmdk", parent=None)
    delta1 = NS(fileName="[ds] vm/vm-000001.vmdk", parent=base)
    delta2 = NS(fileName="[ds] vm/vm-000002.vmdk", parent=delta1)
    assert disks.base_file(delta2) == "[ds] vm/vm.vmdk"
    assert disks.base_file(base) == "[ds] vm/vm.vmdk"


def test_base_file_loop_is_an_error() -> None:
    a = NS(fileName="[ds] a.vmdk", parent=None)
    b = NS(fileName="[ds] b.vmdk", parent=a)
    a.parent = b
    with pytest.raises(VSphereError, match="longer than 255"):
        disks.base_file(b)


def test_fault_text() -> None:
    assert fault_text(None) == "unknown error"
    assert fault_text(NS(msg="Login failure")) == "Login failure (SimpleNamespace)"
    assert fault_text(ValueError("x")) == "x"
