"""Fixtures of the VDDK tests; the helpers live in vddk_helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vddk_helpers import Sim, need


@pytest.fixture(scope="session")
def sim_libdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vmrestore import vddk
    from vmrestore.errors import VddkError

    try:
        return vddk.sim_libdir(tmp_path_factory.mktemp("vddk-sim"))
    except VddkError as e:
        need(False, str(e))
        raise


@pytest.fixture
def sim(tmp_path: Path, sim_libdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    ds = tmp_path / "ds1"
    ds.mkdir()
    s = Sim(ds=ds, trace=tmp_path / "sim-trace.log", libdir=sim_libdir)
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_DATASTORES", f"ds1={ds}")
    monkeypatch.setenv("VMRESTORE_VDDK_SIM_TRACE", str(s.trace))
    monkeypatch.setenv("VMRESTORE_VDDK_PASSWORD", "secret")
    for var in ("VMRESTORE_VDDK_SIM_FAIL", "VMRESTORE_VDDK_SIM_LATENCY_US",
                "VMRESTORE_VDDK_SIM_TRANSPORTS", "VMRESTORE_VDDK_SIM_THUMBPRINT",
                "VMRESTORE_VDDK_SIM_USER", "VMRESTORE_VDDK_SIM_PASSWORD",
                "VMRESTORE_VDDK_SIM_HOST", "VMRESTORE_VDDK_SIM_CALLBACKS",
                "VMRESTORE_VDDK_SIM_NFC_MEMORY", "VMRESTORE_VDDK_SIM_NFC_MAX_ALLOC",
                "VMRESTORE_VDDK_SIM_STRICT"):
        monkeypatch.delenv(var, raising=False)
    yield s


@pytest.fixture
def lib(sim: Sim) -> Any:
    from vmrestore import vddk

    return vddk.Library.load(sim.libdir)
