"""`vmrestore inspect BACKUP`: what a restore point holds and what its chain is."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="show a restore point: chain, disks, block counts, VM configuration",
        description="Show the chain (files, ids, depths), disks and capacities, block counts "
        "(zero / data / deduplicated / unchanged), codecs, stored vs raw bytes, and the VM "
        "configuration of a restore point. Reads only the index, not the data.")
    p.add_argument("backup", metavar="BACKUP", help="restore point file (*.vmrb)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=run)


def describe(path: str) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict (also used by tests and the demo)."""
    import numpy as np

    from vmrestore import core
    from vmrestore.repository import format as fmt
    from vmrestore.repository.reader import open_chain

    chain = open_chain(path)
    try:
        last = chain.point
        points = []
        for p in chain.points:
            codecs = np.bincount(p.extents["codec"], minlength=3)
            points.append({
                "file": p.path, "point_id": p.point_id, "depth": p.depth,
                "parent_id": p.manifest.get("parent_id"), "created": p.manifest.get("created"),
                "footer_checksum": p.footer.checksum.hex(),
                "version": f"{p.footer.major}.{p.footer.minor}", "size": p.source.size,
                "extents": len(p.extents),
                "codecs": {core.CODEC_NAMES.get(c, str(c)): int(n)
                           for c, n in enumerate(codecs) if n},
                "stored_bytes": int(p.extents["stored_len"].sum()),
                "raw_bytes": int(p.extents["raw_len"].sum()),
                "stats": p.manifest.get("stats", {}),
            })
        disks = []
        seen = np.zeros(0, np.uint64)
        for d, info in enumerate(last.disks):
            m = last.block_map(d)
            kind = m["kind"]
            data = kind == fmt.BLOCK_DATA
            own = data & (m["point"] == last.depth)
            _pt, _ext, rkind = chain.resolved_map(d)
            # "data" = blocks that first store an extent (as the writer counts them);
            # later blocks using the same extent, here or on an earlier disk, are dedup.
            own_ext = np.unique(m["extent"][own])
            fresh = own_ext[~np.isin(own_ext, seen)]
            seen = np.concatenate([seen, fresh])
            new = len(fresh)
            disks.append({
                "index": d, "label": info.get("label"), "source": info.get("source"),
                "capacity": int(info["capacity"]), "block_size": int(info["block_size"]),
                "blocks": int(info["blocks"]),
                "zero": int(np.count_nonzero(kind == fmt.BLOCK_ZERO)),
                "data": new,
                "dedup": int(np.count_nonzero(data)) - new,
                "unchanged": int(np.count_nonzero(kind == fmt.BLOCK_UNCHANGED)),
                "allocated_bytes_at_point": int(np.count_nonzero(rkind == fmt.BLOCK_DATA))
                * int(info["block_size"]),
            })
        return {"file": last.path, "point_id": last.point_id, "depth": last.depth,
                "chain": points, "disks": disks, "vm_config": last.vm_config,
                "stored_bytes": sum(p["stored_bytes"] for p in points),
                "raw_bytes": sum(p["raw_bytes"] for p in points)}
    finally:
        chain.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    info = describe(args.backup)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = [f"restore point {info['file']}", f"  id {info['point_id']}, depth {info['depth']}",
           "chain (full first):"]
    for p in info["chain"]:
        codecs = ", ".join(f"{k} {v}" for k, v in p["codecs"].items()) or "no extents"
        out.append(f"  [{p['depth']}] {p['file']}  id {p['point_id'][:12]}  {p['created']}  "
                   f"v{p['version']}  {p['extents']} extents ({codecs}), "
                   f"{_mib(p['stored_bytes'])} stored of {_mib(p['raw_bytes'])} raw")
    out.append("disks:")
    for d in info["disks"]:
        out.append(f"  disk {d['index']} ({d['label']}, from {d['source']}): capacity "
                   f"{d['capacity']} ({_mib(d['capacity'])}), block size {d['block_size']}, "
                   f"{d['blocks']} blocks: {d['zero']} zero, {d['data']} data, {d['dedup']} "
                   f"deduplicated, {d['unchanged']} unchanged")
    out.append(f"chain total: {_mib(info['stored_bytes'])} stored of "
               f"{_mib(info['raw_bytes'])} raw")
    vm = info["vm_config"]
    out.append(f"VM configuration: {vm.get('name')} ({vm.get('guest_id')}), "
               f"{vm.get('num_cpus')} CPU, {vm.get('memory_mb')} MB, {vm.get('firmware')}")
    for d in vm.get("disks", []):
        out.append(f"  disk {d.get('index')}: {d.get('label')} {d.get('controller')} "
                   f"{d.get('bus')}:{d.get('unit')} {_mib(int(d.get('capacity', 0)))} "
                   f"{d.get('provisioning')} on {d.get('datastore')}")
    for n in vm.get("nics", []):
        out.append(f"  nic: {n.get('label')} {n.get('type')} on {n.get('network')!r} "
                   f"mac {n.get('mac')}")
    print("\n".join(out))
    return 0

