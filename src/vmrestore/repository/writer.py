"""Write one restore point file, crash-safe: temp name, data, index, footer, fsync, rename.

``PointWriter`` only moves bytes into a file in the order docs/format.md
requires; what goes in (which blocks, which codec, dedup) is decided by
create.py. Until ``finish`` returns, the final name does not exist; a crash
leaves at most a hidden ``.NAME.PID.partial`` file without a footer, which
readers reject as incomplete; the next run for NAME removes those whose PID
is no longer running (a live one may be another run writing NAME now). A
parent file is never opened for writing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from typing import Any

import numpy as np

from vmrestore.errors import TargetError
from vmrestore.procs import pid_alive
from vmrestore.repository import format as fmt

log = logging.getLogger(__name__)


def temp_name(out_path: str) -> str:
    d, base = os.path.split(os.path.abspath(out_path))
    return os.path.join(d, f".{base}.{os.getpid()}.partial")


def remove_stale_partials(out_path: str) -> list[str]:
    """Remove ``.NAME.PID.partial`` files of runs that died (kill -9); returns what went."""
    d, base = os.path.split(os.path.abspath(out_path))
    prefix, removed = f".{base}.", []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix):-len(".partial")]
        if not (name.startswith(prefix) and name.endswith(".partial") and pid.isdigit()):
            continue
        if int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(d, name))
        except OSError as e:
            log.warning("could not remove %s left by a killed run: %s", name, e.strerror)
            continue
        log.info("removed %s, left by a run that was killed (pid %s)", name, pid)
        removed.append(name)
    return removed


def check_output(out_path: str, force: bool) -> None:
    """Refuse an existing output (unless force) or a directory, before any work is done."""
    if os.path.isdir(out_path):
        raise TargetError(f"{out_path}: output is a directory")
    if os.path.lexists(out_path) and not force:
        raise TargetError(f"{out_path}: output exists (use --force to replace it)")
    d = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(d):
        raise TargetError(f"{out_path}: directory {d} does not exist")


class PointWriter:
    """Appends stored extents, then writes sections and the footer (see module doc)."""

    def __init__(self, out_path: str, *, force: bool = False, depth: int = 0,
                 parent_id: bytes = fmt.ZERO_ID, parent_checksum: bytes = fmt.ZERO_ID) -> None:
        check_output(out_path, force)
        self.out_path = os.path.abspath(out_path)
        self.force = force
        self.point_id = uuid.uuid4().bytes
        self.created_ns = time.time_ns()
        self.depth = depth
        self.parent_id = parent_id
        self.parent_checksum = parent_checksum
        self.tmp_path = temp_name(out_path)
        remove_stale_partials(out_path)
        try:
            self.fd = os.open(self.tmp_path,
                              os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TargetError(f"{self.tmp_path}: cannot create: {e.strerror}") from e
        self.offset = 0
        self._extents = np.zeros(1024, fmt.EXTENT_DTYPE)
        self.extent_count = 0
        self.stored_bytes = 0
        self.raw_bytes = 0
        self._write(fmt.Header(self.point_id, self.created_ns).pack())

    def _write(self, buf: bytes | bytearray | memoryview) -> None:
        view = memoryview(buf)
        try:
            while len(view):
                n = os.write(self.fd, view)
                view = view[n:]
                self.offset += n
        except OSError as e:
            raise TargetError(f"{self.tmp_path}: write at offset {self.offset} failed: "
                              f"{e.strerror}") from e

    def add_extent(self, stored: bytes | memoryview, raw_len: int, codec: int, level: int,
                   xxh: tuple[int, int], blake: bytes) -> int:
        """Append one stored extent; returns its index in the extent table."""
        if self.extent_count == len(self._extents):
            self._extents = np.concatenate([self._extents,
                                            np.zeros(len(self._extents), fmt.EXTENT_DTYPE)])
        i = self.extent_count
        rec = self._extents[i]
        rec["offset"] = self.offset
        rec["stored_len"] = len(stored)
        rec["raw_len"] = raw_len
        rec["codec"] = codec
        rec["level"] = max(-128, min(127, level))
        rec["xxh"] = xxh
        rec["blake"] = blake
        self._write(stored)
        self.extent_count += 1
        self.stored_bytes += len(stored)
        self.raw_bytes += raw_len
        return i

    @property
    def extents(self) -> np.ndarray:
        return self._extents[: self.extent_count]

    def _section(self, kind: int, disk: int, buf: bytes, records: int) -> fmt.Section:
        s = fmt.Section(kind, disk, self.offset, len(buf), records, fmt.checksum(buf))
        self._write(buf)
        return s

    def finish(self, manifest: dict[str, Any], vm_config: dict[str, Any],
               block_maps: list[np.ndarray]) -> bytes:
        """Write index and footer, fsync, rename to the final name; returns the footer checksum."""
        def js(obj: dict[str, Any]) -> bytes:
            return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")

        sections = [self._section(fmt.SEC_MANIFEST, fmt.NO_DISK, js(manifest), 0),
                    self._section(fmt.SEC_VM_CONFIG, fmt.NO_DISK, js(vm_config), 0),
                    self._section(fmt.SEC_EXTENTS, fmt.NO_DISK, self.extents.tobytes(),
                                  self.extent_count)]
        for d, m in enumerate(block_maps):
            m = np.ascontiguousarray(m, dtype=fmt.BLOCK_DTYPE)
            sections.append(self._section(fmt.SEC_BLOCK_MAP, d, m.tobytes(), len(m)))
        table = fmt.pack_sections(sections)
        table_off = self.offset
        self._write(table)
        footer = fmt.Footer(self.point_id, self.parent_id, self.parent_checksum, self.depth,
                            len(sections), table_off, len(table), fmt.checksum(table))
        packed = footer.pack()
        self._write(packed)
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"{self.tmp_path}: fsync failed: {e.strerror}") from e
        os.close(self.fd)
        self.fd = -1
        self._publish()
        return packed[112:]

    def _publish(self) -> None:
        """Give the file its final name atomically; without --force never replace a file."""
        try:
            if self.force:
                os.replace(self.tmp_path, self.out_path)
            else:
                try:
                    os.link(self.tmp_path, self.out_path)  # fails if the name appeared meanwhile
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise TargetError(f"{self.out_path}: output exists (use --force to "
                                          "replace it)") from e
                    if os.path.lexists(self.out_path):
                        raise
                    os.rename(self.tmp_path, self.out_path)  # fs without hard links
                else:
                    os.unlink(self.tmp_path)
        except OSError as e:
            raise TargetError(f"{self.out_path}: cannot rename {self.tmp_path} into place: "
                              f"{e.strerror}") from e
        dfd = os.open(os.path.dirname(self.out_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        """Remove the temp file after a failure (a crash leaves it; readers reject it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
