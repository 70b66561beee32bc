"""Processes on this machine: whether a recorded pid still runs; a tool run whose
failure is one error.

Used where a file or a lab records the pid that made it, and a later run
must tell a live owner from a dead one (a stale partial backup, a lab whose
services died); and where the lab runs system tools (losetup, mkfs, mount).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable


def pid_alive(pid: int) -> bool:
    """Whether pid runs here. EPERM means it runs (not ours); a zombie has ended."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_checked(cmd: list[str], what: str, error: Callable[[str], Exception],
                timeout: float = 120) -> str:
    """Run cmd and return its stdout; a failure, a missing tool or a timeout raises
    error("what: the command: why") instead (the caller's own error type)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"{what}: {' '.join(cmd)}: {e}") from e
    if proc.returncode != 0:
        raise error(f"{what}: {' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout
