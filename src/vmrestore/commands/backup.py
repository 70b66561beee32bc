"""`vmrestore backup create`: make a full or incremental restore point from disk images."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmrestore.commands import number, parse_size
from vmrestore.errors import UsageError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("backup", help="make backups (restore points) of disk images",
                              description="Make backups in vmrestore format v1 (docs/format.md).")
    sub = p.add_subparsers(dest="backup_command", metavar="ACTION")
    c = sub.add_parser(
        "create", help="create a full or incremental restore point",
        description="Read raw disk images or block devices and write one restore point file. "
        "Zero blocks are not stored; identical blocks are stored once (within the point and "
        "the chain). With --parent only blocks that changed since the chain's latest state "
        "are stored.")
    c.add_argument("--disk", action="append", required=True, metavar="PATH",
                   help="source disk (raw image or block device); repeat for each disk, in order")
    c.add_argument("--vm-config", metavar="FILE.json",
                   help="VM configuration to store (docs/format.md); default: the parent's, "
                   "or derived from the disks")
    c.add_argument("--codec", choices=("zstd", "lz4", "none"), default="lz4",
                   help="block compression (default lz4: restores decompress it in half the CPU "
                        "of zstd; zstd makes backups about 14%% smaller, docs/benchmarks.md)")
    c.add_argument("--level", type=int, default=None,
                   help="compression level: zstd -128..22 (default 3); lz4: above 1 selects "
                        "LZ4-HC (slower backups, smaller, restored as fast); ignored by none")
    c.add_argument("--block-size", default=None, metavar="SIZE",
                   help="block size, a power of two from 64K to 8M (default 1M, or the "
                   "parent's for an incremental)")
    c.add_argument("--parent", metavar="PREV", help="previous restore point: make an incremental")
    c.add_argument("--threads", type=number(1, 1024), default=None,
                   help="worker threads (default: cores + 1)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="restore point file "
                   "to write (*.vmrb)")
    c.set_defaults(func=run_create)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_create(args: argparse.Namespace) -> int:
    from vmrestore import ui
    from vmrestore.repository.create import create_backup, default_level, load_vm_config

    block_size = parse_size(args.block_size) if args.block_size else None
    level = args.level if args.level is not None else default_level(args.codec)
    # zstd would silently clamp 99 to 22, and the index stores the level as int8: refuse
    # what would not be what the file says (negative levels are zstd's fast modes).
    if args.codec == "zstd" and not -128 <= level <= 22:
        raise UsageError(f"--level {level}: zstd levels are -128..22 (default 3)")
    cfg = load_vm_config(args.vm_config) if args.vm_config else None
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise UsageError(f"--threads {args.threads}: must be 1..256")
    with ui.Display(quiet=args.quiet) as display:
        state: dict[str, ui.Task] = {}

        def start(total: int) -> None:
            state["t"] = display.task(f"backup {args.output}", total=total)

        def progress(done: int) -> None:
            state["t"].update(completed=done)

        summary = create_backup(args.disk, args.output, vm_config=cfg, codec=args.codec,
                                level=level, block_size=block_size, parent=args.parent,
                                force=args.force, threads=args.threads, progress=progress,
                                start=start)
        if "t" in state:
            state["t"].done()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        b = summary["blocks"]
        ratio = summary["stored_bytes"] / summary["source_bytes"] if summary["source_bytes"] else 0
        print(f"{summary['output']}: point {summary['point_id'][:12]} depth {summary['depth']}, "
              f"{len(summary['disks'])} disk(s), blocks: {b['data']} stored, {b['zero']} zero, "
              f"{b['dedup']} dedup, {b['unchanged']} unchanged; "
              f"{summary['stored_bytes'] / 2**20:.1f} MiB stored "
              f"({100 * ratio:.1f}% of {summary['source_bytes'] / 2**20:.1f} MiB) in "
              f"{summary['seconds']:.2f} s ({summary['mb_per_s']} MB/s)")
    return 0
