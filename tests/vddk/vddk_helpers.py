"""Shared helpers of the VDDK tests: vddk_sim's library dir, datastores, trace, small builds.

Fixtures (in tests/vddk/conftest.py): ``sim_libdir`` (session: a VDDK-shaped
dir for the built vddk_sim), ``sim`` (per test: a datastore ``ds1`` in a tmp
dir, env vars set, a trace file; ``sim.disk(name, size)`` creates a disk and
returns its vSphere path and flat file), ``lib`` (the loaded Library).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIM_SRC = ROOT / "ext" / "vddk_sim" / "vddk_sim.c"
DECL_DIR = ROOT / "ext" / "vixdisklib"
MIB = 1 << 20


from support import need, need_tool, run_cli  # noqa: E402, F401


@dataclass
class Sim:
    """One test's simulated vSphere storage: datastore ds1 at ``ds``; trace at ``trace``."""

    ds: Path
    trace: Path
    libdir: Path

    def disk(self, name: str = "disk", size: int = 8 * MIB, thick: bool = False,
             vm: str = "vm1") -> tuple[str, Path]:
        from vmrestore import vddk

        vddk.create_sim_disk(self.ds / vm, name, size, thick=thick)
        return f"[ds1] {vm}/{name}.vmdk", self.ds / vm / f"{name}-flat.vmdk"

    def calls(self) -> list[str]:
        """API calls the sim traced (first word of each line)."""
        if not self.trace.exists():
            return []
        return [line.split()[0] for line in self.trace.read_text().splitlines() if line]

    def uri(self, path: str = "vm1/disk.vmdk", **query: str) -> str:
        q = {"vm": "vm-1", "transports": "nbd", **query}
        return "vddk://root@esx1/ds1/" + path + "?" + "&".join(f"{k}={v}" for k, v in q.items())


def backed_up_disk(tmp_path: Path, size: int, seed: int) -> tuple[Path, bytes]:
    """A backup of a disk of size bytes (zero, random and compressible blocks), and its bytes."""
    from repo_helpers import backup, make_disk

    raw = tmp_path / "src.raw"
    data = make_disk(raw, size, seed=seed)
    out = tmp_path / "b.vmrb"
    backup([raw], out)
    return out, data


def compile_so(out: Path, sources: list[Path], *flags: str) -> Path:
    """Build a small shared library (for missing/legacy-library tests)."""
    need_tool("gcc")
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-pthread", f"-I{DECL_DIR}", *flags,
           *map(str, sources), "-ldl", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def libdir_for(so: Path, base: Path) -> Path:
    """A VDDK-shaped dir (base/lib64/libvixDiskLib.so.8) holding so and the sim's companion."""
    from vmrestore import vddk

    lib64 = base / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    shutil.copy(so, lib64 / "libvixDiskLib.so.8")
    shutil.copy(vddk.sim_library("_vddk_sim_vim"), lib64 / vddk.SIM_COMPANION)
    return base


def sim_env(sim: Sim) -> dict[str, str]:
    """Environment for a vmrestore subprocess using this sim."""
    env = dict(os.environ)
    env.update({
        "VMRESTORE_VDDK_SIM_DATASTORES": f"ds1={sim.ds}",
        "VMRESTORE_VDDK_SIM_TRACE": str(sim.trace),
        "VMRESTORE_VDDK_LIBDIR": str(sim.libdir),
        "VMRESTORE_VDDK_PASSWORD": "secret",
    })
    return env
