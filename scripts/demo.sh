#!/usr/bin/env bash
# The main job, end to end: set up, make a sample 2-disk VM backup, verify it,
# restore each disk and compare. (The lab restore replaces the restore step
# once the lab lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m vmrestore.demo "$@"
