"""Fixtures of the plan tests: tests/fleet_helpers.py (a 3-proxy lab, small sample backups)."""

from fleet_helpers import fleet_backups, fleet_lab  # noqa: F401  (re-exported fixtures)
