"""One unit of data-phase work and its one driver: restore one disk of one VM (docs/disktask.md).

A :class:`DiskTask` says everything a proxy needs to write one disk: which
restore point (a local backup path, or a ``repo://`` / ``repos://`` URL of a
repository agent), which disk, which target URI through which transport,
where the durable checkpoint lives, the core's settings, and the attempt
number that fences a stale run. It is a frozen msgspec Struct, so the same
task runs in this process, in a ``vmrestore proxy-mover`` subprocess (JSON
in, JSON lines out, docs/proxy-mover.md) or on a Dask worker.

:func:`run_disk_task` is the only driver of the data phase. It plans the disk
(locally or over the wire), claims the checkpoint for its attempt (a lower
attempt than the recorded one stops with StaleAttemptError), resumes from the
durable prefix, runs the plan through one of three engines and records
checkpoints (prefix, flush, then the fsynced record: checkpoint.py):

- ``local``: chain files on this machine, the core reads them (restore_disk.run_plan);
- ``repository``: a ``repo://`` agent, the core pulls the extents itself and
  reconnects on loss (mover/repo_source.run_repo_plan);
- ``repository-tls``: a ``repos://`` agent; Python's TLS session cannot move
  into C, so mover/remote.py's batch loop writes (local files and devices).

Reconnects everywhere follow retry.py. Callers: restore_disk(),
``vmrestore restore-disk``, ``vmrestore vddk restore-disk``, the movers of
mover/session.py and the proxy mover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from vmrestore.errors import Interrupted, UsageError

log = logging.getLogger("vmrestore.disktask")

TASK_VERSION = 1
MiB = 1 << 20


class TaskSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the core runs one disk; 0 means "the measured default" (docs/core.md)."""

    threads: int = 0              # decompress + verify threads
    queue_depth: int = 0          # requests in flight per writer lane
    lanes: int = 0                # writer lanes (NBD connections / file writer threads)
    readers: int = 0              # reader threads
    buffers: int = 0              # block buffers in the pool
    max_rate: int = 0             # data bytes per second written at most (0 = no limit)
    direct: bool = True           # O_DIRECT on files and devices
    connections: int = 0          # repository: sockets per reader (core) / fetch threads (TLS)
    retries: int = 5              # reconnects without progress before giving up (retry.py)
    retry_deadline: float | None = None  # seconds of failing reconnects before giving up
    client: str | None = None     # name shown to the repository agent
    token_file: str | None = None  # the agent's token (else $VMRESTORE_REPO_TOKEN); never the token
    force: bool = False           # overwrite an existing regular file target
    target_zeroed: bool | None = None  # the target reads as zeros (None: only a file we create)
    checkpoint_interval: float = 1.0   # seconds between durable checkpoints
    progress_interval: float = 0.1     # seconds between progress callbacks and timeline samples
    max_request: int = 0          # vddk: bytes per WriteAsync (0: vddk.DEFAULT_MAX_REQUEST)
    max_inflight: int = 0         # vddk: bytes of WriteAsync in flight (0: the default)
    vddk_libdir: str | None = None  # vddk: VixDiskLib directory (else the URI's / environment)
    compare: bool = False         # quick rollback: hash what the target holds, write what differs
    stall: float = 0.0            # tests only: eight slices with a checkpoint + pause after each


class DiskTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Restore disk ``disk`` of restore point ``source`` (``point``) to ``target``.

    TLS and its CA travel in the source URL (``repos://…?ca=PEM``), NBD TLS and
    the flush policy in the target URI (``nbds://…``, ``flush-every=MiB``).
    ``start_entry`` None resumes from the checkpoint file (when its plan
    digest matches); a number overrides it (the proxy mover's v1 jobs).
    """

    disk: int
    source: str
    target: str
    version: int = TASK_VERSION
    job_id: str = ""
    vm: str = ""
    point: str | None = None
    transport: str = "auto"       # for reports; the target URI decides the writer
    checkpoint: str | None = None  # checkpoint file (jobstate format), None: no checkpoints
    start_entry: int | None = None
    attempt: int = 1              # fencing token: a lower attempt than the recorded one stops
    settings: TaskSettings = msgspec.field(default_factory=TaskSettings)

    def validate(self) -> DiskTask:
        """Refuse what no engine can run (a UsageError naming the field)."""
        where = f"disk task {self.job_id + ' ' if self.job_id else ''}disk {self.disk}"
        if self.version != TASK_VERSION:
            raise UsageError(f"{where}: version {self.version} not supported (this build runs "
                             f"{TASK_VERSION})")
        if self.disk < 0:
            raise UsageError(f"{where}: disk index must be >= 0")
        if not self.source or not self.target:
            raise UsageError(f"{where}: source and target are required")
        if self.attempt < 1:
            raise UsageError(f"{where}: attempt must be >= 1")
        if self.start_entry is not None and self.start_entry < 0:
            raise UsageError(f"{where}: start_entry must be >= 0")
        s = self.settings
        for name in ("threads", "queue_depth", "lanes", "readers", "buffers", "connections",
                     "retries", "max_request", "max_inflight", "max_rate"):
            if getattr(s, name) < 0:
                raise UsageError(f"{where}: settings.{name} must be >= 0")
        if s.checkpoint_interval <= 0 or s.progress_interval <= 0 or s.stall < 0:
            raise UsageError(f"{where}: intervals must be > 0 and stall >= 0")
        return self

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> DiskTask:
        try:
            return msgspec.json.decode(data, type=cls).validate()
        except msgspec.ValidationError as e:
            raise UsageError(f"disk task: {e}") from None
        except msgspec.DecodeError as e:
            raise UsageError(f"disk task: not valid JSON ({e})") from None


class DiskProgress(msgspec.Struct, frozen=True):
    """A progress sample, or (``durable``) a checkpoint the target holds on stable storage."""

    disk: int
    done: int                     # disk bytes done (written + zeroed + skipped, resumed included)
    total: int                    # the disk's capacity
    prefix: int = 0               # leading plan entries: completed, or durable when ``durable``
    durable: bool = False         # a checkpoint: plan[:prefix] is flushed on the target
    entries: int = 0              # plan length
    digest: str = ""              # of the plan (jobstate.plan_digest)
    attempt: int = 0


class DiskTaskResult(msgspec.Struct, kw_only=True):
    """What one disk task did; ``as_dict()`` is restore-disk's --json and the mover's disk_done."""

    disk: int
    target: str
    job_id: str = ""
    vm: str = ""
    attempt: int = 1              # the task's fencing token
    transport: str = ""           # what the writer did (hotadd/nbd/nbdssl/san/vddk mode)
    writer: str = ""              # the core writer (file, nbd, san, vddk, python-tls)
    source: str = "local"         # local | repository
    capacity: int = 0
    entries: int = 0              # plan length
    start_entry: int = 0          # resumed from (durable checkpoint or the task's start_entry)
    completed_prefix: int = 0
    resumed_bytes: int = 0        # disk bytes before start_entry
    bytes_written: int = 0        # this run only: with a resume they sum to capacity - resumed
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    bytes_read: int = 0
    verified_blocks: int = 0      # data blocks checked against their XXH3-128 and written
    attempts: int = 0             # pipeline runs: slices + reconnects
    reconnects: int = 0
    refetches: int = 0
    wire_bytes: int = 0           # every byte received from a repository agent
    stored_bytes: int = 0
    metadata_bytes: int = 0
    connections: int = 0
    tls: bool = False
    seconds: float = 0.0          # wall time of the task (planning included)
    plan_seconds: float = 0.0     # of which planning
    elapsed_ns: int = 0           # the core's run time, summed over runs
    busy: dict[str, float] = msgspec.field(default_factory=dict)  # read/decompress/write 0..1
    busy_ns: dict[str, float] = msgspec.field(default_factory=dict)
    peak_rss: int = 0
    settings: dict[str, int] = msgspec.field(default_factory=dict)
    notes: list[str] = msgspec.field(default_factory=list)
    timeline: dict[str, Any] = msgspec.field(default_factory=dict)  # vmrestore.timeline samples
    # Quick rollback (settings.compare): the target was compared block by block first.
    quick_rollback: bool = False
    compared_entries: int = 0     # plan entries compared (data blocks + zero blocks)
    differing_entries: int = 0    # of those, entries the target did not hold (restored)
    compare_read_bytes: int = 0   # bytes read from the target to compare
    known_zero_bytes: int = 0     # zero bytes the target reported as holes (not read)
    bytes_same: int = 0           # bytes the target already held (not written)

    @property
    def mb_per_s(self) -> float:
        """Logical MiB per second of this run (resumed part excluded)."""
        moved = self.bytes_written + self.bytes_zeroed + self.bytes_skipped
        return moved / MiB / self.seconds if self.seconds > 0 else 0.0

    @property
    def wire_ratio(self) -> float:
        logical = self.bytes_written + self.bytes_zeroed + self.bytes_skipped
        return self.wire_bytes / logical if logical and self.wire_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self)
        d["busy_pct"] = {k: round(100 * v, 1) for k, v in self.busy.items()}
        d["seconds"] = round(self.seconds, 3)
        d["mb_per_s"] = round(self.mb_per_s, 1)
        if self.source == "repository":
            d["wire_ratio"] = round(self.wire_ratio, 4)
        return d

    @classmethod
    def from_counters(cls, c: Any, *, settings: dict[str, int] | None = None,
                      compare: bool = False, note: str = "", **fields: Any) -> DiskTaskResult:
        """One engine run's result from its final core counters (pipeline.Counters)."""
        from vmrestore.restore_disk import peak_rss

        return cls(
            bytes_written=c.bytes_written, bytes_zeroed=c.bytes_zeroed,
            bytes_skipped=c.bytes_skipped, bytes_read=c.bytes_read, peak_rss=peak_rss(),
            busy=c.busy, busy_ns=c.busy_ns, elapsed_ns=c.elapsed_ns,
            settings={"readers": c.readers, "threads": c.threads, "lanes": c.lanes,
                      "queue_depth": c.queue_depth, "buffers": c.buffers, **(settings or {})},
            notes=[note] if note else [], quick_rollback=compare,
            compared_entries=c.cmp_entries, differing_entries=c.cmp_differ,
            compare_read_bytes=c.cmp_bytes_read, known_zero_bytes=c.cmp_known_zero,
            bytes_same=c.bytes_same, **fields)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiskTaskResult:
        """Back from as_dict() (a disk_done event); derived and unknown keys are dropped."""
        fields = set(cls.__struct_fields__)
        return msgspec.convert({k: v for k, v in d.items() if k in fields}, cls)


Progress = Callable[[DiskProgress], None]


@dataclass
class _Planned:
    """A disk's plan and how to reach its source."""

    kind: str                     # local | repository | repository-tls
    plan: Any                     # repository.plan.DiskPlan
    entries: Any                  # the plan array to run (plan.plan, or its compare plan)
    url: Any = None               # mover.client.RepoURL
    token: bytes = b""
    remote: Any = None            # mover.repo_source.RemotePlan
    metadata_bytes: int = 0


def _plan_remote_retrying(task: DiskTask, url: Any, token: bytes) -> Any:
    """Plan over the wire; an agent lost while planning is reconnected like one lost mid-data."""
    from vmrestore.mover.repo_source import plan_remote
    from vmrestore.retry import RetryPolicy, call

    s = task.settings
    return call(lambda: plan_remote(url, token, task.disk, point=task.point, client=s.client),
                RetryPolicy(attempts=s.retries, deadline=s.retry_deadline),
                f"disk {task.disk}: planning from the repository agent {url.host}:{url.port}")


def _plan(task: DiskTask) -> _Planned:
    from vmrestore.mover.url import is_repo_url

    if is_repo_url(task.source):
        from vmrestore.mover.client import RepoURL, load_token

        url = RepoURL.parse(task.source)
        token = load_token(task.settings.token_file)
        if task.settings.compare and url.tls:
            raise UsageError(f"disk {task.disk}: a quick rollback (compare) runs in the core: "
                             "repo:// or a local backup, not repos:// (TLS stays in Python)")
        rp = _plan_remote_retrying(task, url, token)
        entries = rp.plan.plan
        if task.settings.compare:
            from vmrestore.plan import compare_plan

            entries = compare_plan(entries, rp.plan.block_size)
        return _Planned("repository-tls" if url.tls else "repository", rp.plan, entries,
                        url, token, rp, rp.metadata_bytes)
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    full = open_chain(task.source)
    try:
        chain = full.at(task.point) if task.point else full
        dp = build_plan(chain, task.disk)
    finally:
        full.close()
    if task.settings.compare:
        from vmrestore.plan import compare_plan

        return _Planned("local", dp, compare_plan(dp.plan, dp.block_size))
    return _Planned("local", dp, dp.plan)


class _Run:
    """State of one run_disk_task call: the plan's byte offsets, checkpoints, progress."""

    def __init__(self, task: DiskTask, p: _Planned, progress: Progress | None,
                 cancel: threading.Event | None) -> None:
        import numpy as np

        from vmrestore.jobstate import plan_digest

        self.task, self.p, self.cb, self.cancel = task, p, progress, cancel
        plan = p.entries
        self.entries = len(plan)
        self.ends = np.cumsum(plan["length"].astype(np.int64)) if self.entries else None
        self.digest = plan_digest(plan)
        self.capacity = int(p.plan.capacity)
        self.lease: Any = None
        self.durable = -1
        self.lock = threading.Lock()
        from vmrestore.timeline import Sampler
        from vmrestore.transport.uri import parse_target

        self.sampler = Sampler(parse_target(task.target).transport)

    def done_at(self, prefix: int) -> int:
        return int(self.ends[prefix - 1]) if prefix > 0 else 0

    def claim(self) -> int:
        """Take the checkpoint for this attempt; the entry to start from."""
        from vmrestore.checkpoint import CheckpointLease

        task = self.task
        found = None
        if task.checkpoint:
            self.lease = CheckpointLease(task.checkpoint, task.disk, task.attempt)
            found = self.lease.claim()
        if task.start_entry is not None:
            start = task.start_entry
        elif found is not None and found.digest == self.digest and found.entries == self.entries:
            start = found.prefix
        else:
            if found is not None and found.prefix:
                log.warning("disk %d: checkpoint %s is of another plan; starting over",
                            task.disk, task.checkpoint)
            start = 0
        if not 0 <= start <= self.entries:
            raise UsageError(f"disk {task.disk}: start entry {start} outside the plan "
                             f"(0..{self.entries})")
        self.durable = start
        return start

    def record(self, prefix: int) -> None:
        """``plan[:prefix]`` is flushed on the target: record it (fenced), then say so."""
        with self.lock:
            if prefix <= self.durable:
                return
            self.durable = prefix
            done = self.done_at(prefix)
            if self.lease is not None:
                self.lease.record(prefix, self.entries, self.digest, done)
        if self.cb is not None:
            self.cb(DiskProgress(self.task.disk, done, self.capacity, prefix, True,
                                 self.entries, self.digest, self.task.attempt))

    def counters(self, base: int, done: int, prefix: int) -> None:
        """A progress sample from an engine: ``done`` bytes and ``prefix`` entries of its slice."""
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted(f"disk {self.task.disk}: cancelled")
        if self.cb is not None:
            self.cb(DiskProgress(self.task.disk, self.done_at(base) + done, self.capacity,
                                 base + prefix, entries=self.entries, attempt=self.task.attempt))

    def pause(self, b: int) -> None:
        """Test hook ``stall``: wait after a slice (a kill -9 lands mid-disk)."""
        if self.task.settings.stall > 0 and b < self.entries:
            log.info("disk %d: stalling %.1fs after entry %d (test hook)", self.task.disk,
                     self.task.settings.stall, b)
            if self.cancel is not None:
                if self.cancel.wait(self.task.settings.stall):
                    raise Interrupted(f"disk {self.task.disk}: cancelled")
            else:
                time.sleep(self.task.settings.stall)


def slices(start: int, total: int, stall: float) -> list[tuple[int, int]]:
    """Plan ranges to run: all at once, or (test hook ``stall``) in eight slices."""
    if stall <= 0 or total <= start:
        return [(start, total)]
    step = max(1, (total - start) // 8)
    return [(a, min(a + step, total)) for a in range(start, total, step)]


def run_disk_task(task: DiskTask, progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> DiskTaskResult:
    """Run one disk task to the end: plan, claim, resume, write, checkpoint; the one driver.

    ``progress(DiskProgress)`` gets samples every ``settings.progress_interval``
    seconds and every durable checkpoint (``durable=True``, in order). Setting
    ``cancel`` stops the run at the next sample with Interrupted (the
    checkpoint stays: a rerun resumes). Errors are the typed ones of
    errors.py; a stale attempt raises StaleAttemptError before writing.
    """
    from vmrestore import ownership
    from vmrestore.restore_disk import peak_rss

    task.validate()
    # The point file named is protected too when an earlier point is read (the engines
    # check the files of the chain they read).
    ownership.refuse_overlap(ownership.target_path(task.target), [task.source],
                             what="restore target",
                             why="a file of the backup chain this restore reads")
    if task.source.startswith("repos://"):
        _check_tls_target(task)   # refused before anything connects or is written
    t0 = time.monotonic()
    p = _plan(task)
    run = _Run(task, p, progress, cancel)
    plan_seconds = time.monotonic() - t0
    start = run.claim()
    out = DiskTaskResult(disk=task.disk, target=task.target, job_id=task.job_id, vm=task.vm,
                         attempt=task.attempt, capacity=run.capacity, entries=run.entries,
                         start_entry=start, resumed_bytes=run.done_at(start),
                         source="local" if p.kind == "local" else "repository",
                         wire_bytes=p.metadata_bytes, metadata_bytes=p.metadata_bytes,
                         plan_seconds=plan_seconds)
    if p.remote is not None:
        out.tls = bool(p.remote.tls)
    engine = {"local": _run_local, "repository": _run_repo, "repository-tls": _run_tls}[p.kind]
    for a, b in slices(start, run.entries, task.settings.stall):
        if cancel is not None and cancel.is_set():
            raise Interrupted(f"disk {task.disk}: cancelled")
        engine(run, a, b, out)
        run.record(b)  # every engine ends a run with a final flush: all of [a, b) is durable
        out.attempts += 1
        run.pause(b)
    from vmrestore.plan import KIND_DATA

    out.verified_blocks = int((p.entries["kind"][start:] == KIND_DATA).sum())
    out.completed_prefix = run.durable
    out.seconds = time.monotonic() - t0
    if out.elapsed_ns > 0:
        out.busy = {k: min(1.0, v / out.elapsed_ns) for k, v in out.busy_ns.items()}
    out.timeline = run.sampler.as_dict()
    out.peak_rss = peak_rss()
    if not out.transport:
        out.transport = task.transport
    if progress is not None:
        progress(DiskProgress(task.disk, run.capacity, run.capacity, run.entries,
                              entries=run.entries, attempt=task.attempt))
    return out


def _add(out: DiskTaskResult, res: Any) -> None:
    """Sum one engine run (a DiskTaskResult or a RemoteResult) into the task's result."""
    for k in ("bytes_written", "bytes_zeroed", "bytes_skipped", "bytes_read", "reconnects",
              "refetches", "stored_bytes", "elapsed_ns", "compared_entries",
              "differing_entries", "compare_read_bytes", "known_zero_bytes", "bytes_same"):
        setattr(out, k, getattr(out, k) + int(getattr(res, k, 0)))
    out.quick_rollback = out.quick_rollback or bool(getattr(res, "quick_rollback", False))
    out.attempts += int(getattr(res, "reconnects", 0))
    for k, v in (getattr(res, "busy_ns", None) or {}).items():
        out.busy_ns[k] = out.busy_ns.get(k, 0.0) + v
    out.connections = int(getattr(res, "connections", 0)) or out.connections
    settings = getattr(res, "settings", None)
    if settings:
        out.settings = dict(settings)
    for n in getattr(res, "notes", None) or []:
        if n not in out.notes:
            out.notes.append(n)
    writer = getattr(res, "writer", "")
    if writer:
        out.writer = writer
    transport = getattr(res, "transport", "")
    if transport:
        out.transport = transport


def _open_options(task: DiskTask) -> dict[str, Any]:
    """The engines' common keywords: core settings, target options, the sampling interval."""
    s = task.settings
    extra = {k: getattr(s, k) for k in ("vddk_libdir", "max_request", "max_inflight")
             if getattr(s, k)}
    return {"threads": s.threads, "queue_depth": s.queue_depth, "lanes": s.lanes,
            "readers": s.readers, "buffers": s.buffers, "max_rate": s.max_rate,
            "direct": s.direct,
            "target_zeroed": s.target_zeroed, "interval": s.progress_interval,
            "open_options": extra}


def _run_local(run: _Run, a: int, b: int, out: DiskTaskResult) -> None:
    """Chain files on this machine: the core reads them (restore_disk.run_plan)."""
    from vmrestore.checkpoint import Checkpointer
    from vmrestore.restore_disk import run_plan

    task, dp, s = run.task, run.p.plan, run.task.settings
    with Checkpointer(s.checkpoint_interval, run.record, base=a,
                      name=f"ckpt-disk{task.disk}") as ckpt:
        res = run_plan(run.p.entries[a:b], dp.sources, task.target, disk=task.disk,
                       capacity=dp.capacity, force=s.force or a > 0 or s.compare,
                       compare=s.compare,
                       on_counters=lambda c: run.counters(a, c.bytes_done, c.completed_prefix),
                       on_start=ckpt.start, sampler=run.sampler, **_open_options(task))
    _add(out, res)


def _run_repo(run: _Run, a: int, b: int, out: DiskTaskResult) -> None:
    """A repo:// agent: the core pulls the extents, reconnecting on loss (repo_source)."""
    from vmrestore.mover.repo_source import DEFAULT_CONNECTIONS, restore_repo_disk

    task, s = run.task, run.task.settings
    res = restore_repo_disk(
        run.p.url, run.p.token, task.disk, task.target, point=task.point,
        force=s.force or a > 0 or s.compare, start_entry=a, end_entry=b, remote_plan=run.p.remote,
        retries=s.retries, retry_deadline=s.retry_deadline,
        connections=s.connections or DEFAULT_CONNECTIONS, client=s.client,
        on_counters=lambda c: run.counters(a, c.bytes_done, c.completed_prefix),
        on_checkpoint=run.record, checkpoint_interval=s.checkpoint_interval,
        sampler=run.sampler, compare=s.compare, **_open_options(task))
    _add(out, res)
    out.wire_bytes += res.wire_bytes - res.metadata_bytes


def _check_tls_target(task: DiskTask) -> None:
    target = task.target.removeprefix("file://")
    if "://" in target or target.startswith("san:"):
        raise UsageError(f"disk {task.disk}: target {task.target}: over TLS (repos://) this "
                         "build writes local files and block devices only (TLS stays in "
                         "Python); use repo:// for nbd/san/vddk targets")


def _run_tls(run: _Run, a: int, b: int, out: DiskTaskResult) -> None:
    """A repos:// agent: mover/remote.py's batch loop (local files and block devices)."""
    from vmrestore.mover.remote import CONNECTIONS, run_tls_plan

    task, s = run.task, run.task.settings
    res = run_tls_plan(
        run.p.remote, run.p.url, run.p.token, task.disk, task.target.removeprefix("file://"),
        start_entry=a, end_entry=b, connections=s.connections or CONNECTIONS,
        force=s.force or a > 0, retries=s.retries, retry_deadline=s.retry_deadline,
        client=s.client, target_zeroed=s.target_zeroed, max_rate=s.max_rate,
        progress=lambda done, prefix: run.counters(a, done, prefix),
        on_checkpoint=run.record, checkpoint_interval=s.checkpoint_interval,
        interval=s.progress_interval)
    _add(out, res)
    out.wire_bytes += res.wire_bytes
    out.writer = "python-tls"
    out.transport = "hotadd"
