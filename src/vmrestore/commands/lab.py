"""`vmrestore lab up|down|status`: the embedded vSphere lab (vcsim + host data services)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from vmrestore.commands import number
from vmrestore.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def _size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 512M, 2G)")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "lab", help="start, stop or show the embedded vSphere lab",
        description="The embedded vSphere lab: a simulated vCenter (vcsim) with 2 ESXi hosts, "
        "datastores ds-local, ds-san (ext4 on a loop-device LUN) and ds-vvol (type VVOL), "
        "networks 'VM Network' and 'Restore Network', the HotAdd proxy VM vmr-proxy, and the "
        "host data services (NBD exports, SAN extent maps, hot-add). Needs root. "
        "See docs/lab.md.")
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None,
                        help="lab directory (default: $VMRESTORE_LAB_DIR or ./.lab)")
    common.add_argument("--json", action="store_true", help="print the status as JSON")
    u = sub.add_parser("up", parents=[common], help="start the lab (already up: show status)",
                       description="Start the lab in DIR (vcsim is built once and cached; "
                       "the SAN LUN is a sparse image on a loop device) and print its status: "
                       "vCenter URL, user, password, datastores. Running it again on a lab "
                       "that is up only prints the status. Needs root.")
    u.add_argument("--hosts", type=number(1, 64), default=2,
                   help="ESXi hosts in the cluster (default 2)")
    u.add_argument("--proxies", type=number(0, 64), default=1,
                   help="HotAdd proxy VMs: vmr-proxy, vmr-proxy2, ... one per host, round "
                   "robin (default 1)")
    u.add_argument("--datastores", type=number(0, 64), default=0, metavar="N",
                   help="more local datastores besides ds-local, ds-san, ds-vvol: ds-local2 "
                   "... (default 0)")
    u.add_argument("--netns", action="store_true",
                   help="a network namespace per proxy VM, joined by a veth pair, for its "
                   "proxy worker (docs/lab.md)")
    u.add_argument("--esx", action="store_true",
                   help="also run a standalone ESXi endpoint (restores straight to a host)")
    u.add_argument("--san-size", type=_size, default=1 << 30,
                   help="size of the SAN LUN image, sparse (default 1G)")
    u.set_defaults(func=run_up)
    d = sub.add_parser("down", parents=[common],
                       help="stop the lab and remove its processes, loop devices, mounts, files",
                       description="Stop the lab in DIR: its processes, mounts and loop "
                       "devices, then its files (unless --keep-files). Safe to run twice.")
    d.add_argument("--keep-files", action="store_true",
                   help="keep the datastore directories and logs")
    d.set_defaults(func=run_down)
    s = sub.add_parser("status", parents=[common], help="show the lab (exit 1 when not up)",
                       description="Show the lab in DIR: vCenter URL, user, password, and each "
                       "datastore's name, type and local directory (--json: docs/lab.md). "
                       "Exit 0 when up, 1 when not.")
    s.set_defaults(func=run_status)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _print(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if doc.get("state") != "up":
        print(f"lab in {doc['dir']}: {doc.get('state')}")
        for p in doc.get("problems", []):
            print(f"  problem: {p}")
        return
    print(f"lab in {doc['dir']}: up")
    print(f"  vCenter     {doc['vcenter_url']}  user {doc['user']}  "
          f"password file {doc['password_file']}")
    print(f"  datacenter  {doc['datacenter']}  cluster {doc['cluster']}  "
          f"hosts {', '.join(doc['hosts'])}")
    print(f"  networks    {', '.join(doc['networks'])}")
    print(f"  proxy VMs   {', '.join(doc.get('proxy_vms') or [doc['proxy_vm']])}")
    for vm, n in (doc.get("proxy_netns") or {}).items():
        print(f"  netns       {vm}: {n['netns']} {n['ip']} (this side {n['host_ip']})")
    if doc.get("ca_file"):
        tp = doc.get("thumbprints", {})
        print(f"  TLS         CA {doc['ca_file']}  SHA-1 {tp.get('sha1', '?')}")
    if doc.get("esx"):
        print(f"  ESXi        {doc['esx']['url']}  host {doc['esx']['host']} (standalone)")
    print(f"  hostd       {doc['hostd_url']} (API v1)")
    for ds in doc["datastores"]:
        lun = f"  LUN {ds['lun']}" if ds.get("lun") else ""
        print(f"  datastore   {ds['name']:<9} {ds['type']:<5} {ds['dir']}{lun}")


def run_up(args: argparse.Namespace) -> int:
    from vmrestore.lab import lab

    if args.hosts < 1:
        raise UsageError("--hosts must be at least 1")
    if not 1 <= args.proxies <= 16:
        raise UsageError("--proxies must be 1..16")
    if not 0 <= args.datastores <= 16:
        raise UsageError("--datastores must be 0..16")
    doc = lab.up(args.dir, hosts=args.hosts, san_size=args.san_size, proxies=args.proxies,
                 datastores=args.datastores, netns=args.netns, esx=args.esx)
    _print(doc, args.json)
    return 0


def run_down(args: argparse.Namespace) -> int:
    from vmrestore.lab import lab

    actions = lab.down(args.dir, keep_files=args.keep_files)
    if args.json:
        json.dump({"state": "down", "actions": actions}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for a in actions:
            print(a)
        if not actions:
            print("no lab to stop")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from vmrestore.lab import lab

    doc = lab.status(args.dir)
    _print(doc, args.json)
    return 0 if doc.get("state") == "up" else 1
