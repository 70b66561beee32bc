"""Loop devices for the lab: attach writable, detach with retries, undo fences.

A fence sets a loop device read-only with ``blockdev --setro``. That flag
belongs to the block device, not to the binding: it outlives ``losetup -d``
and the next ``losetup -f`` that picks the same number hands out a device
that refuses every write (``mkfs`` fails with "Operation not permitted").
So every attach here clears the flag on the device it gets, and fenced
devices are made writable again as soon as nobody holds them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable

from vmrestore.procs import run_checked

ErrorFactory = Callable[[str], Exception]


def attach(path: str | os.PathLike[str], what: str, error: ErrorFactory) -> str:
    """Bind the first free loop device to path and return it, writable."""
    dev = run_checked(["losetup", "-f", "--show", str(path)], what, error).strip()
    try:
        run_checked(["blockdev", "--setrw", dev], f"{what} (making {dev} writable)", error)
    except Exception:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        raise
    return dev


def detach(dev: str, error: ErrorFactory, *, tries: int = 50) -> None:
    """``losetup -d`` with retries: udev or blkid may hold the device for a moment."""
    proc = None
    for _ in range(tries):
        proc = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.1)
    raise error(f"cannot detach loop device {dev}: {proc.stderr.strip() if proc else ''}")


def fence(dev: str) -> bool:
    """Set dev read-only: writes fail even through descriptors already open."""
    return subprocess.run(["blockdev", "--setro", dev], capture_output=True).returncode == 0


def is_bound(dev: str) -> bool:
    return os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")


def is_read_only(dev: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/ro") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def unfence_unbound(devices: Iterable[str]) -> set[str]:
    """Make the unbound ones of devices writable; return those still bound (still fenced)."""
    left = set()
    for dev in devices:
        if is_bound(dev):
            left.add(dev)
        else:
            subprocess.run(["blockdev", "--setrw", dev], capture_output=True)
    return left
