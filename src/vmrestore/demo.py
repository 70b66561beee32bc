"""The README's main job, end to end, through the real CLI as a user would run it.

Steps: bring the embedded vSphere lab up (``vmrestore lab up``: vcsim, host data
services, a SAN LUN on a loop device); write a sample 2-disk VM (disk 0
thick-eager, disk 1 thin, one NIC on "VM Network"); ``vmrestore backup create``
a full, change some blocks, back up an incremental, ``vmrestore verify`` it;
then ``vmrestore restore`` the whole VM into the lab in the five phases, with a
new name (``demo-vm-restored``), disk 0 on the SAN datastore and disk 1 on the
local one, and the NIC mapped to "Restore Network"; print the restore report;
read the restored disk files back from the datastores and compare them byte for
byte with the sources. ``--all-transports`` also restores the VM once through
each transport (san, hotadd, nbd, nbdssl) and prints the MB/s of each.

The lab is left up (so the restored VM can be looked at with ``vmrestore lab
status``); the demo prints how to take it down, or takes it down itself with
``--lab-down``. VMs of an earlier demo run (the fixed names ``demo-vm-restored``
and ``demo-vm-<transport>``) are removed from the lab first.
Exit 0 only when every restored disk matches.

Run: ``scripts/demo.sh`` or ``python -m vmrestore.demo [--size 256M] [--workdir DIR]``.
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

RESTORED = "demo-vm-restored"
TRANSPORTS = ("san", "hotadd", "nbd", "nbdssl")


def _vmrestore(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real command; its progress goes to our stderr, its stdout is returned."""
    cmd = [sys.executable, "-m", "vmrestore", *args]
    print("$ vmrestore " + " ".join(a if " " not in a else repr(a) for a in args),
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: 'vmrestore {' '.join(args)}' failed with exit code "
                         f"{proc.returncode}")
    return proc


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _flat_file(lab: Any, ds_path: str) -> str:
    """'[ds] dir/x.vmdk' -> the local flat file behind it in the lab."""
    ds, _, rel = ds_path.partition("] ")
    base = os.path.join(str(lab.datastore(ds.lstrip("[")).dir), rel)
    return base.removesuffix(".vmdk") + "-flat.vmdk"


def _drop_caches() -> None:
    """SAN writes go to the LUN under the datastore's filesystem: read back, not the cache."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _remove_old_demo_vms(lab: Any, names: list[str]) -> None:
    from vmrestore.vsphere import cleanup
    from vmrestore.vsphere.connect import connect

    with connect(lab.target()) as s:
        dc = s.datacenter(lab.datacenter)
        for name in names:
            vm = s.find_vm(dc, name)
            if vm is not None:
                print(f"demo: removing VM {name}", file=sys.stderr)
                cleanup.destroy_vm(s, vm)
            for ds in lab.datastores:
                if cleanup.datastore_dir_exists(s, dc, ds, name):
                    cleanup.delete_datastore_path(s, dc, f"[{ds}] {name}")


def _restore(inc: str, name: str, lab_dir: str, *extra: str) -> dict[str, Any]:
    p = _vmrestore("restore", "--backup", inc, "--name", name, "--network-map",
                   "VM Network=Restore Network", "--json", *extra, check=False)
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"demo: restore of {name} failed (exit {p.returncode})") from None
    if p.returncode != 0:
        from vmrestore.report import format_table, from_dict

        print(format_table(from_dict(rep)))
        raise SystemExit(f"demo: restore of {name} failed (exit {p.returncode})")
    return rep


def main(argv: list[str] | None = None) -> int:
    from vmrestore import sample
    from vmrestore.commands.backup import parse_size

    ap = argparse.ArgumentParser(prog="python -m vmrestore.demo", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--size", default="256M", help="size of each sample disk (default 256M)")
    ap.add_argument("--workdir", default="./demo-work", help="where to put the sample VM "
                    "and its backups (default ./demo-work; files of a previous run are replaced)")
    ap.add_argument("--lab-dir", default=None,
                    help="lab directory (default: $VMRESTORE_LAB_DIR or ./.lab)")
    ap.add_argument("--lab-down", action="store_true", help="take the lab down at the end")
    ap.add_argument("--all-transports", action="store_true",
                    help="also restore through each transport and print its MB/s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--codec", default="lz4", choices=("zstd", "lz4", "none"))
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    if size % 512 or size <= 0:
        raise SystemExit(f"demo: --size {a.size}: must be a positive multiple of 512")
    work = os.path.abspath(a.workdir)
    os.makedirs(work, exist_ok=True)
    lab_dir = os.path.abspath(a.lab_dir or os.environ.get("VMRESTORE_LAB_DIR") or ".lab")
    os.environ["VMRESTORE_LAB_DIR"] = lab_dir  # the restores below use this lab
    t0 = time.monotonic()

    # 1. The lab: the vCenter + ESXi hosts + datastores the VM is restored into.
    _vmrestore("lab", "up", "--dir", lab_dir)
    from vmrestore.lab.client import load_lab

    lab = load_lab(lab_dir)
    names = [RESTORED] + [f"demo-vm-{t}" for t in TRANSPORTS]
    _remove_old_demo_vms(lab, names)

    # 2. A sample VM and its backups: full, then an incremental after some changes.
    full, inc = os.path.join(work, "vm-full.vmrb"), os.path.join(work, "vm-inc1.vmrb")
    for stale in (full, inc):
        if os.path.exists(stale):
            os.unlink(stale)
    print(f"demo: writing a sample 2-disk VM of {size / 2**20:.0f} MiB per disk to {work}",
          file=sys.stderr)
    disks, cfg = sample.write_sample_vm(work, size, seed=a.seed, disks=2, name="demo-vm")
    disk_args = [arg for d in disks for arg in ("--disk", d)]
    s_full = json.loads(_vmrestore("backup", "create", *disk_args, "--vm-config", cfg,
                                   "--codec", a.codec, "--json", "-o", full).stdout)
    nblocks = -(-size // sample.MIB)
    changed = [sample.change_blocks(d, max(1, nblocks // 20), seed=a.seed * 10 + i)
               for i, d in enumerate(disks)]
    print(f"demo: changed {sum(map(len, changed))} blocks", file=sys.stderr)
    s_inc = json.loads(_vmrestore("backup", "create", *disk_args, "--parent", full,
                                  "--codec", a.codec, "--json", "-o", inc).stdout)
    s_ver = json.loads(_vmrestore("verify", inc, "--json").stdout)

    # 3. The full VM restore: new name, disk 0 on the SAN datastore, NIC remapped.
    rep = _restore(inc, RESTORED, lab_dir, "--datastore", "ds-local", "--disk-datastore",
                   "0=ds-san", "--power-on")
    from vmrestore.report import format_table, from_dict

    print(format_table(from_dict(rep)))
    print()

    # 4. Read the restored disks back from the datastores and compare with the sources.
    _drop_caches()
    rows = []
    for d in rep["disks"]:
        flat = _flat_file(lab, d["file"])
        rows.append({"disk": d["disk"], "file": d["file"], "transport": d["transport"],
                     "identical": _digest(flat) == _digest(disks[d["disk"]])})

    # 5. Optionally, every transport once, for its MB/s.
    per_transport: list[dict[str, Any]] = []
    if a.all_transports:
        for t in TRANSPORTS:
            extra = ["--datastore", "ds-san", "--disk-format", "thick-eager"] if t == "san" \
                else ["--datastore", "ds-local"]
            r = _restore(inc, f"demo-vm-{t}", lab_dir, "--transport", t, *extra)
            _drop_caches()
            moved = sum(x["bytes_written"] + x["bytes_zeroed"] for x in r["disks"])
            secs = sum(x["seconds"] for x in r["disks"])
            same = all(_digest(_flat_file(lab, x["file"])) == _digest(disks[x["disk"]])
                       for x in r["disks"])
            per_transport.append({"transport": t, "mib": moved / 2**20, "seconds": secs,
                                  "mb_per_s": moved / secs / 1e6 if secs else 0.0,
                                  "identical": same})
            _remove_old_demo_vms(lab, [f"demo-vm-{t}"])

    _print_summary(work, lab_dir, s_full, s_inc, s_ver, rows, per_transport,
                   time.monotonic() - t0)
    if a.lab_down:
        _vmrestore("lab", "down", "--dir", lab_dir)
        print(f"demo: lab in {lab_dir} taken down")
    else:
        print(f"demo: the lab is still up (VM {RESTORED!r} is in it): see it with "
              f"'vmrestore lab status --dir {lab_dir}', take it down with "
              f"'.venv/bin/vmrestore lab down --dir {lab_dir}'")
    ok = all(r["identical"] for r in rows) and s_ver["ok"] and \
        all(p["identical"] for p in per_transport)
    return 0 if ok else 1


def _print_summary(work: str, lab_dir: str, s_full: dict[str, Any], s_inc: dict[str, Any],
                   s_ver: dict[str, Any], rows: list[dict[str, Any]],
                   per_transport: list[dict[str, Any]], total: float) -> None:
    def mib(n: float) -> str:
        return f"{n / 2**20:.1f} MiB"

    lines = [
        f"demo summary (work {work}, lab {lab_dir})",
        f"  full backup        {os.path.basename(s_full['output'])}: {mib(s_full['stored_bytes'])}"
        f" stored for {mib(s_full['source_bytes'])} of disks, {s_full['mb_per_s']} MB/s; "
        f"blocks {s_full['blocks']}",
        f"  incremental        {os.path.basename(s_inc['output'])}: {mib(s_inc['stored_bytes'])}"
        f" stored, {s_inc['mb_per_s']} MB/s; blocks {s_inc['blocks']}",
        f"  verify             {'OK' if s_ver['ok'] else 'FAILED'}: {s_ver['extents']} extents,"
        f" {mib(s_ver['raw_bytes'])} in {s_ver['seconds']} s ({s_ver['mb_per_s']} MB/s)",
        f"  restored VM        {RESTORED} (incremental point, chain resolved); disks read back:",
    ]
    for r in rows:
        lines.append(f"    disk {r['disk']}  {r['transport']:<8} {r['file']:<48} "
                     f"{'identical' if r['identical'] else 'DIFFERENT'}")
    if per_transport:
        lines.append("  per transport (both disks, data moved / time in the data phase):")
        for p in per_transport:
            lines.append(f"    {p['transport']:<8} {p['mib']:>8.1f} MiB {p['seconds']:>7.2f} s "
                         f"{p['mb_per_s']:>8.1f} MB/s  "
                         f"{'identical' if p['identical'] else 'DIFFERENT'}")
    ok = all(r["identical"] for r in rows) and s_ver["ok"] and \
        all(p["identical"] for p in per_transport)
    lines.append(f"  result             {'all disks identical' if ok else 'MISMATCH'} "
                 f"({total:.1f} s in all)")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
