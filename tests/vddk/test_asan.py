"""The async VDDK path (core writer + vddk_sim) under AddressSanitizer/UBSan, once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from vddk_helpers import MIB, ROOT, SIM_SRC, need_tool

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def test_writer_and_sim_under_asan(tmp_path):
    need_tool("gcc")
    exe = tmp_path / "asan_driver"
    cmd = ["gcc", "-std=gnu11", "-g", "-O1", "-pthread", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
           f"-I{ROOT / 'ext' / 'core'}", f"-I{ROOT / 'ext' / 'vixdisklib'}",
           str(HERE / "asan_driver.c"), str(ROOT / "ext" / "core" / "writer_vddk.c"),
           str(SIM_SRC), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    flat = tmp_path / "disk-flat.vmdk"
    size = 16 * MIB
    with open(flat, "wb") as f:
        f.truncate(size)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMRESTORE_VDDK_SIM_")}
    env.update(ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               VMRESTORE_VDDK_SIM_WORKERS="4")
    run = subprocess.run([str(exe), str(flat), str(size)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert "runtime error" not in run.stderr
