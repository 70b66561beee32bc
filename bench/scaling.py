"""Scaling curves of restore-disk into nbdkit targets: by disk size, by disks at once, by codec.

Why: one ratio at 2 GiB says little about how the engine behaves on a 16 GiB
disk, with eight disks on one proxy, or with another codec. This script
prints the three tables of docs/benchmarks.md ("Scaling curves"):

    python bench/scaling.py sizes --sizes 256M,1G,2G,4G,16G --drop-images
    python bench/scaling.py parallel --size 512M --disks 1,2,4,8
    python bench/scaling.py codecs --size 2G --codecs zstd:3,zstd:1,lz4,none

Every restore goes into a fresh sparse nbdkit ``file`` target on a unix
socket (one nbdkit per disk), with the backup read into the page cache first
(the warm case of ``bench compare``); wall time from spawn to exit, CPU from
GNU time, every target byte-checked against its image. Add ``--json`` for the
raw figures. Reuses bench/compare.py's helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as cmp

VMR = [sys.executable, "-m", "vmrestore"]


def _image(wd: Path, size: int, codec: str = "") -> tuple[Path, Path]:
    """The sample disk of `size` (bench compare's mix) and its backup with `codec`
    (NAME[:LEVEL]; empty: `backup create`'s defaults, what a restore usually meets)."""
    raw = wd / f"disk-{size >> 20}m.raw"
    if not raw.exists():
        cmp.make_sample(raw, size)
    name, _, level = codec.partition(":")
    vmrb = wd / f"disk-{size >> 20}m-{name or 'default'}{level}.vmrb"
    if not vmrb.exists():
        cmd = [*VMR, "backup", "create", "--disk", str(raw), "-o", str(vmrb), "-q"]
        cmd += (["--codec", name] if name else []) + (["--level", level] if level else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return raw, vmrb


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill a restore-disk that is still running (the run was interrupted)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _restore_many(wd: Path, jobs: list[tuple[Path, Path]], tag: str) -> dict[str, Any]:
    """Restore each (raw, vmrb) into its own nbdkit target, all at once; check the bytes."""
    logs = wd / "logs"
    logs.mkdir(exist_ok=True)
    cmp.read_into_cache([v for _, v in jobs])
    with contextlib.ExitStack() as stack:
        procs = []
        srvs = []
        for i, (raw, vmrb) in enumerate(jobs):
            tgt = wd / f"target-{i}.img"
            srv = stack.enter_context(cmp.nbdkit_file(tgt, raw.stat().st_size,
                                                      wd / f"t{i}.sock", logs / "nbdkit.log"))
            srvs.append(srv)
            rss = logs / f"{tag}-{i}.time"
            cmd = [cmp.TIME, "-f", cmp.TIME_FMT, "-o", str(rss), "--", *VMR, "restore-disk",
                   str(vmrb), "--disk", "0", "--to", f"nbd+unix:///?socket={srv.sock}",
                   "--json", "-q"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            stack.callback(_stop, proc)  # on Ctrl-C / SIGTERM too, before its nbdkit goes
            procs.append((proc, rss))
        t0 = time.perf_counter()
        outs = []
        for p, rss in procs:
            out, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise cmp.TargetError(f"restore-disk ({tag}) exit {p.returncode}: {err[-300:]}")
            outs.append((json.loads(out), cmp._read_time(rss)))
        wall = time.perf_counter() - t0
    for i, (raw, _) in enumerate(jobs):
        cmp.verify_target(wd / f"target-{i}.img", raw, raw.stat().st_size)
        (wd / f"target-{i}.img").unlink()
    logical = sum(raw.stat().st_size for raw, _ in jobs)
    cpu = sum(c for _, (_, c) in outs)
    return {"disks": len(jobs), "logical_bytes": logical, "wall_s": round(wall, 3),
            "mb_s": round(logical / wall / 1e6, 1), "cpu_s": round(cpu, 2),
            "nbdkit_cpu_s": round(sum(s.cpu_s for s in srvs), 2),
            "peak_rss_kib": max(r for _, (r, _) in outs),
            "pipeline_s": [d["seconds"] for d, _ in outs],
            "busy_pct": [d["busy_pct"] for d, _ in outs],
            "load_avg": list(os.getloadavg())}


def cmd_sizes(a: argparse.Namespace, wd: Path) -> list[dict[str, Any]]:
    rows = []
    for s in a.sizes.split(","):
        size = cmp.parse_size(s)
        raw, vmrb = _image(wd, size)
        best = min((_restore_many(wd, [(raw, vmrb)], f"size{size >> 20}")
                    for _ in range(a.runs)), key=lambda r: r["wall_s"])
        best["size"] = size
        rows.append(best)
        print(f"size {cmp.fmt_size(size)}: {best['wall_s']} s {best['mb_s']} MB/s "
              f"(load {best['load_avg'][0]:.2f})", file=sys.stderr)
        if a.drop_images:
            raw.unlink()
            vmrb.unlink()
    return rows


def cmd_parallel(a: argparse.Namespace, wd: Path) -> list[dict[str, Any]]:
    size = cmp.parse_size(a.size)
    raw, vmrb = _image(wd, size)
    rows = []
    for n in (int(x) for x in a.disks.split(",")):
        best = min((_restore_many(wd, [(raw, vmrb)] * n, f"par{n}") for _ in range(a.runs)),
                   key=lambda r: r["wall_s"])
        rows.append(best)
        print(f"{n} disks: {best['wall_s']} s {best['mb_s']} MB/s aggregate "
              f"(load {best['load_avg'][0]:.2f})", file=sys.stderr)
    return rows


def cmd_codecs(a: argparse.Namespace, wd: Path) -> list[dict[str, Any]]:
    size = cmp.parse_size(a.size)
    rows = []
    for codec in a.codecs.split(","):
        raw, vmrb = _image(wd, size, codec)
        runs = [_restore_many(wd, [(raw, vmrb)], f"codec-{codec}") for _ in range(a.runs)]
        best = min(runs, key=lambda r: r["cpu_s"])
        best.update(codec=codec, backup_bytes=vmrb.stat().st_size,
                    cpu_s_runs=[r["cpu_s"] for r in runs],
                    cpu_s_per_gib=round(best["cpu_s"] / (size / 2**30), 3))
        rows.append(best)
        print(f"codec {codec}: backup {cmp.fmt_size(vmrb.stat().st_size)}, CPU "
              f"{best['cpu_s']} s ({best['cpu_s_per_gib']} s/GiB), wall {best['wall_s']} s",
              file=sys.stderr)
    return rows


def render(what: str, rows: list[dict[str, Any]]) -> str:
    if what == "sizes":
        head = "| disk | wall s | MB/s | CPU s | CPU s/GiB | nbdkit CPU s | peak RSS | load |"
        lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            gib = r["logical_bytes"] / 2**30
            lines.append(f"| {cmp.fmt_size(r['size'])} | {r['wall_s']:.2f} | {r['mb_s']:.0f} | "
                         f"{r['cpu_s']:.2f} | {r['cpu_s'] / gib:.2f} | {r['nbdkit_cpu_s']:.2f} | "
                         f"{cmp.fmt_size(r['peak_rss_kib'] * 1024)} | {r['load_avg'][0]:.1f} |")
    elif what == "parallel":
        head = "| disks at once | wall s | aggregate MB/s | per disk MB/s | CPU s | load |"
        lines = [head, "|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['disks']} | {r['wall_s']:.2f} | {r['mb_s']:.0f} | "
                         f"{r['mb_s'] / r['disks']:.0f} | {r['cpu_s']:.2f} | "
                         f"{r['load_avg'][0]:.1f} |")
    else:
        head = ("| codec | backup size | restore CPU s (best) | CPU s per GiB restored | "
                "wall s | load |")
        lines = [head, "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['codec']} | {cmp.fmt_size(r['backup_bytes'])} | "
                         f"{r['cpu_s']:.2f} | {r['cpu_s_per_gib']:.3f} | {r['wall_s']:.2f} | "
                         f"{r['load_avg'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="images and targets (default: a new dir in /var/tmp)")
    p.add_argument("--runs", type=int, default=3, help="runs per point, best kept (default 3)")
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sizes")
    s.add_argument("--sizes", default="256M,512M,1G,2G,4G")
    s.add_argument("--drop-images", action="store_true", help="delete each size's files after")
    s = sub.add_parser("parallel")
    s.add_argument("--size", default="512M")
    s.add_argument("--disks", default="1,2,4,8")
    s = sub.add_parser("codecs")
    s.add_argument("--size", default="2G")
    s.add_argument("--codecs", default="zstd:3,zstd:1,lz4,none")
    a = p.parse_args(argv)
    wd = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="vmr-scale-",
                                                                 dir="/var/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            cmp._install_sigterm(stack)  # SIGTERM unwinds like Ctrl-C: servers are stopped
            rows = {"sizes": cmd_sizes, "parallel": cmd_parallel,
                    "codecs": cmd_codecs}[a.what](a, wd)
    except KeyboardInterrupt:
        print("scaling: interrupted; servers and restores stopped", file=sys.stderr)
        return 130
    finally:
        if not a.workdir:
            shutil.rmtree(wd, True)
    print(json.dumps(rows, indent=2) if a.json else render(a.what, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
