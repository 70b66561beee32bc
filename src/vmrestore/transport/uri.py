"""Restore targets by URI: parse one into a TargetSpec, open it as a core writer.

URI forms (docs/core.md, "Targets"):

``PATH`` or ``file://PATH``
    A regular file or a block device (the HotAdd data path: the hot-added
    disk is a local block device). A new file is created sparse and its zero
    ranges are skipped; an existing regular file is refused unless ``force``;
    a block device is written in place (refused when smaller than the disk).
``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``
    An NBD export, through libnbd. Query parameters of libnbd pass through:
    ``socket=``, ``tls-certificates=DIR``, ``tls-psk-file=FILE``; a user name
    for TLS goes before the host (``nbds://alice@host/``).
``nbds://…``, ``nbds+unix://…``
    The same with TLS required (PSK file or certificates as above).
    vmrestore's own parameters, removed before libnbd sees the URI:
    ``connections=N`` (used when the server offers multi-conn),
    ``retries=N`` (attempts per failed request on a fresh connection, default 3),
    ``tls-verify-peer=0|1``, ``flush-every=MiB`` (early writeback: an unwaited
    flush every MiB written over all connections, 0 = only the final flush),
    ``timeout=SECONDS`` (how long one request, flush or connection attempt
    may wait for the server before it counts as lost, default 30),
    ``request-size=KiB`` (a larger block goes out as several NBD writes of at
    most this size; default 256, 0 = one request per block).
``san:LUN?map=MAP.json`` (or ``san:?map=MAP.json``, LUN taken from the map)
    A raw LUN (block device or file) written at the disk's physical extents
    given by MAP.json: ``{"version": 1, "lun": PATH, "size": BYTES,
    "extents": [[disk_offset, lun_offset, length], ...]}`` (the order of
    vmrestore.transport.host.ExtentMap). Refused unless the extents cover the
    whole disk (a thin disk has holes: use hotadd or nbd).

Other schemes (``vddk://``) register an opener in :data:`OPENERS`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np

from vmrestore import ownership
from vmrestore.errors import TargetError, UsageError, from_core

log = logging.getLogger("vmrestore.transport")

MAP_VERSION = 1
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp")
_OWN_NBD_PARAMS = ("connections", "retries", "tls-verify-peer", "flush-every", "request-size",
                   "timeout")
DEFAULT_NBD_TIMEOUT_S = 30


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target: ``kind`` is file, nbd, san, or a registered scheme."""

    kind: str
    uri: str                          # as given
    path: str | None = None           # file: the path; san: the LUN
    nbd_uri: str | None = None        # nbd: the URI libnbd connects to
    map_path: str | None = None       # san: the extent map file
    options: dict[str, str] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        """The restore transport this target means (hotadd for a local device or file)."""
        return {"file": "hotadd", "nbd": "nbdssl" if self.tls else "nbd"}.get(self.kind,
                                                                               self.kind)

    @property
    def tls(self) -> bool:
        return self.kind == "nbd" and (self.nbd_uri or "").startswith("nbds")


def parse_target(uri: str) -> TargetSpec:
    """Parse a target URI (see module doc); raises UsageError naming what is wrong."""
    if not uri:
        raise UsageError("empty target URI")
    if uri.startswith("san:"):
        return _parse_san(uri)
    if "://" not in uri:
        return TargetSpec("file", uri, path=uri)
    try:  # a broken IPv6 literal or a port out of range raise ValueError here
        parts = urlsplit(uri)
        _ = parts.port
    except ValueError as e:
        raise UsageError(f"{uri}: not a valid URI: {e}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{uri}: file:// URIs name a local path (file:///dev/sdb)")
        if not parts.path:
            raise UsageError(f"{uri}: no path")
        return TargetSpec("file", uri, path=parts.path)
    if scheme in NBD_SCHEMES:
        query = parse_qsl(parts.query, keep_blank_values=True)
        own = {k: v for k, v in query if k in _OWN_NBD_PARAMS}
        rest = [(k, v) for k, v in query if k not in _OWN_NBD_PARAMS]
        if "unix" in scheme and not any(k == "socket" for k, _ in rest):
            raise UsageError(f"{uri}: {scheme} needs ?socket=PATH")
        if "unix" not in scheme and not parts.hostname:
            raise UsageError(f"{uri}: no host")
        for k in ("connections", "retries", "flush-every", "timeout", "request-size"):
            if k in own and not (own[k].isdigit() and int(own[k]) < 1 << 31):
                raise UsageError(f"{uri}: {k}= must be a number")
        if int(own.get("request-size", 0)) > 1 << 16:
            raise UsageError(f"{uri}: request-size= must be 0..65536 KiB")
        if own.get("timeout") == "0" or int(own.get("timeout", 1)) > 86400:
            raise UsageError(f"{uri}: timeout= must be 1..86400 seconds")
        # built by hand: urlunsplit drops the '//' of nbd+unix:///export
        q = urlencode(rest, safe="/:@")
        nbd_uri = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{q}" if q else "")
        return TargetSpec("nbd", uri, nbd_uri=nbd_uri, options=own)
    if scheme in OPENERS:
        return TargetSpec(scheme, uri)
    raise UsageError(f"{uri}: unknown target scheme {scheme!r} (use a path, file://, nbd://, "
                     f"nbd+unix://, nbds://, san:{''.join(', ' + s + '://' for s in OPENERS)})")


def _parse_san(uri: str) -> TargetSpec:
    body = uri[len("san:"):]
    lun, _, query = body.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if not params.get("map"):
        raise UsageError(f"{uri}: san: needs ?map=EXTENTMAP.json")
    if lun.startswith("//"):
        lun = lun[2:]
    return TargetSpec("san", uri, path=lun or None, map_path=params["map"], options=params)


# ---------------------------------------------------------------- extent maps


def write_extent_map(path: str | os.PathLike[str], lun: str, size: int,
                     extents: list[tuple[int, int, int]]) -> None:
    """Write MAP.json for san: URIs; extents are (disk_offset, lun_offset, length)."""
    doc = {"version": MAP_VERSION, "lun": lun, "size": size,
           "extents": [[int(a), int(b), int(c)] for a, b, c in extents]}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_extent_map(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check MAP.json; returns the document with extents as an (n, 3) array."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:  # strerror only: the path is already named once
        raise TargetError(f"{path}: cannot read extent map: {e.strerror}") from None
    except ValueError as e:
        raise TargetError(f"{path}: cannot read extent map: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != MAP_VERSION or \
            not isinstance(doc.get("extents"), list):
        raise TargetError(f"{path}: not an extent map of version {MAP_VERSION}")
    try:
        ext = np.array(doc["extents"], dtype=np.uint64).reshape(-1, 3)
    except (TypeError, ValueError, OverflowError):
        raise TargetError(f"{path}: extents must be [disk_offset, lun_offset, length]") from None
    doc["extents"] = ext[np.argsort(ext[:, 0], kind="stable")]
    return doc


# ------------------------------------------------------------------- opening


@dataclass(frozen=True)
class OpenOptions:
    """How to open a target for one disk restore."""

    force: bool = False               # allow overwriting an existing regular file
    target_zeroed: bool | None = None # None: known only for a file we create
    direct: bool = True               # O_DIRECT on local targets
    retries: int = 3                  # NBD attempts per request on a fresh connection
    retry_delay_ms: int = 200
    flush_every_mib: int | None = None  # NBD early writeback; None: the measured default
    timeout_s: float = DEFAULT_NBD_TIMEOUT_S  # NBD: one request/flush/connect may wait this long
    vddk_libdir: str | None = None    # vddk://: VixDiskLib directory (else the URI's ?libdir=)
    max_request: int = 0              # vddk://: bytes per WriteAsync (0: the measured default)
    max_inflight: int = 0             # vddk://: bytes of WriteAsync in flight (0: the default)


Opener = Callable[[TargetSpec, int, OpenOptions], Any]
OPENERS: dict[str, Opener] = {}


def open_target(target: str | TargetSpec, size: int, opts: OpenOptions | None = None) -> Any:
    """Open the target as a core Writer for a disk of ``size`` bytes (checked before writing)."""
    from vmrestore import pipeline as pl

    spec = parse_target(target) if isinstance(target, str) else target
    o = opts or OpenOptions()
    flags = 0 if o.direct else pl.F_NO_DIRECT
    if o.target_zeroed:
        flags |= pl.F_TARGET_ZEROED
    try:
        if spec.kind == "file":
            assert spec.path is not None
            flags |= pl.F_CREATE | (pl.F_FORCE if o.force else 0)
            w = pl.Writer.open_file(spec.path, size, flags)
            if w.created is not None:  # ours by identity: only this file may be removed
                ownership.record_created(spec.path, *w.created)
        elif spec.kind == "nbd":
            assert spec.nbd_uri is not None
            retries = int(spec.options.get("retries", o.retries))
            verify = spec.options.get("tls-verify-peer")
            every = spec.options.get("flush-every", o.flush_every_mib)
            every = pl.DEFAULT_NBD_FLUSH_EVERY_MIB if every is None else int(every)
            req_kib = int(spec.options.get("request-size", pl.DEFAULT_NBD_REQUEST_KIB))
            w = pl.Writer.open_nbd(spec.nbd_uri, size, retries=retries,
                                   retry_delay_ms=o.retry_delay_ms, flags=flags,
                                   tls_verify_peer=-1 if verify is None else int(verify == "1"),
                                   flush_every=every << 20, max_write=req_kib << 10,
                                   timeout_ms=int(1000 * float(spec.options.get(
                                       "timeout", o.timeout_s))))
            # ?connections=N: lanes when the server offers multi-conn (--connections wins)
            w.preferred_lanes = int(spec.options.get("connections", 0))
        elif spec.kind == "san":
            assert spec.map_path is not None
            doc = read_extent_map(spec.map_path)
            lun = spec.path or doc.get("lun")
            if not lun:
                raise UsageError(f"{spec.uri}: no LUN in the URI or the map")
            ext = doc["extents"]
            # core order: (disk offset, length, LUN offset)
            flat = np.ascontiguousarray(ext[:, [0, 2, 1]]).reshape(-1)
            w = pl.Writer.open_san(str(lun), flat, size, flags)
        elif spec.kind in OPENERS:
            return OPENERS[spec.kind](spec, size, o)
        else:  # pragma: no cover - parse_target refuses these
            raise UsageError(f"{spec.uri}: no writer for {spec.kind}")
    except pl.CoreError as e:
        raise from_core(e) from None
    if o.target_zeroed is False:
        w.target_zeroed = False
    if w.note:
        log.info("%s", w.note)
    return w


# vddk:// (VixDiskLib): the parser and opener live in transport/vddk_uri.py.
from vmrestore.transport import vddk_uri as _vddk_uri  # noqa: E402

OPENERS[_vddk_uri.SCHEME] = _vddk_uri.open_target
