"""Snapshots of the restored VM: create, check, remove (commit).

Lab notes apply: never read ``VirtualMachine.snapshot`` (the simulator drops
the connection when the VM has none) — ``rootSnapshot`` and
``layoutEx.snapshot`` say the same safely; remove with
``RemoveAllSnapshots_Task`` on the VM (a snapshot's own remove task has a
TaskInfo pyvmomi cannot read from the simulator). The restored VM has only
the snapshot this restore made, so "remove all" is "commit ours".
"""

from __future__ import annotations

from typing import Any

SNAPSHOT_NAME = "vmrestore-restore"


def has_snapshot(vm: Any) -> bool:
    return bool(vm.rootSnapshot) or bool(vm.layoutEx and vm.layoutEx.snapshot)


def snapshot_count(vm: Any) -> int:
    return len(vm.layoutEx.snapshot) if vm.layoutEx and vm.layoutEx.snapshot else \
        len(vm.rootSnapshot or [])


def create(session: Any, vm: Any, description: str) -> Any:
    """A crash-consistent snapshot (no memory, no quiesce: the VM is powered off)."""
    task = vm.CreateSnapshot_Task(name=SNAPSHOT_NAME, description=description, memory=False,
                                  quiesce=False)
    session.wait(task, f"create snapshot of VM {vm.name}")
    return session.task_result(task)


def remove_all(session: Any, vm: Any) -> None:
    """Commit: merge every delta into the base disks and drop the snapshots."""
    if not has_snapshot(vm):
        return
    task = vm.RemoveAllSnapshots_Task()
    session.wait(task, f"remove snapshots of VM {vm.name}")
