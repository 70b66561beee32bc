"""Disk-task scheduling: admission and ordering, shared by the Dask runner and the simulator.

Pure Python, no I/O: ``model`` holds the typed vocabulary, ``admission`` the
controller. The contract is documented in docs/scheduling.md.
"""

from vmrestore.schedule.admission import Admission
from vmrestore.schedule.model import NBD_TRANSPORTS, Grant, Limits, ProxySpec, TaskSpec, Usage

__all__ = ["NBD_TRANSPORTS", "Admission", "Grant", "Limits", "ProxySpec", "TaskSpec", "Usage"]
