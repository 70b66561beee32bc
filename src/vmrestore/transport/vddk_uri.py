"""The ``vddk://`` target URI: which disk to write through VixDiskLib, and how to connect.

Form (documented in ``restore-disk --help`` and docs/vddk.md)::

    vddk://[USER@]SERVER[:PORT]/DATASTORE/DIR/DISK.vmdk?vm=MOREF[&transports=MODES]
           [&thumbprint=SHA1][&password_file=PATH][&snapshot=MOREF][&nfc_port=N]
           [&new=1][&unbuffered=1][&libdir=DIR][&endpoint=vcenter|esx][&access=caller]
    vddk:///ABS/PATH/DISK.vmdk        a local disk file through VixDiskLib ("file" mode)

* The first path segment is the datastore: ``/ds1/vm/vm.vmdk`` is the disk
  vSphere names ``[ds1] vm/vm.vmdk``. A percent-encoded ``[ds1] vm/vm.vmdk``
  is accepted too.
* ``vm`` is the VM's managed object id (``vm-123`` or ``moref=vm-123``; VDDK's
  vmxSpec); ``vmx`` passes any other vmxSpec form verbatim.
* ``transports`` is a colon- (or comma-) separated list tried in order, of
  san, hotadd, nbd, nbdssl (default: the library's own order).
* The password comes from ``password_file``, else ``$VMRESTORE_VDDK_PASSWORD``,
  else the URI's ``USER:PASSWORD@`` (discouraged: visible in process lists).
* ``new=1``: the disk was just created (reads as zeros): zero runs are skipped.
* ``libdir`` overrides ``--vddk-libdir`` / ``$VMRESTORE_VDDK_LIBDIR``.
* ``endpoint=esx``: SERVER is an ESXi host, not vCenter: no PrepareForAccess.
* ``access=caller``: the caller brackets the VM with PrepareForAccess/EndAccess
  (the orchestrator does, around the snapshot); the session does not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from vmrestore.errors import UsageError
from vmrestore.vddk import ENDPOINTS, TRANSPORT_MODES, ConnectSpec

SCHEME = "vddk"
PASSWORD_ENV = "VMRESTORE_VDDK_PASSWORD"
_KNOWN = {"vm", "vmx", "transports", "thumbprint", "password_file", "snapshot", "nfc_port",
          "new", "unbuffered", "libdir", "endpoint", "access"}

HELP = (
    "vddk://[USER@]SERVER[:PORT]/DATASTORE/DIR/DISK.vmdk?vm=MOREF"
    "[&transports=san:hotadd:nbdssl:nbd][&thumbprint=SHA1][&password_file=PATH]"
    "[&new=1][&libdir=DIR][&endpoint=esx] (password also from $VMRESTORE_VDDK_PASSWORD); "
    "vddk:///PATH/DISK.vmdk for a local disk file"
)


@dataclass(frozen=True)
class VddkTarget:
    """A parsed vddk:// URI: the connection, the disk path, and open/write options."""

    spec: ConnectSpec
    disk_path: str        # "[ds1] vm/vm.vmdk", or a local path
    new_disk: bool = False
    unbuffered: bool = False
    libdir: str | None = None
    caller_access: bool = False  # access=caller: PrepareForAccess is the caller's

    @property
    def label(self) -> str:
        where = self.spec.server or "local"
        return f"vddk://{where}/{self.disk_path}"


def is_vddk_uri(uri: str) -> bool:
    return uri.startswith(f"{SCHEME}://")


def _flag(q: dict[str, str], name: str, uri: str) -> bool:
    v = q.get(name, "0").lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise UsageError(f"{uri}: {name}={v!r} is not 0 or 1")


def parse(uri: str) -> VddkTarget:
    """Parse a vddk:// URI; UsageError naming the part that is wrong."""
    u = urlsplit(uri)
    if u.scheme != SCHEME:
        raise UsageError(f"not a vddk:// URI: {uri}")
    raw = parse_qs(u.query, keep_blank_values=True)
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise UsageError(f"{uri}: unknown parameter(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_KNOWN))})")
    q = {k: v[-1] for k, v in raw.items()}
    path = unquote(u.path)

    transports: tuple[str, ...] = ()
    if q.get("transports"):
        transports = tuple(m for m in q["transports"].replace(",", ":").split(":") if m)
        bad = [m for m in transports if m not in TRANSPORT_MODES or m == "file"]
        if bad:
            raise UsageError(f"{uri}: unknown transport mode(s) {', '.join(bad)} "
                             "(san, hotadd, nbd, nbdssl)")

    if not u.hostname:  # local file through VixDiskLib
        if not path or path == "/":
            raise UsageError(f"{uri}: no disk path")
        return VddkTarget(ConnectSpec(), path, _flag(q, "new", uri), _flag(q, "unbuffered", uri),
                          q.get("libdir") or None)

    path = path.lstrip("/")
    if path.startswith("["):
        disk_path = path
    else:
        ds, _, rest = path.partition("/")
        if not ds or not rest:
            raise UsageError(f"{uri}: the path must be /DATASTORE/DIR/DISK.vmdk")
        disk_path = f"[{ds}] {rest}"
    if not disk_path.endswith(".vmdk"):
        raise UsageError(f"{uri}: the disk path must name a .vmdk ({disk_path})")

    vmx = q.get("vmx") or None
    if q.get("vm"):
        vm = q["vm"]
        vmx = vm if vm.startswith("moref=") else f"moref={vm}"
    if vmx is None:
        raise UsageError(f"{uri}: vm=MOREF is required (the VM whose disk this is)")

    password = None
    if q.get("password_file"):
        try:
            password = Path(q["password_file"]).read_text().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"{uri}: cannot read password_file: {e}") from None
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    elif u.password is not None:
        password = unquote(u.password)
    user = unquote(u.username) if u.username else None
    if user is None or password is None:
        raise UsageError(f"{uri}: a user (USER@SERVER) and a password (password_file=, "
                         f"${PASSWORD_ENV}) are required")
    try:
        port = u.port or 0
        nfc_port = int(q.get("nfc_port") or 0)
    except ValueError as e:
        raise UsageError(f"{uri}: bad port: {e}") from None
    endpoint = q.get("endpoint") or "vcenter"
    if endpoint not in ENDPOINTS:
        raise UsageError(f"{uri}: endpoint must be one of {', '.join(ENDPOINTS)}")
    if q.get("access", "") not in ("", "caller"):
        raise UsageError(f"{uri}: access must be 'caller' (or absent)")

    spec = ConnectSpec(
        server=u.hostname, user=user, password=password, thumbprint=q.get("thumbprint") or None,
        vmx_spec=vmx, port=port, nfc_host_port=nfc_port, transports=transports,
        snapshot=q.get("snapshot") or None, endpoint=endpoint,
    )
    return VddkTarget(spec, disk_path, _flag(q, "new", uri), _flag(q, "unbuffered", uri),
                      q.get("libdir") or None, q.get("access") == "caller")


def build(server: str, disk_path: str, vm: str, user: str, *, port: int = 0,
          transports: tuple[str, ...] = (), thumbprint: str | None = None,
          password_file: str | None = None, new: bool = False,
          libdir: str | None = None, endpoint: str = "vcenter",
          caller_access: bool = False) -> str:
    """The vddk:// URI for a disk vSphere names ``disk_path`` ("[ds] dir/x.vmdk").

    For the orchestrator (``restore --disk-library vddk``): it knows these parts
    and should not hand-escape them. Parses back to the same target.
    """
    m = re.fullmatch(r"\[([^\]]+)\] ?(.+)", disk_path)
    if not m:
        raise UsageError(f"not a datastore path: {disk_path!r} (want '[ds] dir/disk.vmdk')")
    netloc = quote(user, safe="") + "@" + server + (f":{port}" if port else "")
    path = quote(m.group(1), safe="") + "/" + quote(m.group(2), safe="/")
    q: dict[str, str] = {"vm": vm}
    if transports:
        q["transports"] = ":".join(transports)
    if thumbprint:
        q["thumbprint"] = thumbprint
    if password_file:
        q["password_file"] = password_file
    if new:
        q["new"] = "1"
    if libdir:
        q["libdir"] = libdir
    if endpoint != "vcenter":
        q["endpoint"] = endpoint
    if caller_access:
        q["access"] = "caller"
    return f"{SCHEME}://{netloc}/{path}?{urlencode(q, safe=':/')}"


def open_target(spec: Any, size: int, opts: Any) -> Any:
    """transport.uri's opener for vddk://: a core Writer owning its VDDK session.

    ``spec`` is transport.uri.TargetSpec, ``opts`` its OpenOptions
    (``target_zeroed``, ``vddk_libdir``, ``max_request``, ``max_inflight`` apply). Closing the
    writer closes the disk, disconnects and ends the access bracket; closed
    during an exception, it runs Cleanup.
    """
    from vmrestore import vddk

    kw: dict[str, Any] = {"target_zeroed": opts.target_zeroed}
    if opts.vddk_libdir:
        kw["libdir"] = opts.vddk_libdir
    if opts.max_request:
        kw["max_request"] = opts.max_request
    if opts.max_inflight:
        kw["max_inflight"] = opts.max_inflight
    return vddk.open_session_writer(parse(spec.uri), size, **kw)
