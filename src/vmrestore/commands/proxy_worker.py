"""`vmrestore proxy-worker`: this machine becomes proxy P, a Dask worker of a plan's cluster."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "join a Dask cluster as a proxy (a worker named after it, resources slot=K)"

DESCRIPTION = """\
Run a proxy for `vmrestore restore --plan ... --scheduler tcp://HOST:PORT`: a Dask
worker named after the proxy with resources {'slot': K}, advertising what it can do
(its proxy VM for HotAdd, the datastores it reaches, the LUNs it sees for SAN, its
transports). The orchestrator's admission decides what runs where; Dask only carries
the disk tasks. Runs until stopped. Details: docs/fleet.md."""

EPILOG = """\
examples:
  dask scheduler --port 8786                                    # on the orchestrator
  vmrestore proxy-worker --scheduler tcp://10.0.0.1:8786 --name proxy1 --slots 4 \\
      --vm vmr-proxy --transports hotadd,nbd
  vmrestore proxy-worker --scheduler tcp://10.0.0.1:8786 --name proxy2 --infra infra.yaml
"""


def register(sub: Any) -> None:
    p = sub.add_parser("proxy-worker", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheduler", required=True, metavar="tcp://HOST:PORT",
                   help="the Dask scheduler to join")
    p.add_argument("--name", required=True, metavar="P", help="the proxy's name")
    p.add_argument("--infra", metavar="FILE",
                   help="take the proxy's slots, VM, datastores, SAN and transports from its "
                   "entry in this infrastructure file (docs/restore.md)")
    p.add_argument("--slots", type=int, metavar="K",
                   help="concurrent disk tasks (default 4, or the infra file's)")
    p.add_argument("--vm", metavar="NAME", help="the proxy's own VM in vCenter (HotAdd)")
    p.add_argument("--datastores", metavar="DS,...",
                   help="datastores its VM can hot-add from (default: all)")
    p.add_argument("--san", metavar="DS,...|auto",
                   help="datastores whose LUN it sees, or auto (default auto)")
    p.add_argument("--transports", metavar="T,...",
                   help="transports it offers, of san,hotadd,nbd,nbdssl (default all)")
    p.set_defaults(func=run)


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    from vmrestore import infra as infra_mod
    from vmrestore.errors import UsageError
    from vmrestore.fleet.worker import run_proxy_worker

    if args.infra:
        proxy = infra_mod.load_infra(args.infra).get(args.name)
    else:
        proxy = infra_mod.Proxy(name=args.name)
    item: dict[str, Any] = {"name": proxy.name, "slots": args.slots or proxy.slots,
                            "vm": args.vm or proxy.vm,
                            "datastores": _csv(args.datastores) or proxy.datastores,
                            "san": (args.san if args.san == "auto" else _csv(args.san))
                            if args.san else proxy.san,
                            "transports": _csv(args.transports) or list(proxy.transports)}
    # The same checks as an infra file's entry (one message shape for a bad value).
    proxy = infra_mod.parse_proxy({k: v for k, v in item.items() if v is not None},
                                  f"proxy-worker --name {args.name}")
    if not args.scheduler.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://")):
        raise UsageError(f"proxy-worker: --scheduler {args.scheduler!r} is not a Dask address "
                         "(tcp://HOST:PORT)")
    run_proxy_worker(args.scheduler, proxy)
    return 0
