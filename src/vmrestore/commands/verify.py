"""`vmrestore verify BACKUP`: check every stored block a restore point needs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vmrestore.commands import number
from vmrestore.errors import ChecksumError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify", help="check every checksum of a restore point and its chain",
        description="Read every stored extent the restore point needs (its own and the ones it "
        "uses from its chain), decompress and check its XXH3-128. Exit 0 when all are good; "
        "exit 4 with one line per bad block otherwise (exit 3 for a broken file).")
    p.add_argument("backup", metavar="BACKUP", help="restore point file (*.vmrb)")
    p.add_argument("--threads", type=number(1, 1024), default=None,
                   help="worker threads (default: cores)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmrestore import ui
    from vmrestore.repository.reader import open_chain
    from vmrestore.repository.verify import verify_chain

    chain = open_chain(args.backup)
    try:
        with ui.Display(quiet=args.quiet) as display:
            state: dict[str, ui.Task] = {}

            def start(total: int) -> None:
                state["t"] = display.task(f"verify {args.backup}", total=total)

            result = verify_chain(chain, threads=args.threads, start=start,
                                  progress=lambda n: state["t"].update(completed=n))
            state["t"].done()
    finally:
        chain.close()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    for line in result.problems:
        print(line, file=sys.stderr)
    if not result.ok:
        raise ChecksumError(f"{args.backup}: {len(result.problems)} bad block(s) in "
                            f"{result.bad_extents} extent(s)")
    if not args.json:
        s = result.as_dict()
        print(f"{args.backup}: OK, {len(result.chain)} file(s), {result.extents} extents, "
              f"{result.raw_bytes / 2**20:.1f} MiB ({result.stored_bytes / 2**20:.1f} MiB stored) "
              f"checked in {result.seconds:.2f} s ({s['mb_per_s']} MB/s)")
    return 0
