"""Root fixtures; the helpers themselves live in support.py (importable by name)."""

from __future__ import annotations

import signal

import pytest

from support import run_cli


def pytest_configure(config: pytest.Config) -> None:
    # A runner started as a background job of a non-interactive shell inherits
    # SIGINT as *ignored*, and so would every vmrestore the tests start: the
    # Ctrl-C tests would then see a run that cannot be interrupted. Catching it
    # here makes exec'd children start with the default disposition again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def cli():
    return run_cli
