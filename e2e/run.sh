#!/usr/bin/env bash
# End-to-end on kind: create a kind cluster (e2e/kind-config.yaml), build the image from the
# Dockerfile and `kind load` it, `helm install` charts/neoplasma-operator, apply examples/,
# and test subscribers, autoscaling, a proxy rollout and uninstall (e2e/test_kind.py).
#
# Needs: a running Docker engine, kind, kubectl, helm 3, and the project installed
# (pip install -e '.[test]'). Takes about 10 minutes, most of it the image build.
#
#   e2e/run.sh                 # everything; the cluster is deleted afterwards
#   NEOPLASMA_E2E_KEEP=1 e2e/run.sh -x    # keep the cluster; extra args go to pytest
#
# See e2e/README.md for the environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! command -v helm >/dev/null 2>&1 && [[ -z "${NEOPLASMA_HELM:-}" ]]; then
    cache="${NEOPLASMA_K8S_CACHE:-$HOME/.cache/neoplasma/k8s-v1.20.2}"
    if [[ -x "$cache/bin/helm" ]]; then
        export NEOPLASMA_HELM="$cache/bin/helm"
    else
        missing+=(helm)
    fi
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "e2e/run.sh: missing: ${missing[*]} (see e2e/README.md)" >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "e2e/run.sh: no Docker engine is reachable (docker info failed)" >&2
    exit 2
fi
python -c 'import neoplasma.core.cli' 2>/dev/null || {
    echo "e2e/run.sh: the project is not installed: pip install -e '.[test]'" >&2
    exit 2
}

exec python -m pytest e2e -v -rs -p no:cacheprovider "$@"
