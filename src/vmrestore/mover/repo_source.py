"""Restore one disk from a repository agent on the C core (ext/core/source_repo.c).

Python decides, C moves bytes: this module plans over the wire (the
repository reader over :class:`RemoteSource`, metadata ranges only), opens
and authenticates the data connections (handshake, OPEN of every chain file,
footer checksum = the very restore point that was planned), hands the plain
sockets to the core and waits. The core pulls the stored extents with
pipelined EXTENTS requests into its own read buffers, decompresses, checks
XXH3-128 and writes to any target URI (file, block device, nbd, san, vddk).

Robustness lives here, because only here can we re-authenticate:

- a lost connection (agent restarted, network cut, a corrupted frame) stops
  the job with a TransportError; we reconnect (retry.py: backoff 0.2 s
  doubling to 5 s, with jitter) and run ``plan[completed_prefix:]`` again on
  fresh sockets. After ``retries`` consecutive failures without progress:
  TransportError naming the disk, the plan entry and the disk offset;
- a checksum mismatch (a flipped bit on the wire) stops the job before the
  block is written; the same resume fetches it once more. The same entry
  failing again is a ChecksumError naming disk, block and offset: the stored
  data is bad.

TLS (``repos://``) is not handed to C: Python's ssl session cannot be moved
into the core, so a TLS restore runs mover/remote.py's batch loop (local
files and block devices only). docs/protocol.md, "Proxy data path".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmrestore.checkpoint import Checkpointer
from vmrestore.errors import (
    ChainError,
    ChecksumError,
    MoverError,
    TargetError,
    TransportError,
    UsageError,
    VmrError,
)
from vmrestore.mover.client import Connection, RemoteSource, RepoURL
from vmrestore.plan import KIND_DATA, KIND_ZERO, compare_plan
from vmrestore.retry import Backoff, RetryPolicy

log = logging.getLogger("vmrestore.mover.repo_source")

DEFAULT_READERS = 1
DEFAULT_CONNECTIONS = 2     # per reader: the agent serves one request per connection at a time
DEFAULT_DEPTH = 4           # EXTENTS requests in flight per connection
DEFAULT_BATCH = 4 << 20     # stored bytes per EXTENTS request
RETRIES = 5
IO_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class RemotePlan:
    """A disk plan made over the wire, and what the data connections must re-open."""

    plan: Any                    # repository.plan.DiskPlan (sources are paths relative to root)
    sums: dict[str, bytes]       # footer checksum of every chain file
    metadata_bytes: int          # received while planning
    tls: bool


def plan_remote(url: RepoURL, token: bytes, disk: int, *, point: str | None = None,
                client: str | None = None) -> RemotePlan:
    """Open the chain on the agent (metadata only) and build the disk's plan."""
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    conn = Connection(url, token, client)
    try:
        full = open_chain(RemoteSource(conn, url.path))
        chain = full.at(point) if point else full
        dp = build_plan(chain, disk)
        sums = {p.path: p.footer.checksum for p in chain.points}
        return RemotePlan(dp, sums, conn.wire_bytes, conn.tls)
    finally:
        conn.close()


def open_repository_chain(url: str, token_file: str | None = None,
                          client: str | None = None) -> Any:
    """The chain of a repo:// restore point, read over the wire (for the orchestrator).

    Metadata only (VM config, disks, plans); call ``chain.close()`` when done
    (it closes the connection). Disks are then restored with a DiskTask whose
    ``source`` is the same URL: InProcessMovers / the proxy mover pull the
    data through the core's repository source.
    """
    from vmrestore.mover.client import load_token
    from vmrestore.repository.reader import open_chain
    from vmrestore.retry import RetryPolicy, call

    ru = RepoURL.parse(url)
    token = load_token(token_file)

    def attempt() -> tuple[Any, Any]:
        conn = Connection(ru, token, client)
        try:
            return conn, open_chain(RemoteSource(conn, ru.path))
        except BaseException:
            conn.close()
            raise

    # An agent restarted while we read the metadata is tried again; when the budget
    # is spent our own error is raised as it was (same message, same exit code), a
    # bare socket error as the MoverError it is.
    what = f"repository agent {ru.host}:{ru.port}: reading {ru.path}"

    def give_up(err: BaseException, _retries: int) -> BaseException:
        return err if isinstance(err, VmrError) else MoverError(f"{what}: {err}")

    conn, chain = call(attempt, RetryPolicy(attempts=RETRIES), what, give_up=give_up)
    close = chain.close
    chain.tls = conn.tls  # the agent answered with TLS (a repo:// data path cannot use it)

    def close_all() -> None:
        try:
            close()
        finally:
            conn.close()

    chain.close = close_all
    return chain


@dataclass
class DataConnections:
    """Authenticated sockets for the core, plus what their handshakes cost on the wire."""

    repo: dict[str, Any]
    handshake_bytes: int


def open_data_connections(url: RepoURL, token: bytes, sources: list[str],
                          sums: dict[str, bytes], *, readers: int, per_reader: int,
                          client: str | None = None, depth: int = DEFAULT_DEPTH,
                          batch_bytes: int = DEFAULT_BATCH) -> DataConnections:
    """readers x per_reader connections, every chain file opened and checked on each."""
    conns: list[Connection] = []
    try:
        handles: list[int] = []
        for _ in range(readers * per_reader):
            c = Connection(url, token, client)
            conns.append(c)
            for rel in sources:
                f = c.open(rel)
                if f.footer_sum != sums[rel]:
                    raise ChainError(f"{rel} on the agent is not the restore point that was "
                                     "planned (footer checksum differs)")
                handles.append(f.handle)
        max_ranges = min(c.max_ranges for c in conns)
        max_bulk = min(c.max_bulk for c in conns)
        hs = sum(c.wire_bytes for c in conns)
        fds = []
        for c in conns:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fds.append(c.detach_fd())
        conns = []
    except BaseException:
        for c in conns:
            with contextlib.suppress(Exception):
                c.sock.close()
        raise
    return DataConnections({"fds": fds, "handles": handles, "readers": readers,
                            "max_ranges": max_ranges, "max_bulk": max_bulk,
                            "batch_bytes": min(batch_bytes, max_bulk), "depth": depth,
                            "io_timeout_ms": IO_TIMEOUT_MS}, hs)


@dataclass
class RepoRun:
    """What run_repo_plan did over all its attempts."""

    counters: Any                # pipeline.Counters of the whole plan (summed over attempts)
    wire_bytes: int = 0          # data connections: handshakes + frames + stored extents
    stored_bytes: int = 0        # stored extent bytes received
    requests: int = 0
    reconnects: int = 0
    refetches: int = 0
    connections: int = 0


def _sum_counters(acc: Any, c: Any, prefix_base: int, total: int) -> Any:
    """Counters of the run so far: earlier attempts' bytes + this attempt's."""
    if acc is None:
        return dataclasses.replace(c, completed_prefix=prefix_base + c.completed_prefix,
                                   bytes_total=total)
    add = ("bytes_read", "bytes_decompressed", "bytes_written", "bytes_zeroed", "bytes_skipped",
           "read_ns", "decompress_ns", "write_ns", "entries_done", "elapsed_ns",
           "cmp_entries", "cmp_differ", "cmp_bytes_read", "cmp_known_zero", "bytes_same",
           "compare_ns")
    return dataclasses.replace(c, **{k: getattr(acc, k) + getattr(c, k) for k in add},
                               completed_prefix=prefix_base + c.completed_prefix,
                               entries_total=acc.entries_total, bytes_total=total)


def _durable_only(c: Any, seg: np.ndarray) -> Any:
    """A failed attempt's byte counters limited to its durable prefix ``seg``.

    The next attempt writes everything after that prefix again; counting the failed
    attempt's later writes as well made a disk's written + zeroed + skipped exceed its
    capacity after a reconnect."""
    data = int(seg["length"][seg["kind"] == KIND_DATA].sum())
    zero = int(seg["length"][seg["kind"] == KIND_ZERO].sum())
    same = min(c.bytes_same, data)
    skipped = min(c.bytes_skipped, zero)
    return dataclasses.replace(c, bytes_same=same, bytes_written=min(c.bytes_written, data - same),
                               bytes_skipped=skipped,
                               bytes_zeroed=min(c.bytes_zeroed, zero - skipped))


def run_repo_plan(plan: np.ndarray, sources: list[str], sums: dict[str, bytes], writer: Any,
                  url: RepoURL, token: bytes, *, disk: int = 0, settings: Any = None,
                  per_reader: int = DEFAULT_CONNECTIONS, retries: int = RETRIES,
                  retry_deadline: float | None = None, client: str | None = None,
                  on_counters: Callable[[Any], None] | None = None,
                  interval: float = 0.25,
                  on_checkpoint: Callable[[int], None] | None = None,
                  checkpoint_interval: float = 1.0, compare: bool = False) -> RepoRun:
    """Run ``plan`` into the open ``writer`` from the agent; reconnect and resume on loss.

    ``on_checkpoint(prefix)`` (entries of ``plan``) is called every
    ``checkpoint_interval`` seconds with a prefix that is durable: it is read
    from the pipeline, then the writer is flushed, then the callback runs (in
    a thread beside the pipeline). The end of the run is durable too (every
    lane flushes), which the caller records itself.
    """
    from vmrestore import pipeline as pl

    if url.tls:
        raise UsageError(f"{url}: TLS connections stay in Python; use the batch loop "
                         "(mover.remote) for repos:// URLs")
    s = settings or pl.Settings()
    readers = s.readers or DEFAULT_READERS
    s = dataclasses.replace(s, readers=readers)
    total_bytes = int(plan["length"].sum()) if len(plan) else 0
    ends = np.cumsum(plan["length"].astype(np.int64)) if len(plan) else np.zeros(0, np.int64)
    run = RepoRun(counters=None, connections=readers * per_reader)
    pos = 0                      # entries of `plan` done (durable at the end of the run)
    refetched: set[int] = set()

    def give_up(e: BaseException, tries: int) -> TransportError:
        off = int(ends[pos - 1]) if pos > 0 else 0
        if pos < len(plan):
            off = int(plan["dst_off"][pos])
        return TransportError(
            f"disk {disk}: lost the repository agent {url.host}:{url.port} at disk offset "
            f"{off} (plan entry {pos} of {len(plan)}) and {tries} reconnects failed: {e}")

    backoff = Backoff(RetryPolicy(attempts=retries, deadline=retry_deadline),
                      f"disk {disk}: repository agent {url.host}:{url.port}", give_up=give_up)
    while True:
        try:
            dc = open_data_connections(url, token, sources, sums, readers=readers,
                                       per_reader=per_reader, client=client)
        except (MoverError, OSError) as e:
            backoff.failed(e)     # final errors (auth, another point) re-raise; else wait
            run.reconnects += 1
            continue
        run.wire_bytes += dc.handshake_bytes
        base = pos
        acc = run.counters

        def forward(c: Any, base: int = base, acc: Any = acc) -> None:
            if on_counters is not None:
                on_counters(_sum_counters(acc, c, base, total_bytes))

        job = pl.Job(plan[pos:], sources, writer, disk=disk, settings=s, repo=dc.repo,
                     compare=compare)
        ckpt = (Checkpointer(checkpoint_interval, on_checkpoint, base=base,
                             name=f"ckpt-repo-disk{disk}") if on_checkpoint else None)
        try:
            try:
                job.run(forward, interval, on_start=ckpt.start if ckpt else None)
                err: BaseException | None = None
            except (TransportError, ChecksumError) as e:
                err = e
            finally:
                if ckpt is not None:
                    ckpt.stop()
            c = job.counters()
        finally:
            job.close()
        st = job.source_stats()
        run.wire_bytes += st["wire_bytes"]
        run.stored_bytes += st["bulk_bytes"]
        run.requests += st["requests"]
        if err is not None:
            c = _durable_only(c, plan[base:base + c.completed_prefix])
        run.counters = _sum_counters(acc, c, base, total_bytes)
        if err is None:
            return run
        done = c.completed_prefix
        pos = base + done
        if isinstance(err, ChecksumError):
            idx = base + (getattr(err, "plan_index", None) or 0)
            if idx in refetched:
                raise err
            refetched.add(idx)
            run.refetches += 1
            log.warning("%s: fetching it again", err)
            backoff.reset()
            continue
        if done > 0:
            backoff.reset()       # progress renews the retry budget
        backoff.failed(err)
        run.reconnects += 1


def restore_repo_disk(url: RepoURL, token: bytes, disk: int, target: str, *,
                      point: str | None = None, force: bool = False,
                      target_zeroed: bool | None = None, start_entry: int = 0,
                      threads: int = 0, queue_depth: int = 0, lanes: int = 0, readers: int = 0,
                      buffers: int = 0, max_rate: int = 0, direct: bool = True,
                      retries: int = RETRIES,
                      retry_deadline: float | None = None,
                      connections: int = DEFAULT_CONNECTIONS, client: str | None = None,
                      on_counters: Callable[[Any], None] | None = None,
                      interval: float = 0.1, end_entry: int | None = None,
                      remote_plan: RemotePlan | None = None,
                      on_checkpoint: Callable[[int], None] | None = None,
                      checkpoint_interval: float = 1.0,
                      open_options: dict[str, Any] | None = None, sampler: Any = None,
                      compare: bool = False) -> Any:
    """restore_disk() for a repo:// backup: plan over the wire, data through the C source.

    Runs ``plan[start_entry:end_entry]`` (a resume, or a slice); ``remote_plan``
    reuses a plan already made with :func:`plan_remote` (its metadata bytes are
    then counted again in ``wire_bytes``/``metadata_bytes``: subtract them when
    summing slices). ``on_checkpoint(prefix)`` receives durable prefixes in
    entries of the whole plan (see :func:`run_repo_plan`). ``compare``: quick
    rollback of an existing target; the plan (and its entry numbers) is then
    ``plan.compare_plan`` of the remote plan, and only differing blocks are fetched.
    Returns a vmrestore.disktask.DiskTaskResult of this run with the wire fields filled.
    """
    from vmrestore import pipeline as pl
    from vmrestore.disktask import DiskTaskResult
    from vmrestore.timeline import Sampler
    from vmrestore.transport.uri import OpenOptions, open_target, parse_target

    t0 = time.monotonic()
    rp = remote_plan or plan_remote(url, token, disk, point=point, client=client)
    dp = rp.plan
    entries = compare_plan(dp.plan, dp.block_size) if compare else dp.plan
    end = len(entries) if end_entry is None else end_entry
    if not 0 <= start_entry <= end <= len(entries):
        raise UsageError(f"plan slice {start_entry}..{end} outside the plan "
                         f"(0..{len(entries)})")
    spec = parse_target(target)
    if compare:
        target_zeroed = False
        if spec.kind == "file" and not os.path.exists(spec.path or ""):
            raise TargetError(f"{spec.path}: does not exist; a quick rollback compares with an "
                              "existing disk")
    sampler = sampler or Sampler(spec.transport)
    writer = open_target(spec, dp.capacity, OpenOptions(
        force=force or start_entry > 0, target_zeroed=target_zeroed, direct=direct,
        retries=3, **(open_options or {})))
    try:
        settings = pl.Settings(readers=readers, threads=threads, lanes=lanes,
                               queue_depth=queue_depth, buffers=buffers, max_rate=max_rate)
        if compare and not writer.capabilities()["read"]:
            raise UsageError(f"{target}: the {writer.name} target cannot be read back, so a "
                             "quick rollback cannot compare it")
        run = run_repo_plan(entries[start_entry:end], dp.sources, rp.sums, writer, url, token,
                            disk=disk, settings=settings, per_reader=connections,
                            retries=retries, retry_deadline=retry_deadline, client=client,
                            on_counters=sampler.segment(on_counters), interval=interval,
                            on_checkpoint=(None if on_checkpoint is None else
                                           lambda p: on_checkpoint(start_entry + p)),
                            checkpoint_interval=checkpoint_interval, compare=compare)
        name, note = writer.name, writer.note
        mode = getattr(writer, "transport_mode", None) or spec.transport
    finally:
        writer.close()
    seconds = time.monotonic() - t0
    c = run.counters
    resumed = int(entries["length"][:start_entry].sum()) if start_entry else 0
    return DiskTaskResult.from_counters(
        c, disk=disk, target=target, transport=mode, writer=name, capacity=dp.capacity,
        seconds=seconds, entries=len(entries), completed_prefix=start_entry + c.completed_prefix,
        settings={"connections": run.connections, **({"max_rate": max_rate} if max_rate else {})},
        compare=compare, note=note,
        source="repository", resumed_bytes=resumed,
        wire_bytes=rp.metadata_bytes + run.wire_bytes, stored_bytes=run.stored_bytes,
        metadata_bytes=rp.metadata_bytes, reconnects=run.reconnects, refetches=run.refetches,
        connections=run.connections, tls=False, timeline=sampler.as_dict())
