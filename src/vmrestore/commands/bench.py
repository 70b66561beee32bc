"""`vmrestore bench compare|rss|schedule`: benchmarks users can run.

``schedule`` simulates a mass restore over the real admission code
(vmrestore.schedule.sim; docs/scheduling.md) and needs nothing but the package.
The compare/rss harness lives in the repository's ``bench/compare.py`` (beside the
pytest-benchmark suites), not in the installed package; this module only
defines the arguments and loads that file when the command runs. Set
VMRESTORE_BENCH_DIR to point at another checkout's ``bench/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from vmrestore.errors import UsageError

_MODULE = "vmrestore_bench_compare"


def _load() -> ModuleType:
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    env = os.environ.get("VMRESTORE_BENCH_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[3] / "bench"
    path = base / "compare.py"
    if not path.is_file():
        raise UsageError(f"{path} not found: 'vmrestore bench' runs from a source checkout "
                         "(or set VMRESTORE_BENCH_DIR to its bench/ directory)")
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = mod
    spec.loader.exec_module(mod)
    return mod


def _run_compare(args: argparse.Namespace) -> int:
    return int(_load().cmd_compare(args))


def _run_rss(args: argparse.Namespace) -> int:
    return int(_load().cmd_rss(args))


def _run_schedule(args: argparse.Namespace) -> int:
    import msgspec

    from vmrestore.schedule.scenario import fleet
    from vmrestore.schedule.sim import simulate, summarize

    for name in ("seeds", "vms", "hosts", "datastores", "proxies"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}: must be at least 1 (got {getattr(args, name)})")
    if not 0 <= args.kills <= args.proxies:
        raise UsageError(f"--kills: must be between 0 and --proxies ({args.proxies})")
    if not 0.0 <= args.tier0 <= 1.0:
        raise UsageError(f"--tier0: a fraction between 0 and 1 (got {args.tier0})")
    out = sys.stderr if args.json else sys.stdout
    if not args.json:
        print(f"{'seed':>4} {'makespan':>9} {'bound':>9} {'ratio':>6}  {'binding term':<24} "
              f"{'RTO p50':>8} {'RTO p99':>8} {'re-copied':>10}", file=out)
    results = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        sc = fleet(seed, vms=args.vms, hosts=args.hosts, datastores=args.datastores,
                   proxies=args.proxies, kills=args.kills, tier0=args.tier0)
        r = simulate(sc)
        results.append(r)
        print(f"{seed:>4} {_hms(r.makespan):>9} {_hms(r.bound.value):>9} {r.ratio:>6.3f}  "
              f"{r.bound.term:<24} {_hms(r.rto_p50):>8} {_hms(r.rto_p99):>8} "
              f"{r.recopied_bytes / 1e9:>8.1f}GB", file=out, flush=True)
    s = summarize(results)
    if args.json:
        print(msgspec.json.encode(s).decode())
        return 0
    terms = ", ".join(f"{k} {v}" for k, v in s.binding_terms.items())
    disks = sum(r.tasks for r in results) / len(results)
    print(f"\n{len(results)} seeds: {args.vms} VMs ({disks:.0f} disks on average), "
          f"{args.proxies} proxies, {args.kills} proxy kills each")
    print(f"makespan / lower bound: median {s.ratio_median:.3f}, worst {s.ratio_worst:.3f}")
    print(f"binding terms: {terms}")
    print(f"VM RTO: p50 {_hms(s.rto_p50_median)} (median over seeds), "
          f"p99 {_hms(s.rto_p99_median)} (median), {_hms(s.rto_p99_worst)} (worst)")
    if len(s.rto_by_tier) > 1:
        print("VM RTO by tier (medians over seeds): " + "; ".join(
            f"tier {k} p50 {_hms(p50)} p99 {_hms(p99)}" for k, (p50, p99) in s.rto_by_tier.items()))
    print(f"re-copied after {s.kills_total} kills: {s.recopied_bytes_total / 1e9:.1f} GB "
          f"({s.recopied_bytes_mean / 1e9:.1f} GB per seed)")
    print(f"admission CPU: {s.admission_cpu_per_sim_hour:.3f} s per simulated hour")
    return 0


def _hms(seconds: float) -> str:
    m, sec = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench", help="benchmarks: vmrestore side by side with qemu-img, nbdcopy, dd",
        description="Benchmarks users can run. See docs/benchmarks.md.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

    c = sub.add_parser(
        "compare",
        help="time restore-disk vs qemu-img / nbdcopy / dd into NBD and loop targets",
        description=(
            "Generate one sample disk (40% zero, 30% text-like, 30% random 1 MiB blocks), "
            "back it up with vmrestore and as a compressed qcow2, then time every tool putting "
            "it into an nbdkit file target (unix socket) and a loop device, best of N, checking "
            "the target's bytes after every run. Two cases side by side in one run: caches "
            "warm (inputs read into the page cache) and caches dropped (root). Every tool "
            "flushes the target. Cleans up servers, sockets and loop devices, also on Ctrl-C."
        ),
    )
    c.add_argument("--size", default="2G", help="logical disk size (default 2G; multiple of 1M)")
    c.add_argument("--runs", type=int, default=3, help="runs per tool, best is kept (default 3)")
    c.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed rounds (every tool, every case) before each target "
                        "group's timed ones (default 1): the first runs after the images "
                        "are made meet a machine still settling, and round 1 would judge "
                        "its first tools on it")
    c.add_argument("--workdir", metavar="DIR",
                   help="where images and targets go (default: a new dir in /var/tmp)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--keep", action="store_true", help="keep images, targets and logs")
    c.add_argument("--cases", default="warm,cold", metavar="LIST",
                   help="cache cases to run side by side: warm (inputs read into the page "
                        "cache first), cold (caches dropped; root) (default warm,cold)")
    c.add_argument("--no-drop-caches", action="store_true",
                   help="never drop the page cache: only the warm case runs")
    c.add_argument("--only", action="append", metavar="KEY",
                   help="run only these rows: nbd, loop, or e.g. nbd/qemu-img (repeatable)")
    c.add_argument("--seed", type=int, default=1, help="sample image seed (default 1)")
    c.add_argument("--codec", choices=("zstd", "lz4", "none"),
                   help="codec of vmrestore's backup (default: backup create's default)")
    c.set_defaults(func=_run_compare)

    r = sub.add_parser(
        "rss",
        help="peak RSS of restore-disk on mostly-zero 2 GiB and 16 GiB disks",
        description=("Make a mostly-zero sample disk of each size, back it up, restore it into "
                     "a sparse file and an nbdkit target, and report restore-disk's peak RSS "
                     "(from wait4). Reports; does not assert."),
    )
    r.add_argument("--sizes", default="2G,16G", help="comma-separated disk sizes (default 2G,16G)")
    r.add_argument("--data-every", type=int, default=16,
                   help="one data block in every N 1 MiB blocks (default 16)")
    r.add_argument("--workdir", metavar="DIR", help="default: a new dir in /var/tmp")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--keep", action="store_true", help="keep images and logs")
    r.set_defaults(func=_run_rss)

    sc = sub.add_parser(
        "schedule",
        help="simulate a mass restore over the real admission code: makespan vs a lower bound",
        description=(
            "Discrete-event simulation of restoring a synthetic fleet (VMs of 1-8 disks, "
            "lognormal 20 GB-4 TB, thin/thick; hosts, datastores, SAN and HotAdd proxies of "
            "4-16 slots, per-transport stream rates, at most 48 NBD streams per host, HotAdd "
            "attach 30-60 s, random proxy kills resumed from the last checkpoint), driving "
            "vmrestore.schedule.Admission in simulated time. Prints makespan / lower bound, "
            "the binding term, VM RTO p50/p99 and bytes re-copied after kills, per seed and "
            "summarised. See docs/scheduling.md."
        ),
    )
    sc.add_argument("--seeds", type=int, default=20, help="number of seeds (default 20)")
    sc.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    sc.add_argument("--vms", type=int, default=1000, help="VMs (default 1000)")
    sc.add_argument("--hosts", type=int, default=20, help="ESXi hosts (default 20)")
    sc.add_argument("--datastores", type=int, default=10, help="datastores (default 10)")
    sc.add_argument("--proxies", type=int, default=50, help="proxies (default 50)")
    sc.add_argument("--kills", type=int, default=3, help="proxy kills per seed (default 3)")
    sc.add_argument("--tier0", type=float, default=0.0,
                    help="fraction of VMs in RTO tier 0, the rest tier 1 (default 0)")
    sc.add_argument("--json", action="store_true",
                    help="print the summary with every seed's result as JSON (rows to stderr)")
    sc.set_defaults(func=_run_schedule)
