"""Proxies as Dask workers: the embedded LocalCluster, a real cluster, and `proxy-worker`.

A proxy is a Dask worker named after it with ``resources={'slot': K}``; it
advertises what it can do (its proxy VM for HotAdd, the datastores it reaches,
the LUNs it sees, its transports) as ``worker.vmr_proxy``, set by
:class:`ProxyFacts` (a worker plugin). The orchestrator reads them with
``client.run`` and turns them into the scheduler's ``ProxySpec`` and
``infra.Proxy``. Without ``--scheduler`` a LocalCluster runs the infra's
proxies on this machine, one worker process (with its nanny) per proxy; with
``--scheduler`` the same code talks to a real cluster whose workers were
started by ``vmrestore proxy-worker``. Limits are not Dask's business: disk
tasks carry ``resources={'slot': 1}`` only so that Dask never runs more than
K of them on a worker, while admission (vmrestore.schedule) decides.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from vmrestore.errors import UsageError
from vmrestore.infra import MODES, Infra, Proxy

log = logging.getLogger("vmrestore.fleet")

# A task whose worker dies fails at once (KilledWorker) instead of being rerun by Dask:
# the runner resubmits it itself, with the next attempt number and from its checkpoint.
DASK_CONFIG = {"distributed.scheduler.allowed-failures": 0,
               "distributed.worker.daemon": False}


def proxy_facts(p: Proxy) -> dict[str, Any]:
    """What a worker advertises about its proxy (plain data, crosses processes)."""
    return {"name": p.name, "slots": p.slots, "vm": p.vm, "datastores": p.datastores,
            "san": p.san, "transports": list(p.transports)}


def proxy_from_facts(f: dict[str, Any]) -> Proxy:
    return Proxy(name=f["name"], slots=int(f["slots"]), vm=f.get("vm"),
                 datastores=f.get("datastores"), san=f.get("san", "auto"),
                 transports=tuple(f.get("transports") or MODES))


class ProxyFacts(WorkerPlugin):
    """Worker plugin: sets ``worker.vmr_proxy`` from the facts for the worker's name.

    Registered once by the orchestrator for the embedded cluster (it reaches the
    workers a nanny restarts too), or given to its own worker by proxy-worker.
    """

    name = "vmrestore-proxy-facts"

    def __init__(self, facts: dict[str, dict[str, Any]]) -> None:
        self.facts = facts

    def setup(self, worker: Any) -> None:
        f = self.facts.get(str(worker.name))
        if f is not None:
            worker.vmr_proxy = f


class WorkersUnknown(Exception):
    """The cluster could not say which proxies are alive right now (not: none are)."""


def _worker_facts(dask_worker: Any) -> dict[str, Any] | None:
    import os

    f = getattr(dask_worker, "vmr_proxy", None)
    return {**f, "pid": os.getpid()} if f else None


def _members(dask_scheduler: Any) -> dict[str, str]:
    return {addr: str(ws.name) for addr, ws in dask_scheduler.workers.items()}


def workers(client: Any) -> dict[str, str]:
    """Worker address -> name, asked of the scheduler now (who is a member).

    Not the client's cached ``scheduler_info()``, which may lag or be empty while
    it refreshes: an empty answer there would look like every proxy gone.
    """
    return dict(client.run_on_scheduler(_members))


def live_proxies(client: Any, pids: dict[str, int] | None = None,
                 only: list[str] | None = None) -> dict[str, tuple[str, Proxy]]:
    """Proxy name -> (worker address, its facts) for the workers that advertise a proxy.

    ``only``: ask just these worker addresses (the new ones). A worker that does not
    answer is left out; it is not thereby gone (membership is the scheduler's word,
    :func:`workers`). Raises WorkersUnknown when the workers cannot be asked at all.
    ``pids`` (if given) is filled with each proxy worker's process id (the live view
    shows it: which process is which proxy).
    """
    names = workers(client)
    if only is not None:
        names = {a: n for a, n in names.items() if a in only}
    if not names:
        return {}
    try:
        facts = client.run(_worker_facts, workers=list(names), on_error="return")
    except Exception as e:  # a worker vanished between the two calls: ask again
        log.debug("facts query failed: %s", e)
        try:
            facts = client.run(_worker_facts, workers=list(names), on_error="return")
        except Exception as e2:
            raise WorkersUnknown(f"cannot ask the workers for their proxies: {e2}") from e2
    out: dict[str, tuple[str, Proxy]] = {}
    for addr, f in facts.items():
        if isinstance(f, dict) and f.get("name") == names.get(addr):
            out[f["name"]] = (addr, proxy_from_facts(f))
            if pids is not None:
                pids[f["name"]] = int(f.get("pid") or 0)
    return out


@contextlib.contextmanager
def connect(scheduler: str | None, infra: Infra,
            timeout: float = 60.0) -> Iterator[tuple[Any, str]]:
    """A Dask client: to ``scheduler``, else to a LocalCluster running ``infra``'s proxies.

    Yields (client, description). The embedded cluster has one worker process per
    proxy, named after it, ``nthreads = resources['slot'] = slots``.
    """
    import dask
    from distributed import Client, LocalCluster, Nanny

    with dask.config.set(DASK_CONFIG):
        if scheduler:
            try:
                client = Client(scheduler, timeout=timeout)
            except (OSError, TimeoutError) as e:
                raise UsageError(f"--scheduler {scheduler}: cannot connect: {e}") from None
            try:
                yield client, f"Dask scheduler {scheduler}"
            finally:
                client.close()
            return
        cluster = LocalCluster(n_workers=0, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        try:
            for p in infra.proxies:
                cluster.worker_spec[p.name] = {
                    "cls": Nanny,
                    "options": {"name": p.name, "nthreads": p.slots,
                                "resources": {"slot": p.slots},
                                "silence_logs": logging.ERROR,
                                # Orphans of a killed orchestrator stop on their own.
                                "death_timeout": 30}}
            cluster.scale(len(infra.proxies))
            client = Client(cluster)
            try:
                client.register_plugin(ProxyFacts({p.name: proxy_facts(p)
                                                   for p in infra.proxies}))
                client.wait_for_workers(len(infra.proxies), timeout=timeout)
                yield client, (f"embedded LocalCluster ({len(infra.proxies)} proxy worker "
                               f"processes on this machine)")
            finally:
                client.close()
        finally:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)


def wait_for_proxies(client: Any, want: int, timeout: float) -> dict[str, tuple[str, Proxy]]:
    """Wait until ``want`` proxies advertise themselves (or the timeout); return them."""
    deadline = time.monotonic() + timeout
    live: dict[str, tuple[str, Proxy]] = {}
    while True:
        with contextlib.suppress(WorkersUnknown):
            live = live_proxies(client)
        if len(live) >= want or time.monotonic() > deadline:
            return live
        time.sleep(0.2)
