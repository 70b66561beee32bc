"""The face of VixDiskLib (VMware VDDK): load it, check it, call it, convert its errors.

The user brings the library (``--vddk-libdir DIR`` or ``VMRESTORE_VDDK_LIBDIR``,
laid out as VDDK ships it: ``DIR/lib64/libvixDiskLib.so[.N]``); tests and the
lab use ext/vddk_sim through :func:`sim_libdir`. The library is opened with
cffi in ABI mode (``ffi.dlopen``), checked against the one table of functions
in ext/vixdisklib (required calls missing -> refused at load; optional calls
missing -> the operation that needs one says which), and initialized once per
process. Every VixError becomes ``VddkError`` in one place
(:meth:`Library.check`), with the library's own text.

The session follows VMware's rules (docs/vddk.md, "VMware's rules"): the
VDDK's lib64 on the library search path (the CLI re-executes itself with
LD_LIBRARY_PATH; in-process, VMware's own companion libraries are loaded by
path first), thread-safe log functions for InitEx (C, ext/core/vddk_log.c,
drained into ``logging``), InitEx on the main thread, one process-wide lock
around ConnectEx/Disconnect/Open/Close and the access calls, PrepareForAccess
only against vCenter (retried once when the VM's methods are already
disabled; EndAccess failures only logged), zeroed connect params with
specType set, and Cleanup after every remote session.

No block I/O happens here: the core's VDDK writer (ext/core/writer_vddk.c)
calls WriteAsync itself, with the disk handle and function addresses this
module hands it (:meth:`Disk.writer_args`). ``read``/``write`` below are for
control-plane use and tests (a few sectors), not the data path.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrestore.errors import UsageError, VddkError, from_core

log = logging.getLogger("vmrestore.vddk")
lib_log = logging.getLogger("vmrestore.vddk.lib")  # what VixDiskLib itself logged

LIBDIR_ENV = "VMRESTORE_VDDK_LIBDIR"
LIBNAME = "libvixDiskLib.so"
SECTOR = 512
# The VixDiskLib API version vmrestore asks InitEx for (async I/O needs 6.x).
API_MAJOR, API_MINOR = 6, 0

VIX_OK = 0
VIX_E_FAIL = 1
VIX_E_OBJECT_IS_BUSY = 5
VIX_E_NOT_SUPPORTED = 6
VIX_ASYNC = 25000
SPEC_VMX = 0

# VMware's rule: the VDDK's lib64 must be on the library search path, because
# libvixDiskLib loads its companion libraries by name at run time.
SEARCH_PATH_VAR = "LD_LIBRARY_PATH"
REEXEC_MARK = "VMRESTORE_VDDK_REEXECUTED"
COMPANION_PREFIXES = ("libvixDiskLib", "libdiskLib")  # VMware's own, in lib64
ENDPOINTS = ("vcenter", "esx")

# One lock for the calls VMware says must not run concurrently: ConnectEx,
# Disconnect, Open, Close (they set up and tear down libraries), and the
# access calls made with the same connect params.
SESSION_LOCK = threading.RLock()

FLAG_UNBUFFERED = 1
FLAG_SINGLE_LINK = 2
FLAG_READ_ONLY = 4

CRED_UID = 1
ADAPTERS = {1: "ide", 2: "buslogic", 3: "lsilogic", 256: "unknown"}
TRANSPORT_MODES = ("file", "san", "hotadd", "nbd", "nbdssl")


def _decl() -> Any:
    try:
        from vmrestore import _vixdisklib
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise VddkError(
            f"vmrestore's VixDiskLib declarations are missing ({e}); rebuild with "
            "'python setup.py build_ext --inplace' or scripts/bootstrap.sh"
        ) from e
    return _vixdisklib


def find_library(libdir: str | os.PathLike[str] | None = None) -> Path:
    """The libvixDiskLib.so to load: from libdir, else $VMRESTORE_VDDK_LIBDIR.

    Accepts the VDDK directory (with lib64/), the lib64 directory itself, or
    the .so file. Prefers ``libvixDiskLib.so``, else the highest ``.so.N``.
    """
    where = libdir if libdir not in (None, "") else os.environ.get(LIBDIR_ENV)
    if not where:
        raise UsageError(
            "no VixDiskLib given: pass --vddk-libdir DIR (the VDDK directory with "
            f"lib64/{LIBNAME}) or set {LIBDIR_ENV}"
        )
    base = Path(where)
    if base.is_file():
        return base
    for d in (base / "lib64", base):
        exact = d / LIBNAME
        if exact.exists():
            return exact
        versions = sorted(
            d.glob(f"{LIBNAME}.*"),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.name[len(LIBNAME):])],
        )
        if versions:
            return versions[-1]
    raise VddkError(f"no {LIBNAME} in {base / 'lib64'} (is {base} a VDDK directory?)")


def _loader_search_path() -> list[str]:
    """LD_LIBRARY_PATH as the dynamic loader read it when this process started.

    glibc reads it once, at start: setting os.environ later changes nothing for
    dlopen, so the process's initial environment is what counts.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        raw = f"{SEARCH_PATH_VAR}={os.environ.get(SEARCH_PATH_VAR, '')}".encode()
    key = SEARCH_PATH_VAR.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(key):
            return [p for p in item[len(key):].decode(errors="replace").split(":") if p]
    return []


def _abs(p: Path) -> Path:
    """Absolute, symlinks kept: lib64/libvixDiskLib.so may link elsewhere, lib64 counts."""
    return Path(os.path.abspath(p))


def on_search_path(lib: Path) -> bool:
    """True when the loader's search path holds the directory of lib (its lib64)."""
    d = lib.parent.resolve()
    return any(Path(p).resolve() == d for p in _loader_search_path())


def _may_reexec() -> bool:
    """Only the `vmrestore` command running on its own argv may re-execute itself."""
    return bool(getattr(sys.modules.get("vmrestore.cli"), "REAL_COMMAND_LINE", False))


def ensure_search_path(libdir: str | os.PathLike[str] | None) -> None:
    """VMware's rule for the CLI: re-execute with LD_LIBRARY_PATH naming the VDDK's lib64.

    Does nothing when the search path already holds it, when not called from
    the command line (tests, library use: Library.load preloads instead), when
    this process was already re-executed, or when no library is found (the
    load that follows says why).
    """
    try:
        path = _abs(find_library(libdir))
    except (UsageError, VddkError):
        return
    if not _may_reexec() or on_search_path(path) or os.environ.get(REEXEC_MARK):
        return
    env = dict(os.environ)
    env[SEARCH_PATH_VAR] = ":".join([str(path.parent), *_loader_search_path()])
    env[REEXEC_MARK] = "1"
    log.debug("re-executing with %s=%s", SEARCH_PATH_VAR, env[SEARCH_PATH_VAR])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vmrestore", *sys.argv[1:]], env)


def _preload_companions(lib: Path) -> list[str]:
    """Load VMware's own libraries of lib64 by path, so lookups by name find them loaded.

    The in-process fallback when the search path lacks lib64 (the loader matches
    a by-name dlopen against the SONAME of a library already loaded). Third-party
    libraries VDDK ships (libssl, libcurl, ...) are left alone: only the search
    path should bring those in.
    """
    done = []
    for p in sorted(lib.parent.glob("lib*.so*")):
        if p.resolve() == lib.resolve() or not p.name.startswith(COMPANION_PREFIXES):
            continue
        try:
            ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise VddkError(f"cannot load VixDiskLib's companion {p}: {e}") from None
        done.append(p.name)
    return done


# -- VixDiskLib's own log messages ------------------------------------------------

_last_warnings: collections.deque[str] = collections.deque(maxlen=3)


def drain_log() -> None:
    """Move what VixDiskLib logged (C ring, any thread) into Python logging; main thread only."""
    from vmrestore import _pipeline

    entries, dropped = _pipeline.vddk_log_drain()
    for level, text in entries:  # warnings at INFO: an error that follows quotes them
        if level == 0:
            lib_log.debug("%s", text)
        else:
            lib_log.log(logging.INFO if level == 1 else logging.CRITICAL, "%s", text)
            _last_warnings.append(text)
    if dropped:
        lib_log.warning("%d VixDiskLib log messages dropped (log ring full)", dropped)


def last_warning() -> str | None:
    """The library's most recent warning (drained first): the reason behind a bare code."""
    drain_log()
    return _last_warnings[-1] if _last_warnings else None


@dataclass(frozen=True)
class FunctionStatus:
    name: str
    required: bool
    since: str
    present: bool
    purpose: str


@dataclass(frozen=True)
class DiskInfo:
    capacity_sectors: int
    bios_geometry: tuple[int, int, int]  # cylinders, heads, sectors
    phys_geometry: tuple[int, int, int]
    adapter: str
    num_links: int
    parent_hint: str | None
    uuid: str | None

    @property
    def size(self) -> int:
        return self.capacity_sectors * SECTOR


@dataclass
class ConnectSpec:
    """What ConnectEx needs; ``server=None`` means local files (transport "file")."""

    server: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    thumbprint: str | None = None
    vmx_spec: str | None = None  # "moref=vm-123" or a vmx path spec
    port: int = 0
    nfc_host_port: int = 0
    transports: tuple[str, ...] = ()  # tried in order; () = library default
    snapshot: str | None = None  # snapshot moref (read access to a snapshot)
    endpoint: str = "vcenter"  # "esx": an ESXi host directly (no PrepareForAccess)


class Library:
    """A loaded and initialized VixDiskLib (one per path per process)."""

    _cache: dict[Path, Library] = {}  # noqa: RUF012 - process-wide on purpose
    _lock = threading.Lock()

    def __init__(self, path: Path, check: bool = True) -> None:
        import cffi

        decl = _decl()
        self.path = path
        self.ffi = cffi.FFI()
        self.ffi.cdef(decl.CDEF)
        self.functions = decl.FUNCTIONS
        self.needs: dict[str, tuple[str, ...]] = decl.NEEDS
        if on_search_path(path):
            self.search_path = f"{SEARCH_PATH_VAR} holds {path.parent}"
        else:
            names = _preload_companions(path)
            self.search_path = (f"{path.parent} not in {SEARCH_PATH_VAR}; companions loaded "
                                f"by path: {', '.join(names) or 'none found'}")
        try:
            self.lib = self.ffi.dlopen(str(path))
        except OSError as e:
            raise VddkError(f"cannot load VixDiskLib {path}: {e}") from None
        self.present = {f.name: hasattr(self.lib, f.name) for f in self.functions}
        self.refused: str | None = None
        missing = [f for f in self.functions if f.required and not self.present[f.name]]
        if missing:
            names = ", ".join(f"{f.name} (VDDK {f.since})" for f in missing)
            self.refused = f"{path} is not a usable VixDiskLib: it lacks {names}"
            if check:
                raise VddkError(self.refused)
        self._initialized = False

    @classmethod
    def probe(cls, libdir: str | os.PathLike[str] | None = None) -> Library:
        """The library loaded but neither checked nor initialized (``vddk info`` on a refusal)."""
        return cls(_abs(find_library(libdir)), check=False)

    @classmethod
    def load(cls, libdir: str | os.PathLike[str] | None = None, init: bool = True) -> Library:
        """Find, dlopen, check and (once per process) InitEx the library."""
        path = _abs(find_library(libdir))
        with cls._lock:
            lib = cls._cache.get(path)
            if lib is None:
                lib = cls(path)
                cls._cache[path] = lib
            if init and not lib._initialized:
                lib._init()
        return lib

    def _init(self) -> None:
        """InitEx once per process, from the main thread, with thread-safe log functions."""
        from vmrestore import _pipeline

        if threading.current_thread() is not threading.main_thread():
            raise VddkError(f"VixDiskLib {self.path} must be initialized from the main thread "
                            "(VMware's rule): load it with vddk.Library.load() before "
                            "starting threads")
        config = os.environ.get("VMRESTORE_VDDK_CONFIG")
        fns = _pipeline.vddk_log_functions()
        logf = {k: self.ffi.cast("VixDiskLibGenericLogFunc *", v) for k, v in fns.items()}
        err = self.lib.VixDiskLib_InitEx(
            API_MAJOR, API_MINOR, logf["log"], logf["warn"], logf["panic"],
            str(self.path.parent.parent).encode(),
            config.encode() if config else self.ffi.NULL,
        )
        if int(err) != VIX_OK:
            e = self.error(err, f"VixDiskLib_InitEx ({self.path})")
            if not on_search_path(self.path):
                e = VddkError(f"{e} (is {self.path.parent} on {SEARCH_PATH_VAR}?)",
                              code=e.code, text=e.text, kind=e.kind)
            raise e
        drain_log()
        self._initialized = True
        atexit.register(self._exit)

    def _exit(self) -> None:
        if self._initialized:
            self._initialized = False
            self.lib.VixDiskLib_Exit()

    # -- the one place where VixErrors become exceptions ---------------------

    def error(self, err: int, what: str) -> VddkError:
        """VddkError for err, with the library's text (GetErrorText, then FreeErrorText)

        and the library's last logged warning when it says more than the code."""
        code = int(err) & 0xFFFF
        ptr = self.lib.VixDiskLib_GetErrorText(err, self.ffi.NULL)
        try:
            text = self.ffi.string(ptr).decode(errors="replace") if ptr else "unknown error"
        finally:
            if ptr:
                self.lib.VixDiskLib_FreeErrorText(ptr)
        why = last_warning()
        _last_warnings.clear()
        detail = f" [library: {why}]" if why else ""
        return VddkError(f"{what}: {text} (VixError {code}){detail}", code=code, text=text)

    def check(self, err: int, what: str) -> None:
        if int(err) != VIX_OK:
            raise self.error(err, what)

    # -- what the library offers ---------------------------------------------

    def has(self, name: str) -> bool:
        return self.present.get(name, False)

    def require(self, feature: str) -> None:
        """Raise VddkError naming the calls the library lacks for feature (see NEEDS)."""
        by_name = {f.name: f for f in self.functions}
        missing = [n for n in self.needs[feature] if not self.present[n]]
        if missing:
            names = ", ".join(f"{n} (VDDK {by_name[n].since})" for n in missing)
            raise VddkError(f"VixDiskLib {self.path} is too old for {feature}: it lacks {names}")

    def function_status(self) -> list[FunctionStatus]:
        return [
            FunctionStatus(f.name, f.required, f.since, self.present[f.name], f.purpose)
            for f in self.functions
        ]

    def transport_modes(self) -> list[str]:
        ptr = self.lib.VixDiskLib_ListTransportModes()
        return self.ffi.string(ptr).decode().split(":") if ptr else []

    def report(self) -> dict[str, Any]:
        """What the loaded library offers, for `vmrestore vddk info` (also when refused)."""
        return {
            "path": str(self.path),
            "refused": self.refused,
            "search_path": self.search_path,
            "transport_modes": self.transport_modes() if self.refused is None else [],
            "features": {k: all(self.present[n] for n in v) for k, v in self.needs.items()},
            "functions": [f.__dict__ for f in self.function_status()],
        }

    # -- connections -------------------------------------------------------------

    def _params(self, spec: ConnectSpec, keep: list[Any]) -> Any:
        """A VixDiskLibConnectParams for spec; keep holds the C strings alive."""
        ffi = self.ffi

        def s(v: str | None) -> Any:
            if v is None:
                return ffi.NULL
            buf = ffi.new("char[]", v.encode())
            keep.append(buf)
            return buf

        if self.has("VixDiskLib_AllocateConnectParams"):
            p = self.lib.VixDiskLib_AllocateConnectParams()
            if p == ffi.NULL:
                raise VddkError("VixDiskLib_AllocateConnectParams: out of memory")
            p = ffi.gc(p, self.lib.VixDiskLib_FreeConnectParams)
        else:
            p = ffi.new("VixDiskLibConnectParams *")  # zero-filled
        keep.append(p)
        p.specType = SPEC_VMX  # set, not left to the allocator's zero
        p.vmxSpec = s(spec.vmx_spec)
        p.serverName = s(spec.server)
        p.thumbPrint = s(spec.thumbprint)
        if spec.server is not None:
            p.credType = CRED_UID
            p.creds.uid.userName = s(spec.user)
            p.creds.uid.password = s(spec.password)
        p.port = spec.port
        p.nfcHostPort = spec.nfc_host_port
        return p

    def connect(self, spec: ConnectSpec, read_only: bool = False) -> Connection:
        return Connection(self, spec, read_only)

    def _session_call(self, fn: Any, *args: Any) -> int:
        """A call VMware wants serialized: under SESSION_LOCK, then the log drained."""
        with SESSION_LOCK:
            err = fn(*args)
        drain_log()
        return int(err)

    def prepare_for_access(self, spec: ConnectSpec, identity: str = "vmrestore") -> None:
        keep: list[Any] = []
        err = self._session_call(self.lib.VixDiskLib_PrepareForAccess,
                                 self._params(spec, keep), identity.encode())
        self.check(err, f"VixDiskLib_PrepareForAccess {spec.vmx_spec} on {spec.server}")

    def end_access(self, spec: ConnectSpec, identity: str = "vmrestore") -> None:
        keep: list[Any] = []
        err = self._session_call(self.lib.VixDiskLib_EndAccess,
                                 self._params(spec, keep), identity.encode())
        self.check(err, f"VixDiskLib_EndAccess {spec.vmx_spec} on {spec.server}")

    def cleanup(self, spec: ConnectSpec) -> tuple[int, int]:
        """Undo state a session left on the host; returns (cleaned, remaining)."""
        keep: list[Any] = []
        params = self._params(ConnectSpec(**{**spec.__dict__, "vmx_spec": None}), keep)
        cleaned = self.ffi.new("uint32_t *")
        remaining = self.ffi.new("uint32_t *")
        err = self._session_call(self.lib.VixDiskLib_Cleanup, params, cleaned, remaining)
        self.check(err, f"VixDiskLib_Cleanup on {spec.server}")
        return int(cleaned[0]), int(remaining[0])

    def cleanup_quietly(self, spec: ConnectSpec) -> None:
        """Cleanup after a session: a failure is logged, never raised (it must not mask
        the session's own error nor fail a finished restore)."""
        if spec.server is None:
            return
        try:
            cleaned, remaining = self.cleanup(spec)
        except VddkError as e:
            log.warning("VixDiskLib_Cleanup after the session failed: %s", e)
            return
        if cleaned or remaining:
            log.info("VixDiskLib_Cleanup on %s: %d cleaned up, %d remaining",
                     spec.server, cleaned, remaining)

    def access(self, spec: ConnectSpec, identity: str = "vmrestore") -> Access:
        """Context manager: PrepareForAccess ... EndAccess (VMs behind vCenter only)."""
        return Access(self, spec, identity)


class Access:
    """PrepareForAccess ... EndAccess around the disks' use, as VMware specifies.

    Only against vCenter (``spec.endpoint == "vcenter"``): an ESXi host has no
    method to disable. Call it before the snapshot is taken and end it after the
    snapshot is removed. A VM whose methods are already disabled (a session that
    died before EndAccess) gets EndAccess and one retry. EndAccess failures are
    logged, never raised: they must not mask the restore's error nor fail a
    restore that finished.
    """

    def __init__(self, lib: Library, spec: ConnectSpec, identity: str) -> None:
        self.lib, self.spec, self.identity = lib, spec, identity
        self.active = (spec.server is not None and spec.vmx_spec is not None
                       and spec.endpoint == "vcenter")
        self.prepared = False

    def begin(self) -> None:
        if not self.active or self.prepared:
            return
        try:
            self.lib.prepare_for_access(self.spec, self.identity)
        except VddkError as e:
            if e.code != VIX_E_OBJECT_IS_BUSY:
                raise
            log.warning("%s; ending the earlier access and retrying once", e)
            self.end()
            self.lib.prepare_for_access(self.spec, self.identity)
        self.prepared = True

    def end(self) -> None:
        try:
            self.lib.end_access(self.spec, self.identity)
        except VddkError as e:
            log.warning("%s (the VM's methods may stay disabled until vCenter re-enables "
                        "them)", e)

    def __enter__(self) -> Access:
        self.begin()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.prepared:
            self.prepared = False
            self.end()


class Connection:
    """A VixDiskLib connection (ConnectEx ... Disconnect); a context manager."""

    def __init__(self, lib: Library, spec: ConnectSpec, read_only: bool) -> None:
        self.lib = lib
        self.spec = spec
        ffi = lib.ffi
        self._keep: list[Any] = []
        params = lib._params(spec, self._keep)  # local files too: zeroed, never NULL
        modes = ":".join(spec.transports)
        for m in spec.transports:
            if m not in TRANSPORT_MODES:
                raise UsageError(f"unknown VDDK transport mode {m!r} (one of "
                                 f"{', '.join(TRANSPORT_MODES)})")
        out = ffi.new("VixDiskLibConnection *")
        err = lib._session_call(
            lib.lib.VixDiskLib_ConnectEx,
            params, b"\x01" if read_only else b"\x00",
            spec.snapshot.encode() if spec.snapshot else ffi.NULL,
            modes.encode() if modes else ffi.NULL, out,
        )
        where = spec.server or "local files"
        lib.check(err, f"VixDiskLib_ConnectEx to {where}"
                       + (f" ({spec.vmx_spec})" if spec.vmx_spec else ""))
        self.handle = out[0]

    def open(self, path: str, flags: int = 0) -> Disk:
        return Disk(self, path, flags)

    def close(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            self.lib.check(self.lib._session_call(self.lib.lib.VixDiskLib_Disconnect, h),
                           f"VixDiskLib_Disconnect from {self.spec.server or 'local files'}")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Disk:
    """An open virtual disk (Open ... Close); a context manager."""

    def __init__(self, conn: Connection, path: str, flags: int) -> None:
        self.conn = conn
        self.lib = conn.lib
        self.path = path
        self.flags = flags
        out = self.lib.ffi.new("VixDiskLibHandle *")
        err = self.lib._session_call(self.lib.lib.VixDiskLib_Open, conn.handle, path.encode(),
                                     flags, out)
        self.lib.check(err, f"VixDiskLib_Open {path}")
        self.handle = out[0]

    @property
    def transport_mode(self) -> str:
        ptr = self.lib.lib.VixDiskLib_GetTransportMode(self.handle)
        return self.lib.ffi.string(ptr).decode() if ptr else ""

    def info(self) -> DiskInfo:
        ffi, lib = self.lib.ffi, self.lib.lib
        out = ffi.new("VixDiskLibInfo **")
        self.lib.check(lib.VixDiskLib_GetInfo(self.handle, out), f"VixDiskLib_GetInfo {self.path}")
        i = out[0]
        try:
            return DiskInfo(
                capacity_sectors=int(i.capacity),
                bios_geometry=(i.biosGeo.cylinders, i.biosGeo.heads, i.biosGeo.sectors),
                phys_geometry=(i.physGeo.cylinders, i.physGeo.heads, i.physGeo.sectors),
                adapter=ADAPTERS.get(int(i.adapterType), str(int(i.adapterType))),
                num_links=int(i.numLinks),
                parent_hint=ffi.string(i.parentFileNameHint).decode()
                if i.parentFileNameHint else None,
                uuid=ffi.string(i.uuid).decode() if i.uuid else None,
            )
        finally:
            lib.VixDiskLib_FreeInfo(i)

    def read(self, sector: int, count: int) -> bytes:
        """Read count sectors (control plane and tests; not the data path)."""
        buf = self.lib.ffi.new("uint8_t[]", count * SECTOR)
        err = self.lib.lib.VixDiskLib_Read(self.handle, sector, count, buf)
        self.lib.check(err, f"VixDiskLib_Read {self.path} at offset {sector * SECTOR}")
        return bytes(self.lib.ffi.buffer(buf))

    def write(self, sector: int, data: bytes) -> None:
        """Write whole sectors (control plane and tests; not the data path)."""
        if len(data) % SECTOR:
            raise UsageError(f"VDDK writes are whole sectors; got {len(data)} bytes")
        err = self.lib.lib.VixDiskLib_Write(self.handle, sector, len(data) // SECTOR, data)
        self.lib.check(err, f"VixDiskLib_Write {self.path} at offset {sector * SECTOR}")

    def wait(self) -> None:
        self.lib.require("async-write")
        self.lib.check(self.lib.lib.VixDiskLib_Wait(self.handle), f"VixDiskLib_Wait {self.path}")

    def flush(self) -> None:
        self.lib.require("flush")
        self.lib.check(self.lib.lib.VixDiskLib_Flush(self.handle), f"VixDiskLib_Flush {self.path}")

    def allocated_blocks(self, chunk_sectors: int = 2048) -> Iterator[tuple[int, int]]:
        """(start sector, sector count) of allocated chunks, the whole disk, merged."""
        self.lib.require("allocated-blocks")
        ffi, lib = self.lib.ffi, self.lib.lib
        capacity = self.info().capacity_sectors
        usable = capacity - capacity % chunk_sectors
        step = chunk_sectors * (512 * 1024)  # VIXDISKLIB_MAX_CHUNK_NUMBER chunks per call
        pending: tuple[int, int] | None = None
        for start in range(0, usable, step):
            count = min(step, usable - start)
            out = ffi.new("VixDiskLibBlockList **")
            err = lib.VixDiskLib_QueryAllocatedBlocks(self.handle, start, count, chunk_sectors, out)
            self.lib.check(err, f"VixDiskLib_QueryAllocatedBlocks {self.path} at sector {start}")
            bl = out[0]
            try:
                arr = ffi.cast("VixDiskLibBlock *", bl.blocks)  # blocks[1] is really [numBlocks]
                blocks = [(int(arr[i].offset), int(arr[i].length)) for i in range(bl.numBlocks)]
            finally:
                lib.VixDiskLib_FreeBlockList(bl)
            for off, n in blocks:
                if pending and pending[0] + pending[1] == off:
                    pending = (pending[0], pending[1] + n)
                    continue
                if pending:
                    yield pending
                pending = (off, n)
        if pending:
            yield pending
        if usable < capacity:  # the tail smaller than a chunk: report it as allocated
            yield (usable, capacity - usable)

    def writer_args(self) -> dict[str, int]:
        """Addresses the core's VDDK writer needs: the handle and the calls it makes."""
        self.lib.require("async-write")
        ffi, lib = self.lib.ffi, self.lib.lib
        return {
            "handle": int(ffi.cast("uintptr_t", self.handle)),
            **{name: int(ffi.cast("uintptr_t", getattr(lib, f"VixDiskLib_{name}")))
               for name in ("WriteAsync", "Write", "Wait", "Flush",
                            "GetErrorText", "FreeErrorText", "Read")},
        }

    def close(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            self.lib.check(self.lib._session_call(self.lib.lib.VixDiskLib_Close, h),
                           f"VixDiskLib_Close {self.path}")

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the data path: a core writer over an open disk, and a whole-disk restore -----

# Requests in flight per disk handle (measured, docs/vddk.md), bytes per WriteAsync
# and bytes the library may hold per disk handle: an NFC message is the data + 24
# bytes from the host's small NFC buffer pool (docs/vddk.md, "NFC buffers").
DEFAULT_QUEUE_DEPTH = 16
DEFAULT_MAX_REQUEST = 1 << 20
DEFAULT_MAX_INFLIGHT = 8 << 20


@dataclass
class VddkRestoreResult:
    """What restore_disk_vddk did, for reports and --json."""

    disk: str
    transport: str
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int
    seconds: float
    counters: dict[str, Any]


@dataclass
class VddkWriter:
    """An open VDDK disk as the core sees it: pass ``writer`` to the pipeline."""

    writer: Any  # vmrestore._pipeline.Writer
    transport: str  # the mode VixDiskLib chose (san, hotadd, nbd, nbdssl, file)
    info: DiskInfo
    target: Any  # transport.vddk_uri.VddkTarget


def with_library_reason(e: Exception) -> Exception:
    """A VddkError from the data path, with the library's last warning when it has one."""
    why = last_warning()
    _last_warnings.clear()
    if isinstance(e, VddkError) and why and why not in str(e):
        return VddkError(f"{e} [library: {why}]", code=e.code, text=e.text, kind=e.kind)
    return e


def _writer_class() -> type:
    """A core Writer subclass whose close() also ends the VDDK session behind it.

    Used when the pipeline's caller only knows Writers (transport.uri.open_target
    -> restore_disk.run_plan): closing the writer closes the disk, disconnects,
    ends the access bracket -- and runs Cleanup when closed while an exception
    propagates (run_plan closes it in a ``finally``).
    """
    global _WRITER_CLS
    if _WRITER_CLS is None:
        from vmrestore import _pipeline

        class VddkCoreWriter(_pipeline.Writer):  # type: ignore[misc,name-defined]
            def close(self) -> None:
                _pipeline.Writer.close(self)
                stack = self.__dict__.pop("_vddk_stack", None)
                if stack is not None:
                    stack.__exit__(*sys.exc_info())

        _WRITER_CLS = VddkCoreWriter
    return _WRITER_CLS


_WRITER_CLS: type | None = None


@contextmanager
def open_writer(target: Any, size: int, *, libdir: str | os.PathLike[str] | None = None,
                max_request: int = DEFAULT_MAX_REQUEST,
                max_inflight: int = DEFAULT_MAX_INFLIGHT, identity: str = "vmrestore",
                target_zeroed: bool | None = None) -> Iterator[VddkWriter]:
    """A core writer onto a VDDK disk, for the pipeline (``.writer``: a _pipeline.Writer).

    target is a ``transport.vddk_uri.VddkTarget`` (or a vddk:// string). Brackets
    the data phase with PrepareForAccess/EndAccess (vCenter only, and not when the
    URI says the caller holds the bracket: ``access=caller``), connects, opens the
    disk, refuses a disk smaller than ``size`` (TargetError), and closes
    everything in order afterwards. VixDiskLib_Cleanup runs after every remote
    session, failed or not; its own failure is only logged. ``target_zeroed``
    (None: the URI's ``new=``) says whether zero runs may be skipped.
    """
    from vmrestore import _pipeline
    from vmrestore.errors import TargetError
    from vmrestore.transport import vddk_uri

    if isinstance(target, str):
        target = vddk_uri.parse(target)
    zeroed = target.new_disk if target_zeroed is None else target_zeroed
    lib = Library.load(libdir if libdir not in (None, "") else target.libdir)
    lib.require("async-write")
    spec = target.spec
    flags = FLAG_UNBUFFERED if target.unbuffered else 0
    with ExitStack() as stack:
        stack.callback(lib.cleanup_quietly, spec)  # runs last, after EndAccess
        if not target.caller_access:
            stack.enter_context(lib.access(spec, identity))
        conn = stack.enter_context(lib.connect(spec))
        disk = stack.enter_context(conn.open(target.disk_path, flags))
        info = disk.info()
        if info.size < size:
            raise TargetError(f"{target.label}: the disk holds {info.size} bytes, "
                              f"the restore needs {size}")
        try:
            w = _pipeline.open_vddk_writer(
                disk.writer_args(), info.size, target.disk_path, max_request,
                _pipeline.F_TARGET_ZEROED if zeroed else 0, _writer_class(), max_inflight)
        except _pipeline.CoreError as e:
            raise with_library_reason(from_core(e, where=target.label)) from None
        log.info("%s: VixDiskLib transport %s", target.label, disk.transport_mode)
        try:
            yield VddkWriter(w, disk.transport_mode, info, target)
        finally:
            _pipeline.Writer.close(w)
            drain_log()


def open_session_writer(target: Any, size: int, **kw: Any) -> Any:
    """open_writer() as a plain Writer whose close() ends the VDDK session (see _writer_class)."""
    stack = ExitStack()
    vw = stack.enter_context(open_writer(target, size, **kw))
    vw.writer._vddk_stack = stack
    vw.writer.transport_mode = vw.transport  # the mode VixDiskLib chose, for reports
    return vw.writer


def restore_disk_vddk(backup: str | os.PathLike[str], disk: int, target: str, *,
                      libdir: str | os.PathLike[str] | None = None, point: str | None = None,
                      queue_depth: int = DEFAULT_QUEUE_DEPTH,
                      max_request: int = DEFAULT_MAX_REQUEST,
                      max_inflight: int = DEFAULT_MAX_INFLIGHT, threads: int = 0,
                      progress: Any = None) -> VddkRestoreResult:
    """Restore disk ``disk`` of a backup chain through VixDiskLib (a vddk:// target URI).

    A disk task like any other (vmrestore.disktask.run_disk_task): the plan
    comes from the repository, the core moves the blocks and its writer lane
    calls WriteAsync; ``progress(DiskProgress)`` sees the samples. A write or
    flush VixDiskLib refused is a VddkError with the library's code (errors.from_core).
    """
    from vmrestore.disktask import DiskTask, TaskSettings, run_disk_task
    from vmrestore.transport import vddk_uri

    parsed = vddk_uri.parse(target)
    task = DiskTask(disk=disk, source=str(backup), target=target, point=point,
                    transport="vddk", settings=TaskSettings(
                        threads=threads, queue_depth=queue_depth, max_request=max_request,
                        max_inflight=max_inflight,
                        vddk_libdir=str(libdir) if libdir not in (None, "") else None))
    try:
        r = run_disk_task(task, progress)
    except Exception as e:
        raise with_library_reason(e) from None
    finally:
        drain_log()
    return VddkRestoreResult(
        disk=parsed.disk_path, transport=r.transport, bytes_written=r.bytes_written,
        bytes_zeroed=r.bytes_zeroed, bytes_skipped=r.bytes_skipped, seconds=r.seconds,
        counters={**r.settings, "bytes_written": r.bytes_written,
                  "bytes_zeroed": r.bytes_zeroed, "bytes_skipped": r.bytes_skipped})


# -- vddk_sim ----------------------------------------------------------------------


SIM_COMPANION = "libvixDiskLibVim.so.8"  # ext/build_vddk_sim.py's COMPANION_SONAME


def sim_library(name: str = "_vddk_sim") -> Path:
    """The built vddk_sim shared library (ext/vddk_sim), or VddkError if not built.

    name ``_vddk_sim_vim`` gives its companion library instead."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{name}.*so"))
    if not found:
        raise VddkError(
            f"vddk_sim ({name}) is not built: run 'python setup.py build_ext --inplace' "
            "(or scripts/bootstrap.sh)"
        )
    return found[0]


def _link(link: Path, to: Path) -> None:
    """link -> to, replaced atomically when it points elsewhere."""
    if link.is_symlink() and Path(os.readlink(link)) == to:
        return
    tmp = link.parent / f".{link.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(to)
    tmp.replace(link)


def sim_libdir(base: str | os.PathLike[str] | None = None) -> Path:
    """A VDDK-shaped directory for vddk_sim: ``DIR/lib64/libvixDiskLib.so`` -> the sim.

    Made under base, else the user cache dir; pass the result as --vddk-libdir.
    """
    root = Path(base) if base else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmrestore" / "vddk-sim"
    lib64 = root / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    _link(lib64 / LIBNAME, sim_library())
    _link(lib64 / SIM_COMPANION, sim_library("_vddk_sim_vim"))
    return root


def sim_env_for_lab(lab: Any) -> dict[str, str]:
    """Environment pointing vddk_sim at a lab's datastores (lab: vmrestore.lab.client.LabInfo).

    With it, vddk:// URIs naming the lab's disks ("[ds-local] vm/vm.vmdk") reach
    the same files the lab's hosts serve, with the lab's credentials enforced.
    """
    return {
        "VMRESTORE_VDDK_SIM_DATASTORES": ",".join(
            f"{name}={ds.dir}" for name, ds in lab.datastores.items()),
        "VMRESTORE_VDDK_SIM_USER": lab.user,
        "VMRESTORE_VDDK_SIM_PASSWORD": lab.password,
    }


def create_sim_disk(directory: str | os.PathLike[str], name: str, size: int,
                    thick: bool = False, adapter: str = "lsilogic") -> Path:
    """Create a disk as vSphere lays it out: NAME.vmdk (descriptor) + NAME-flat.vmdk (data).

    For tests and the lab; ``thick`` allocates every block (what SAN mode needs).
    """
    if size % SECTOR:
        raise UsageError(f"disk size must be a multiple of {SECTOR}: {size}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flat = d / f"{name}-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(size)
        if thick:
            os.posix_fallocate(f.fileno(), 0, size)
    desc = d / f"{name}.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="vmfs"\n\n# Extent description\n'
        f'RW {size // SECTOR} VMFS "{flat.name}"\n\n# The Disk Data Base\n'
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.thinProvisioned = "{0 if thick else 1}"\n'
    )
    return desc
