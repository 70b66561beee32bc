"""Check every stored extent a restore point needs: read, decompress, compare XXH3-128.

The extents checked are all of the point's own and every ancestor extent its
resolved block maps reference (an ancestor's extents that the point no
longer uses cannot break its restore). Extents are read in file order in
batches of one large pread each; decompression and hashing run in a small
thread pool (the core calls release the GIL). A bad extent is reported once
per block that uses it, with the block's byte offset on the disk, because
that is what a user has to know: which data is lost.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmrestore import core
from vmrestore.repository import format as fmt
from vmrestore.repository.reader import Chain, RestorePoint

BATCH_BYTES = 8 * 1024 * 1024


@dataclass
class VerifyResult:
    """Outcome of ``verify_chain``; ``problems`` holds one line per bad block."""

    chain: list[str]
    extents: int = 0
    stored_bytes: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    bad_extents: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        mbps = self.raw_bytes / self.seconds / 1e6 if self.seconds > 0 else None
        return {"ok": self.ok, "chain": self.chain, "extents": self.extents,
                "stored_bytes": self.stored_bytes, "raw_bytes": self.raw_bytes,
                "seconds": round(self.seconds, 3),
                "mb_per_s": round(mbps, 1) if mbps is not None else None,
                "bad_extents": self.bad_extents, "problems": self.problems}


_local = threading.local()


def _scratch(n: int) -> bytearray:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(max(n, fmt.MAX_BLOCK_SIZE))
    return buf


def _check_batch(point: RestorePoint, idx: np.ndarray) -> list[tuple[int, str]]:
    """Verify the extents ``idx`` (sorted by offset) of one point; returns (extent, why)."""
    e = point.extents[idx]
    start = int(e["offset"][0])
    end = int((e["offset"] + e["stored_len"]).max())
    try:
        buf = point.source.pread(end - start, start)
    except Exception as exc:  # the source names file and offset
        return [(int(i), f"cannot read: {exc}") for i in idx]
    mv = memoryview(buf)
    bad: list[tuple[int, str]] = []
    for i, rec in zip(idx, e, strict=True):
        off = int(rec["offset"]) - start
        n, raw_len = int(rec["stored_len"]), int(rec["raw_len"])
        if off + n > len(buf):
            bad.append((int(i), f"truncated: stored bytes end at {start + len(buf)}"))
            continue
        out = memoryview(_scratch(raw_len))[:raw_len]
        try:
            core.decompress_into(mv[off:off + n], out, int(rec["codec"]))
        except core.CodecError:
            bad.append((int(i), f"does not decompress ({fmt_codec(int(rec['codec']))}, {n} "
                                f"bytes to {raw_len})"))
            continue
        if core.xxh3_128(out) != (int(rec["xxh"][0]), int(rec["xxh"][1])):
            bad.append((int(i), "checksum mismatch (XXH3-128 of the raw bytes)"))
    return bad


def fmt_codec(codec: int) -> str:
    return core.CODEC_NAMES.get(codec, f"codec {codec}")


def _batches(point: RestorePoint, idx: np.ndarray) -> list[np.ndarray]:
    """Split extents (sorted by offset) into runs spanning about BATCH_BYTES of file."""
    if not len(idx):
        return []
    off = point.extents["offset"][idx].astype(np.int64)
    cut = np.flatnonzero(np.diff(off // BATCH_BYTES)) + 1
    return np.split(idx, cut)


def verify_chain(chain: Chain, threads: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 start: Callable[[int], None] | None = None) -> VerifyResult:
    """Verify what ``chain.point`` needs (see module doc); never raises on bad data."""
    t0 = time.monotonic()
    last = len(chain.points) - 1
    resolved = [chain.resolved_map(d) for d in range(len(chain.disks))]
    needed: list[np.ndarray] = []
    for i, p in enumerate(chain.points):
        if i == last:
            needed.append(np.arange(len(p.extents), dtype=np.uint64))
            continue
        refs = [ext[(kind == fmt.BLOCK_DATA) & (pt == i)] for pt, ext, kind in resolved]
        needed.append(np.unique(np.concatenate(refs)) if refs else np.zeros(0, np.uint64))
    res = VerifyResult(chain=chain.paths)
    jobs: list[tuple[int, np.ndarray]] = []
    for i, idx in enumerate(needed):
        p = chain.points[i]
        idx = idx[np.argsort(p.extents["offset"][idx], kind="stable")]
        res.extents += len(idx)
        res.stored_bytes += int(p.extents["stored_len"][idx].sum())
        res.raw_bytes += int(p.extents["raw_len"][idx].sum())
        jobs += [(i, b) for b in _batches(p, idx)]
    if start:
        start(res.stored_bytes)
    bad: dict[tuple[int, int], str] = {}
    done = 0
    with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 2),
                            thread_name_prefix="verify") as pool:
        futures = [(i, b, pool.submit(_check_batch, chain.points[i], b)) for i, b in jobs]
        for i, b, fut in futures:
            for ext, why in fut.result():
                bad[(i, ext)] = why
            done += int(chain.points[i].extents["stored_len"][b].sum())
            if progress:
                progress(done)
    res.bad_extents = len(bad)
    if bad:
        res.problems = _describe(chain, resolved, bad)
    res.seconds = time.monotonic() - t0
    return res


def _describe(chain: Chain, resolved: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
              bad: dict[tuple[int, int], str]) -> list[str]:
    """One line per block that uses a bad extent (and per bad extent no block uses)."""
    lines: list[str] = []
    used: set[tuple[int, int]] = set()
    keys = np.array([(i << 48) | e for i, e in bad], dtype=np.uint64)
    for d, (pt, ext, kind) in enumerate(resolved):
        bs = int(chain.disks[d]["block_size"])
        key = (pt.astype(np.uint64) << np.uint64(48)) | ext
        hit = np.flatnonzero((kind == fmt.BLOCK_DATA) & np.isin(key, keys))
        for b in hit:
            i, e = int(pt[b]), int(ext[b])
            used.add((i, e))
            p = chain.points[i]
            lines.append(f"{p.path}, disk {d}, block {int(b)}, offset {int(b) * bs}, extent {e} "
                         f"at file offset {int(p.extents['offset'][e])}: {bad[(i, e)]}")
    for (i, e), why in sorted(bad.items()):
        if (i, e) not in used:
            p = chain.points[i]
            lines.append(f"{p.path}, no block uses it, extent {e} at file offset "
                         f"{int(p.extents['offset'][e])}: {why}")
    return lines
