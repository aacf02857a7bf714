#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the project and its test
# tools, the real Kubernetes control plane (cached outside the repo) and redis-server, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
scripts/k8s-control-plane.sh
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
ruff check .
mypy
exec python3 -m pytest -ra "$@"
