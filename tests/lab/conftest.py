"""Fixtures for the lab's own tests.

The session-scoped ``lab`` fixture (a real vcsim + host data services + SAN
loop LUN, torn down at the end) lives in tests/lab_helpers.py so that other
test folders can use it too: see that module's docstring for what it yields.
"""

from lab_helpers import host_services, lab, lab_si  # noqa: F401  (fixtures)
