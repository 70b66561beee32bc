"""Shared test helpers: finding the real parts, and skipping (or failing in CI) without them.

Import with ``from support import need, ...`` (pytest puts tests/ on sys.path:
see pythonpath in pyproject.toml). conftest.py only holds fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("VMRESTORE_REQUIRE_ALL") == "1"


def need(condition: bool, why: str) -> None:
    """Skip the test when a real part is missing; in CI (VMRESTORE_REQUIRE_ALL=1) fail instead."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required part missing in CI: {why}")
    pytest.skip(why)


def need_tool(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"{name} not installed (scripts/bootstrap.sh)")


def need_root() -> None:
    need(os.geteuid() == 0, "needs root for loop devices / mounts")


def run_cli(*args: str, check: bool = False, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `vmrestore` command in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmrestore", *args],
        capture_output=True, text=True, input=input, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vmrestore {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
