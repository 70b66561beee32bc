#!/usr/bin/env bash
# Set up everything vmrestore needs on Debian 12, as root; safe to run again.
#   1. apt packages: build deps, the lab's parts (nbdkit, qemu, libnbd, Go + govmomi sources)
#   2. .venv with the Python dependencies
#   3. the package installed editable, its compiled core built
# Set VMRESTORE_SKIP_APT=1 to skip step 1 (packages already there).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config python3-dev python3-venv
  liblz4-dev libzstd-dev libxxhash-dev libnbd-dev
  libnbd-bin nbdkit qemu-utils
  golang-go golang-github-vmware-govmomi-dev
  e2fsprogs util-linux kmod gnutls-bin procps time
  chromium
)

say() { printf '[bootstrap] %s\n' "$*" >&2; }

if [[ "${VMRESTORE_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { say "need root to apt-get install: ${missing[*]}"; exit 1; }
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "apt packages present"
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
say "installing Python build and test dependencies"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "Cython>=3.0" "cffi>=1.15" "numpy>=1.24"
say "building vmrestore and its compiled core"
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test]'
# byte-compile the sources once: with PYTHONDONTWRITEBYTECODE set (CI, many images) every
# run would otherwise compile ~30 modules again (45 ms of each restore-disk start-up)
.venv/bin/python -m compileall -q src/vmrestore
.venv/bin/python -c "import vmrestore.core"
say "ready: .venv/bin/vmrestore --help"
