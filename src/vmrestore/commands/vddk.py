"""`vmrestore vddk`: what a VixDiskLib offers, where vddk_sim is, and a restore through it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmrestore.commands import number, point_id

LIBDIR_HELP = ("VDDK directory holding lib64/libvixDiskLib.so (default: $VMRESTORE_VDDK_LIBDIR; "
               "'sim' = the built-in vddk_sim)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "vddk", help="VixDiskLib (VMware VDDK): inspect the library, restore a disk through it",
        description="Work with the VixDiskLib the user supplies (or ext/vddk_sim, a compatible "
        "library over local files used by tests and the lab).")
    sub = p.add_subparsers(dest="vddk_command", metavar="SUBCOMMAND", required=True)

    info = sub.add_parser(
        "info", help="what the loaded library offers",
        description="Load the library, check it against the functions vmrestore uses (required "
        "ones missing: refused; optional ones missing: the features that need them are off) "
        "and list its transport modes.")
    info.add_argument("--vddk-libdir", metavar="DIR", help=LIBDIR_HELP)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=run_info)

    sim = sub.add_parser(
        "sim-libdir", help="print a VDDK-shaped directory for vddk_sim (for --vddk-libdir)",
        description="Create (if needed) DIR/lib64/libvixDiskLib.so pointing at the built "
        "vddk_sim and print DIR.")
    sim.add_argument("dir", nargs="?", help="where to create it (default: the user cache dir)")
    sim.set_defaults(func=run_sim_libdir)

    from vmrestore.transport.vddk_uri import HELP as URI_HELP

    rd = sub.add_parser(
        "restore-disk", help="restore one disk of a backup to a vddk:// target",
        description="Restore disk N of a backup chain through VixDiskLib: the core pipeline "
        "writes with VixDiskLib_WriteAsync straight from its buffers; PrepareForAccess/"
        "EndAccess bracket the data phase and Cleanup runs after a failure. "
        f"URI: {URI_HELP}.")
    rd.add_argument("backup", metavar="BACKUP", help="restore point file (*.vmrb)")
    rd.add_argument("--disk", type=number(0, 65535), default=0, help="disk index (default 0)")
    rd.add_argument("--to", required=True, metavar="URI", help="vddk:// target")
    rd.add_argument("--point", type=point_id, metavar="ID",
                    help="restore point of the chain (id prefix/file)")
    rd.add_argument("--vddk-libdir", metavar="DIR", help=LIBDIR_HELP)
    rd.add_argument("--queue-depth", type=number(1, 4096), default=None,
                    help="WriteAsync requests in flight (default: measured, see docs/vddk.md)")
    rd.add_argument("--max-request", type=number(512, 1 << 30), default=None, metavar="BYTES",
                    help="bytes per WriteAsync (default 1 MiB: NFC buffers, docs/vddk.md)")
    rd.add_argument("--max-inflight", type=number(512, 1 << 34), default=None, metavar="BYTES",
                    help="bytes WriteAsync may hold per disk (default 8 MiB)")
    rd.add_argument("--threads", type=number(0, 1024), default=0,
                    help="decompress threads (0 = default)")
    rd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    rd.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    rd.set_defaults(func=run_restore_disk)


def _libdir(value: str | None) -> str | None:
    from vmrestore import vddk

    return str(vddk.sim_libdir()) if value == "sim" else value


def run_info(args: argparse.Namespace) -> int:
    from vmrestore import vddk
    from vmrestore.errors import VddkError

    libdir = _libdir(args.vddk_libdir)
    vddk.ensure_search_path(libdir)
    refused: VddkError | None = None
    try:
        lib = vddk.Library.load(libdir)
    except VddkError as e:  # still show what the library offers, then fail
        refused = e
        try:
            lib = vddk.Library.probe(libdir)
        except VddkError:
            raise e from None
    report = lib.report()
    report["refused"] = str(refused) if refused else None
    rc = refused.exit_code if refused else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return rc
    print(f"library: {report['path']}")
    if refused:
        print(f"REFUSED: {refused}")
    print(f"search path: {report['search_path']}")
    print(f"transport modes: {':'.join(report['transport_modes'])}")
    print("features: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                   for k, v in report["features"].items()))
    for f in report["functions"]:
        state = "ok" if f["present"] else ("MISSING" if f["required"] else "absent")
        kind = "required" if f["required"] else f"optional, VDDK {f['since']}"
        print(f"  {f['name']:<36} {state:<8} ({kind}) {f['purpose']}")
    return rc


def run_sim_libdir(args: argparse.Namespace) -> int:
    from vmrestore import vddk

    print(vddk.sim_libdir(args.dir))
    return 0


def run_restore_disk(args: argparse.Namespace) -> int:
    from vmrestore import ui, vddk
    from vmrestore.transport import vddk_uri

    target = vddk_uri.parse(args.to)
    vddk.ensure_search_path(_libdir(args.vddk_libdir) or target.libdir)
    kw: dict[str, Any] = {"threads": args.threads}
    if args.queue_depth:
        kw["queue_depth"] = args.queue_depth
    if args.max_request:
        kw["max_request"] = args.max_request
    if args.max_inflight:
        kw["max_inflight"] = args.max_inflight
    with ui.Display(quiet=args.quiet) as display:
        task = display.task(f"disk {args.disk} -> {target.label}")

        def progress(p: Any) -> None:
            task.update(completed=p.done)

        result = vddk.restore_disk_vddk(args.backup, args.disk, args.to,
                                        libdir=_libdir(args.vddk_libdir), point=args.point,
                                        progress=progress, **kw)
        task.done()
    mb = (result.bytes_written + result.bytes_zeroed) / 1e6
    summary = {
        "disk": result.disk, "transport": result.transport,
        "bytes_written": result.bytes_written, "bytes_zeroed": result.bytes_zeroed,
        "bytes_skipped": result.bytes_skipped, "seconds": round(result.seconds, 3),
        "mb_per_s": round(mb / result.seconds, 1) if result.seconds > 0 else None,
        "queue_depth": result.counters.get("queue_depth"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{result.disk}: {result.bytes_written} bytes written, {result.bytes_skipped} "
              f"skipped (zeros), transport {result.transport}, {result.seconds:.2f} s")
    return 0
