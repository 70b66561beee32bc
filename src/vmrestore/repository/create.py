"""Make a restore point from raw disk images or block devices (`vmrestore backup create`).

Per disk, chunks of blocks are read with large preads by a small thread pool
that also detects zero blocks, hashes (BLAKE2b-192 identity, XXH3-128
checksum) and compresses; all of these release the GIL, so both cores stay
busy. The main thread takes the chunks back in disk order, makes the final
dedup decision (so a block is stored once even when two workers saw it at the
same time) and appends to the file. A block already known to the chain is
compressed at most once per window, never stored twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vmrestore import __version__, core, ownership, schema
from vmrestore.errors import SourceError, UsageError
from vmrestore.repository import format as fmt
from vmrestore.repository.reader import Chain, open_chain
from vmrestore.repository.source import device_size
from vmrestore.repository.writer import PointWriter, check_output
from vmrestore.safeopen import open_readonly

CHUNK_BYTES = 8 * 1024 * 1024  # one pread per chunk

ProgressFn = Callable[[int], None]


@dataclass
class _Disk:
    path: str
    fd: int
    size: int


def open_source(path: str) -> _Disk:
    """Open a raw image or block device for reading; its size must be a multiple of 512."""
    try:
        fd = open_readonly(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot open source disk: {e.strerror}") from e
    try:
        size = device_size(fd)
    except OSError as e:
        os.close(fd)
        raise SourceError(f"{path}: cannot get the size of the source: {e.strerror}") from e
    if size % 512:
        os.close(fd)
        raise SourceError(f"{path}: disk size {size} is not a multiple of 512")
    return _Disk(os.path.abspath(path), fd, size)


def load_vm_config(path: str) -> dict[str, Any]:
    """A --vm-config file: JSON, checked against the section's declaration (fmt.VMConfig)."""
    where = f"{path}: VM configuration"
    text = schema.text_of(schema.read_bytes(path, where), where)
    cfg = schema.parse(text, where, json_only=True)
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: VM configuration must be a JSON object")
    schema.convert(cfg, fmt.VMConfig, where, text)
    return cfg


def derive_vm_config(name: str, disks: list[_Disk]) -> dict[str, Any]:
    """The configuration docs/format.md prescribes when none is given: thin disks, no NIC."""
    return {
        "name": name, "guest_id": "otherGuest64", "num_cpus": 1, "memory_mb": 1024,
        "firmware": "bios",
        "disks": [{"index": i, "label": f"Hard disk {i + 1}", "controller": "pvscsi", "bus": 0,
                   "unit": i, "capacity": d.size, "provisioning": "thin", "datastore": None}
                  for i, d in enumerate(disks)],
        "nics": [],
    }


def _fit_vm_config(cfg: dict[str, Any], disks: list[_Disk], where: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    cdisks = cfg.get("disks")
    if not isinstance(cdisks, list) or len(cdisks) != len(disks):
        raise UsageError(f"{where}: VM configuration lists "
                         f"{len(cdisks) if isinstance(cdisks, list) else 'no'} disks, "
                         f"{len(disks)} --disk given")
    for i, (c, d) in enumerate(zip(cdisks, disks, strict=True)):
        if not isinstance(c, dict):
            raise UsageError(f"{where}: VM configuration disk {i} is not an object")
        c.setdefault("index", i)
        c["capacity"] = d.size  # the backup is the truth about sizes
    return cfg


class _ParentState:
    """The chain's latest state of one disk: zero flags and BLAKE2b identities per block."""

    def __init__(self, chain: Chain | None, disk: int) -> None:
        self.blocks = 0
        if chain is None or disk >= len(chain.disks):
            return
        point, extent, kind = chain.resolved_map(disk)
        self.blocks = len(kind)
        self.zero = kind == fmt.BLOCK_ZERO
        ids = np.zeros(len(kind), "V24")
        data = np.flatnonzero(~self.zero)
        for i, p in enumerate(chain.points):
            sel = data[point[data] == i]
            ids[sel] = p.extents["blake"][extent[sel]]
        self.ids = ids

    def same(self, block: int, digest: bytes | None) -> bool:
        if block >= self.blocks:
            return False
        if digest is None:
            return bool(self.zero[block])
        return not self.zero[block] and self.ids[block].tobytes() == digest


@dataclass
class _Result:
    kind: str  # z zero, u unchanged, d known to the chain/point, n new
    digest: bytes = b""
    xxh: tuple[int, int] = (0, 0)
    stored: bytes | memoryview = b""
    codec: int = 0
    raw_len: int = 0


def _process_chunk(disk: _Disk, first: int, count: int, bs: int, codec: int, level: int,
                   known: dict[bytes, tuple[int, int]], parent: _ParentState) -> list[_Result]:
    off = first * bs
    want = min(count * bs, disk.size - off)
    try:
        buf = os.pread(disk.fd, want, off)
    except OSError as e:
        raise SourceError(f"{disk.path}: read of {want} bytes at offset {off} failed: "
                          f"{e.strerror}") from e
    if len(buf) != want:
        raise SourceError(f"{disk.path}: short read at offset {off + len(buf)} (the source "
                          "shrank while being read?)")
    mv = memoryview(buf)
    out: list[_Result] = []
    for i in range(count):
        blk = mv[i * bs:(i + 1) * bs]
        if core.is_zero(blk):
            out.append(_Result("u" if parent.same(first + i, None) else "z"))
            continue
        digest = hashlib.blake2b(blk, digest_size=24).digest()
        if parent.same(first + i, digest):
            out.append(_Result("u", digest))
        elif digest in known:
            out.append(_Result("d", digest))
        else:
            xxh = core.xxh3_128(blk)
            stored: bytes | memoryview = blk
            used = core.CODEC_NONE
            if codec != core.CODEC_NONE:
                packed = core.compress(blk, codec, level)
                if len(packed) < len(blk):
                    stored, used = packed, codec
            out.append(_Result("n", digest, xxh, stored, used, len(blk)))
    return out


def default_level(codec: str) -> int:
    """The level a codec gets when none is asked for: zstd 3; lz4 0 (plain LZ4: a level
    above 1 selects LZ4-HC, codec.c); none ignores it."""
    return 3 if codec == "zstd" else 0


def create_backup(disk_paths: list[str], out_path: str, *, vm_config: dict[str, Any] | None = None,
                  codec: str = "lz4", level: int | None = None, block_size: int | None = None,
                  parent: str | None = None, force: bool = False, threads: int | None = None,
                  progress: ProgressFn | None = None,
                  start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write one restore point; returns the summary printed by ``backup create --json``.

    ``start(total_bytes)`` is called once sources are open; ``progress(n)``
    after every chunk with the bytes read so far. ``block_size`` defaults to
    the parent's (an incremental must use it) or 1 MiB.
    """
    if not disk_paths:
        raise UsageError("backup create needs at least one --disk")
    if block_size is not None and not fmt.valid_block_size(block_size):
        raise UsageError(f"block size {block_size} is not a power of two in 64K..8M")
    if codec not in core.CODECS:
        raise UsageError(f"unknown codec {codec!r} (zstd, lz4, none)")
    codec_id = core.CODECS[codec]
    if level is None:
        level = default_level(codec)
    check_output(out_path, force)
    t0 = time.monotonic()
    chain = open_chain(parent) if parent else None
    if chain is not None and chain.disks:
        parent_bs = int(chain.disks[0]["block_size"])
        if block_size is not None and block_size != parent_bs:
            chain.close()
            raise UsageError(f"block size {block_size} differs from the parent's ({parent_bs}, "
                             f"{chain.point.path}); an incremental keeps its parent's")
        block_size = parent_bs
    bs: int = block_size or fmt.DEFAULT_BLOCK_SIZE
    disks: list[_Disk] = []
    writer: PointWriter | None = None
    try:
        # The output replaces its path by rename: it must not be a disk it reads or a point
        # of the chain it extends (a hard link or symlink to one is that file), --force or not.
        ownership.refuse_overlap(out_path, disk_paths, what="output",
                                 why="a disk this backup reads")
        if chain is not None:
            ownership.refuse_overlap(out_path, chain.paths, what="output",
                                     why="a restore point of the chain it extends (--parent)")
        for p in disk_paths:
            disks.append(open_source(p))
        name = os.path.basename(out_path)
        if name.endswith(fmt.SUFFIX):
            name = name[: -len(fmt.SUFFIX)]
        if vm_config is not None:
            cfg = _fit_vm_config(vm_config, disks, "--vm-config")
        elif chain is not None and len(chain.vm_config.get("disks", [])) == len(disks):
            cfg = _fit_vm_config(chain.vm_config, disks, chain.point.path)
        else:
            cfg = derive_vm_config(name, disks)
        total = sum(d.size for d in disks)
        if start:
            start(total)

        depth = chain.point.depth + 1 if chain else 0
        if chain is not None and depth > 0xFFFF:
            raise UsageError(f"{parent}: chain is too long ({depth} points)")
        writer = PointWriter(out_path, force=force, depth=depth,
                             parent_id=chain.point.id if chain else fmt.ZERO_ID,
                             parent_checksum=chain.point.footer.checksum if chain
                             else fmt.ZERO_ID)
        known: dict[bytes, tuple[int, int]] = {}
        if chain is not None:
            for p in chain.points:
                raw = p.extents["blake"].tobytes()
                for i in range(len(p.extents)):
                    known.setdefault(raw[i * 24:(i + 1) * 24], (p.depth, i))
        stats = {"data_blocks": 0, "zero_blocks": 0, "dedup_blocks": 0, "unchanged_blocks": 0}
        maps: list[np.ndarray] = []
        done = 0
        # One more worker than cores: a worker waiting in pread leaves no core idle.
        nthreads = threads or (os.cpu_count() or 2) + 1
        per_chunk = max(1, CHUNK_BYTES // bs)
        pool = ThreadPoolExecutor(nthreads, thread_name_prefix="backup")
        try:  # on error or Ctrl-C: drop queued chunks instead of reading them
            for di, disk in enumerate(disks):
                nblocks = fmt.block_count(disk.size, bs)
                bmap = np.zeros(nblocks, fmt.BLOCK_DTYPE)
                kind = bmap["kind"]
                pstate = _ParentState(chain, di)
                window: deque[tuple[int, Future[list[_Result]]]] = deque()
                nxt = 0

                while nxt < nblocks or window:
                    while nxt < nblocks and len(window) < 2 * nthreads:
                        fut = pool.submit(_process_chunk, disk, nxt,
                                          min(per_chunk, nblocks - nxt), bs, codec_id,
                                          level, known, pstate)
                        window.append((nxt, fut))
                        nxt += per_chunk
                    first, fut = window.popleft()
                    for i, r in enumerate(fut.result()):
                        b = first + i
                        if r.kind == "z":
                            stats["zero_blocks"] += 1
                        elif r.kind == "u":
                            kind[b] = fmt.BLOCK_UNCHANGED
                            stats["unchanged_blocks"] += 1
                        elif r.digest in known:
                            pt, ext = known[r.digest]
                            kind[b], bmap["point"][b], bmap["extent"][b] = fmt.BLOCK_DATA, pt, ext
                            stats["dedup_blocks"] += 1
                        else:
                            ext = writer.add_extent(r.stored, r.raw_len, r.codec,
                                                    level if r.codec else 0, r.xxh, r.digest)
                            known[r.digest] = (depth, ext)
                            kind[b], bmap["point"][b], bmap["extent"][b] = (fmt.BLOCK_DATA,
                                                                            depth, ext)
                            stats["data_blocks"] += 1
                    if progress:
                        progress(done + min(disk.size, (first + per_chunk) * bs))
                done += disk.size
                maps.append(bmap)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        stats["stored_bytes"] = writer.stored_bytes
        stats["raw_bytes"] = writer.raw_bytes
        created = datetime.fromtimestamp(writer.created_ns / 1e9, UTC)
        manifest = {
            "format": "vmrestore-backup", "version": [fmt.VERSION_MAJOR, fmt.VERSION_MINOR],
            "point_id": writer.point_id.hex(),
            "parent_id": chain.point.point_id if chain else None,
            "parent_name": chain.point.name if chain else None,
            "depth": depth,
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tool": f"vmrestore {__version__}",
            "codec": codec, "level": level,
            "disks": [{"index": i, "capacity": d.size, "block_size": bs,
                       "blocks": fmt.block_count(d.size, bs),
                       "source": os.path.basename(d.path),
                       "label": str(cfg["disks"][i].get("label", f"Hard disk {i + 1}"))}
                      for i, d in enumerate(disks)],
            "stats": stats,
        }
        writer.finish(manifest, cfg, maps)
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for d in disks:
            os.close(d.fd)
        if chain is not None:
            chain.close()
    seconds = time.monotonic() - t0
    return {
        "output": os.path.abspath(out_path), "point_id": manifest["point_id"], "depth": depth,
        "parent": chain.point.path if chain else None,
        "disks": [{"index": i, "path": d.path, "capacity": d.size} for i, d in enumerate(disks)],
        "codec": codec, "level": level, "block_size": bs,
        "blocks": {"zero": stats["zero_blocks"], "data": stats["data_blocks"],
                   "dedup": stats["dedup_blocks"], "unchanged": stats["unchanged_blocks"]},
        "stored_bytes": stats["stored_bytes"], "raw_bytes": stats["raw_bytes"],
        "source_bytes": total, "seconds": round(seconds, 3),
        "mb_per_s": round(total / seconds / 1e6, 1) if seconds > 0 else None,
    }


__all__ = ["create_backup", "derive_vm_config", "load_vm_config", "open_source"]
