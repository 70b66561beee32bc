"""Client of the host data services: ESXi's side of the transports, behind one interface.

The transports and the orchestrator ask a host for what only the host can do
(export a disk over NBD, tell where a thick disk lies on its LUN, hot-add a
disk to the proxy, give a new disk file its provisioning) through this class
and nothing else. In the lab the server is vmrestore.lab.hostd; a real ESXi
counterpart would implement the same API, v1, documented in docs/lab.md
(JSON over HTTP, bearer token). Standard library only, so importing it is cheap.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from vmrestore.errors import HostServiceError

API_VERSION = 1
PROVISIONING = ("thin", "thick-lazy", "thick-eager")


@dataclass(frozen=True)
class NbdExport:
    id: str
    uri: str                 # libnbd URI, e.g. nbd+unix:///?socket=... or nbds+unix://vmr@/?...
    size: int
    tls: bool
    readonly: bool
    psk_file: str | None     # nbdssl: "identity:hexkey" file, 0600
    psk_identity: str | None
    socket: str | None       # unix socket path (transport "unix")
    host: str | None         # loopback TCP (transport "tcp")
    port: int | None
    attempt: int | None = None  # the disk task attempt it was made for (fencing), if any


@dataclass(frozen=True)
class ExtentMap:
    datastore_path: str
    lun: str                 # the raw LUN as the SAN proxy sees it (a block device)
    size: int                # the disk's size in bytes
    extents: list[tuple[int, int, int]]   # (disk offset, LUN offset, length), covering the disk


@dataclass(frozen=True)
class HotAdd:
    id: str
    datastore_path: str
    device: str              # /dev/loopN on the proxy
    size: int
    proxy_vm: str
    disk_key: int            # the VirtualDisk's key in the proxy VM
    controller_key: int
    unit_number: int
    attempt: int | None = None


@dataclass(frozen=True)
class DiskInfo:
    datastore_path: str
    size: int
    allocated: int           # bytes allocated on the datastore (st_blocks * 512)


class HostServices:
    """One host data services endpoint (base URL + bearer token)."""

    def __init__(self, url: str, token: str, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_lab(cls, lab: Any) -> HostServices:
        """From a vmrestore.lab.client.LabInfo."""
        return cls(lab.hostd_url, lab.hostd_token)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}/v{API_VERSION}/{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
                kind, message = err["kind"], err["message"]
            except (ValueError, KeyError, TypeError):
                kind, message = "failed", f"HTTP {e.code} {e.reason}"
            raise HostServiceError(message, kind=kind) from None
        except (OSError, ValueError) as e:
            raise HostServiceError(f"host data services at {self.url} unreachable: {e}",
                                   kind="unreachable") from None

    def info(self) -> dict[str, Any]:
        """API version, datastores (name, type), SAN LUNs, proxy VM name."""
        return self._call("GET", "info")

    # -- provisioning --------------------------------------------------------------------
    def prepare_disk(self, datastore_path: str, capacity: int, provisioning: str) -> DiskInfo:
        """Give a newly created disk file its capacity by provisioning type.

        What a real host does itself when it creates the disk: against real
        ESXi this is a no-op. provisioning: thin | thick-lazy | thick-eager.
        """
        r = self._call("POST", "disks/prepare", {"datastore_path": datastore_path,
                                                  "capacity": capacity,
                                                  "provisioning": provisioning})
        return DiskInfo(**r)

    def sync_disk(self, datastore_path: str) -> DiskInfo:
        """After writing a disk through its LUN (SAN), make the host's view of the file current.

        Drops what the host cached of the file; a no-op against real ESXi
        (VMFS does not cache guest disk data). Call it when a SAN write ends.
        """
        return DiskInfo(**self._call("POST", "disks/sync", {"datastore_path": datastore_path}))

    def disk_snapshot(self, datastore_path: str, op: str) -> None:
        """The data side of a VM snapshot where the host does not keep deltas (the lab).

        op: keep (at snapshot creation), revert (at RevertToSnapshot), drop (at
        removal). A real host keeps deltas itself: its services answer no-op.
        """
        self._call("POST", "disks/snapshot", {"datastore_path": datastore_path, "op": op})

    def disk_info(self, datastore_path: str) -> DiskInfo:
        return DiskInfo(**self._call("POST", "disks/info", {"datastore_path": datastore_path}))

    # -- NBD (nbd / nbdssl transports) ---------------------------------------------------
    def export_nbd(self, datastore_path: str, *, tls: bool = False, readonly: bool = False,
                   transport: str = "unix", attempt: int | None = None) -> NbdExport:
        """Export the disk over NBD (TLS-PSK when tls); release with unexport_nbd.

        ``attempt`` fences: the host refuses an attempt lower than one it saw for
        this disk (kind "stale") and revokes a lower attempt's attachments first.
        """
        body: dict[str, Any] = {"datastore_path": datastore_path, "tls": tls,
                                "readonly": readonly, "transport": transport}
        if attempt is not None:
            body["attempt"] = attempt
        return NbdExport(**self._call("POST", "exports", body))

    def unexport_nbd(self, export_id: str) -> None:
        self._call("DELETE", f"exports/{export_id}")

    def exports(self) -> list[NbdExport]:
        return [NbdExport(**e) for e in self._call("GET", "exports")]

    # -- SAN -----------------------------------------------------------------------------
    def extent_map(self, datastore_path: str) -> ExtentMap:
        """Where the thick disk lies on its LUN; HostServiceError(kind="refused") if thin."""
        r = self._call("POST", "extents", {"datastore_path": datastore_path})
        return ExtentMap(datastore_path=r["datastore_path"], lun=r["lun"], size=r["size"],
                         extents=[tuple(e) for e in r["extents"]])

    # -- HotAdd --------------------------------------------------------------------------
    def hot_add(self, datastore_path: str, proxy_vm: str | None = None,
                attempt: int | None = None) -> HotAdd:
        """Attach the disk to the proxy VM; returns the block device the proxy sees.

        ``attempt`` fences as in :meth:`export_nbd`."""
        body: dict[str, Any] = {"datastore_path": datastore_path}
        if proxy_vm:
            body["proxy_vm"] = proxy_vm
        if attempt is not None:
            body["attempt"] = attempt
        return HotAdd(**self._call("POST", "hotadd", body))

    def hot_remove(self, hotadd_id: str) -> None:
        """Detach from the proxy (the disk file stays)."""
        self._call("DELETE", f"hotadd/{hotadd_id}")

    def hot_adds(self) -> list[HotAdd]:
        return [HotAdd(**h) for h in self._call("GET", "hotadd")]

    def fences(self) -> list[dict[str, Any]]:
        """Per disk: the highest attempt seen and every attempt's attachments with their
        grant and revoke times (the proof that two attempts never held a disk at once)."""
        return list(self._call("GET", "fences"))

    def release_all(self) -> dict[str, int]:
        """Release every export and hot-added disk (cleanup after a failed restore, lab down)."""
        return self._call("POST", "release-all", {})
