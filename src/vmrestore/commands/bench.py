"""`vmrestore bench compare|rss`: the side-by-side benchmark, run from a source checkout.

The harness lives in the repository's ``bench/compare.py`` (beside the
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
