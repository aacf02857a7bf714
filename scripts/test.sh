#!/usr/bin/env bash
# The whole test suite, from a fresh machine: makes a virtual environment (.venv, or the one that is
# active) and installs the project and its test tools into it at the exact versions of
# constraints.txt, installs the real Kubernetes control plane and node binaries (cached outside the
# repo) and redis-server, runs pytest, then the end-to-end suite on a real one-node cluster made on
# this machine (e2e/run.sh --node; NEOPLASMA_E2E=0 leaves it out). At the end it prints the versions
# it tested with and each stage's time.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=()
step_start=$SECONDS
step() {
    stages+=("$(printf '%-44s %5d s' "$1" $((SECONDS - step_start)))")
    echo "scripts/test.sh: $1 took $((SECONDS - step_start)) s" >&2
    step_start=$SECONDS
}
summary() {
    local rc=$?
    {
        echo "scripts/test.sh: ---- $([[ $rc == 0 ]] && echo passed || echo "FAILED (exit $rc)") in $SECONDS s ----"
        printf 'scripts/test.sh:   %s\n' "${stages[@]}"
        if [[ -x "${venv:-}/bin/python" ]]; then
            echo "scripts/test.sh: versions: $("$venv/bin/python" --version 2>&1)," \
                "$("$venv/bin/python" -m pip freeze --all 2>/dev/null | grep -iE \
                '^(grpcio|grpcio-tools|protobuf|h2|aiohttp|kopf|kubernetes|jinja2|pytest|mypy|ruff)==' | paste -sd' ')"
        fi
        echo "scripts/test.sh: versions: kube-apiserver $("${NEOPLASMA_K8S_CACHE:-$HOME/.cache/neoplasma/k8s-v1.20.2}/bin/kube-apiserver" --version 2>/dev/null | awk '{print $2}' || true)," \
            "etcd $(etcd --version 2>/dev/null | awk 'NR==1{print $3}' || true)," \
            "$(chromium --version 2>/dev/null || echo 'no chromium')," \
            "$(redis-server --version 2>/dev/null | awk '{print $1, $3}' || echo 'no redis-server')," \
            "$(prometheus --version 2>/dev/null | head -1 | awk '{print "prometheus", $3}' || echo 'no prometheus')"
    } >&2
}
trap summary EXIT

# One environment, the same on every machine: the exact versions of constraints.txt (scripts/lock.sh
# makes it), also for the build backend of the editable install.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then venv="$VIRTUAL_ENV"; else venv="$PWD/.venv"; fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" PIP_CONSTRAINT="$PWD/constraints.txt"
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
step "pip install (constraints.txt)"
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
# them, or fails under CI): chromium for tests/test_browser.py, redis-server for tests/test_redis_ingest.py,
# prometheus (and its promtool) for tests/test_observability.py.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server redis-tools)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
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
