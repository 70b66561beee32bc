"""--original without a lab: job fields and their refusals, the disk match."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmrestore.errors import UsageError
from vmrestore.job import from_mapping
from vmrestore.original import disk_differences


def test_job_fields_and_refusals() -> None:
    job = from_mapping({"backup": "b.vmrb", "original": True, "quick-rollback": True,
                        "keep_config": True, "force": True, "original_vm": "vm-42"})
    assert job.original and job.quick_rollback and job.keep_config and job.force
    assert job.identity()["quick_rollback"] is True
    for bad, why in (({"quick_rollback": True}, "only with 'original'"),
                     ({"original": True, "datastore": "ds"}, "the VM stays where it is"),
                     ({"original": True, "disk_format": "thin"}, "keeps its disks"),
                     ({"original": True, "keep_config": True, "network_map": {"a": "b"}},
                      "keep_config"),
                     ({"original": True, "disk_library": "vddk"}, "own writers"),
                     ({"full": True}, "only with 'original'"),
                     ({"original": True, "full": True, "quick_rollback": True},
                      "field 'full': not with 'quick_rollback': .* nothing to compare")):
        with pytest.raises(UsageError, match=why):
            from_mapping({"backup": "b.vmrb", **bad})
    # VixDiskLib has a read side: a quick rollback may use it (an overwrite not yet)
    assert from_mapping({"backup": "b.vmrb", "original": True, "quick_rollback": True,
                         "disk_library": "vddk"}).disk_library == "vddk"


def test_disk_differences_name_count_and_capacity() -> None:
    t = [SimpleNamespace(index=0, capacity=16), SimpleNamespace(index=1, capacity=32)]
    d = [SimpleNamespace(label="Hard disk 1", capacity=16),
         SimpleNamespace(label="Hard disk 2", capacity=64)]
    assert disk_differences(t, d) == ["disk 1 (Hard disk 2): backup 32 bytes, VM 64 bytes"]
    assert disk_differences(t, d[:1]) == ["the backup has 2 disk(s), the VM 1"]
    assert disk_differences(t, [SimpleNamespace(label="x", capacity=16),
                                SimpleNamespace(label="y", capacity=32)]) == []


def test_full_with_quick_rollback_refused_on_one_line() -> None:
    """The command form: exit 2, one line naming both options, no traceback."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "vmrestore", "restore", "--backup", "b.vmrb",
                        "--original", "--full", "--quick-rollback"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "'full'" in lines[0] and "quick_rollback" in lines[0], p.stderr
