"""The disk task and its driver: JSON form, the retry rule, resume and attempt fencing.

Real backups made by `vmrestore backup create`, restored by the real core into
files; the retry rule is checked with an injected clock (no waiting).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import msgspec
import pytest

from core_helpers import backup, make_image
from vmrestore.checkpoint import CheckpointLease
from vmrestore.disktask import DiskProgress, DiskTask, DiskTaskResult, TaskSettings, run_disk_task
from vmrestore.errors import (
    AuthenticationError,
    StaleAttemptError,
    TransportError,
    UsageError,
)
from vmrestore.jobstate import read_checkpoint
from vmrestore.retry import Backoff, RetryPolicy, retryable


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("disktask")
    data = make_image(d / "disk.img", 24, seed=5)
    return backup(d / "disk.img", d / "full.vmrb"), data


def test_task_json_round_trip_and_refusals() -> None:
    t = DiskTask(disk=1, source="repo://h:1/a.vmrb", target="nbd://x/e", attempt=3,
                 settings=TaskSettings(threads=2, token_file="/t"))
    assert DiskTask.from_json(t.to_json()) == t
    with pytest.raises(UsageError, match="unknown field"):
        DiskTask.from_json(b'{"disk": 0, "source": "a", "target": "b", "atempt": 2}')
    with pytest.raises(UsageError, match="attempt must be >= 1"):
        DiskTask.from_json(b'{"disk": 0, "source": "a", "target": "b", "attempt": 0}')
    with pytest.raises(UsageError, match=r"settings\.threads"):
        DiskTask(disk=0, source="a", target="b", settings=TaskSettings(threads=-1)).validate()


def test_backoff_waits_doubling_then_gives_up_and_progress_renews_it() -> None:
    waits: list[float] = []
    b = Backoff(RetryPolicy(attempts=3, base=0.2, cap=0.5, jitter=0.0), "agent",
                sleep=waits.append)
    for _ in range(3):
        b.failed(ConnectionResetError(104, "reset"))
    assert waits == [0.2, 0.4, 0.5]
    with pytest.raises(TransportError, match="agent: 3 retries failed"):
        b.failed(TimeoutError("slow"))
    b.reset()
    b.failed(ConnectionRefusedError(111, "refused"))
    assert waits[-1] == 0.2 and b.total == 5


def test_backoff_jitter_deadline_and_final_errors() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(d: float) -> None:
        waits.append(d)
        now[0] += d

    b = Backoff(RetryPolicy(attempts=100, base=1.0, cap=1.0, jitter=0.25, deadline=2.5),
                "x", sleep=sleep, clock=lambda: now[0], rng=random.Random(7))
    with pytest.raises(TransportError):
        for _ in range(10):
            b.failed(ConnectionResetError(104, "reset"))
    assert all(0.75 <= w <= 1.25 for w in waits[:-1]) and now[0] <= 2.5 + 1e-9
    with pytest.raises(AuthenticationError):   # refused login: final, not retried
        b.failed(AuthenticationError("bad token"))
    assert not retryable(FileNotFoundError(2, "gone")) and retryable(OSError("no errno"))


def test_run_resume_from_checkpoint_and_result_document(point, tmp_path: Path) -> None:
    bk, data = point
    out, ck = tmp_path / "d.img", tmp_path / "d.ckpt"
    seen: list[DiskProgress] = []
    task = DiskTask(disk=0, source=str(bk), target=str(out), checkpoint=str(ck), vm="vm1",
                    settings=TaskSettings(stall=0.01))
    r = run_disk_task(task, seen.append)
    assert out.read_bytes() == data
    durable = [p.prefix for p in seen if p.durable]
    assert durable == sorted(durable) and durable[-1] == r.entries and len(durable) >= 4
    c = read_checkpoint(ck)
    assert c is not None and (c.prefix, c.attempt) == (r.entries, 1)
    assert r.bytes_written + r.bytes_zeroed + r.bytes_skipped == len(data) == r.capacity
    assert r.verified_blocks > 0 and r.attempts >= 8 and r.timeline["t"]
    back = DiskTaskResult.from_dict(msgspec.json.decode(msgspec.json.encode(r.as_dict())))
    assert back.bytes_written == r.bytes_written and back.vm == "vm1"
    # attempt 2 resumes from the durable prefix (the whole plan): nothing is written again
    out.write_bytes(b"\xee" * len(data))
    r2 = run_disk_task(msgspec.structs.replace(task, attempt=2,
                                               settings=TaskSettings(force=True)))
    assert r2.start_entry == r.entries and r2.bytes_written == 0
    assert out.read_bytes() == b"\xee" * len(data)


def test_stale_attempt_refused_before_writing_and_mid_run(point, tmp_path: Path) -> None:
    bk, _ = point
    out, ck = tmp_path / "d.img", tmp_path / "d.ckpt"
    CheckpointLease(ck, 0, 5).claim()
    with pytest.raises(StaleAttemptError, match="attempt 5 holds"):
        run_disk_task(DiskTask(disk=0, source=str(bk), target=str(out), checkpoint=str(ck),
                               attempt=4))
    assert not out.exists()

    # attempt 6 runs in slices; attempt 7 takes the disk after its first checkpoint
    ck2 = tmp_path / "e.ckpt"
    first = threading.Event()
    task = DiskTask(disk=0, source=str(bk), target=str(tmp_path / "e.img"), checkpoint=str(ck2),
                    attempt=6, settings=TaskSettings(stall=0.3, checkpoint_interval=0.05))
    err: list[BaseException] = []

    def run() -> None:
        try:
            run_disk_task(task, lambda p: p.durable and p.prefix and first.set())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert first.wait(30)
    CheckpointLease(ck2, 0, 7).claim()
    t.join(30)
    assert err and isinstance(err[0], StaleAttemptError)
    c = read_checkpoint(ck2)
    assert c is not None and c.attempt == 7 and c.prefix < c.entries


def test_agent_lost_while_planning_is_retried_then_named(monkeypatch) -> None:
    """An agent killed between OPEN and the chain's parents (seen in the soak): the
    planning step reconnects like the data step, and gives up with one typed line."""
    from vmrestore import disktask
    from vmrestore.mover import repo_source
    from vmrestore.mover.client import RepoURL

    calls: list[int] = []
    fail_first = 2

    def flaky(url, token, disk, *, point=None, client=None):
        calls.append(disk)
        if len(calls) <= fail_first:
            raise ConnectionError("connection closed by peer (0 of 16 bytes received)")
        return "planned"

    monkeypatch.setattr(repo_source, "plan_remote", flaky)
    task = DiskTask(disk=2, source="repo://127.0.0.1:9/a.vmrb", target="/dev/null",
                    settings=TaskSettings(retries=2))
    url = RepoURL.parse(task.source)
    assert disktask._plan_remote_retrying(task, url, b"t") == "planned"
    assert len(calls) == 3

    calls.clear()
    fail_first = 10
    with pytest.raises(TransportError, match=r"disk 2: planning from the repository agent "
                                             r"127\.0\.0\.1:9: 2 retries failed"):
        disktask._plan_remote_retrying(task, url, b"t")
    assert len(calls) == 3
