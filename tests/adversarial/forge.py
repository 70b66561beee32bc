"""Forge backup files: change a section, then recompute every checksum that covers it.

A forger that knows the format can make every checksum agree (section, section
table, footer, header), so checksums alone prove nothing: the reader must still
refuse what is structurally impossible. ``rebuild`` lays the index region out
again (the stored extents are kept byte for byte) with the sections replaced.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from vmrestore.repository import format as fmt


def sections(raw: bytes) -> tuple[fmt.Footer, list[fmt.Section]]:
    footer = fmt.Footer.unpack(raw[-fmt.FOOTER_SIZE:], "forge")
    table = raw[footer.section_offset:footer.section_offset + footer.section_length]
    return footer, fmt.unpack_sections(table, footer.section_count)


def section_bytes(raw: bytes, s: fmt.Section) -> bytes:
    return raw[s.offset:s.offset + s.length]


def rebuild(raw: bytes, bodies: list[tuple[fmt.Section, bytes]] | None = None,
            **footer_changes: Any) -> bytes:
    """The file with the given (section, body) list as its index, checksums recomputed."""
    footer, secs = sections(raw)
    if bodies is None:
        bodies = [(s, section_bytes(raw, s)) for s in secs]
    data_end = min(s.offset for s in secs)
    out = bytearray(raw[:data_end])
    table = []
    for s, body in bodies:
        size = {fmt.SEC_EXTENTS: fmt.EXTENT_DTYPE.itemsize,
                fmt.SEC_BLOCK_MAP: fmt.BLOCK_DTYPE.itemsize}.get(s.kind)
        records = len(body) // size if size else s.records
        table.append(fmt.Section(s.kind, s.disk, len(out), len(body), records,
                                 fmt.checksum(body)))
        out += body
    packed = fmt.pack_sections(table)
    changes = {"section_offset": len(out), "section_length": len(packed),
               "section_count": len(table), "section_checksum": fmt.checksum(packed),
               **footer_changes}
    out += packed
    out += dataclasses.replace(footer, **changes).pack()
    return bytes(out)


def edit_section(raw: bytes, kind: int, change: Callable[[bytes], bytes]) -> bytes:
    """Rebuild with the first section of ``kind`` replaced by change(its bytes)."""
    _f, secs = sections(raw)
    done = False
    bodies = []
    for s in secs:
        body = section_bytes(raw, s)
        if s.kind == kind and not done:
            body, done = change(body), True
        bodies.append((s, body))
    assert done, f"no section of kind {kind}"
    return rebuild(raw, bodies)


def edit_json(raw: bytes, kind: int, change: Callable[[dict[str, Any]], Any]) -> bytes:
    def apply(body: bytes) -> bytes:
        doc = json.loads(body)
        out = change(doc)
        return json.dumps(doc if out is None else out).encode()
    return edit_section(raw, kind, apply)


def edit_records(raw: bytes, kind: int, dtype: np.dtype,
                 change: Callable[[np.ndarray], np.ndarray | None]) -> bytes:
    def apply(body: bytes) -> bytes:
        rec = np.frombuffer(body, dtype).copy()
        out = change(rec)
        return (rec if out is None else out).tobytes()
    return edit_section(raw, kind, apply)


def with_header_id(raw: bytes, point_id: bytes) -> bytes:
    """The header names another point id (its checksum recomputed)."""
    h = fmt.Header.unpack(raw[:64], "forge")
    return dataclasses.replace(h, point_id=point_id).pack() + raw[fmt.HEADER_SIZE:]
