"""Processes on this machine: whether a recorded pid still runs.

Used where a file or a lab records the pid that made it, and a later run
must tell a live owner from a dead one (a stale partial backup, a lab whose
services died).
"""

from __future__ import annotations

import os


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
