"""Power state of the restored VM."""

from __future__ import annotations

from typing import Any


def power_on(session: Any, vm: Any) -> None:
    if vm.runtime.powerState != "poweredOn":
        session.wait(vm.PowerOnVM_Task(), f"power on VM {vm.name}")


def power_off(session: Any, vm: Any) -> None:
    if vm.runtime.powerState == "poweredOn":
        session.wait(vm.PowerOffVM_Task(), f"power off VM {vm.name}")
