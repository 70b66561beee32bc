"""Soak: 8 restores at once into the lab while a seeded chaos loop kills things.

For 50 seconds (VMRESTORE_SOAK_SECONDS): restores are killed with -9 and resumed
(--resume) at random, the repository agent half of them read from is killed -9 and
restarted on its port,
and the lab's NBD servers (nbdkit of an export) are killed -9. A run that fails on
its own (not killed) must have rolled back: nothing of it is left in the lab at
that moment; it then starts again. When the chaos stops, every job is finished
(resumed or restarted without faults) and every VM's disks must be byte-identical
to the backed-up images: a job that had touched another's VM or disks would show
here. The numbers (kills, resumes, failures seen) are printed for the closing note.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mover.mover_helpers import TOKEN, AgentProc
from restore_helpers import assert_nothing_left, assert_restored, find_vm, lab_env, unique

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]

JOBS = 8
CHAOS_SECONDS = float(os.environ.get("VMRESTORE_SOAK_SECONDS", "50"))
SEED = int(os.environ.get("VMRESTORE_SOAK_SEED", "13"))


@dataclass
class Job:
    index: int
    name: str
    args: list[str]
    state: Path
    proc: subprocess.Popen[str] | None = None
    done: bool = False
    resume: bool = False
    start_at: float = 0.0
    log: list[str] = field(default_factory=list)


def _nbdkits(lab_dir: Path) -> list[int]:
    """The lab's own nbdkit processes (exports of its hostd), by pid."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and any(str(lab_dir).encode() in a
                                                         for a in argv):
            out.append(int(d.name))
    return out


def test_soak_eight_restores_under_kills(lab, lab_si, host_services, backup,
                                         tmp_path: Path) -> None:
    rng = random.Random(SEED)
    tok = tmp_path / "agent.token"
    tok.write_text(TOKEN + "\n")
    agent = AgentProc(backup.dir, tok).start()
    infra = tmp_path / "infra.yaml"
    infra.write_text("version: 1\nproxies:\n  - name: soak\n    slots: 8\n    vm: vmr-proxy\n")
    base_env = lab_env(lab, VMRESTORE_SLOT_DIR=str(tmp_path / "slots"))
    chaos_env = {**base_env, "VMRESTORE_FAULT": "stall:data:0.3"}
    jobs = []
    for i in range(JOBS):
        name = unique(f"soak{i}")
        src = (["--repository", agent.url("inc1.vmrb"), "--token-file", str(tok)] if i % 2
               else ["--backup", str(backup.inc)])
        transport = "nbd" if i % 4 < 2 else "hotadd"
        jobs.append(Job(i, name, ["restore", *src, "--name", name, "--datastore", "ds-local",
                                  "--transport", transport, "--infra", str(infra),
                                  "--network-map", "VM Network=Restore Network", "--json"],
                        tmp_path / f"state{i}"))
    stats = {"restores killed": 0, "resumes": 0, "agent kills": 0, "nbdkit kills": 0,
             "failed on their own (rolled back, checked clean)": 0, "restarts": 0,
             "failed, still resumable (state kept)": 0}

    def start(j: Job, env: dict[str, str]) -> None:
        argv = [sys.executable, "-m", "vmrestore", *j.args, "--state-dir", str(j.state)]
        if j.resume:
            argv.append("--resume")
            stats["resumes"] += 1
        j.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)

    def reap(j: Job, env: dict[str, str], now: float) -> None:
        assert j.proc is not None
        rc = j.proc.poll()
        if rc is None:
            return
        _out, err = j.proc.communicate()
        j.proc = None
        j.log.append(f"rc={rc} {err.strip().splitlines()[-1:] if err.strip() else ''}")
        if rc == 0:
            j.done = True
            return
        if rc == -signal.SIGKILL:
            j.resume, j.start_at = True, now + rng.uniform(0.3, 2.0)
            return
        assert "Traceback" not in err, err
        if list(j.state.glob("restore-*.json")):
            # a resume that failed early (e.g. the agent was down) keeps the interrupted
            # run's state and objects: still resumable, so resumed again
            stats["failed, still resumable (state kept)"] += 1
            j.resume, j.start_at = True, now + rng.uniform(0.3, 2.0)
            return
        # failed on its own and rolled back: nothing of it may be left
        stats["failed on their own (rolled back, checked clean)"] += 1
        assert_nothing_left(lab, host_services, lab_si, j.name, j.state)
        stats["restarts"] += 1
        j.resume, j.start_at = False, now + rng.uniform(0.3, 2.0)

    def step(env: dict[str, str]) -> float:
        """Reap finished runs, start the ones due; returns the time."""
        now = time.monotonic()
        for j in jobs:
            if j.proc is not None:
                reap(j, env, now)
            elif not j.done and now >= j.start_at:
                start(j, env)
        return now

    try:
        t_end = time.monotonic() + CHAOS_SECONDS
        next_chaos = time.monotonic() + rng.uniform(2, 4)
        while time.monotonic() < t_end:
            now = step(chaos_env)
            if now >= next_chaos:
                next_chaos = now + rng.uniform(1.0, 3.0)
                what = rng.random()
                running = [j for j in jobs if j.proc is not None and j.proc.poll() is None]
                if what < 0.5 and running:
                    victim = rng.choice(running)
                    os.kill(victim.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    stats["restores killed"] += 1
                elif what < 0.75:
                    agent.kill()
                    stats["agent kills"] += 1
                    time.sleep(rng.uniform(0.2, 1.0))
                    agent.start()
                else:
                    pids = _nbdkits(lab.dir)
                    if pids:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        stats["nbdkit kills"] += 1
            time.sleep(0.1)
        # chaos over: let every job finish, resuming or restarting without faults
        deadline = time.monotonic() + 240
        while not all(j.done for j in jobs) and time.monotonic() < deadline:
            step(base_env)
            time.sleep(0.2)
    finally:
        for j in jobs:
            if j.proc is not None and j.proc.poll() is None:
                j.proc.kill()
                j.proc.communicate()
        agent.stop()
    print("soak:", json.dumps(stats), "per job:",
          json.dumps({j.name: j.log for j in jobs}))
    assert all(j.done for j in jobs), {j.name: j.log for j in jobs}
    for j in jobs:
        assert find_vm(lab_si, j.name) is not None
        assert_restored(lab, lab_si, j.name, backup.images, ["thick-eager", "thin"])
        assert not list(j.state.glob("restore-*")), f"job state of {j.name} left"
    assert stats["restores killed"] > 0 and stats["resumes"] > 0
