#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the project and its test
# tools, the real Kubernetes control plane (cached outside the repo), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
scripts/k8s-control-plane.sh
# Debian's chromium for tests/test_browser.py (which says why it is skipped, or fails under CI, without it).
if ! command -v chromium >/dev/null 2>&1; then
    sudo=(); [[ $EUID -eq 0 ]] || sudo=(sudo)
    { "${sudo[@]}" apt-get update -q \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
        || echo "scripts/test.sh: chromium could not be installed; tests/test_browser.py will not run" >&2
fi
ruff check .
mypy
exec python3 -m pytest -ra "$@"
