"""Many VMs at once: restore plans scheduled over proxies that are Dask workers (docs/fleet.md).

plan.py (the plan document), cluster.py (LocalCluster or a real scheduler; proxy
facts), worker.py (what a proxy's worker runs; ``vmrestore proxy-worker``),
dispatch.py (admission grants -> Dask tasks, lost workers -> requeues), vm.py
(one VM's five phases with its disks on the plan's proxies), runner.py (the
plan run and its durable state), report.py, progress.py.
"""
