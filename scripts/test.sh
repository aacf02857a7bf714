#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the project and its test
# tools, the real Kubernetes control plane (cached outside the repo), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
scripts/k8s-control-plane.sh
ruff check .
mypy
exec python3 -m pytest -ra "$@"
