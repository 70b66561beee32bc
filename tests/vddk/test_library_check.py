"""A missing, incomplete or old VixDiskLib gives a clear error, never a crash."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from vddk_helpers import DECL_DIR, ROOT, SIM_SRC, compile_so, libdir_for, run_cli

from vmrestore import vddk
from vmrestore.errors import UsageError, VddkError


def test_no_libdir_given(monkeypatch):
    monkeypatch.delenv("VMRESTORE_VDDK_LIBDIR", raising=False)
    with pytest.raises(UsageError, match="--vddk-libdir"):
        vddk.find_library(None)


def test_dir_without_library(tmp_path):
    with pytest.raises(VddkError, match=r"no libvixDiskLib\.so in"):
        vddk.find_library(tmp_path)


def test_versioned_name_and_env_var(tmp_path, monkeypatch):
    lib64 = tmp_path / "lib64"
    lib64.mkdir()
    for v in ("6.7.0", "8.0.1", "7.0.3"):
        (lib64 / f"libvixDiskLib.so.{v}").write_bytes(b"")
    monkeypatch.setenv("VMRESTORE_VDDK_LIBDIR", str(tmp_path))
    assert vddk.find_library(None).name == "libvixDiskLib.so.8.0.1"


def test_not_a_shared_library(tmp_path):
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libvixDiskLib.so").write_text("not ELF")
    with pytest.raises(VddkError, match="cannot load VixDiskLib"):
        vddk.Library.load(tmp_path)


def test_missing_required_function_refused(tmp_path):
    src = tmp_path / "tiny.c"
    src.write_text(textwrap.dedent("""
        #include "vixdisklib.h"
        VixError VixDiskLib_InitEx(uint32_t a, uint32_t b, VixDiskLibGenericLogFunc *l,
            VixDiskLibGenericLogFunc *w, VixDiskLibGenericLogFunc *p, const char *d,
            const char *c) { return VIX_OK; }
        void VixDiskLib_Exit(void) {}
    """))
    libdir = libdir_for(compile_so(tmp_path / "tiny.so", [src]), tmp_path / "vddk")
    with pytest.raises(VddkError) as ei:
        vddk.Library.load(libdir)
    msg = str(ei.value)
    assert "is not a usable VixDiskLib" in msg
    assert "VixDiskLib_ConnectEx (VDDK 5.0)" in msg and "VixDiskLib_Open" in msg
    assert "VixDiskLib_InitEx" not in msg
    # `vddk info` still shows what the refused library has, then says why (exit 10).
    proc = run_cli("vddk", "info", "--vddk-libdir", str(libdir))
    assert proc.returncode == 10, proc.stderr
    assert "REFUSED:" in proc.stdout and "is not a usable VixDiskLib" in proc.stdout
    assert re.search(r"VixDiskLib_InitEx\s+ok", proc.stdout)
    assert re.search(r"VixDiskLib_ConnectEx\s+MISSING", proc.stdout)


def test_old_library_loads_but_async_write_names_the_missing_calls(tmp_path):
    so = compile_so(tmp_path / "legacy.so", [SIM_SRC], "-DVDDK_SIM_LEGACY",
                    "-fvisibility=hidden")
    libdir = libdir_for(so, tmp_path / "vddk55")
    lib = vddk.Library.load(libdir)
    assert not lib.has("VixDiskLib_WriteAsync")
    assert lib.report()["features"]["async-write"] is False
    with pytest.raises(VddkError) as ei:
        lib.require("async-write")
    assert "too old for async-write" in str(ei.value)
    assert "VixDiskLib_WriteAsync (VDDK 6.0)" in str(ei.value)
    assert "VixDiskLib_Wait (VDDK 6.5)" in str(ei.value)
    # the sync calls still work: connect params are built without AllocateConnectParams
    lib.connect(vddk.ConnectSpec(server="esx1", user="u", password="p")).close()


def test_info_command_on_an_old_library(tmp_path):
    so = compile_so(tmp_path / "legacy.so", [SIM_SRC], "-DVDDK_SIM_LEGACY",
                    "-fvisibility=hidden")
    libdir = libdir_for(so, tmp_path / "vddk55")
    proc = run_cli("vddk", "info", "--vddk-libdir", str(libdir), "--json", check=True)
    report = json.loads(proc.stdout)
    absent = {f["name"] for f in report["functions"] if not f["present"]}
    assert "VixDiskLib_WriteAsync" in absent and "VixDiskLib_Open" not in absent
    proc = run_cli("vddk", "info", "--vddk-libdir", str(libdir))
    assert "async-write NO" in proc.stdout


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("vddk", "info", "--vddk-libdir", str(tmp_path))
    assert proc.returncode == 10
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr


def test_generated_declarations_are_current():
    sys.path.insert(0, str(DECL_DIR))
    try:
        import generate
    finally:
        sys.path.remove(str(DECL_DIR))
    for path, text in generate.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python ext/vixdisklib/generate.py"


def test_c_header_compiles_and_matches_the_cdef(tmp_path):
    """The C header's struct layouts equal the ones cffi computes from the cdef."""
    import cffi

    from vmrestore import _vixdisklib

    ffi = cffi.FFI()
    ffi.cdef(_vixdisklib.CDEF)
    structs = ("VixDiskLibConnectParams", "VixDiskLibInfo", "VixDiskLibBlockList")
    prog = tmp_path / "sizes.c"
    prog.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "vixdisklib.h"\n'
                    "int main(void) {\n"
                    + "".join(f'printf("%zu\\n", sizeof({s}));\n' for s in structs)
                    + 'printf("%zu\\n", offsetof(VixDiskLibConnectParams, port));\n'
                    + 'printf("%zu\\n", offsetof(VixDiskLibConnectParams, specType));\n'
                    + "return 0; }\n")
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{DECL_DIR}", str(prog), "-o", str(exe)],
                   check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    want = [ffi.sizeof(s) for s in structs] + [
        ffi.offsetof("VixDiskLibConnectParams", "port"),
        ffi.offsetof("VixDiskLibConnectParams", "specType")]
    assert got == want
    assert ROOT.joinpath("ext/vixdisklib/vixdisklib.h").exists()
