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


def vm_exists(vm: Any) -> bool:
    """Whether the managed object still exists (reading its name fails once it is gone)."""
    try:
        _ = vm.name
    except Exception:
        return False
    return True


def owner_token(vm: Any) -> str | None:
    """The vmrestore.owner token in the VM's extraConfig (the job that created it), or None."""
    from vmrestore.vsphere.vmconfig import OWNER_KEY

    try:
        for opt in vm.config.extraConfig or []:
            if opt.key == OWNER_KEY:
                return str(opt.value)
    except Exception:  # gone, or no config yet
        return None
    return None


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
        if e.fault == "FileNotFound":
            return False
        raise
    return True


def datastore_dir_files(session: Any, dc: Any, ds_path: str) -> list[str] | None:
    """The files in '[ds] dir' as datastore paths (one level), or None when it is gone."""
    from pyVmomi import vim

    ds_name = ds_path[1:ds_path.index("]")]
    ds = session.datastore(dc, ds_name)
    spec = vim.host.DatastoreBrowser.SearchSpec(  # a spec is required (vcsim: else a panic)
        matchPattern=["*"], details=vim.host.DatastoreBrowser.FileInfo.Details())
    task = ds.browser.SearchDatastore_Task(datastorePath=ds_path, searchSpec=spec)
    try:
        session.wait(task, f"list {ds_path}")
    except VSphereError as e:
        if e.fault == "FileNotFound":
            return None
        raise
    res = session.task_result(task)
    return [f"{ds_path.rstrip('/')}/{f.path}" for f in (getattr(res, "file", None) or [])]


def vm_files(vm: Any) -> set[str]:
    """The datastore files of a VM (layoutEx, else its disk backings and vmx), for rollback."""
    files: set[str] = set()
    try:
        files.update(f.name for f in (vm.layoutEx.file if vm.layoutEx else []) or [])
        files.add(vm.config.files.vmPathName)
        for d in vm.config.hardware.device:
            name = getattr(getattr(d, "backing", None), "fileName", None)
            if name:
                files.add(name)
    except Exception:  # gone: it has no files left to claim
        pass
    return files


def delete_datastore_dir(session: Any, dc: Any, ds_path: str, ours: set[str]) -> str:
    """Delete '[ds] name', a directory this restore created, if it holds only files in ``ours``.

    Returns "deleted", "gone" (not there), or "kept": another job's file is in it (a racer
    for the same VM name may have put its disk there): never removed with ours.
    """
    files = datastore_dir_files(session, dc, ds_path)
    if files is None:
        return "gone"
    if not set(files) <= ours:
        return "kept"
    return "deleted" if delete_datastore_path(session, dc, ds_path) else "gone"


def delete_datastore_path(session: Any, dc: Any, ds_path: str) -> bool:
    """Delete a datastore file or directory, unconditionally; False when it was not there.

    Only for paths known to be the caller's (the demo's own fixed names, a directory
    delete_datastore_dir checked).
    """
    fm = session.content.fileManager
    try:
        session.wait(fm.DeleteDatastoreFile_Task(name=ds_path, datacenter=dc),
                     f"delete {ds_path}")
    except VSphereError as e:
        if e.fault == "FileNotFound":
            return False
        raise
    return True
