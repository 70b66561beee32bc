"""The async VDDK path (core writer + vddk_sim) under AddressSanitizer/UBSan.

One build, run in each of the sim's completion modes (callbacks from a library
thread, inside the submit call, only during Wait), and once with NULL loggers,
where the strict sim must abort as VMware's default loggers are not thread-safe.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from vddk_helpers import MIB, ROOT, SIM_SRC, need_tool

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SIZE = 16 * MIB


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The ASan driver and a dir holding the sim's companion (for LD_LIBRARY_PATH)."""
    need_tool("gcc")
    d = tmp_path_factory.mktemp("asan")
    san = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    lib64 = d / "lib64"
    lib64.mkdir()
    companion = subprocess.run(
        ["gcc", "-shared", "-fPIC", *san, "-Wl,-soname,libvixDiskLibVim.so.8",
         str(ROOT / "ext" / "vddk_sim" / "vddk_sim_vim.c"), "-o",
         str(lib64 / "libvixDiskLibVim.so.8")], capture_output=True, text=True)
    assert companion.returncode == 0, companion.stderr
    exe = d / "asan_driver"
    cmd = ["gcc", "-std=gnu11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", *san,
           f"-I{ROOT / 'ext' / 'core'}", f"-I{ROOT / 'ext' / 'vixdisklib'}",
           str(HERE / "asan_driver.c"), str(ROOT / "ext" / "core" / "writer_vddk.c"),
           str(ROOT / "ext" / "core" / "vddk_log.c"), str(SIM_SRC), "-ldl", "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe, lib64


def _run(driver: tuple[Path, Path], tmp_path: Path, *extra: str,
         **env_over: str) -> subprocess.CompletedProcess[str]:
    exe, lib64 = driver
    flat = tmp_path / "disk-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(SIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMRESTORE_VDDK_SIM_")}
    env.update({"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1",
                "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
                "VMRESTORE_VDDK_SIM_WORKERS": "4", "LD_LIBRARY_PATH": str(lib64), **env_over})
    return subprocess.run([str(exe), str(flat), str(SIZE), *extra], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("mode", ["thread", "inline", "wait"])
def test_writer_and_sim_under_asan(driver, tmp_path, mode):
    run = _run(driver, tmp_path, VMRESTORE_VDDK_SIM_CALLBACKS=mode)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert "runtime error" not in run.stderr


def test_null_loggers_from_two_threads_abort(driver, tmp_path):
    run = _run(driver, tmp_path, "null-loggers")
    assert run.returncode == -signal.SIGABRT, run.stdout + run.stderr
    assert "not thread-safe" in run.stderr
    assert "not aborted" not in run.stdout


def test_companion_missing_from_search_path_fails_init(driver, tmp_path):
    run = _run(driver, tmp_path, LD_LIBRARY_PATH=str(tmp_path))
    assert run.returncode == 1 and run.stderr.strip() == "init", run.stdout + run.stderr
