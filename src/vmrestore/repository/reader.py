"""Open restore points and chains, validated, with their index as numpy arrays.

API (stable; other modules build on it):

- ``open_point(path_or_source) -> RestorePoint``: one file, checked in the
  order docs/format.md gives (footer, version, header, sections, index
  consistency). Raises IncompleteBackupError, UnsupportedVersionError,
  FormatError with the file name.
- ``open_chain(path_or_source) -> Chain``: the point and all its ancestors,
  full first; each parent is found by name then by id in the same directory,
  and its id, footer checksum and depth must match what the child recorded
  (ChainError naming both files otherwise).
- ``Chain.resolved_map(disk) -> (point_idx, extent_idx, kind)``: what every
  block of the disk is at the chain's last point, in a few vector operations.

The reader only asks a ``ByteSource`` for byte ranges, so a remote file works
the same as a local one (see source.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmrestore import schema
from vmrestore.errors import (
    ChainError,
    FormatError,
    IncompleteBackupError,
    SourceError,
    UsageError,
)
from vmrestore.repository import format as fmt
from vmrestore.repository.source import ByteSource, FileSource


def _as_source(path_or_source: str | os.PathLike[str] | ByteSource) -> ByteSource:
    if isinstance(path_or_source, (str, os.PathLike)):
        return FileSource(path_or_source)
    return path_or_source


class RestorePoint:
    """One validated backup file: header, footer, sections and index.

    Attributes: ``path``, ``name`` (file name), ``id`` (16 raw bytes),
    ``point_id`` (hex), ``parent_id`` (16 bytes, zero for a full), ``depth``,
    ``footer`` (format.Footer; ``footer.checksum`` identifies the content),
    ``manifest`` and ``vm_config`` (dicts), ``extents`` (EXTENT_DTYPE array),
    ``disks`` (manifest disk dicts), ``data_end`` (end of the stored extents),
    ``source`` (the ByteSource, for reading extents).
    """

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.path = source.path
        self.name = os.path.basename(source.path)
        name = self.path
        if source.size < fmt.MIN_FILE_SIZE:
            raise IncompleteBackupError(
                f"{name}: incomplete backup ({source.size} bytes, shorter than header + footer)"
            )
        # A file that does not even start like a backup (a disk image given by mistake) is
        # "not a backup", not "incomplete": the header is written first, so check it first.
        if source.pread(len(fmt.HEADER_MAGIC), 0) != fmt.HEADER_MAGIC:
            fmt.Header.unpack(source.pread(64, 0), name)  # raises the bad-magic FormatError
        footer = fmt.Footer.unpack(source.pread(fmt.FOOTER_SIZE,
                                                source.size - fmt.FOOTER_SIZE), name)
        header = fmt.Header.unpack(source.pread(64, 0), name)
        if header.point_id != footer.point_id:
            raise FormatError(f"{name}: header and footer name different point ids")
        self.header = header
        self.footer = footer
        self.id = footer.point_id
        self.point_id = footer.point_id.hex()
        self.parent_id = footer.parent_id
        self.depth = footer.depth
        if (self.depth == 0) != (self.parent_id == fmt.ZERO_ID):
            raise FormatError(f"{name}: depth {self.depth} does not agree with its parent id")

        limit = source.size - fmt.FOOTER_SIZE
        if (footer.section_length != footer.section_count * fmt.SECTION_SIZE
                or footer.section_offset < fmt.HEADER_SIZE
                or footer.section_offset + footer.section_length > limit):
            raise FormatError(f"{name}: broken section table (outside the file's index region)")
        table = self._read(footer.section_offset, footer.section_length, "section table")
        if fmt.checksum(table) != footer.section_checksum:
            raise FormatError(
                f"{name}: section table checksum mismatch at offset {footer.section_offset}"
            )
        self.sections = fmt.unpack_sections(table, footer.section_count)
        data_end = min((s.offset for s in self.sections), default=footer.section_offset)
        self.data_end = min(data_end, footer.section_offset)
        for s in self.sections:
            if s.offset < fmt.HEADER_SIZE or s.offset + s.length > limit:
                raise FormatError(
                    f"{name}: broken section (kind {s.kind}) at offset {s.offset}: outside the file"
                )

        self.manifest: dict[str, Any] = self._json(self._only(fmt.SEC_MANIFEST), "manifest")
        vm = [s for s in self.sections if s.kind == fmt.SEC_VM_CONFIG]
        self.vm_config: dict[str, Any] = self._json(vm[0], "VM configuration") if vm else {}
        schema.convert(self.vm_config, fmt.VMConfig, f"{self.path}: VM configuration",
                       error=FormatError)
        try:
            self._check_manifest()
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise FormatError(f"{name}: malformed manifest ({e})") from e
        ext_sec = self._only(fmt.SEC_EXTENTS)
        self.extents = self._records(ext_sec, fmt.EXTENT_DTYPE, "extent table")
        self._maps: dict[int, np.ndarray] = {}
        for s in self.sections:
            if s.kind == fmt.SEC_BLOCK_MAP:
                if s.disk >= len(self.disks) or s.disk in self._maps:
                    raise FormatError(f"{name}: block map for unknown or repeated disk {s.disk}")
                self._maps[s.disk] = self._records(s, fmt.BLOCK_DTYPE,
                                                   f"block map of disk {s.disk}")
        for d in range(len(self.disks)):
            if d not in self._maps:
                raise FormatError(f"{name}: no block map for disk {d}")
        self._check_index()

    # -- reading and checking sections ---------------------------------------------------

    def _read(self, offset: int, length: int, what: str) -> bytes:
        buf = self.source.pread(length, offset)
        if len(buf) != length:
            raise IncompleteBackupError(
                f"{self.path}: truncated {what} at offset {offset} ({len(buf)} of {length} bytes)"
            )
        return buf

    def _only(self, kind: int) -> fmt.Section:
        found = [s for s in self.sections if s.kind == kind]
        if len(found) != 1:
            raise FormatError(f"{self.path}: expected one section of kind {kind}, found "
                              f"{len(found)}")
        return found[0]

    def _section_bytes(self, s: fmt.Section, what: str) -> bytes:
        buf = self._read(s.offset, s.length, what)
        if fmt.checksum(buf) != s.checksum:
            raise FormatError(f"{self.path}: {what} checksum mismatch (section at offset "
                              f"{s.offset}, {s.length} bytes)")
        return buf

    def _json(self, s: fmt.Section, what: str) -> dict[str, Any]:
        buf = self._section_bytes(s, what)
        where = f"{self.path}: {what} at offset {s.offset}"
        try:
            text = buf.decode("utf-8")
            schema.check_depth(text, where, FormatError)
            obj = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise FormatError(f"{where} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{self.path}: {what} at offset {s.offset} is not a JSON object")
        return obj

    def _records(self, s: fmt.Section, dtype: np.dtype, what: str) -> np.ndarray:
        if s.length != s.records * dtype.itemsize:
            raise FormatError(f"{self.path}: {what} length {s.length} does not match "
                              f"{s.records} records")
        return np.frombuffer(self._section_bytes(s, what), dtype=dtype)

    def _check_manifest(self) -> None:
        m, name = self.manifest, self.path
        if m.get("format") != "vmrestore-backup" or m.get("point_id") != self.point_id:
            raise FormatError(f"{name}: manifest does not belong to point {self.point_id}")
        if int(m.get("depth", -1)) != self.depth:
            raise FormatError(f"{name}: manifest depth {m.get('depth')} != footer depth "
                              f"{self.depth}")
        disks = m.get("disks")
        if not isinstance(disks, list):
            raise FormatError(f"{name}: manifest has no disk list")
        for i, d in enumerate(disks):
            try:
                cap, bs, blocks = int(d["capacity"]), int(d["block_size"]), int(d["blocks"])
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{name}: manifest disk {i} is malformed ({e})") from e
            if int(d.get("index", i)) != i:
                raise FormatError(f"{name}: manifest disk {i} has index {d.get('index')}")
            if cap < 0 or cap % 512:
                raise FormatError(f"{name}: disk {i} capacity {cap} is not a multiple of 512")
            if not fmt.valid_block_size(bs):
                raise FormatError(f"{name}: disk {i} block size {bs} is not a power of two "
                                  "in 64K..8M")
            if blocks != fmt.block_count(cap, bs):
                raise FormatError(f"{name}: disk {i} has {blocks} blocks, capacity says "
                                  f"{fmt.block_count(cap, bs)}")
        self.disks: list[dict[str, Any]] = disks

    def _check_index(self) -> None:
        """Vectorised consistency checks: every reference points inside this file."""
        e, name = self.extents, self.path
        if len(e):
            # compared without adding (offset + length could wrap around 2**64)
            past = (e["offset"] > self.data_end) | \
                (e["stored_len"] > self.data_end - np.minimum(e["offset"], self.data_end))
            bad = np.flatnonzero((e["offset"] < fmt.HEADER_SIZE) | past
                                 | (e["codec"] > 2) | (e["raw_len"] > fmt.MAX_BLOCK_SIZE)
                                 | (e["raw_len"] == 0))
            if len(bad):
                i = int(bad[0])
                raise FormatError(f"{name}: broken extent table: extent {i} (offset "
                                  f"{int(e['offset'][i])}, {int(e['stored_len'][i])} bytes, "
                                  f"codec {int(e['codec'][i])}) is invalid")
        for d, m in self._maps.items():
            disk = self.disks[d]
            if len(m) != int(disk["blocks"]):
                raise FormatError(f"{name}: block map of disk {d} has {len(m)} records, "
                                  f"expected {disk['blocks']}")
            kind = m["kind"]
            bad = np.flatnonzero((kind > 2) | ((kind == fmt.BLOCK_UNCHANGED) & (self.depth == 0))
                                 | ((kind == fmt.BLOCK_DATA) & (m["point"] > self.depth)))
            own = np.flatnonzero((kind == fmt.BLOCK_DATA) & (m["point"] == self.depth))
            if not len(bad) and len(own):
                ext = m["extent"][own]
                over = ext >= len(e)
                if over.any():
                    bad = own[over]
                else:
                    expect = _block_lengths(own, int(disk["capacity"]), int(disk["block_size"]))
                    bad = own[e["raw_len"][ext] != expect]
            if len(bad):
                b = int(bad[0])
                raise FormatError(f"{name}: broken block map: disk {d}, block {b} (kind "
                                  f"{int(kind[b])}, point {int(m['point'][b])}, extent "
                                  f"{int(m['extent'][b])})")

    # -- public --------------------------------------------------------------------------

    def block_map(self, disk: int) -> np.ndarray:
        """The disk's block map (BLOCK_DTYPE records, one per block, read-only)."""
        try:
            return self._maps[disk]
        except KeyError:
            raise FormatError(f"{self.path}: no disk {disk} (the point has "
                              f"{len(self.disks)} disks)") from None

    def read_extent(self, index: int) -> bytes:
        """The stored (still compressed) bytes of one extent."""
        rec = self.extents[index]
        return self._read(int(rec["offset"]), int(rec["stored_len"]), f"extent {index}")

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"<RestorePoint {self.name} id={self.point_id[:12]} depth={self.depth}>"


def _block_lengths(blocks: np.ndarray, capacity: int, block_size: int) -> np.ndarray:
    """Raw length of each given block (the last block of a disk may be short)."""
    start = blocks.astype(np.uint64) * np.uint64(block_size)
    return np.minimum(np.uint64(block_size), np.uint64(capacity) - start)


def open_point(path_or_source: str | os.PathLike[str] | ByteSource) -> RestorePoint:
    """Open and validate one restore point (see module doc)."""
    return RestorePoint(_as_source(path_or_source))


@dataclass
class Chain:
    """A full restore point and its incrementals, ``points[i].depth == i``.

    The chain describes the state at its last point. ``manifest`` and
    ``vm_config`` are the last point's; ``disks`` likewise.
    """

    points: list[RestorePoint]

    @property
    def point(self) -> RestorePoint:
        return self.points[-1]

    @property
    def manifest(self) -> dict[str, Any]:
        return self.point.manifest

    @property
    def vm_config(self) -> dict[str, Any]:
        return self.point.vm_config

    @property
    def disks(self) -> list[dict[str, Any]]:
        return self.point.disks

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.points]

    def at(self, selector: str) -> Chain:
        """The chain up to the point whose file name or id (hex prefix) is ``selector``."""
        for i, p in enumerate(self.points):
            if selector in (p.name, p.path) or (len(selector) >= 4 and
                                                  p.point_id.startswith(selector.lower())):
                return Chain(self.points[: i + 1])
        # The backup is fine; the argument names nothing in it (exit 2, not 3).
        raise UsageError(f"{self.point.path}: no restore point {selector!r} in its chain "
                         f"({', '.join(p.name for p in self.points)})")

    def disk(self, disk: int) -> dict[str, Any]:
        if not 0 <= disk < len(self.disks):
            raise UsageError(f"{self.point.path}: no disk {disk} (the point has "
                              f"{len(self.disks)} disks)")
        return self.disks[disk]

    def resolved_map(self, disk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per block of ``disk`` at the last point: (point index, extent index, kind).

        kind is BLOCK_ZERO or BLOCK_DATA (never unchanged); for data blocks the
        extent is ``points[point].extents[extent]``, checked to exist and to
        have the block's length. Vectorised: one pass per point, none per block.
        """
        info = self.disk(disk)
        n = int(info["blocks"])
        kind = np.zeros(n, np.uint8)
        point = np.zeros(n, np.uint16)
        extent = np.zeros(n, np.uint64)
        prev_blocks = 0
        for p in self.points:
            if disk >= len(p.disks):
                prev_blocks = 0
                continue
            if int(p.disks[disk]["block_size"]) != int(info["block_size"]):
                raise FormatError(f"{p.path}: disk {disk} has block size "
                                  f"{p.disks[disk]['block_size']}, but {self.point.path} has "
                                  f"{info['block_size']}: not one chain")
            m = p.block_map(disk)
            m = m[: min(len(m), n)]
            k = m["kind"]
            unch = k == fmt.BLOCK_UNCHANGED
            if unch.any() and np.flatnonzero(unch)[-1] >= prev_blocks:
                b = int(np.flatnonzero(unch)[-1])
                raise FormatError(f"{p.path}: disk {disk}, block {b} is marked unchanged but "
                                  "the parent has no such block")
            sel = np.flatnonzero(~unch)
            kind[sel] = k[sel]
            point[sel] = m["point"][sel]
            extent[sel] = m["extent"][sel]
            prev_blocks = len(p.block_map(disk))
        data = np.flatnonzero(kind == fmt.BLOCK_DATA)
        cap, bs = int(info["capacity"]), int(info["block_size"])
        for i, p in enumerate(self.points):
            sel = data[point[data] == i]
            if not len(sel):
                continue
            ext = extent[sel]
            over = ext >= len(p.extents)
            bad = sel[over] if over.any() else sel[p.extents["raw_len"][ext]
                                                    != _block_lengths(sel, cap, bs)]
            if len(bad):
                b = int(bad[0])
                raise FormatError(f"{self.point.path}: disk {disk}, block {b} references "
                                  f"extent {int(extent[b])} of {p.path}, which does not fit it")
        return point, extent, kind

    def close(self) -> None:
        for p in self.points:
            p.close()


def _find_parent(child: RestorePoint) -> RestorePoint:
    name = child.manifest.get("parent_name")
    want = child.parent_id
    tried: list[str] = []
    named_err = ""   # why the file named as the parent could not be opened
    candidates: list[str] = []
    if isinstance(name, str) and name:
        candidates.append(name)
    try:
        candidates += [n for n in child.source.siblings() if n not in candidates]
    except OSError:
        pass
    for cand in candidates:
        if cand == child.name:
            continue
        try:
            src = child.source.sibling(cand)
        except FileNotFoundError:
            continue
        except (FormatError, SourceError) as e:  # e.g. a FIFO named like the parent: say so
            if cand == name:
                named_err = str(e)
            continue
        if cand != name:  # scanning: look at the footer's id before reading the index
            try:
                peek = fmt.Footer.unpack(src.pread(fmt.FOOTER_SIZE, src.size - fmt.FOOTER_SIZE),
                                         src.path)
            except (FormatError, ValueError):
                src.close()
                continue
            if peek.point_id != want:
                tried.append(cand)
                src.close()
                continue
        try:
            p = RestorePoint(src)
        except FormatError as e:
            if cand == name:
                raise ChainError(f"{child.path}: parent {cand} is unusable: {e}") from e
            src.close()
            continue
        if p.id == want:
            if p.footer.checksum != child.footer.parent_checksum:
                raise ChainError(f"{child.path}: parent {p.path} has id {p.point_id} but a "
                                 "different footer checksum (rewritten or replaced)")
            if p.depth != child.depth - 1:
                raise ChainError(f"{child.path}: parent {p.path} has depth {p.depth}, "
                                 f"expected {child.depth - 1}")
            return p
        tried.append(cand)
        p.close()
    raise ChainError(f"{child.path}: parent {name or '?'} (id {want.hex()}) not found in "
                     f"{os.path.dirname(child.path) or '.'}"
                     + (f" (other points there: {', '.join(tried)})" if tried else "")
                     + (f"; {named_err}" if named_err else ""))


def open_chain(path_or_source: str | os.PathLike[str] | ByteSource) -> Chain:
    """Open a restore point and its ancestors (see module doc)."""
    pts = [open_point(path_or_source)]
    while pts[-1].depth > 0:
        pts.append(_find_parent(pts[-1]))
    pts.reverse()
    return Chain(pts)
