"""The lab's host data services (hostd): ESXi's side of the transports, as a local service.

Run by ``vmrestore lab up`` as ``python -m vmrestore.lab.hostd --lab-dir DIR``.
It serves API v1 (JSON over HTTP on 127.0.0.1, bearer token; docs/lab.md)
and is the only part that touches lab internals for the transports: it maps
datastore paths to files, runs nbdkit exports, reads FIEMAP for the SAN LUN,
attaches loop devices for HotAdd and reconfigures the proxy VM through the
vSphere API. Everything it holds is recorded in hostd/state.json so that
``lab down`` can release it even after a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from vmrestore.lab import loopdev
from vmrestore.procs import run_checked
from vmrestore.transport.host import API_VERSION, PROVISIONING

log = logging.getLogger("vmrestore.lab.hostd")

DSPATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<rel>.*)$")
PSK_IDENTITY = "vmr"
ZERO_CHUNK = 4 << 20


class HostdError(Exception):
    """An API error: HTTP status + kind + one-line message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def bad(msg: str) -> HostdError:
    return HostdError(400, "bad-request", msg)


def not_found(msg: str) -> HostdError:
    return HostdError(404, "not-found", msg)


def refused(msg: str) -> HostdError:
    return HostdError(409, "refused", msg)


def failed(msg: str) -> HostdError:
    return HostdError(500, "failed", msg)


def _sh(cmd: list[str], what: str) -> str:
    return run_checked(cmd, what, failed)


class Hostd:
    """The services' state and operations; the HTTP layer only routes to these methods."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.cfg: dict[str, Any] = json.loads((lab_dir / "hostd.json").read_text())
        self.token = (lab_dir / "hostd.token").read_text().strip()
        self.datastores = {d["name"]: d for d in self.cfg["datastores"]}
        self.run_dir = lab_dir / "hostd"
        self.run_dir.mkdir(exist_ok=True)
        # Unix socket paths are limited to 108 bytes: use a short dir when needed.
        if len(str(self.run_dir)) > 70:
            self.sock_dir = Path(tempfile.mkdtemp(prefix="vmr-hostd-"))
        else:
            self.sock_dir = self.run_dir
        self.lock = threading.RLock()
        self.exports: dict[str, dict[str, Any]] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hotadds: dict[str, dict[str, Any]] = {}
        # Fencing per disk file: the highest attempt seen, and every attachment made for an
        # attempt with its grant and revoke times (what `GET /v1/fences` shows).
        self.fences: dict[str, dict[str, Any]] = {}
        # Loop devices made read-only by a hot-remove; made writable again once unbound
        # (a stale holder keeps one bound until it closes it), so that the next user of
        # the device number does not inherit the flag. Kept in state.json so that
        # `lab down` can undo them after a crash.
        self._fenced: set[str] = set()
        self._stop_watch = threading.Event()
        self._si: Any = None
        self.spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostd-spawner")
        self._save()

    # -- state -------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"version": 1, "sock_dir": str(self.sock_dir), "exports": self.exports,
                 "hotadds": self.hotadds, "fences": self.fences,
                 "fenced_devices": sorted(self._fenced)}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.run_dir / "state.json")

    # -- paths -------------------------------------------------------------------------
    def resolve(self, datastore_path: Any, *, flat: bool = True) -> tuple[str, Path]:
        """``[ds] dir/x.vmdk`` → (datastore name, local file); the flat extent when flat."""
        if not isinstance(datastore_path, str):
            raise bad("datastore_path must be a string like '[ds-local] vm/vm.vmdk'")
        m = DSPATH.match(datastore_path)
        if not m:
            raise bad(f"not a datastore path: {datastore_path!r} (want '[ds] dir/file.vmdk')")
        ds = self.datastores.get(m["ds"])
        if ds is None:
            raise not_found(f"no datastore {m['ds']!r} on this host "
                            f"(has: {', '.join(self.datastores)})")
        root = Path(ds["dir"]).resolve()
        path = (root / m["rel"]).resolve()
        if root not in path.parents:
            raise bad(f"{datastore_path}: path leaves the datastore")
        if flat and path.name.endswith(".vmdk") and not path.name.endswith("-flat.vmdk"):
            flat_path = path.with_name(path.name[: -len(".vmdk")] + "-flat.vmdk")
            if flat_path.exists() or not path.exists():
                path = flat_path
        if not path.exists():
            raise not_found(f"{datastore_path}: no such disk file ({path.name})")
        return m["ds"], path

    # -- provisioning ------------------------------------------------------------------
    def prepare_disk(self, datastore_path: Any, capacity: Any, provisioning: Any) -> dict[str, Any]:
        if provisioning not in PROVISIONING:
            raise bad(f"provisioning must be one of {', '.join(PROVISIONING)}, "
                      f"not {provisioning!r}")
        if not isinstance(capacity, int) or capacity <= 0 or capacity % 512:
            raise bad(f"capacity must be a positive multiple of 512 bytes, not {capacity!r}")
        _ds, path = self.resolve(datastore_path)
        size = path.stat().st_size
        if size > capacity:
            raise refused(f"{datastore_path}: file is {size} bytes, larger than the "
                          f"capacity {capacity}: a disk is never shrunk")
        fd = os.open(path, os.O_RDWR)
        try:
            if provisioning == "thin":
                os.ftruncate(fd, capacity)
            elif provisioning == "thick-lazy":
                os.posix_fallocate(fd, 0, capacity)
            else:
                os.ftruncate(fd, capacity)
                self._write_zeros(fd, datastore_path, capacity)
            os.fsync(fd)
        except OSError as e:
            raise failed(f"{datastore_path}: provisioning {provisioning} "
                         f"({capacity} bytes) failed: {e}") from e
        finally:
            os.close(fd)
        self._write_descriptor(path, capacity, provisioning)
        _forget_cached(path)
        return self.disk_info(datastore_path)

    @staticmethod
    def _write_zeros(fd: int, what: str, capacity: int) -> None:
        """Eager-zero: every block written, so its extents are real (not 'unwritten')."""
        from vmrestore.transport.extents import FIEMAP_EXTENT_UNWRITTEN, fiemap

        zeros = bytes(ZERO_CHUNK)
        # Only the ranges not already written with data (re-prepare keeps data).
        written = [(e.logical, e.logical + e.length)
                   for e in fiemap(f"/proc/self/fd/{fd}")
                   if not e.flags & FIEMAP_EXTENT_UNWRITTEN]
        pos = 0
        for start, end in [*written, (capacity, capacity)]:
            while pos < min(start, capacity):
                n = min(ZERO_CHUNK, start - pos)
                os.pwrite(fd, zeros[:n], pos)
                pos += n
            pos = max(pos, end)

    @staticmethod
    def _write_descriptor(flat: Path, capacity: int, provisioning: str) -> None:
        """vcsim leaves the descriptor empty; write a monolithic-flat one if so."""
        if not flat.name.endswith("-flat.vmdk"):
            return
        desc = flat.with_name(flat.name[: -len("-flat.vmdk")] + ".vmdk")
        if desc.exists() and desc.stat().st_size > 0:
            return
        lines = [
            "# Disk DescriptorFile", "version=1", f"CID={secrets.randbits(32):08x}",
            "parentCID=ffffffff", 'createType="vmfs"', "",
            "# Extent description", f'RW {capacity // 512} VMFS "{flat.name}"', "",
            "# The Disk Data Base", "#DDB", "", 'ddb.adapterType = "lsilogic"',
            'ddb.virtualHWVersion = "13"',
        ]
        if provisioning == "thin":
            lines.append('ddb.thinProvisioned = "1"')
        desc.write_text("\n".join(lines) + "\n")

    def sync_disk(self, datastore_path: Any) -> dict[str, Any]:
        """Make the host see what was written under the filesystem (after SAN writes)."""
        _ds, path = self.resolve(datastore_path)
        _forget_cached(path)
        return self.disk_info(datastore_path)

    def disk_snapshot(self, datastore_path: Any, op: Any) -> dict[str, Any]:
        """The data side of a VM snapshot, which the simulator does not keep.

        On a real host a snapshot switches the disk to a delta file: reverting
        drops the delta, removing it merges the delta in. The simulator keeps
        running on the base file, so the lab keeps a copy of the disk at the
        snapshot (``keep``), copies it back in place on ``revert`` (same inode:
        exports and hot-adds stay valid) and deletes it on ``drop``. A real
        host's services answer these as no-ops.
        """
        if op not in ("keep", "revert", "drop"):
            raise bad(f"op must be keep, revert or drop, not {op!r}")
        _ds, path = self.resolve(datastore_path)
        saved = path.with_name(f".{path.name}.snapshot")
        if op == "keep":
            _sh(["cp", "--reflink=auto", "--sparse=always", str(path), str(saved)],
                f"keep {datastore_path} at the snapshot")
        elif not saved.exists():
            raise not_found(f"{datastore_path}: no snapshot copy to {op}")
        elif op == "revert":
            _forget_cached(path)
            _sh(["cp", "--reflink=auto", "--sparse=always", str(saved), str(path)],
                f"revert {datastore_path} to the snapshot")
            _forget_cached(path)
            saved.unlink()
        else:
            saved.unlink()
        return {"datastore_path": datastore_path, "op": op, "emulated": True}

    def disk_info(self, datastore_path: Any) -> dict[str, Any]:
        _ds, path = self.resolve(datastore_path)
        st = path.stat()
        return {"datastore_path": datastore_path, "size": st.st_size,
                "allocated": st.st_blocks * 512}

    # -- fencing ---------------------------------------------------------------------------
    def _fence(self, datastore_path: str, path: Path, attempt: Any) -> None:
        """Admit an attachment for ``attempt`` of the disk task writing ``path``.

        A lower attempt than one already seen is refused (kind ``stale``); a
        higher one first revokes every live export and hot-add of the file made
        for a lower attempt, so a stale writer's connection or device is gone
        before its successor can write. No attempt: no fencing (API v1 callers).
        """
        if attempt is None:
            return
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise bad(f"attempt must be a positive integer, not {attempt!r}")
        ino = path.stat().st_ino
        with self.lock:
            f = self.fences.setdefault(str(path), {"datastore_path": datastore_path,
                                                   "attempt": 0, "log": []})
            if f.get("ino") != ino:  # a new disk file (a VM made again): a new fence
                f.update(attempt=0, ino=ino)
            if attempt < f["attempt"]:
                raise HostdError(409, "stale", f"{datastore_path}: attempt {attempt} is stale "
                                 f"(attempt {f['attempt']} holds the disk)")
            f["attempt"] = attempt
            old_exports = [e for e, r in self.exports.items() if r["path"] == str(path)
                           and r.get("attempt") is not None and r["attempt"] < attempt]
            old_hotadds = [h for h, r in self.hotadds.items() if r["path"] == str(path)
                           and r.get("attempt") is not None and r["attempt"] < attempt]
            self._save()
        for eid in old_exports:
            with contextlib.suppress(HostdError):
                self.unexport(eid)
        for hid in old_hotadds:
            with contextlib.suppress(HostdError):
                self.hot_remove(hid)

    def _fence_log(self, rec: dict[str, Any], kind: str, event: str) -> None:
        """Record the grant or the revoke of an attempt's attachment (lock held)."""
        f = self.fences.get(rec["path"])
        if f is None or rec.get("attempt") is None:
            return
        if event == "granted":
            f["log"].append({"attempt": rec["attempt"], "kind": kind, "id": rec["id"],
                             "granted": time.time(), "revoked": None})
        else:
            for e in f["log"]:
                if e["id"] == rec["id"] and e["revoked"] is None:
                    e["revoked"] = time.time()

    def list_fences(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"datastore_path": f["datastore_path"], "attempt": f["attempt"],
                     "log": [dict(e) for e in f["log"]]} for f in self.fences.values()]

    # -- NBD -----------------------------------------------------------------------------
    def export(self, datastore_path: Any, tls: Any = False, readonly: Any = False,
               transport: Any = "unix", attempt: Any = None) -> dict[str, Any]:
        if transport not in ("unix", "tcp"):
            raise bad(f"transport must be unix or tcp, not {transport!r}")
        _ds, path = self.resolve(datastore_path)
        self._fence(datastore_path, path, attempt)
        size = path.stat().st_size
        if size == 0:
            raise refused(f"{datastore_path}: disk file is empty (not provisioned: "
                          "call prepare_disk first)")
        eid = secrets.token_hex(4)
        sock = host = port = psk = None
        opts: list[str] = []
        if tls:
            psk = str(self.run_dir / f"nbd-{eid}.psk")
            fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{PSK_IDENTITY}:{secrets.token_hex(32)}\n")
            opts += ["--tls=require", f"--tls-psk={psk}"]
        if readonly:
            opts.append("-r")
        opts += ["file", f"file={path}"]
        # A TCP port picked free may be taken before nbdkit binds it: try again.
        for try_no in range(3 if transport == "tcp" else 1):
            if transport == "unix":
                sock = str(self.sock_dir / f"nbd-{eid}.sock")
                listen = ["-U", sock]
            else:
                host, port = "127.0.0.1", _free_port()
                listen = ["-i", host, "-p", str(port)]
            try:
                proc = self._start_nbdkit(eid, listen + opts, datastore_path)
                break
            except HostdError:
                if try_no == (2 if transport == "tcp" else 0):
                    if psk:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(psk)
                    raise
        if transport == "unix":
            scheme = "nbds+unix" if tls else "nbd+unix"
            user = f"{PSK_IDENTITY}@" if tls else ""
            uri = f"{scheme}://{user}/?socket={sock}"
        else:
            scheme = "nbds" if tls else "nbd"
            user = f"{PSK_IDENTITY}@" if tls else ""
            uri = f"{scheme}://{user}{host}:{port}/"
        if tls:
            uri += ("&" if "?" in uri else "?") + f"tls-psk-file={psk}"
        rec = {"id": eid, "uri": uri, "size": size, "tls": bool(tls), "readonly": bool(readonly),
               "psk_file": psk, "psk_identity": PSK_IDENTITY if tls else None, "socket": sock,
               "host": host, "port": port, "attempt": attempt}
        with self.lock:
            self.exports[eid] = {**rec, "pid": proc.pid, "path": str(path),
                                 "datastore_path": datastore_path}
            self.procs[eid] = proc
            self._fence_log(self.exports[eid], "export", "granted")
            self._save()
        log.info("export %s: %s → %s", eid, datastore_path, uri)
        return rec

    def _start_nbdkit(self, eid: str, args: list[str], what: str) -> subprocess.Popen[bytes]:
        pidfile = self.run_dir / f"nbd-{eid}.pid"
        logpath = self.run_dir / f"nbd-{eid}.log"
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-P", str(pidfile), *args]
        with open(logpath, "wb") as logf:
            # --exit-with-parent ties nbdkit to the *thread* that forks it: fork from
            # the long-lived spawner thread, not from this request's thread.
            proc = self.spawner.submit(subprocess.Popen, cmd, stdin=subprocess.DEVNULL,
                                       stdout=logf, stderr=logf).result()
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                err = logpath.read_text(errors="replace").strip()
                raise failed(f"nbdkit for {what} did not start: {err[-300:]}")
            time.sleep(0.02)
        return proc

    def unexport(self, eid: str) -> dict[str, Any]:
        with self.lock:
            rec = self.exports.pop(eid, None)
            proc = self.procs.pop(eid, None)
            if rec is None:
                raise not_found(f"no export {eid!r}")
            self._save()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with self.lock:  # nbdkit is gone: nothing more can reach the disk through it
            self._fence_log(rec, "export", "revoked")
            self._save()
        for suffix in (".sock", ".psk", ".pid", ".log"):
            base = self.sock_dir if suffix == ".sock" else self.run_dir
            with contextlib.suppress(FileNotFoundError):
                (base / f"nbd-{eid}{suffix}").unlink()
        log.info("unexport %s", eid)
        return {"id": eid}

    def list_exports(self) -> list[dict[str, Any]]:
        keys = ("id", "uri", "size", "tls", "readonly", "psk_file", "psk_identity", "socket",
                "host", "port", "attempt")
        with self.lock:
            return [{k: e.get(k) for k in keys} for e in self.exports.values()]

    # -- SAN -------------------------------------------------------------------------------
    def extents(self, datastore_path: Any) -> dict[str, Any]:
        from vmrestore.transport.extents import ExtentMapError, written_map

        ds, path = self.resolve(datastore_path)
        lun = self.datastores[ds].get("lun")
        if not lun:
            raise refused(f"{datastore_path}: datastore {ds} is not on a SAN LUN "
                          "(no raw device for a SAN proxy)")
        if path.stat().st_size == 0:
            raise refused(f"{datastore_path}: disk file is empty (not provisioned)")
        try:
            ext = written_map(path)
            _forget_cached(path)
        except ExtentMapError as e:
            raise refused(f"{datastore_path}: no SAN extent map: {e}") from e
        except OSError as e:
            raise failed(f"{datastore_path}: FIEMAP failed: {e}") from e
        return {"datastore_path": datastore_path, "lun": lun, "size": path.stat().st_size,
                "extents": [list(x) for x in ext]}

    # -- HotAdd ----------------------------------------------------------------------------
    def _vsphere(self) -> Any:
        from pyVim.connect import SmartConnect

        if self._si is not None:
            try:
                self._si.content.sessionManager.currentSession  # noqa: B018 - liveness probe
                return self._si
            except Exception:
                self._si = None
        from urllib.parse import urlsplit

        u = urlsplit(self.cfg["vcenter_url"])
        ctx = None
        if u.scheme == "https" and self.cfg.get("ca_file"):  # the lab's own CA
            import ssl

            ctx = ssl.create_default_context(cafile=self.cfg["ca_file"])
        self._si = SmartConnect(host=u.hostname, port=u.port, user=self.cfg["user"],
                                pwd=self.cfg["password"], protocol=u.scheme, sslContext=ctx)
        return self._si

    def _find_vm(self, name: str) -> Any:
        from pyVmomi import vim

        content = self._vsphere().content
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            for vm in view.view:
                if vm.name == name:
                    return vm
        finally:
            view.Destroy()
        raise not_found(f"proxy VM {name!r} not found in the inventory")

    @staticmethod
    def _wait(task: Any, what: str) -> None:
        while task.info.state in ("queued", "running"):
            time.sleep(0.05)
        if task.info.state != "success":
            msg = getattr(task.info.error, "msg", None) or str(task.info.error)
            raise failed(f"{what}: {msg}")

    def hot_add(self, datastore_path: Any, proxy_vm: Any = None,
                attempt: Any = None) -> dict[str, Any]:
        from pyVmomi import vim

        _ds, path = self.resolve(datastore_path)
        self._fence(datastore_path, path, attempt)
        size = path.stat().st_size
        if size == 0:
            raise refused(f"{datastore_path}: disk file is empty (not provisioned)")
        proxy = proxy_vm or self.cfg["proxy_vm"]
        with self.lock:
            for h in self.hotadds.values():
                if h["path"] == str(path):
                    raise refused(f"{datastore_path} is already hot-added to {h['proxy_vm']} "
                                  f"as {h['device']}")
            vm = self._find_vm(proxy)
            devices = vm.config.hardware.device
            ctrl = next((d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)),
                        None)
            if ctrl is None:
                raise refused(f"proxy VM {proxy} has no SCSI controller for hot-add")
            used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctrl.key}
            free = [u for u in range(16) if u != 7 and u not in used]
            if not free:
                raise refused(f"proxy VM {proxy}: SCSI controller {ctrl.key} is full")
            unit = free[0]
            disk = vim.vm.device.VirtualDisk(
                key=-1, controllerKey=ctrl.key, unitNumber=unit, capacityInKB=size // 1024,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=datastore_path, diskMode="persistent"))
            change = vim.vm.device.VirtualDeviceSpec(operation="add", device=disk)
            self._wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])),
                       f"hot-add of {datastore_path} to {proxy}")
            key = next((d.key for d in vm.config.hardware.device
                        if isinstance(d, vim.vm.device.VirtualDisk)
                        and d.controllerKey == ctrl.key and d.unitNumber == unit), None)
            if key is None:
                raise failed(f"hot-add of {datastore_path}: {proxy} does not show the disk")
            self._fenced = loopdev.unfence_unbound(self._fenced)
            try:
                dev = loopdev.attach(path, "attaching the disk", failed)
            except HostdError:
                self._remove_disk(vm, key, datastore_path, proxy)
                raise
            hid = secrets.token_hex(4)
            rec = {"id": hid, "datastore_path": datastore_path, "device": dev, "size": size,
                   "proxy_vm": proxy, "disk_key": key, "controller_key": ctrl.key,
                   "unit_number": unit, "attempt": attempt}
            self.hotadds[hid] = {**rec, "path": str(path)}
            self._fence_log(self.hotadds[hid], "hotadd", "granted")
            self._save()
        log.info("hot-add %s: %s → %s (%s key %d)", hid, datastore_path, dev, proxy, key)
        return rec

    def _remove_disk(self, vm: Any, key: int, datastore_path: str, proxy: str) -> None:
        from pyVmomi import vim

        disk = next((d for d in vm.config.hardware.device if d.key == key), None)
        if disk is None:
            return
        change = vim.vm.device.VirtualDeviceSpec(operation="remove", device=disk)
        self._wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])),
                   f"hot-remove of {datastore_path} from {proxy}")

    def hot_remove(self, hid: str) -> dict[str, Any]:
        with self.lock:
            rec = self.hotadds.get(hid)
            if rec is None:
                raise not_found(f"no hot-added disk {hid!r}")
            dev = rec["device"]
            # Fence first: read-only refuses further writes even through a descriptor the
            # proxy still holds open (a detach alone waits for the last close). Then flush
            # what it wrote and detach.
            loopdev.fence(dev)
            self._fence_log(rec, "hotadd", "revoked")
            with contextlib.suppress(OSError):
                fd = os.open(dev, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            loopdev.detach(dev, failed)
            self._fenced = loopdev.unfence_unbound(self._fenced | {dev})
            try:
                self._remove_disk(self._find_vm(rec["proxy_vm"]), rec["disk_key"],
                                  rec["datastore_path"], rec["proxy_vm"])
            finally:
                del self.hotadds[hid]
                self._save()
        log.info("hot-remove %s: %s from %s", hid, rec["datastore_path"], rec["proxy_vm"])
        return {"id": hid}

    def list_hotadds(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{k: v for k, v in h.items() if k != "path"} for h in self.hotadds.values()]

    def release_all(self) -> dict[str, int]:
        n_exp = n_hot = 0
        for eid in list(self.exports):
            with contextlib.suppress(HostdError):
                self.unexport(eid)
                n_exp += 1
        for hid in list(self.hotadds):
            try:
                self.hot_remove(hid)
                n_hot += 1
            except Exception as e:
                log.warning("release of hot-add %s: %s", hid, e)
        return {"exports": n_exp, "hotadds": n_hot}

    def info(self) -> dict[str, Any]:
        return {
            "api": API_VERSION,
            "datastores": [{"name": d["name"], "type": d["type"], "san": bool(d.get("lun"))}
                           for d in self.cfg["datastores"]],
            "luns": {d["name"]: d["lun"] for d in self.cfg["datastores"] if d.get("lun")},
            "proxy_vm": self.cfg["proxy_vm"],
            "provisioning": list(PROVISIONING),
        }

    def watch_fences(self, interval: float = 0.5) -> None:
        """Undo fences as their stale holders let go, not only at the next hot-add."""
        while not self._stop_watch.wait(interval):
            with self.lock:
                if not self._fenced:
                    continue
                left = loopdev.unfence_unbound(self._fenced)
                if left != self._fenced:
                    log.info("fenced loop device(s) %s released: writable again",
                             " ".join(sorted(self._fenced - left)))
                    self._fenced = left
                    self._save()

    def shutdown(self) -> None:
        self._stop_watch.set()
        self.release_all()
        with self.lock:
            self._fenced = loopdev.unfence_unbound(self._fenced)
            self._save()
        if self.sock_dir != self.run_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)


def _forget_cached(path: Path) -> None:
    """Flush the file and drop its page cache, so reads go to the device again.

    A SAN writer changes the file's blocks under the filesystem (through the
    LUN); pages the host cached before would hide that. Real VMFS hosts do not
    cache guest disk data; this makes the lab behave the same.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handler(BaseHTTPRequestHandler):
    server_version = "vmr-hostd/1"
    hostd: Hostd  # set on the class by serve()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if method == "GET" and path == "/v1/ping":
                return self._reply(200, {"api": API_VERSION})
            if self.headers.get("Authorization") != f"Bearer {self.hostd.token}":
                raise HostdError(401, "unauthorized", "missing or wrong bearer token")
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            if not isinstance(body, dict):
                raise bad("request body must be a JSON object")
            self._reply(200, self._route(method, path, body))
        except HostdError as e:
            self._reply(e.status, {"error": {"kind": e.kind, "message": str(e)}})
        except (ValueError, TypeError) as e:
            self._reply(400, {"error": {"kind": "bad-request", "message": str(e)}})
        except Exception as e:
            log.exception("internal error on %s %s", method, self.path)
            self._reply(500, {"error": {"kind": "failed", "message": f"{type(e).__name__}: {e}"}})

    def _route(self, method: str, path: str, body: dict[str, Any]) -> Any:
        h = self.hostd
        if not path.startswith("/v1/"):
            raise HostdError(404, "not-found", f"no such endpoint {path} (API v{API_VERSION})")
        rest = path[len("/v1/"):]
        head, _, arg = rest.partition("/")
        if head == "disks":
            head, arg = rest, ""
        route = (method, head)
        try:
            if route == ("GET", "info"):
                return h.info()
            if route == ("POST", "disks/prepare"):
                return h.prepare_disk(body.get("datastore_path"), body.get("capacity"),
                                      body.get("provisioning"))
            if route == ("POST", "disks/sync"):
                return h.sync_disk(body.get("datastore_path"))
            if route == ("POST", "disks/snapshot"):
                return h.disk_snapshot(body.get("datastore_path"), body.get("op"))
            if route == ("POST", "disks/info"):
                return h.disk_info(body.get("datastore_path"))
            if route == ("POST", "exports") and not arg:
                return h.export(body.get("datastore_path"), body.get("tls", False),
                                body.get("readonly", False), body.get("transport", "unix"),
                                body.get("attempt"))
            if route == ("GET", "exports") and not arg:
                return h.list_exports()
            if route == ("DELETE", "exports") and arg:
                return h.unexport(arg)
            if route == ("POST", "extents"):
                return h.extents(body.get("datastore_path"))
            if route == ("POST", "hotadd") and not arg:
                return h.hot_add(body.get("datastore_path"), body.get("proxy_vm"),
                                 body.get("attempt"))
            if route == ("GET", "hotadd") and not arg:
                return h.list_hotadds()
            if route == ("DELETE", "hotadd") and arg:
                return h.hot_remove(arg)
            if route == ("GET", "fences") and not arg:
                return h.list_fences()
            if route == ("POST", "release-all"):
                return h.release_all()
        except OSError as e:
            raise failed(f"{method} {path}: {e}") from e
        raise HostdError(404, "not-found", f"no such endpoint {method} {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def serve(lab_dir: Path) -> int:
    hostd = Hostd(lab_dir)
    Handler.hostd = hostd
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=hostd.watch_fences, name="hostd-fences", daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = lab_dir / "hostd.url.tmp"
    tmp.write_text(url + "\n")
    os.replace(tmp, lab_dir / "hostd.url")
    log.info("hostd API v%d at %s", API_VERSION, url)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        hostd.shutdown()
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmrestore.lab.hostd",
                                     description="The lab's host data services (API v1).")
    parser.add_argument("--lab-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s hostd %(levelname)s %(message)s")
    return serve(args.lab_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
