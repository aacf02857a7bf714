#!/usr/bin/env bash
# End to end (e2e/test_e2e.py): the image built from the Dockerfile, `helm install` of
# charts/neoplasma-operator, the examples, subscribers, autoscaling, a proxy rollout, uninstall.
#
#   e2e/run.sh --node [PYTEST ARGS]   # on a real one-node cluster made on this machine by
#                                     # scripts/k8s-node.sh (root; torn down afterwards)
#   e2e/run.sh [PYTEST ARGS]          # on kind (Docker engine and kind needed), or on the
#                                     # cluster of NEOPLASMA_E2E_KUBECONFIG
#   NEOPLASMA_E2E_KEEP=1 e2e/run.sh -x    # kind: keep the cluster
#
# Needs kubectl, helm 3 (or scripts/k8s-control-plane.sh's) and the project installed
# (pip install -e '.[test]'). See e2e/README.md for the environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == --node ]]; then
    shift
    export NEOPLASMA_E2E_KUBECONFIG="${NEOPLASMA_NODE_DIR:-/run/neoplasma-node}/kubeconfig"
    export NEOPLASMA_E2E_LOAD="${NEOPLASMA_E2E_LOAD-scripts/k8s-node.sh image {image}}"
    exec scripts/k8s-node.sh run "$0" "$@"
fi

missing=()
tools=(kubectl)
[[ -n "${NEOPLASMA_E2E_KUBECONFIG:-}" ]] || tools+=(docker kind)
for tool in "${tools[@]}"; do
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
python3 -c 'import neoplasma.cli' 2>/dev/null || {
    echo "e2e/run.sh: the project is not installed: pip install -e '.[test]'" >&2
    exit 2
}

exec python3 -m pytest e2e -v -rs -p no:cacheprovider "$@"
