"""The README's main job, end to end, through the real CLI as a user would run it.

Steps: write a sample 2-disk VM (disk 0 thick-eager, disk 1 thin, one NIC),
``vmrestore backup create`` a full, change some blocks, back up an
incremental, ``vmrestore verify`` it, restore each disk of the incremental
with ``vmrestore restore-disk`` (or, while that command does not exist, the
pure-Python reference restore, and say so), compare the bytes with the
sources, print a summary table. Exit 0 only when every disk matches.

Run: ``scripts/demo.sh`` or ``python -m vmrestore.demo [--size 256M] [--workdir DIR]``.
(The lab restore into vSphere will replace the restore step.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any


def _vmrestore(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command; its progress goes to our stderr, its stdout is returned."""
    cmd = [sys.executable, "-m", "vmrestore", *args]
    print("$ vmrestore " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: 'vmrestore {' '.join(args)}' failed with exit code "
                         f"{proc.returncode}")
    return proc


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _has_restore_disk() -> bool:
    r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", "--help"],
                       capture_output=True, text=True)
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    from vmrestore import sample
    from vmrestore.commands.backup import parse_size

    ap = argparse.ArgumentParser(prog="python -m vmrestore.demo", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--size", default="256M", help="size of each sample disk (default 256M)")
    ap.add_argument("--workdir", default="./demo-work", help="where to put everything "
                    "(default ./demo-work; files of a previous run are replaced)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--codec", default="zstd", choices=("zstd", "lz4", "none"))
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    if size % 512 or size <= 0:
        raise SystemExit(f"demo: --size {a.size}: must be a positive multiple of 512")
    work = os.path.abspath(a.workdir)
    os.makedirs(work, exist_ok=True)
    full, inc = os.path.join(work, "vm-full.vmrb"), os.path.join(work, "vm-inc1.vmrb")
    for stale in (full, inc):
        if os.path.exists(stale):
            os.unlink(stale)
    t0 = time.monotonic()
    print(f"demo: writing a sample 2-disk VM of {size / 2**20:.0f} MiB per disk to {work}",
          file=sys.stderr)
    disks, cfg = sample.write_sample_vm(work, size, seed=a.seed, disks=2, name="demo-vm")

    disk_args = [arg for d in disks for arg in ("--disk", d)]
    s_full = json.loads(_vmrestore("backup", "create", *disk_args,
                                   "--vm-config", cfg, "--codec", a.codec, "--json", "-o",
                                   full).stdout)
    nblocks = -(-size // sample.MIB)
    changed = [sample.change_blocks(d, max(1, nblocks // 20), seed=a.seed * 10 + i)
               for i, d in enumerate(disks)]
    print(f"demo: changed {sum(map(len, changed))} blocks", file=sys.stderr)
    s_inc = json.loads(_vmrestore("backup", "create", *disk_args,
                                  "--parent", full, "--codec", a.codec, "--json", "-o",
                                  inc).stdout)
    s_ver = json.loads(_vmrestore("verify", inc, "--json").stdout)

    use_cli = _has_restore_disk()
    if not use_cli:
        print("demo: 'vmrestore restore-disk' is not available yet: restoring with the "
              "pure-Python reference restore (vmrestore.repository.reference) instead",
              file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for i, d in enumerate(disks):
        out = os.path.join(work, f"restored-disk{i}.img")
        if os.path.exists(out):
            os.unlink(out)
        t = time.monotonic()
        r: dict[str, Any] = {}
        if use_cli:
            r = json.loads(_vmrestore("restore-disk", inc, "--disk", str(i), "--to", out,
                                      "--json").stdout)
            how = "restore-disk"
        else:
            from vmrestore.repository.reader import open_chain
            from vmrestore.repository.reference import restore_disk_py

            chain = open_chain(inc)
            try:
                restore_disk_py(chain, i, out)
            finally:
                chain.close()
            how = "reference (Python)"
        secs = time.monotonic() - t
        mbps = round(size / secs / 1e6, 1) if secs else None
        if use_cli:  # the command's own figures, without interpreter start-up
            secs, mbps = float(r.get("seconds", secs)), r.get("mb_per_s", mbps)
        same = _digest(out) == _digest(d)
        rows.append({"disk": i, "capacity": size, "restored_by": how, "seconds": round(secs, 2),
                     "mb_per_s": mbps, "identical": same})

    _print_summary(work, s_full, s_inc, s_ver, rows, time.monotonic() - t0)
    return 0 if all(r["identical"] for r in rows) else 1


def _print_summary(work: str, s_full: dict[str, Any], s_inc: dict[str, Any],
                   s_ver: dict[str, Any], rows: list[dict[str, Any]], total: float) -> None:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    lines = [
        f"demo summary ({work})",
        f"  full backup        {os.path.basename(s_full['output'])}: {mib(s_full['stored_bytes'])}"
        f" stored for {mib(s_full['source_bytes'])} of disks, {s_full['mb_per_s']} MB/s; "
        f"blocks {s_full['blocks']}",
        f"  incremental        {os.path.basename(s_inc['output'])}: {mib(s_inc['stored_bytes'])}"
        f" stored, {s_inc['mb_per_s']} MB/s; blocks {s_inc['blocks']}",
        f"  verify             {'OK' if s_ver['ok'] else 'FAILED'}: {s_ver['extents']} extents,"
        f" {mib(s_ver['raw_bytes'])} in {s_ver['seconds']} s ({s_ver['mb_per_s']} MB/s)",
        "  restore (incremental point, chain resolved):",
        f"    {'disk':<5} {'capacity':>11} {'restored by':<20} {'seconds':>8} {'MB/s':>8} "
        "identical",
    ]
    for r in rows:
        lines.append(f"    {r['disk']:<5} {mib(r['capacity']):>11} {r['restored_by']:<20} "
                     f"{r['seconds']:>8} {r['mb_per_s']!s:>8} "
                     f"{'yes' if r['identical'] else 'NO'}")
    ok = all(r["identical"] for r in rows) and s_ver["ok"]
    lines.append(f"  result             {'all disks identical' if ok else 'MISMATCH'} "
                 f"({total:.1f} s in all)")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
