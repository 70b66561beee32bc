"""Root fixtures; the helpers themselves live in support.py (importable by name)."""

from __future__ import annotations

import pytest

from support import run_cli


@pytest.fixture
def cli():
    return run_cli
