"""Fixtures of the restore tests: the real lab (tests/lab_helpers.py) and a sample backup.

``lab``, ``lab_si``, ``host_services`` come from tests/lab_helpers.py (one lab per
session); ``backup`` and the helpers the tests use are in tests/restore_helpers.py.
"""

from lab_helpers import host_services, lab, lab_si  # noqa: F401  (re-exported fixtures)
from restore_helpers import backup  # noqa: F401  (re-exported fixture)
