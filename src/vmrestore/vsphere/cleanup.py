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


def datastore_dir_exists(session: Any, dc: Any, datastore: str, name: str) -> bool:
    """Whether '[datastore] name' exists (the datastore browser says FileNotFound if not)."""
    ds = session.datastore(dc, datastore)
    try:
        session.wait(ds.browser.SearchDatastore_Task(datastorePath=f"[{datastore}] {name}"),
                     f"look for [{datastore}] {name}")
    except VSphereError as e:
        if "FileNotFound" in str(e):
            return False
        raise
    return True


def delete_datastore_dir(session: Any, dc: Any, ds_path: str) -> bool:
    """Delete a directory this restore created ('[ds] name'); False when it was not there."""
    fm = session.content.fileManager
    try:
        session.wait(fm.DeleteDatastoreFile_Task(name=ds_path, datacenter=dc),
                     f"delete {ds_path}")
    except VSphereError as e:
        if "FileNotFound" in str(e):
            return False
        raise
    return True
