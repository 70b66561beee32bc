"""The proxy side of a plan: what runs in a proxy's Dask worker.

:func:`run_disk` is the function a disk task runs on its worker: the same
in-process mover the orchestrator uses for a single restore (the core, GIL
released), with progress published as Dask worker events (topic
:data:`TOPIC`) so that the orchestrator's live view sees bytes move; the
durable checkpoints are written by the mover itself, fenced by the task's
attempt number. :func:`run_proxy_worker` is ``vmrestore proxy-worker``: a
Dask worker named after its proxy, ``resources={'slot': K}``, advertising the
proxy's facts (cluster.ProxyFacts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from vmrestore.fleet.cluster import DASK_CONFIG, ProxyFacts, proxy_facts
from vmrestore.infra import Proxy

log = logging.getLogger("vmrestore.fleet")

TOPIC = "vmrestore-disk-progress"
PROGRESS_EVERY = 0.5  # seconds between progress events of one disk


def run_disk(task: Any, key: str, attempt: int, once: str | None = None) -> Any:
    """Run one disk task on this worker; returns the mover's outcome.

    ``once`` is a file beside the checkpoint, created exclusively before the first
    write: Dask may run a task again after its worker died (a result lost with
    the worker is recomputed), but an attempt of a disk task runs at most once;
    its successor is a new attempt the orchestrator grants.
    """
    import os

    from vmrestore.errors import MoverError

    # Pin a device target first, then claim the attempt: a device opened before the
    # orchestrator revoked it is still this disk's (revoking a held device only makes it
    # read-only), and one opened after was revoked after the attempt was given up (the
    # orchestrator burns the run-once file first), so the claim below fails.
    target = getattr(task, "target", "")
    pin = os.open(target, os.O_RDONLY) if target.startswith("/dev/") else None
    try:
        if once:
            try:
                os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                raise MoverError(f"{key}: attempt {attempt} was given up or already ran; a "
                                 "rerun by the cluster is refused") from None
        return _run(task, key, attempt)
    finally:
        if pin is not None:
            os.close(pin)


def _run(task: Any, key: str, attempt: int) -> Any:
    from distributed import get_worker

    from vmrestore.mover.session import InProcessMovers

    worker = get_worker()
    last = [0.0]

    def progress(p: Any) -> None:
        if getattr(p, "durable", False):  # a checkpoint record, not a progress sample
            return
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or p.done >= p.total:
            last[0] = now
            worker.log_event(TOPIC, {"key": key, "attempt": attempt, "done": int(p.done),
                                     "total": int(p.total)})

    movers = InProcessMovers()
    movers.open()
    try:
        return movers.restore_disk(task, progress)
    finally:
        movers.close()


async def _serve(scheduler: str, proxy: Proxy) -> None:
    from distributed import Worker

    async with Worker(scheduler, name=proxy.name, nthreads=proxy.slots,
                      resources={"slot": proxy.slots},
                      plugins={ProxyFacts({proxy.name: proxy_facts(proxy)})}) as w:
        log.info("proxy %s joined %s as %s (%d slots)", proxy.name, scheduler, w.address,
                 proxy.slots)
        await w.finished()


def run_proxy_worker(scheduler: str, proxy: Proxy) -> None:
    """Join ``scheduler`` as the worker of ``proxy``; returns when the worker stops."""
    import dask

    with dask.config.set(DASK_CONFIG):
        asyncio.run(_serve(scheduler, proxy))
