"""Fixtures of the mover tests (helpers live in mover_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mover_helpers import TOKEN, AgentProc, make_backup


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shared read-only backup: repo/vm1/{full,inc1}.vmrb and the disk it should restore to."""
    return make_backup(tmp_path_factory.mktemp("mover-sample"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture
def agent_factory(token_file: Path) -> Iterator:
    agents: list[AgentProc] = []

    def make(root: Path, extra: list[str] | None = None, **kw: object) -> AgentProc:
        a = AgentProc(root, token_file, extra, **kw)  # type: ignore[arg-type]
        agents.append(a)
        return a.start()

    yield make
    for a in agents:
        a.stop()
