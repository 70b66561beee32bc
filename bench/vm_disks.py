"""The disks of one VM in parallel against its largest disk alone, in one run (docs/benchmarks.md).

    python bench/vm_disks.py [--sizes 256,128,128,64] [--transport nbd|file] [--runs 3]
                             [--stream-mbps N] [--workdir DIR] [--json]

Writes a 4-disk sample VM (vmrestore.sample: 40 % zero, 30 % text, 30 % random
1 MiB blocks), backs it up with ``vmrestore backup create`` into one restore
point, and restores it three ways through the same code as phase 4 of
``vmrestore restore`` (DiskTasks run by InProcessMovers, new target disks, so
zero runs are skipped as on a new VM disk):

- ``largest alone``: only the largest disk's task;
- ``vm parallel``: the four tasks at once, one thread each (phase 4 with four
  free proxy slots);
- ``vm serial``: the four tasks one after another (phase 4 before this change).

Runs are interleaved (round 1 of each way, round 2, ...) and the best of
``--runs`` is kept for each; every target is compared with its source disk
after every run. Transport ``nbd``: one nbdkit ``file`` export per disk on a
unix socket (the lab's NBD path); ``file``: new local files (HotAdd's path).
``--stream-mbps N`` caps each export at N MB/s (nbdkit's rate filter): an
ESXi NBD/NFC stream runs near 50 MB/s however fast the proxy is, which is why
disks in parallel pay; without a cap the proxy's CPU is the only limit.
The load average (``uptime``) before and after is printed: the machine's two
cores are shared, so the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def _nbdkit(image: Path, sock: Path, mbps: float = 0) -> Iterator[str]:
    """nbdkit's file plugin over ``image`` on a unix socket (``mbps``: a rate cap); its URI."""
    pid = sock.with_suffix(".pid")
    for p in (sock, pid):
        p.unlink(missing_ok=True)
    cap = ["--filter=rate"] if mbps else []
    # bits per second; a short bucket (0.25 s), or the first 2 s would pass uncapped
    rate = [f"rate={int(mbps * 8e6)}", "burstiness=0.25"] if mbps else []
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-P", str(pid), "-U",
                             str(sock), *cap, "file", f"file={image}", *rate],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not pid.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nbdkit did not start for {image}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def _targets(wd: Path, sizes: list[int], transport: str, mbps: float,
             stack: contextlib.ExitStack) -> tuple[list[str], list[Path]]:
    """Fresh, empty target disks (a new VM's disks) and their URIs."""
    paths, uris = [], []
    for i, size in enumerate(sizes):
        img = wd / f"target{i}.img"
        img.unlink(missing_ok=True)
        if transport == "nbd":
            with open(img, "wb") as f:
                f.truncate(size)
            uris.append(stack.enter_context(_nbdkit(img, wd / f"t{i}.sock", mbps)))
        else:
            uris.append(str(img))
        paths.append(img)
    return uris, paths


def _run(bk: Path, wd: Path, sizes: list[int], sources: list[Path], disks: list[int],
         transport: str, mbps: float, parallel: bool) -> float:
    """Restore ``disks`` of the point; wall seconds of the data phase (targets ready)."""
    from vmrestore.disktask import DiskTask, TaskSettings
    from vmrestore.mover.session import InProcessMovers

    movers = InProcessMovers()
    movers.open()
    with contextlib.ExitStack() as stack:
        uris, paths = _targets(wd, [sizes[d] for d in disks], transport, mbps, stack)
        tasks = [DiskTask(disk=d, source=str(bk), target=u, transport=transport,
                          settings=TaskSettings(target_zeroed=True))
                 for d, u in zip(disks, uris, strict=True)]
        t0 = time.monotonic()
        if parallel:
            with ThreadPoolExecutor(len(tasks)) as pool:
                list(pool.map(movers.restore_disk, tasks))
        else:
            for t in tasks:
                movers.restore_disk(t)
        seconds = time.monotonic() - t0
    for d, p in zip(disks, paths, strict=True):
        if not filecmp.cmp(p, sources[d], shallow=False):
            raise SystemExit(f"disk {d}: the restored target differs from the source")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,128,128,64", help="disk sizes in MiB")
    ap.add_argument("--transport", choices=("nbd", "file"), default="nbd")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stream-mbps", type=float, default=0,
                    help="cap each NBD export at this many MB/s (default: no cap)")
    ap.add_argument("--workdir", help="default: a new directory in /var/tmp, removed after")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    sizes = [int(x) * MiB for x in a.sizes.split(",")]
    if a.stream_mbps and a.transport != "nbd":
        ap.error("--stream-mbps caps NBD exports: use --transport nbd")
    from vmrestore.sample import write_sample_disk

    with contextlib.ExitStack() as stack:
        wd = Path(a.workdir) if a.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="vmr-vmdisks-", dir="/var/tmp")))
        wd.mkdir(parents=True, exist_ok=True)
        sources = []
        for i, size in enumerate(sizes):
            src = wd / f"disk{i}.raw"
            write_sample_disk(str(src), size, seed=11 + i)
            sources.append(src)
        bk = wd / "vm.vmrb"
        subprocess.run([sys.executable, "-m", "vmrestore", "backup", "create", "--force", "-q",
                        "-o", str(bk), *[x for s in sources for x in ("--disk", str(s))]],
                       check=True, stdout=subprocess.DEVNULL)
        largest = max(range(len(sizes)), key=lambda i: sizes[i])
        everything = list(range(len(sizes)))
        ways = {"largest alone": ([largest], False), "vm parallel": (everything, True),
                "vm serial": (everything, False)}
        load0 = _load()
        times: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(a.runs):
            for name, (disks, par) in ways.items():
                s = _run(bk, wd, sizes, sources, disks, a.transport, a.stream_mbps, par)
                times[name].append(s)
                print(f"run {r + 1} {name}: {s:.3f} s (load {_load()})", file=sys.stderr)
        load1 = _load()
    best = {k: min(v) for k, v in times.items()}
    out = {"sizes_mib": [s // MiB for s in sizes], "transport": a.transport, "runs": a.runs,
           "stream_mbps": a.stream_mbps,
           "cores": os.cpu_count(), "load_before": load0, "load_after": load1,
           "seconds": {k: round(v, 3) for k, v in best.items()},
           "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "parallel_over_largest": round(best["vm parallel"] / best["largest alone"], 3),
           "serial_over_largest": round(best["vm serial"] / best["largest alone"], 3)}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        cap = f" capped at {a.stream_mbps:g} MB/s per disk" if a.stream_mbps else ""
        print(f"{len(sizes)}-disk VM ({a.sizes} MiB), transport {a.transport}{cap}, best of "
              f"{a.runs}; "
              f"load {load0} -> {load1} on {os.cpu_count()} cores")
        for k, v in best.items():
            print(f"  {k:14s} {v:7.3f} s  {v / best['largest alone']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
