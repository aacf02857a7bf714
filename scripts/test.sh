#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the project and its test
# tools, the real Kubernetes control plane and node binaries (cached outside the repo) and
# redis-server, runs pytest, then the end-to-end suite on a real one-node cluster made on this
# machine (e2e/run.sh --node; NEOPLASMA_E2E=0 leaves it out). Each step's time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
step_start=$SECONDS
step() { echo "scripts/test.sh: $1 took $((SECONDS - step_start)) s" >&2; step_start=$SECONDS; }
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
step "pip install"
# The e2e stage's Debian packages, then its image (debootstrap and pip: network-bound) built beside
# the Kubernetes binaries (Go: CPU-bound); both cached.
e2e_image=0
if [[ "${NEOPLASMA_E2E:-1}" != 0 ]]; then
    scripts/k8s-node.sh install
    scripts/k8s-node.sh image neoplasma:e2e > /tmp/neoplasma-e2e-image.log 2>&1 &
    e2e_image=$!
fi
scripts/k8s-control-plane.sh --node
step "scripts/k8s-control-plane.sh --node"
if [[ $e2e_image != 0 ]]; then
    wait "$e2e_image" || { cat /tmp/neoplasma-e2e-image.log >&2; exit 1; }
    step "the e2e image (waited for)"
fi
# Debian packages for tests that need real programs (each such test says why it is skipped without
# them, or fails under CI): chromium for tests/test_browser.py, redis-server for tests/test_redis_ingest.py.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server redis-tools)
if [[ ${#missing[@]} -gt 0 ]]; then
    sudo=(); [[ $EUID -eq 0 ]] || sudo=(sudo)
    { "${sudo[@]}" apt-get update -q \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        || echo "scripts/test.sh: could not install ${missing[*]}; the tests needing them will not run" >&2
fi
step "apt packages"
ruff check .
mypy
step "ruff and mypy"
python3 -m pytest -ra "$@"
step "pytest"
if [[ "${NEOPLASMA_E2E:-1}" != 0 ]]; then
    e2e/run.sh --node
    step "e2e on a real node (e2e/run.sh --node)"
fi
