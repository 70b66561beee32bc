"""Quick rollback against a full overwrite of the same disk, over NBD and HotAdd (loop).

    python bench/rollback.py [--size 2G] [--changed 0.02] [--runs 3] [--workdir DIR] [--warm]

One sample disk (bench/compare.py's recipe: 40 % zero, 30 % text-like, 30 %
random 1 MiB blocks) is backed up with vmrestore. Each transport has its own
target, which starts as the disk restored (a sparse copy: its zero blocks are
holes, as on a thin disk vmrestore restored). Each round, for each transport:
change ``--changed`` of the blocks at random (new random data), then time ``vmrestore restore-disk
--quick-rollback``; change the same share again, then time a full overwrite
(``restore-disk`` into the existing target: every data block written, every
zero run zeroed). Runs alternate, caches are dropped before each (unless
``--warm``), and the target must equal the disk after every run. Compared:
wall time of the whole command (Python start, chain and plan included), the
disk's own time (``seconds`` of the --json result), and bytes written
(written + zeroed); ratios are per round, the table gives their median. Root is needed for the
loop device and for dropping caches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # bench/compare.py: sample, servers, loop devices, caches

MIB = 1 << 20


def drift(path: Path, share: float, rng: np.random.Generator) -> int:
    """Overwrite ``share`` of the 1 MiB blocks with random bytes; returns how many."""
    blocks = path.stat().st_size // MIB
    n = max(1, round(blocks * share))
    with open(path, "r+b") as f:
        for b in rng.choice(blocks, n, replace=False):
            f.seek(int(b) * MIB)
            f.write(rng.integers(0, 256, MIB, dtype=np.uint8).tobytes())
    os.sync()
    return n


def restore(bk: Path, target: str, quick: bool, log: Path) -> dict:
    argv = [sys.executable, "-m", "vmrestore", "restore-disk", str(bk), "--disk", "0",
            "--to", target, "--json", "-q", "--force"]
    if quick:
        argv.append("--quick-rollback")
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    log.write_text(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}\n{p.stderr}")
    doc = json.loads(p.stdout)
    doc["wall"] = wall
    return doc


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--changed", type=float, default=0.02)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--warm", action="store_true", help="do not drop caches between runs")
    ap.add_argument("--transports", default="nbd,hotadd,hotadd-dio",
                    help="nbd (nbdkit file plugin, unix socket), hotadd (loop device over the "
                    "file, buffered: the lab's hot-add), hotadd-dio (loop with direct I/O: no "
                    "host page cache between the proxy and the disk, like a vSCSI disk)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    size = compare.parse_size(args.size)
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="vmr-rollback-"))
    wd.mkdir(parents=True, exist_ok=True)
    disk, bk = wd / "disk.img", wd / "disk.vmrb"
    if not (disk.exists() and bk.exists() and disk.stat().st_size == size):  # reuse a workdir
        compare.make_sample(disk, size)
        subprocess.run([sys.executable, "-m", "vmrestore", "backup", "create", "--disk",
                        str(disk), "-o", str(bk), "-q"], check=True)
    rng = np.random.default_rng(7)
    load = os.getloadavg()
    rows: dict[str, dict[str, list[dict]]] = {}
    for tr in args.transports.split(","):
        rows[tr] = {"quick": [], "full": []}
        target = wd / f"target-{tr}.img"
        subprocess.run(["cp", "--sparse=always", str(disk), str(target)], check=True)
        for r in range(args.runs):
            for mode in ("quick", "full"):
                changed = drift(target, args.changed, rng)
                compare.drop_caches(not args.warm)
                log = wd / f"{tr}-{mode}-{r}.log"
                if tr == "nbd":
                    sock = wd / "nbd.sock"
                    with compare._timed_server(
                            "nbdkit", ["nbdkit", "--foreground", "--exit-with-parent", "-U",
                                       str(sock), "file", f"file={target}"],
                            sock, wd / "nbdkit.log"):
                        doc = restore(bk, f"nbd+unix:///?socket={sock}", mode == "quick", log)
                else:
                    dio = "on" if tr == "hotadd-dio" else "off"
                    out = subprocess.run(["losetup", "--find", "--show", f"--direct-io={dio}",
                                          str(target)], capture_output=True, text=True,
                                         check=True)
                    dev = out.stdout.strip()
                    # a loop device may keep a read-only flag from an earlier user
                    subprocess.run(["blockdev", "--setrw", dev], check=False)
                    try:
                        doc = restore(bk, dev, mode == "quick", log)
                    finally:
                        subprocess.run(["losetup", "-d", dev], check=False)
                if not same(target, disk):
                    raise SystemExit(f"{tr} {mode} run {r}: target differs from the disk")
                doc["changed_blocks"] = changed
                rows[tr][mode].append(doc)
                print(f"{tr:6} {mode:5} run {r}: {doc['wall']:.2f} s (disk "
                      f"{doc['seconds']:.2f} s), "
                      f"{(doc['bytes_written'] + doc['bytes_zeroed']) / MIB:.0f} MiB written, "
                      f"{doc.get('differing_entries', '-')} differing", flush=True)
    load_after = os.getloadavg()
    print(f"\n{size / MIB:.0f} MiB disk, {args.changed:.0%} of blocks changed per run, "
          f"{'warm' if args.warm else 'cold (caches dropped)'}; load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {load_after[0]:.2f} "
          f"{load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{'transport':10}{'quick s':>9}{'full s':>9}{'time x':>8}{'quick MiB':>11}"
          f"{'full MiB':>10}{'bytes x':>9}")
    summary = {}
    for tr, m in rows.items():
        q = [d["wall"] for d in m["quick"]]
        f = [d["wall"] for d in m["full"]]
        qs = [d["seconds"] for d in m["quick"]]
        fs = [d["seconds"] for d in m["full"]]
        qb = [d["bytes_written"] + d["bytes_zeroed"] for d in m["quick"]]
        fb = [d["bytes_written"] + d["bytes_zeroed"] for d in m["full"]]
        tx = statistics.median(a / b for a, b in zip(q, f, strict=True))
        bx = statistics.median(a / b for a, b in zip(qb, fb, strict=True))
        sx = statistics.median(a / b for a, b in zip(qs, fs, strict=True))
        summary[tr] = {"quick_s": q, "full_s": f, "quick_disk_s": qs, "full_disk_s": fs,
                       "quick_bytes": qb, "full_bytes": fb, "time_ratio": tx,
                       "disk_time_ratio": sx, "bytes_ratio": bx}
        print(f"{tr:10}{statistics.median(q):>9.2f}{statistics.median(f):>9.2f}{tx:>8.2f}"
              f"{statistics.median(qb) / MIB:>11.0f}{statistics.median(fb) / MIB:>10.0f}"
              f"{bx:>9.3f}   disk only: {statistics.median(qs):.2f} / "
              f"{statistics.median(fs):.2f} s = {sx:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "changed": args.changed,
                                               "load": [load, load_after], "rows": rows,
                                               "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
