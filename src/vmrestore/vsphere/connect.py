"""Connecting to vCenter/ESXi, waiting on tasks, and finding inventory objects by name.

Every pyvmomi fault or socket error that a user can cause (bad password,
wrong host, untrusted certificate, a datastore name with a typo) becomes a
:class:`VSphereError` here, with a message that says what was looked for and
what exists instead. Callers never see a raw ``vim.fault``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmrestore.errors import VSphereError

log = logging.getLogger("vmrestore.vsphere")


@dataclass
class Target:
    """Where and how to connect; `url` is http(s)://host[:port][/sdk]."""

    url: str
    user: str
    password: str
    thumbprint: str | None = None
    ca_file: str | None = None
    insecure: bool = False


def _ssl_context(t: Target) -> ssl.SSLContext:
    """How the server's certificate is checked: pinned (thumbprint, checked before the
    login by _check_thumbprint), not at all (--insecure), by a CA file, or by the
    system's CAs. Always explicit: pyvmomi's own default does not verify."""
    if t.insecure or t.thumbprint:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if t.ca_file:
        return ssl.create_default_context(cafile=t.ca_file)
    return ssl.create_default_context()


def _check_thumbprint(host: str, port: int, want: str) -> None:
    """Pin the server certificate before sending credentials (like VDDK's thumbprint)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=15) as s, \
                ctx.wrap_socket(s, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True) or b""
    except OSError as e:
        raise VSphereError(f"cannot reach {host}:{port} to check its certificate: {e}") from None
    want_hex = want.replace(":", "").lower()
    algo = hashlib.sha1 if len(want_hex) == 40 else hashlib.sha256
    got = algo(der).hexdigest()
    if got != want_hex:
        def pretty(h: str) -> str:
            return ":".join(h[i:i + 2] for i in range(0, len(h), 2)).upper()

        raise VSphereError(f"certificate of {host}:{port} does not match the thumbprint: "
                           f"expected {algo().name.upper()} {pretty(want_hex)}, the server "
                           f"presents {pretty(got)}; credentials not sent")


class Session:
    """A logged-in connection plus the inventory lookups the restore needs."""

    def __init__(self, si: Any, target: Target) -> None:
        self.si = si
        self.target = target
        self.content = si.RetrieveContent()

    @property
    def about(self) -> str:
        a = self.content.about
        return f"{a.fullName} ({a.apiType})"

    def close(self) -> None:
        from pyVim.connect import Disconnect

        try:
            Disconnect(self.si)
        except Exception:  # already gone: nothing to release
            log.debug("disconnect failed", exc_info=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inventory -------------------------------------------------------------------

    def objects(self, vimtype: Any, root: Any = None) -> Iterator[Any]:
        """All objects of a type under root (default: everything), via a container view."""
        view = self.content.viewManager.CreateContainerView(
            root or self.content.rootFolder, [vimtype], True)
        try:
            yield from list(view.view)
        finally:
            view.Destroy()

    def datacenter(self, name: str | None) -> Any:
        from pyVmomi import vim

        dcs = list(self.objects(vim.Datacenter))
        if name:
            return _named(dcs, name, "datacenter", f"at {self.target.url}")
        if len(dcs) == 1:
            return dcs[0]
        if not dcs:
            raise VSphereError(f"no datacenter at {self.target.url}")
        raise VSphereError(f"{len(dcs)} datacenters at {self.target.url} ({_names(dcs)}): "
                           "name one with 'datacenter'")

    def host(self, dc: Any, name: str | None, datastore: Any = None) -> Any:
        """The named ESXi host, or the first connected host that mounts `datastore`."""
        from pyVmomi import vim

        hosts = list(self.objects(vim.HostSystem, dc.hostFolder))
        if name:
            return _named(hosts, name, "host", f"in datacenter {dc.name}")
        for h in hosts:
            if datastore is None or datastore in h.datastore:
                return h
        raise VSphereError(f"no host in datacenter {dc.name} mounts datastore "
                           f"{datastore.name if datastore else '?'}")

    def datastore(self, dc: Any, name: str) -> Any:
        return _named(dc.datastore, name, "datastore", f"in datacenter {dc.name}")

    def network(self, dc: Any, name: str) -> Any:
        return _named(dc.network, name, "network", f"in datacenter {dc.name}")

    def folder(self, dc: Any, path: str | None) -> Any:
        """A VM folder by path relative to the datacenter's VM folder ('a/b')."""
        from pyVmomi import vim

        folder = dc.vmFolder
        if not path:
            return folder
        for part in [p for p in path.strip("/").split("/") if p]:
            children = [c for c in folder.childEntity if isinstance(c, vim.Folder)]
            match = [c for c in children if c.name == part]
            if not match:
                raise VSphereError(f"folder {path!r} not found in datacenter {dc.name}: no "
                                   f"{part!r} in {folder.name} (there: {_names(children)})")
            folder = match[0]
        return folder

    def resource_pool(self, dc: Any, host: Any, name: str | None) -> Any:
        """The named pool (anywhere in the datacenter), else the host's root pool."""
        from pyVmomi import vim

        if not name:
            return host.parent.resourcePool
        pools = list(self.objects(vim.ResourcePool, dc.hostFolder))
        return _named(pools, name, "resource pool", f"in datacenter {dc.name}")

    def find_vm(self, dc: Any, name: str) -> Any | None:
        """The VM of that name in the datacenter, or None (reads only 'name')."""
        from pyVmomi import vim, vmodl

        view = self.content.viewManager.CreateContainerView(dc.vmFolder, [vim.VirtualMachine],
                                                            True)
        try:
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                        name="v", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.VirtualMachine, pathSet=["name"])])
            for obj in self.content.propertyCollector.RetrieveContents([spec]):
                if obj.propSet and obj.propSet[0].val == name:
                    return obj.obj
            return None
        finally:
            view.Destroy()

    def vm_by_moref(self, moid: str) -> Any:
        from pyVmomi import vim

        return vim.VirtualMachine(moid, self.si._stub)

    # --- tasks -----------------------------------------------------------------------

    def wait(self, task: Any, what: str, timeout: float = 600) -> Any:
        """Wait for a task by polling only info.state/error/result (see Lab notes:
        the full TaskInfo of some tasks does not deserialize)."""
        from pyVmomi import vmodl

        pc = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=type(task), pathSet=["info.state", "info.error"])])
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                res = pc.RetrieveContents([spec])
            except Exception as e:
                raise VSphereError(f"{what}: lost the task: {fault_text(e)}") from None
            props = {p.name: p.val for p in res[0].propSet} if res else {}
            state = props.get("info.state")
            if state == "success":
                return task
            if state == "error":
                fault = props.get("info.error")
                kind = getattr(fault, "fault", None) or fault  # LocalizedMethodFault wraps it
                raise VSphereError(f"{what}: {fault_text(fault)}",
                                   fault=type(kind).__name__.rsplit(".", 1)[-1])
            if time.monotonic() > deadline:
                raise VSphereError(f"{what}: task still {state} after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def task_result(self, task: Any) -> Any:
        return task.info.result


def _named(objs: Any, name: str, what: str, where: str) -> Any:
    """The object called `name`, or an error that lists the names there are."""
    objs = list(objs)
    for o in objs:
        if o.name == name:
            return o
    raise VSphereError(f"{what} {name!r} not found {where} (there: {_names(objs)})")


def _names(objs: Any) -> str:
    names = sorted(o.name for o in objs)
    return ", ".join(names) if names else "none"


def fault_text(fault: Any) -> str:
    """One line from a vim fault or exception: its message, else its type."""
    if fault is None:
        return "unknown error"
    msg = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    if not msg and getattr(fault, "faultMessage", None):
        msg = "; ".join(m.message for m in fault.faultMessage if getattr(m, "message", None))
    name = type(fault).__name__
    return f"{msg} ({name})" if msg else (str(fault).splitlines()[0] if str(fault) else name)


def connect(target: Target, timeout: float = 30) -> Session:
    """Log in; every failure a user can cause becomes a VSphereError naming the URL."""
    from pyVim.connect import SmartConnect
    from pyVmomi import vim

    from vmrestore.job import parse_vcenter

    proto, host, port, path = parse_vcenter(target.url)
    if proto == "https" and target.thumbprint:
        _check_thumbprint(host, port, target.thumbprint)
    where = f"{proto}://{host}:{port}{path}"
    try:
        si = SmartConnect(protocol=proto, host=host, port=port, path=path, user=target.user,
                          pwd=target.password, sslContext=_ssl_context(target),
                          httpConnectionTimeout=timeout,
                          disableSslCertValidation=target.insecure)
    except vim.fault.InvalidLogin:
        raise VSphereError(f"bad credentials: {where} refused user {target.user!r}") from None
    except ssl.SSLCertVerificationError as e:
        raise VSphereError(f"certificate of {where} not trusted ({e.verify_message}); give "
                           "--thumbprint, a CA file, or use the lab's http URL") from None
    except (ConnectionError, socket.gaierror, TimeoutError) as e:
        raise VSphereError(f"cannot reach vCenter/ESXi at {where}: "
                           f"{e.strerror or e}") from None
    except (OSError, http.client.HTTPException) as e:
        raise VSphereError(f"cannot talk to vCenter/ESXi at {where}: {e}") from None
    except vim.fault.VimFault as e:
        raise VSphereError(f"{where} refused the login: {fault_text(e)}") from None
    except Exception as e:
        raise VSphereError(f"{where} is not a vSphere API endpoint: {e}") from None
    s = Session(si, target)
    log.info("connected to %s: %s", where, s.about)
    return s
