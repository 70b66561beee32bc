"""Helpers of the mover tests: sample backups, agents in other processes, jobs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TOKEN = "mover-test-token-0123456789abcdef"
MIB = 1 << 20


def make_backup(workdir: Path, size: int = 24 * MIB, seed: int = 7, incremental: bool = True
                ) -> tuple[Path, Path]:
    """A full (+ one incremental) of a sample disk; returns (backup dir, expected disk image)."""
    from vmrestore.repository.create import create_backup
    from vmrestore.sample import change_blocks, write_sample_disk

    bk = workdir / "repo" / "vm1"
    bk.mkdir(parents=True)
    disk = workdir / "disk0.img"
    write_sample_disk(str(disk), size, seed=seed)
    create_backup([str(disk)], str(bk / "full.vmrb"), codec="zstd")
    if incremental:
        change_blocks(str(disk), 5, seed=seed + 1)
        create_backup([str(disk)], str(bk / "inc1.vmrb"), parent=str(bk / "full.vmrb"))
    return bk, disk


class AgentProc:
    """`vmrestore repo-agent` in its own process; stop/restart by pid (same port)."""

    def __init__(self, root: Path, token_file: Path, extra: list[str] | None = None,
                 prefix: list[str] | None = None, host: str = "127.0.0.1") -> None:
        self.root, self.token_file = root, token_file
        self.extra = extra or []
        self.prefix = prefix or []
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> AgentProc:
        cmd = [*self.prefix, sys.executable, "-m", "vmrestore", "repo-agent",
               "--listen", f"{self.host}:{self.port}", "--root", str(self.root),
               "--token-file", str(self.token_file), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.match(r"listening (\S+):(\d+)", line)
        if not m:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"agent did not start: {line!r} {err}")
        self.port = int(m.group(2))
        self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._drainer.start()
        return self

    def wait_log(self, text: str, timeout: float = 10.0) -> bool:
        """True once a log line containing `text` arrived (the agent logs asynchronously)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.log):
                return True
            time.sleep(0.05)
        return False

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log.append(line)

    def url(self, rel: str = "vm1/inc1.vmrb", scheme: str = "repo") -> str:
        return f"{scheme}://{self.host}:{self.port}/{rel}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def mover_job(url: str, token_file: Path, target: Path, **settings: object) -> dict:
    return {"version": 1, "job_id": "t", "source": {"repository": url,
                                                     "token_file": str(token_file)},
            "disks": [{"disk": 0, "target": str(target)}],
            "settings": {"progress_interval": 0.05, **settings}}


def copy_with_bad_extent(backup_dir: Path, root: Path, nth: int, at: int | None = None,
                         xor: int = 0xFF) -> dict:
    """Copy the sample backups to `root` and flip one byte of the nth stored data extent of
    inc1.vmrb's disk 0 (in its middle unless `at` is given); returns that plan entry."""
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    shutil.copytree(backup_dir, root)
    plan = build_plan(open_chain(root / "inc1.vmrb"), 0)
    e = plan.plan[plan.plan["kind"] == 1][nth]
    victim = root / Path(plan.sources[int(e["src"])]).name
    with open(victim, "r+b") as f:
        f.seek(int(e["src_off"]) + (int(e["stored_len"]) // 2 if at is None else at))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ xor]))
    return {name: int(e[name]) for name in e.dtype.names}
