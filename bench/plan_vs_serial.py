"""A restore plan against one VM at a time, on the same lab, in one run (docs/fleet.md).

    python bench/plan_vs_serial.py [--vms 20] [--workdir DIR] [--json]

Brings up a lab with 4 hosts and 3 proxy VMs in WORKDIR, writes the sample
VMs of the plan tests (2-4 disks of 64-256 MiB, mostly zero), and restores
the same N VMs three ways, each under new names:

- ``plan``: ``vmrestore restore --plan`` (embedded LocalCluster, 3 proxy
  workers, 2 slots each; VMs and disks in parallel);
- ``plan-1vm``: the same plan with ``max_vms: 1`` (one VM at a time, its
  disks in parallel over the proxies);
- ``serial``: ``vmrestore restore JOB.yaml`` once per VM, one after another
  (one proxy slot, disks one after another: the single-VM command).

It prints wall seconds, data MB/s ((written + zeroed) / wall) and logical
MB/s (zero runs skipped on new disks included) for each. Needs root (the lab).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
SHAPES = {"a": (64, 256), "b": (128, 64, 192), "c": (64, 96, 128, 256), "d": (256, 64, 128)}


def _cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmrestore", *args], capture_output=True,
                          text=True, env=env, check=check)


def backups(root: Path, env: dict[str, str]) -> dict[str, Path]:
    from vmrestore.sample import sample_vm_config, write_sample_disk

    out = {}
    for seed, (name, sizes) in enumerate(SHAPES.items(), start=1):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "full.vmrb").exists():
            images = []
            for i, mib in enumerate(sizes):
                p = d / f"disk{i}.img"
                write_sample_disk(str(p), mib * MiB, seed=seed * 100 + i,
                                  mix=(0.94, 0.03, 0.03))
                images.append(p)
            (d / "vm.json").write_text(json.dumps(sample_vm_config(name, [m * MiB for m in
                                                                          sizes], seed)))
            _cli("backup", "create", *[a for p in images for a in ("--disk", str(p))],
                 "--vm-config", str(d / "vm.json"), "-o", str(d / "full.vmrb"), "-q", env=env)
        out[name] = d / "full.vmrb"
    return out


def vms(bk: dict[str, Path], n: int, tag: str) -> list[dict]:
    names = sorted(bk)
    return [{"name": f"{tag}-{names[i % 4]}{i:02d}", "backup": str(bk[names[i % 4]]),
             "disk_format": "thin", "datastore": "ds-local"} for i in range(n)]


def run_plan(work: Path, bk: dict[str, Path], n: int, tag: str, env: dict[str, str],
             max_vms: int | None = None) -> dict:
    plan = work / f"{tag}.yaml"
    plan.write_text(json.dumps({"version": 1, "vms": vms(bk, n, tag),
                                **({"max_vms": max_vms} if max_vms else {})}))
    t0 = time.monotonic()
    p = _cli("restore", "--plan", str(plan), "--json", "-q", env=env, check=False)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"plan {tag} failed (exit {p.returncode}): {p.stderr.strip()}\n"
                         f"{p.stdout[-3000:]}")
    r = json.loads(p.stdout)
    moved = r["bytes_written"] + r["bytes_zeroed"]
    return {"how": tag, "vms": n, "wall_s": round(wall, 1), "plan_s": r["seconds"],
            "data_mb_s": round(moved / wall / 1e6, 1),
            "logical_mb_s": round((moved + r["bytes_skipped"]) / wall / 1e6, 1),
            "report_mb_s": r["mb_per_s"]}


def run_serial(work: Path, bk: dict[str, Path], n: int, tag: str, env: dict[str, str]) -> dict:
    moved = skipped = 0
    t0 = time.monotonic()
    for i, v in enumerate(vms(bk, n, tag)):
        job = work / f"{tag}-{i}.yaml"
        job.write_text(json.dumps({"version": 1, **v}))
        r = json.loads(_cli("restore", str(job), "--json", "-q", env=env).stdout)
        moved += sum(d["bytes_written"] + d["bytes_zeroed"] for d in r["disks"])
        skipped += sum(d["bytes_skipped"] for d in r["disks"])
    wall = time.monotonic() - t0
    return {"how": tag, "vms": n, "wall_s": round(wall, 1),
            "data_mb_s": round(moved / wall / 1e6, 1),
            "logical_mb_s": round((moved + skipped) / wall / 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from vmrestore.lab import lab as labmod

    work = a.workdir or Path(tempfile.mkdtemp(prefix="vmr-plan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lab_dir = work / "lab"
    env = {**os.environ, "VMRESTORE_LAB_DIR": str(lab_dir), "VMRESTORE_PROGRESS": "none"}
    env.pop("VMRESTORE_FAULT", None)
    labmod.up(lab_dir, hosts=4, proxies=3, san_size=128 << 20)
    try:
        bk = backups(work / "backups", env)
        rows = [run_plan(work, bk, a.vms, "plan", env),
                run_plan(work, bk, a.vms, "plan-1vm", env, max_vms=1),
                run_serial(work, bk, a.vms, "serial", env)]
    finally:
        labmod.down(lab_dir)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['how']:<10} {r['vms']} VMs  {r['wall_s']:>7.1f} s  "
                  f"{r['data_mb_s']:>7.1f} MB/s data  {r['logical_mb_s']:>8.1f} MB/s logical")
        base = rows[-1]["wall_s"]
        print(f"plan / serial: {base / rows[0]['wall_s']:.2f}x faster; plan-1vm / serial: "
              f"{base / rows[1]['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
