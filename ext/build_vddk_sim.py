"""Build logic for the VDDK pieces: the generated VixDiskLib declarations and vddk_sim.

``extensions()`` is picked up by ext/build_helpers.py. It first regenerates
``ext/vixdisklib/vixdisklib.h`` and ``src/vmrestore/_vixdisklib.py`` from the
one table in ext/vixdisklib/declarations.py (idempotent), then returns the
vddk_sim shared library as an Extension named ``vmrestore._vddk_sim``: a
plain C library (no Python module init) exporting only the VixDiskLib_*
symbols, and its companion ``vmrestore._vddk_sim_vim`` (SONAME
libvixDiskLibVim.so.8), which the sim loads by name as VMware's library does. ``vmrestore.vddk.sim_libdir()`` lays it out as VDDK does
(``DIR/lib64/libvixDiskLib.so``) for ``--vddk-libdir``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_helpers import C_FLAGS  # noqa: E402

# VMRESTORE_VDDK_SIM_ASAN=1 builds the sim with AddressSanitizer (tests/vddk builds
# its own ASan copy for the slow memory test; this is for manual runs).
_ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def generate_declarations() -> None:
    """Regenerate the C header and the Python declaration module from the table."""
    sys.path.insert(0, str(HERE / "vixdisklib"))
    import generate

    generate.write()


def sim_sources() -> list[str]:
    return ["ext/vddk_sim/vddk_sim.c"]


def sim_compile_args() -> list[str]:
    args = [*C_FLAGS, "-fvisibility=hidden", "-Iext/vixdisklib"]
    if os.environ.get("VMRESTORE_VDDK_SIM_ASAN") == "1":
        args += _ASAN
    return args


# The companion library the sim loads by name at InitEx (as VMware's loads its own):
# its SONAME is what the dynamic loader matches when it is already loaded.
COMPANION_SONAME = "libvixDiskLibVim.so.8"


def extensions() -> list[Extension]:
    generate_declarations()
    link = ["-pthread", "-ldl"]
    if os.environ.get("VMRESTORE_VDDK_SIM_ASAN") == "1":
        link += _ASAN
    return [
        Extension(
            "vmrestore._vddk_sim",
            sources=sim_sources(),
            include_dirs=[str(HERE / "vixdisklib")],
            extra_compile_args=sim_compile_args(),
            extra_link_args=link,
        ),
        Extension(
            "vmrestore._vddk_sim_vim",
            sources=["ext/vddk_sim/vddk_sim_vim.c"],
            extra_compile_args=[*C_FLAGS, "-fvisibility=hidden"],
            extra_link_args=[f"-Wl,-soname,{COMPANION_SONAME}"],
        ),
    ]
