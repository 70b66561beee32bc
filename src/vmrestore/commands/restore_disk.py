"""`vmrestore restore-disk`: restore one disk of a backup to a file, device, NBD export or LUN."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vmrestore.cli import heavy_imports
from vmrestore.commands import number, point_id, rate
from vmrestore.errors import UsageError, VmrError

log = logging.getLogger("vmrestore.restore_disk")

TARGETS_HELP = """\
target URIs:
  PATH | file://PATH               regular file (new: created sparse) or block device (HotAdd)
  nbd://HOST[:PORT]/EXPORT         NBD export through libnbd
  nbd+unix:///EXPORT?socket=PATH   NBD over a unix socket
  nbds://... nbds+unix://...       NBD with TLS: ?tls-psk-file=FILE or ?tls-certificates=DIR,
                                   user name as nbds://USER@host/
     NBD extras: ?connections=N (multi-conn servers), ?retries=N (per request, default 3)
  san:LUN?map=MAP.json             raw LUN at the disk's extents (thick disks only)
  vddk://USER@SERVER[:PORT]/DATASTORE/DIR/DISK.vmdk?vm=MOREF
                                   via VixDiskLib (?libdir=DIR or $VMRESTORE_VDDK_LIBDIR)
     VDDK extras: &transports=san:hotadd:nbdssl:nbd (tried in order), &thumbprint=SHA1,
     &password_file=PATH (or $VMRESTORE_VDDK_PASSWORD), &new=1 (new disk: skip zeros),
     &snapshot=MOREF, &nfc_port=N; vddk:///PATH/DISK.vmdk for a local file (docs/vddk.md)
source:
  BACKUP                           a local restore point file (*.vmrb), chain resolved locally
  repo://HOST:PORT/PATH            a repository agent (vmrestore repo-agent): planned over the
                                   wire, extents pulled by the compiled core (pipelined requests,
                                   --agent-connections sockets), reconnect + resume on loss;
                                   token from --token-file or $VMRESTORE_REPO_TOKEN.
  repos://HOST:PORT/PATH[?ca=PEM]  the same over TLS: Python's batch loop writes (TLS cannot
                                   move into the core), so local files and block devices only
See docs/core.md and docs/protocol.md for details.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore-disk",
        help="restore one disk of a backup to a file, device, NBD export or LUN",
        description="Restore one disk of a restore point (its chain resolved) on the compiled "
                    "pipeline: every block is checked against its XXH3-128 before it is written.",
        epilog=TARGETS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backup", metavar="BACKUP",
                   help="restore point file (*.vmrb) or repo[s]://HOST:PORT/PATH")
    p.add_argument("--disk", type=int, required=True, metavar="N", help="disk index (from 0)")
    p.add_argument("--to", required=True, metavar="URI", dest="target", help="target (below)")
    p.add_argument("--point", type=point_id, metavar="ID",
                   help="restore an earlier point of the chain: id prefix or file name")
    p.add_argument("--threads", type=number(0, 1024), default=0, metavar="T",
                   help="decompress+verify threads (default 2)")
    p.add_argument("--queue-depth", type=number(0, 4096), default=0, metavar="Q",
                   help="requests in flight per connection for NBD (default 16)")
    p.add_argument("--connections", type=number(0, 64), default=0, metavar="C",
                   help="writer lanes: NBD connections (multi-conn servers; default 2, or the "
                        "URI's connections=N) or file writer threads (default 2)")
    p.add_argument("--buffers", type=number(0, 1 << 20), default=0, metavar="B",
                   help="block buffers in the pool (default: from the above)")
    p.add_argument("--max-rate", type=rate, default=0, metavar="RATE",
                   help="write at most RATE data bytes per second (binary units: 200M, 1G, "
                        "500MiB/s), to spare the datastore other VMs use; zero ranges do "
                        "not count (default 0: no limit)")
    p.add_argument("--force", action="store_true", help="overwrite an existing regular file")
    p.add_argument("--target-zeroed", action="store_true",
                   help="the target already reads as zeros: skip zero ranges")
    p.add_argument("--no-direct", action="store_true", help="do not use O_DIRECT")
    p.add_argument("--quick-rollback", action="store_true",
                   help="the target already holds a version of this disk: read and hash "
                        "each block of it (the backup's XXH3-128) and write only the blocks "
                        "that differ (zero blocks that read as zeros are skipped); the "
                        "target must exist and be readable (file, device, NBD, SAN)")
    p.add_argument("--readers", type=int, default=0, metavar="N",
                   help="reader threads; with --quick-rollback each also reads and hashes "
                        "the target through its own handle (default 1, 4 with "
                        "--quick-rollback)")
    p.add_argument("--token-file", metavar="F",
                   help="repo://: the per-job token (default $VMRESTORE_REPO_TOKEN)")
    p.add_argument("--agent-connections", type=number(0, 64), default=0, metavar="N",
                   help="repo://: connections to the agent (default 2)")
    p.add_argument("--retries", type=number(0, 1000), default=5, metavar="R",
                   help="repo://: reconnects without progress before giving up (default 5)")
    p.add_argument("--client", metavar="NAME", help="repo://: client name shown to the agent")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted restore to a new local file from its "
                        "checkpoint (.NAME.vmrestore-resume beside the target)")
    p.add_argument("--checkpoint-every", type=number(0.05, 3600, float), default=2.0,
                   metavar="S", help="new local file: record durable progress every S "
                                     "seconds for --resume (default 2)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run, quick_exit=True)


def run(args: argparse.Namespace) -> int:
    with heavy_imports():
        from vmrestore.mover.url import is_repo_url
        from vmrestore.restore_disk import restore_disk
        from vmrestore.transport import vddk_uri
        from vmrestore.ui import Display

    for name in ("threads", "queue_depth", "connections", "buffers", "agent_connections",
                 "retries", "readers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.disk < 0:
        raise UsageError("--disk must be >= 0")
    if vddk_uri.is_vddk_uri(args.target):  # VMware's search path rule, before any load
        from vmrestore import vddk

        vddk.ensure_search_path(vddk_uri.parse(args.target).libdir)
    with Display(quiet=args.quiet) as display:
        task = display.task(f"disk {args.disk}", None, "bytes")

        def progress(p: Any) -> None:
            task.update(completed=p.done, total=p.total or None)

        extra: dict[str, Any] = {}
        if is_repo_url(args.backup):
            extra = {"token_file": args.token_file, "client": args.client,
                     "retries": args.retries}
            if args.agent_connections:
                extra["connections"] = args.agent_connections
        elif args.token_file or args.agent_connections or args.client:
            raise UsageError("--token-file, --agent-connections and --client need a "
                             "repo:// source")
        if args.quick_rollback:
            extra["compare"] = True
        if args.readers:
            extra["readers"] = args.readers
        new_file = None if args.quick_rollback else _new_local_file(args.target)
        if new_file is not None and not _is_file_target(args.target):
            new_file = None  # san:LUN writes the LUN in place, never through a partial file
        if args.resume and new_file is None:
            raise UsageError(f"--resume continues a restore to a new local file; {args.target} "
                             "is not one (it exists, or is not a local path)")
        common = {"point": args.point, "threads": args.threads,
                  "queue_depth": args.queue_depth, "lanes": args.connections,
                  "buffers": args.buffers, "max_rate": args.max_rate,
                  "direct": not args.no_direct,
                  "progress": progress, **extra}
        log.info("restore-disk %s disk %d -> %s", args.backup, args.disk, args.target)
        if new_file is None:
            res = restore_disk(args.backup, args.disk, args.target, force=args.force,
                               target_zeroed=True if args.target_zeroed else None, **common)
        else:
            res = _restore_new_file(args, new_file, common)
        task.done()
    log.info("restore-disk done: disk %d -> %s (%s): written %d, zeroed %d, skipped %d bytes "
             "in %.2f s; %d blocks verified", res.disk, res.target, res.writer, res.bytes_written,
             res.bytes_zeroed, res.bytes_skipped, res.seconds, res.verified_blocks)
    if args.json:
        sys.stdout.write(json.dumps(res.as_dict(), indent=2) + "\n")  # one write, not one per token
    elif not args.quiet:
        busy = ", ".join(f"{k} {v * 100:.0f}%" for k, v in res.busy.items())
        print(f"disk {res.disk} -> {res.target} ({res.writer}): {res.capacity} bytes in "
              f"{res.seconds:.2f} s ({res.mb_per_s:.1f} MiB/s); written {res.bytes_written}, "
              f"zeroed {res.bytes_zeroed}, skipped {res.bytes_skipped}; busy: {busy}; "
              f"peak RSS {res.peak_rss >> 20} MiB", file=sys.stderr)
        if res.quick_rollback:
            print(f"  quick rollback: {res.compared_entries} entries compared, "
                  f"{res.differing_entries} differed and were restored; "
                  f"{res.compare_read_bytes} bytes read from the target, "
                  f"{res.known_zero_bytes} known zero (holes), {res.bytes_same} already "
                  "held", file=sys.stderr)
        if res.source == "repository":
            print(f"  from the agent: {res.wire_bytes} bytes on the wire for "
                  f"{res.capacity} logical ({res.wire_ratio:.3f}), {res.reconnects} "
                  f"reconnects, {res.refetches} re-fetches", file=sys.stderr)
    return 0


def _new_local_file(target: str) -> Path | None:
    """The target's path when it is a local file that does not exist yet, else None."""
    from vmrestore.ownership import target_path

    path = target_path(target)
    if path is None or os.path.lexists(path):
        return None
    return Path(path)


def _is_file_target(target: str) -> bool:
    from vmrestore.transport.uri import parse_target

    try:
        return parse_target(target).kind == "file"
    except UsageError:
        return False


def _restore_new_file(args: argparse.Namespace, target: Path, common: dict[str, Any]) -> Any:
    """Write a hidden partial file, checkpointed (local or repo:// source), then put it in place."""
    from vmrestore.restore_disk import restore_disk
    from vmrestore.resume import new_file_target

    show = common.pop("progress")
    with new_file_target(target, args.backup, args.disk, args.point, resume=args.resume,
                         token_file=args.token_file) as t:

        def progress(p: Any) -> None:
            # the driver reports a checkpoint once the partial file is flushed up to it
            if p.durable:
                t.record(p.prefix)
            else:
                show(p)

        try:
            # a file this run created reads as zeros where not written: zero runs are skipped
            res = restore_disk(args.backup, args.disk, str(t.partial), start_entry=t.start,
                               force=t.start > 0, target_zeroed=True, progress=progress,
                               checkpoint_interval=args.checkpoint_every, **common)
        except VmrError as e:  # name the target the user gave, not only the hidden file
            if str(t.partial) not in str(e):
                raise
            named = str(e).replace(str(t.partial), f"{target} (written as {t.partial.name})")
            try:
                again = type(e)(named)
            except TypeError:
                raise e from None
            raise again from None
        t.commit()
    res.target = str(target)
    return res
