"""Wires the build helpers in ext/ into setuptools; the logic lives there."""

import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "ext"))

from build_helpers import extensions  # noqa: E402

setup(
    ext_modules=cythonize(
        extensions(),
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    ),
)
