#!/usr/bin/env bash
# The main job, end to end: set up, bring the embedded vSphere lab up, make a
# sample 2-disk VM backup (full + incremental), verify it, restore the whole VM
# into the lab (five phases, new name, network mapping), print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m vmrestore.demo "$@"
