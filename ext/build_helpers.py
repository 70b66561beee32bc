"""Build logic for vmrestore's compiled parts; setup.py only wires these together.

System libraries are found in a fixed order: an explicit prefix in the
environment (``VMRESTORE_<LIB>_PREFIX``), then pkg-config with a minimum
version, then an error that names the Debian package to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension

HERE = Path(__file__).resolve().parent

# name -> (pkg-config module, minimum version, Debian package, link name)
SYSTEM_LIBS: dict[str, tuple[str, str, str, str]] = {
    "lz4": ("liblz4", "1.9.0", "liblz4-dev", "lz4"),
    "zstd": ("libzstd", "1.4.0", "libzstd-dev", "zstd"),
    "xxhash": ("libxxhash", "0.8.0", "libxxhash-dev", "xxhash"),
    "nbd": ("libnbd", "1.10.0", "libnbd-dev", "nbd"),
}

WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
C_FLAGS = ["-O2", "-std=gnu11", "-pthread", *WARNINGS]


class MissingLibrary(RuntimeError):
    """A system library the build needs is absent; the message says what to install."""


def _pkg_config(module: str, *args: str) -> str:
    return subprocess.run(
        ["pkg-config", *args, module], check=True, capture_output=True, text=True
    ).stdout.strip()


def find_library(name: str) -> dict[str, list[str]]:
    """Return include_dirs / library_dirs / libraries for one system library."""
    module, minimum, debian, link = SYSTEM_LIBS[name]
    prefix = os.environ.get(f"VMRESTORE_{name.upper()}_PREFIX")
    if prefix:
        return {
            "include_dirs": [str(Path(prefix) / "include")],
            "library_dirs": [str(Path(prefix) / "lib")],
            "libraries": [link],
        }
    if shutil.which("pkg-config") is None:
        raise MissingLibrary("pkg-config not found: apt-get install pkg-config")
    try:
        _pkg_config(module, f"--atleast-version={minimum}")
    except subprocess.CalledProcessError:
        raise MissingLibrary(
            f"{module} >= {minimum} not found by pkg-config: apt-get install {debian}"
        ) from None
    cflags = _pkg_config(module, "--cflags").split()
    libs = _pkg_config(module, "--libs").split()
    return {
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "libraries": [f[2:] for f in libs if f.startswith("-l")] or [link],
    }


def _merge(*parts: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [], "libraries": []}
    for p in parts:
        for k, v in p.items():
            out[k].extend(x for x in v if x not in out[k])
    return out


def core_codecs_extension() -> Extension:
    """vmrestore._core: codecs, checksums and zero detection (GIL released)."""
    libs = _merge(find_library("lz4"), find_library("zstd"), find_library("xxhash"))
    libs["include_dirs"].insert(0, str(HERE / "core"))
    return Extension(
        "vmrestore._core",
        sources=["ext/core/_core.pyx", "ext/core/codec.c", "ext/core/hash_avx2.c"],
        extra_compile_args=C_FLAGS,
        extra_link_args=["-pthread"],
        **libs,
    )


def extensions() -> list[Extension]:
    """Every compiled module of the package, in build order."""
    exts = [core_codecs_extension()]
    for extra in _optional_extensions():
        exts.append(extra)
    return exts


def _optional_extensions() -> list[Extension]:
    """Extensions whose build logic lives in its own helper module (pipeline, vddk_sim)."""
    import importlib

    out: list[Extension] = []
    for modname in ("build_pipeline", "build_vddk_sim"):
        if (HERE / f"{modname}.py").exists():
            out.extend(importlib.import_module(modname).extensions())
    return out
