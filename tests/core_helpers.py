"""Shared helpers of the core tests: test images, backups, plans, a real nbdkit, loop devices.

Import in a test module with ``from core_helpers import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from support import ROOT, need, need_root, need_tool

MiB = 1 << 20


def make_image(path: Path, blocks: int, block_size: int = MiB, seed: int = 1,
               tail: int = 0) -> bytes:
    """A disk image mixing zero, text-like and random blocks (pattern by index); returns bytes."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(blocks):
        k = (i * 7 + seed) % 5
        if k in (0, 3):
            parts.append(bytes(block_size))
        elif k == 1:
            line = f"line {i} of a text-like block, seed {seed}\n".encode()
            parts.append((line * (block_size // len(line) + 1))[:block_size])
        else:
            parts.append(rng.integers(0, 256, block_size, dtype=np.uint8).tobytes())
    if tail:
        parts.append(rng.integers(0, 256, tail, dtype=np.uint8).tobytes())
    data = b"".join(parts)
    path.write_bytes(data)
    return data


def backup(image: Path, out: Path, *extra: str, parent: Path | None = None) -> Path:
    """Make a restore point with the real `vmrestore backup create`."""
    args = [sys.executable, "-m", "vmrestore", "backup", "create", "--disk", str(image),
            "-o", str(out), "-q", *extra]
    if parent is not None:
        args += ["--parent", str(parent)]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return out


def restore_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", *args],
                          capture_output=True, text=True, timeout=timeout)


def synth_plan(data: bytes, src_path: Path, block_size: int = MiB, codec: str = "zstd",
               zero_runs: bool = True) -> np.ndarray:
    """Write `data`'s non-zero blocks compressed to src_path; return a PLAN_DTYPE plan.

    A plan made without the repository code, so the pipeline is tested on its own.
    """
    from vmrestore import core
    from vmrestore.plan import KIND_DATA, KIND_ZERO, PLAN_DTYPE

    cid = core.CODECS[codec]
    entries = []
    off = 0
    with open(src_path, "wb") as f:
        for b in range(0, len(data), block_size):
            blk = data[b:b + block_size]
            if zero_runs and core.is_zero(blk):
                if entries and entries[-1]["kind"] == KIND_ZERO and \
                        entries[-1]["dst_off"] + entries[-1]["length"] == b:
                    entries[-1]["length"] += len(blk)
                else:
                    entries.append({"kind": KIND_ZERO, "dst_off": b, "length": len(blk),
                                    "block": b // block_size})
                continue
            comp = core.compress(blk, cid, 1) if cid else bytes(blk)
            lo, hi = core.xxh3_128(blk)
            f.write(comp)
            entries.append({"kind": KIND_DATA, "dst_off": b, "length": len(blk),
                            "src_off": off, "stored_len": len(comp), "codec": cid,
                            "xxh_lo": lo, "xxh_hi": hi, "block": b // block_size, "src": 0})
            off += len(comp)
    plan = np.zeros(len(entries), PLAN_DTYPE)
    for i, e in enumerate(entries):
        for k, v in e.items():
            plan[i][k] = v
    return plan


ASAN_OPTIONS = "detect_leaks=1:abort_on_error=0:exitcode=99"


def build_asan_driver(tmp: Path) -> Path:
    """tests/core_asan_driver.c + the core's C files, built with ASan+LSan (no Python)."""
    need_tool("gcc", "pkg-config")
    exe = tmp / "driver"
    libs = subprocess.run(["pkg-config", "--cflags", "--libs", "libzstd", "liblz4",
                           "libxxhash", "libnbd"], capture_output=True, text=True,
                          check=True).stdout.split()
    core = ROOT / "ext" / "core"
    subprocess.run(["gcc", "-g", "-O1", "-fsanitize=address", "-fno-omit-frame-pointer",
                    "-std=gnu11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter",
                    f"-I{core}", str(ROOT / "tests" / "core_asan_driver.c"),
                    *(str(core / f) for f in ("pipeline.c", "compare.c", "writer_file.c",
                                              "writer_nbd.c", "codec.c", "hash_avx2.c")),
                    "-o", str(exe), *libs], check=True)
    return exe


def wait_written(target: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until a restore running in proc has written data into target (all zeros before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(target, "rb") as f:
            if f.read().strip(b"\0"):
                return
        time.sleep(0.05)
    raise AssertionError("the restore wrote nothing before it ended or the time ran out")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# ------------------------------------------------------------------- nbdkit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """A real nbdkit serving a file over a unix socket or loopback TCP; stop() is idempotent."""

    def __init__(self, tmp: Path, image: Path, *filters_and_args: str, tcp: bool = False,
                 plugin: str = "file") -> None:
        need_tool("nbdkit")
        self.sock = tmp / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.pidfile = tmp / f"nbdkit-{time.monotonic_ns()}.pid"
        self.port = free_port() if tcp else 0
        where = ["-i", "127.0.0.1", "-p", str(self.port)] if tcp else ["-U", str(self.sock)]
        filters = [a for a in filters_and_args if a.startswith("--filter=")]
        params = [a for a in filters_and_args if not a.startswith("--filter=")]
        self.argv = ["nbdkit", "-f", "--exit-with-parent", "-P", str(self.pidfile), *where,
                     *filters, plugin, str(image), *params]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.pidfile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"nbdkit did not start: {err}")
            time.sleep(0.02)
        self.uri = (f"nbd://127.0.0.1:{self.port}/" if tcp
                    else f"nbd+unix:///?socket={self.sock}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr:
            self.proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


@contextlib.contextmanager
def nbdkit(tmp: Path, image: Path, *args: str, tcp: bool = False) -> Iterator[Nbdkit]:
    srv = Nbdkit(tmp, image, *args, tcp=tcp)
    try:
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------- loop devices


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """Attach backing to a free loop device; always detached afterwards."""
    need_root()
    need_tool("losetup")
    from vmrestore.lab import loopdev

    try:
        dev = loopdev.attach(backing, "attaching a loop device", RuntimeError)
    except RuntimeError as e:
        need(False, f"no loop device available: {e}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def mounted(dev: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], check=False).returncode == 0:
                break
            time.sleep(0.1)


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
