"""Build the lab's vCenter simulator (vcsim_main.go) once, and cache the binary.

The Go main is package data; building it takes ~13 s, so the binary is cached
under ``$VMRESTORE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/vmrestore`` or
``~/.cache/vmrestore``), keyed by a hash of the Go source and of ``go version``:
a changed source or toolchain gives a new binary, an unchanged one is reused.
Debian's govmomi sources are used in GOPATH mode (no module download).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmrestore.errors import LabError

GO_SOURCE = Path(__file__).with_name("vcsim_main.go")
GOPATH = "/usr/share/gocode"
GOVMOMI_SIM = Path(GOPATH, "src/github.com/vmware/govmomi/simulator")


def cache_dir() -> Path:
    """Where built binaries live; created on demand."""
    env = os.environ.get("VMRESTORE_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "vmrestore" if xdg else Path.home() / ".cache" / "vmrestore"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _go_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="", CGO_ENABLED="0")
    env.setdefault("GOCACHE", str(cache / "go-build"))
    return env


def _go_version(go: str, env: dict[str, str]) -> str:
    try:
        return subprocess.run([go, "version"], capture_output=True, text=True, check=True,
                              env=env, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise LabError(f"cannot run '{go} version': {e}") from e


def vcsim_binary(*, force: bool = False) -> Path:
    """Return the path of the built simulator, building it first if needed.

    Safe to call from several processes at once: builds are serialized by a
    lock file and the binary appears by an atomic rename.
    """
    go = shutil.which("go")
    if go is None:
        raise LabError("'go' not found: install golang-go (scripts/bootstrap.sh)")
    if not GOVMOMI_SIM.is_dir():
        raise LabError(f"govmomi sources not found at {GOVMOMI_SIM}: install "
                       "golang-github-vmware-govmomi-dev (scripts/bootstrap.sh)")
    cache = cache_dir()
    env = _go_env(cache)
    source = GO_SOURCE.read_bytes()
    key = hashlib.sha256(source + b"\0" + _go_version(go, env).encode()).hexdigest()[:16]
    target = cache / f"vmr-vcsim-{key}"
    if target.exists() and not force:
        return target
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and not force:
            return target
        with tempfile.TemporaryDirectory(prefix="vmr-vcsim-build-", dir=cache) as tmp:
            (Path(tmp) / "main.go").write_bytes(source)
            out = Path(tmp) / "vmr-vcsim"
            proc = subprocess.run([go, "build", "-o", str(out), "main.go"], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise LabError(f"building {GO_SOURCE.name} failed: "
                               f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
            os.replace(out, target)
    return target
