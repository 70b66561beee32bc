"""A slow, obviously-correct restore of one disk: the yardstick tests hold the core against.

Used only by tests and by the demo when ``vmrestore restore-disk`` is not
available. It walks the plan entry by entry in Python (never use it on the
real restore path): read the stored bytes, decompress, check XXH3-128, write.
"""

from __future__ import annotations

import os

from vmrestore import core
from vmrestore.errors import ChecksumError
from vmrestore.plan import KIND_DATA
from vmrestore.repository.plan import build_plan
from vmrestore.repository.reader import Chain


def restore_disk_py(chain: Chain, disk: int, out_path: str) -> int:
    """Write ``disk`` at the chain's last point to a new sparse file; returns bytes written."""
    plan = build_plan(chain, disk)
    written = 0
    fds = [os.open(p, os.O_RDONLY) for p in plan.sources]
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(out, plan.capacity)  # zero runs: already zero in a new sparse file
        for e in plan.plan:
            if e["kind"] != KIND_DATA:
                continue
            src, off = int(e["src"]), int(e["src_off"])
            stored = os.pread(fds[src], int(e["stored_len"]), off)
            where = (f"{plan.sources[src]}, disk {disk}, block {int(e['block'])}, "
                     f"offset {int(e['dst_off'])}")
            try:
                raw = core.decompress(stored, int(e["codec"]), int(e["length"]))
            except core.CodecError as exc:
                raise ChecksumError(f"{where}: {exc}") from exc
            if core.xxh3_128(raw) != (int(e["xxh_lo"]), int(e["xxh_hi"])):
                raise ChecksumError(f"{where}: checksum mismatch")
            os.pwrite(out, raw, int(e["dst_off"]))
            written += len(raw)
    finally:
        os.close(out)
        for fd in fds:
            os.close(fd)
    return written
