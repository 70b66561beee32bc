"""Build logic of vmrestore._pipeline: the C block pipeline and the native writers.

Imported by build_helpers.extensions(). ``VMRESTORE_ASAN=1`` builds the
module with AddressSanitizer (run it with ``LD_PRELOAD=$(gcc
-print-file-name=libasan.so)``; tests/test_faults_core.py does this).
Other areas add their C files (e.g. writer_vddk.c, source_repo.c) to
EXTRA_SOURCES below, one line each.
"""

from __future__ import annotations

import os

from build_helpers import C_FLAGS, HERE, _merge, find_library
from setuptools import Extension

CORE_SOURCES = [
    "ext/core/_pipeline.pyx",
    "ext/core/pipeline.c",
    "ext/core/writer_file.c",
    "ext/core/writer_nbd.c",
    "ext/core/codec.c",
    "ext/core/hash_avx2.c",
    "ext/core/compare.c",
]
# Appended by other areas (one line each, with what it is in a comment).
EXTRA_SOURCES: list[str] = [
    "ext/core/writer_vddk.c",  # VixDiskLib writer
    "ext/core/vddk_log.c",  # VixDiskLib's thread-safe log functions (InitEx)
    "ext/core/source_repo.c",  # repository-agent source
]


def asan_enabled() -> bool:
    return os.environ.get("VMRESTORE_ASAN") == "1"


def pipeline_extension() -> Extension:
    """vmrestore._pipeline: pthreads pipeline + file/SAN/NBD writers, GIL released."""
    libs = _merge(
        find_library("lz4"), find_library("zstd"), find_library("xxhash"), find_library("nbd")
    )
    libs["include_dirs"].insert(0, str(HERE / "core"))
    cflags = list(C_FLAGS)
    ldflags = ["-pthread"]
    if asan_enabled():
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
        ldflags += ["-fsanitize=address"]
    return Extension(
        "vmrestore._pipeline",
        sources=CORE_SOURCES + [s for s in EXTRA_SOURCES if (HERE.parent / s).exists()],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        **libs,
    )


def extensions() -> list[Extension]:
    return [pipeline_extension()]
