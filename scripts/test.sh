#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the project and its test
# tools, the real Kubernetes control plane (cached outside the repo) and redis-server, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
scripts/k8s-control-plane.sh
if ! command -v redis-server >/dev/null; then  # the Redis ingest tests start their own (Debian's package)
    sudo=$([[ $EUID -eq 0 ]] || echo sudo)
    $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        redis-server redis-tools
fi
ruff check .
mypy
exec python3 -m pytest -ra "$@"
