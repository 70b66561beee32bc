"""Removing what this restore created, and nothing else.

Rollback works from the job's ledger (what was created, by managed object
id), never from names alone: a VM of the same name that this restore did not
make is never touched.
"""

from __future__ import annotations

import logging
from typing import Any

from vmrestore.errors import VSphereError
from vmrestore.vsphere import power, snapshots

log = logging.getLogger("vmrestore.vsphere")


def destroy_vm(session: Any, vm: Any) -> None:
    """Power off, drop snapshots, destroy (deletes the VM's files, disks included)."""
    try:
        name = vm.name
    except Exception:
        log.info("VM %s already gone", vm)
        return
    power.power_off(session, vm)
    try:
        snapshots.remove_all(session, vm)
    except VSphereError as e:  # destroy removes the deltas anyway
        log.warning("removing snapshots of %s before destroy: %s", name, e)
    session.wait(vm.Destroy_Task(), f"destroy VM {name}")
    log.info("destroyed VM %s", name)


def delete_datastore_dir(session: Any, dc: Any, ds_path: str) -> None:
    """Delete a directory this restore created ('[ds] name'); missing is fine."""
    from pyVmomi import vim

    fm = session.content.fileManager
    try:
        session.wait(fm.DeleteDatastoreFile_Task(name=ds_path, datacenter=dc),
                     f"delete {ds_path}")
    except VSphereError as e:
        if "not found" in str(e).lower() or "FileNotFound" in str(e):
            return
        raise
    except vim.fault.FileNotFound:
        return
