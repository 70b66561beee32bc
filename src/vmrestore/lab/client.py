"""Read a running lab's description: what the orchestrator and tools need to use it.

``vmrestore lab up`` writes ``DIR/lab.json`` (the same document that
``vmrestore lab status --json`` prints, format in docs/lab.md). This module
only reads it, so the orchestrator can take the lab's vCenter, credentials
and host data services as defaults without importing the lab's machinery.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vmrestore.errors import LabError
from vmrestore.procs import pid_alive

STATUS_VERSION = 1


def default_lab_dir() -> Path:
    """``$VMRESTORE_LAB_DIR``, else ``.lab`` in the current directory."""
    env = os.environ.get("VMRESTORE_LAB_DIR")
    return Path(env) if env else Path.cwd() / ".lab"


@dataclass(frozen=True)
class DatastoreInfo:
    name: str
    type: str          # summary.type as the API reports it: VMFS or VVOL
    dir: Path          # the local directory behind it
    lun: str | None = None        # ds-san: the raw LUN (block device) a SAN proxy sees
    lun_image: Path | None = None  # ds-san: the LUN's image file


@dataclass(frozen=True)
class LabInfo:
    """A running lab, as described by its lab.json."""

    dir: Path
    vcenter_url: str
    user: str
    password: str
    password_file: Path
    datacenter: str
    cluster: str
    resource_pool: str
    vm_folder: str
    hosts: list[str]
    networks: list[str]
    proxy_vm: str
    hostd_url: str
    hostd_token_file: Path
    datastores: dict[str, DatastoreInfo] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    proxy_vms: list[str] = field(default_factory=list)  # every proxy VM; proxy_vm is the first

    @property
    def host(self) -> str:
        return urlsplit(self.vcenter_url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        u = urlsplit(self.vcenter_url)
        return u.port or (443 if u.scheme == "https" else 80)

    @property
    def ca_file(self) -> Path | None:
        """The lab CA's certificate: what verifies its https endpoints (``--ca-file``)."""
        return Path(self.raw["ca_file"]) if self.raw.get("ca_file") else None

    @property
    def esx_url(self) -> str | None:
        """The standalone ESXi endpoint's URL, when the lab runs one (``lab up --esx``)."""
        return (self.raw.get("esx") or {}).get("url")

    def endpoints(self) -> list[str]:
        """Every vSphere API URL this lab serves (its vCenter, then its ESXi host if any)."""
        return [u for u in (self.vcenter_url, self.esx_url) if u]

    def target(self, url: str | None = None) -> Any:
        """A vsphere.connect.Target for the lab's vCenter (or url: e.g. its ESXi endpoint)."""
        from vmrestore.vsphere.connect import Target

        return Target(url or self.vcenter_url, self.user, self.password,
                      ca_file=str(self.ca_file) if self.ca_file else None)

    def ssl_context(self) -> Any:
        """An SSL context that trusts the lab's CA (None for an http lab)."""
        import ssl

        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    @property
    def protocol(self) -> str:
        return urlsplit(self.vcenter_url).scheme

    @property
    def hostd_token(self) -> str:
        return self.hostd_token_file.read_text().strip()

    def datastore(self, name: str) -> DatastoreInfo:
        try:
            return self.datastores[name]
        except KeyError:
            raise LabError(f"lab {self.dir} has no datastore {name!r} "
                           f"(has: {', '.join(self.datastores)})") from None

    def connect_args(self) -> dict[str, Any]:
        """Keyword arguments for pyVim.connect.SmartConnect."""
        args = {"host": self.host, "port": self.port, "user": self.user,
                "pwd": self.password, "protocol": self.protocol}
        if self.protocol == "https":
            args["sslContext"] = self.ssl_context()
        return args


def parse_status(doc: dict[str, Any], lab_dir: Path) -> LabInfo:
    """Build a LabInfo from a status document (lab.json)."""
    if doc.get("version") != STATUS_VERSION:
        raise LabError(f"{lab_dir}/lab.json has version {doc.get('version')!r}, "
                       f"this vmrestore reads {STATUS_VERSION}: run 'vmrestore lab down' and up")
    try:
        dss = {
            d["name"]: DatastoreInfo(
                name=d["name"], type=d["type"], dir=Path(d["dir"]), lun=d.get("lun"),
                lun_image=Path(d["lun_image"]) if d.get("lun_image") else None)
            for d in doc["datastores"]
        }
        return LabInfo(
            dir=lab_dir, vcenter_url=doc["vcenter_url"], user=doc["user"],
            password=doc["password"], password_file=Path(doc["password_file"]),
            datacenter=doc["datacenter"], cluster=doc["cluster"],
            resource_pool=doc["resource_pool"], vm_folder=doc["vm_folder"],
            hosts=list(doc["hosts"]), networks=list(doc["networks"]),
            proxy_vm=doc["proxy_vm"], hostd_url=doc["hostd_url"],
            hostd_token_file=Path(doc["hostd_token_file"]), datastores=dss, raw=doc,
            proxy_vms=list(doc.get("proxy_vms") or [doc["proxy_vm"]]),
        )
    except (KeyError, TypeError) as e:
        raise LabError(f"{lab_dir}/lab.json is incomplete ({e}): run 'vmrestore lab up'") from e


def load_lab(lab_dir: str | os.PathLike[str] | None = None) -> LabInfo:
    """The running lab in lab_dir (default: default_lab_dir()); LabError if it is not up."""
    d = Path(lab_dir) if lab_dir is not None else default_lab_dir()
    path = d / "lab.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab is up in {d} (run 'vmrestore lab up --dir {d}')") from None
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read {path}: {e}") from e
    return parse_status(doc, d.resolve())


def lab_is_up(lab_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when lab_dir holds a lab whose processes are alive (cheap: no network)."""
    d = Path(lab_dir) if lab_dir is not None else default_lab_dir()
    try:
        doc = json.loads((d / "lab.json").read_text())
        pids = doc.get("pids", {})
        return all(pid_alive(int(p)) for p in pids.values()) and bool(pids)
    except (OSError, ValueError, TypeError):
        return False


