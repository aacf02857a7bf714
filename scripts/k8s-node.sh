#!/usr/bin/env bash
# A real one-node Kubernetes v1.20.2 on this machine, for the end-to-end suite (e2e/): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built from
# Debian's source by scripts/k8s-control-plane.sh --node, same cache), containerd + runc and the
# CNI plugins from Debian, a pause image built from source, and a Docker engine (Debian's) that
# builds images from the Dockerfile on a Debian base made by debootstrap. No registry is used.
#
#   scripts/k8s-node.sh install        # the Debian packages (binaries: k8s-control-plane.sh --node)
#   scripts/k8s-node.sh image IMAGE    # build IMAGE from the Dockerfile (node up or not; cached
#                                      # layers), and load it into the node when it is up
#   scripts/k8s-node.sh up             # start the node; prints what to export
#   scripts/k8s-node.sh load IMAGE     # load an image built by `image` into the node
#   scripts/k8s-node.sh down           # stop and remove everything `up` made
#   scripts/k8s-node.sh run CMD...     # up, CMD with the node's environment, down (always)
#
# Everything stays on this machine: the node's address ($NODE_IP) lives on `lo` and `up` refuses
# to go on unless `ip route get` calls it local; before any component starts, iptables REJECT
# rules stop the node, pod and service ranges from leaving through the default route; NodePorts
# are served on loopback and the node address only. `down` undoes, by PID and by name, each
# process, mount, interface, network namespace, iptables chain and rule, address, sysctl and
# cgroup that `up` made. Must run as root (or through sudo).
#
# The Docker engine runs only while `image` builds (its own containerd; no bridge, no iptables;
# builds use the host's network), and is stopped and cleaned up the same way.
#
# Environment: NEOPLASMA_K8S_CACHE (binaries, as scripts/k8s-control-plane.sh; the engine's
# layers and saved images go beside it), NEOPLASMA_NODE_DIR (state, default
# /run/neoplasma-node), NEOPLASMA_NODE_LOGS (logs, kept after `down`; default
# /tmp/neoplasma-node-logs).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
K8S_VERSION="v1.20.2"
CACHE="${NEOPLASMA_K8S_CACHE:-$HOME/.cache/neoplasma/k8s-${K8S_VERSION}}"
BIN="$CACHE/bin"
DOCKER_ROOT="$(dirname "$CACHE")/docker"      # image layers, kept between runs (warm builds)
IMAGES="$(dirname "$CACHE")/images"           # `docker save` of each image built, for `load`
STATE="${NEOPLASMA_NODE_DIR:-/run/neoplasma-node}"
ENGINE="$STATE-engine"                        # the Docker engine's run-time state
LOGS="${NEOPLASMA_NODE_LOGS:-/tmp/neoplasma-node-logs}"
NODE_NAME="neoplasma-node"
NODE_IP="10.201.0.1"
NODE_RANGE="10.201.0.0/24"
POD_CIDR="10.202.0.0/24"
SERVICE_CIDR="10.203.0.0/24"
SERVICE_IP="10.203.0.1"     # the `kubernetes` Service
API_PORT=6443
BRIDGE="cni0"
PAUSE_IMAGE="neoplasma.local/pause:$K8S_VERSION"
BASE_IMAGE="neoplasma.local/python:3.11-bookworm"   # stands in for python:3.11-slim-bookworm
CHAIN_GUARD="NEOPLASMA-NODE-GUARD"
CHAIN_FORWARD="NEOPLASMA-NODE-FORWARD"
# Sysctls the kubelet and kube-proxy set; `down` puts back the values `up` found.
SYSCTLS=(net.ipv4.conf.all.route_localnet vm.overcommit_memory vm.panic_on_oom kernel.panic
         kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
PACKAGES=(containerd runc containernetworking-plugins docker.io debootstrap iptables conntrack
          iproute2 openssl util-linux curl)

log() { printf '[k8s-node] %s\n' "$*" >&2; }
die() { printf '[k8s-node] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root"
    exec sudo --preserve-env=NEOPLASMA_K8S_CACHE,NEOPLASMA_NODE_DIR,NEOPLASMA_NODE_LOGS,HOME "$0" "$@"
fi
mkdir -p "$LOGS"

# -- installation ----------------------------------------------------------------------------

install() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "apt-get install ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    command -v kubectl >/dev/null 2>&1 || die "kubectl is not installed"
}



# -- processes -------------------------------------------------------------------------------

# start DIR NAME ARGS...: run in its own session, log to $LOGS/NAME.log, PID in DIR/pids/NAME.
start() {
    local dir="$1" name="$2"
    shift 2
    mkdir -p "$dir/pids"
    setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
    echo $! >"$dir/pids/$name"
    log "started $name (pid $!)"
}

running() { [[ -f "$1/pids/$2" ]] && kill -0 "$(cat "$1/pids/$2")" 2>/dev/null; }

# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.5 s; fail with the logs' tails.
wait_until() {
    local timeout="$1" what="$2" deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout} s waiting for $what; last log lines:"
            tail -n 15 "$LOGS"/*.log >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# stop DIR NAME [SECONDS]: SIGTERM (repeated every 5 s: kube-apiserver 1.20 may ignore the
# first), SIGKILL after SECONDS.
stop() {
    local dir="$1" name="$2" timeout="${3:-20}" pid deadline
    [[ -f "$dir/pids/$name" ]] || return 0
    pid="$(cat "$dir/pids/$name")"
    deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        kill -TERM "$pid" 2>/dev/null || true
        local tick=$((SECONDS + 5))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < tick)); do sleep 0.2; done
    done
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$dir/pids/$name"
    log "stopped $name"
}

# PIDs of processes whose command line mentions DIR/ (containerd shims, stray children).
pids_of() {
    local proc pid
    for proc in /proc/[0-9]*; do
        pid="${proc#/proc/}"
        [[ $pid == "$$" ]] && continue
        tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "$1/" && echo "$pid"
    done
    return 0
}

# Unmount everything under the directories given, deepest first (the kubelet's bind mount of
# its root, the runtimes' overlays, shm and network namespaces).
unmount_under() {
    local dir mount
    for dir in "$@"; do
        { awk '{print $5}' /proc/self/mountinfo | grep -E "^$dir(/|$)" || true; } | sort -r \
            | while read -r mount; do umount "$mount" 2>/dev/null || umount -l "$mount"; done
    done
}

# -- configuration ---------------------------------------------------------------------------

kubeconfig() {  # kubeconfig FILE USER TOKEN
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $NODE_NAME
  cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: $2
  user: {token: "$3"}
contexts:
- name: $NODE_NAME
  context: {cluster: $NODE_NAME, user: $2}
current-context: $NODE_NAME
EOF
}

# sign NAME SUBJECT [EXTENSIONS]: a key and a certificate signed by the node's CA.
sign() {
    local pki="$STATE/pki"
    printf '%s\n' "${3:-extendedKeyUsage=clientAuth}" >"$pki/$1.ext"
    openssl req -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -out "$pki/$1.crt" -days 2 -extfile "$pki/$1.ext" 2>/dev/null
}

write_config() {
    local pki="$STATE/pki" token user
    mkdir -p "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 2 \
        -subj "/CN=neoplasma-node-ca" 2>/dev/null
    sign apiserver "/CN=kube-apiserver" "subjectAltName=IP:$NODE_IP,IP:$SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
    sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    sign kubelet "/CN=$NODE_NAME" "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME
extendedKeyUsage=serverAuth"
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    : >"$pki/tokens.csv"
    # One identity per component: what RBAC's bootstrap roles and the Node authorizer expect.
    for user in admin=system:masters "system:node:$NODE_NAME=system:nodes" system:kube-proxy= \
                system:kube-scheduler= system:kube-controller-manager=; do
        token="$(openssl rand -hex 16)"
        printf '%s,%s,%s,"%s"\n' "$token" "${user%=*}" "${user%=*}" "${user#*=}" >>"$pki/tokens.csv"
        kubeconfig "$STATE/${user%=*}.kubeconfig" "${user%=*}" "$token"
    done
    mv "$STATE/admin.kubeconfig" "$STATE/kubeconfig"

    mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam"
    cat >"$STATE/cni/net.d/10-neoplasma.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "neoplasma", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
    cat >"$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$STATE/containerd.sock"
[ttrpc]
  address = "$STATE/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below the runtime's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
    : >"$STATE/resolv.conf"   # no cluster DNS, and no name server outside this machine
    cat >"$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: $NODE_IP
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: AlwaysAllow}
tlsCertFile: "$pki/kubelet.crt"
tlsPrivateKeyFile: "$pki/kubelet.key"
cgroupDriver: cgroupfs
failSwapOn: false
resolvConf: "$STATE/resolv.conf"
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}
imageGCHighThresholdPercent: 100
EOF
    cat >"$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$STATE/system:kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: "$NODE_IP:10256"
metricsBindAddress: "$NODE_IP:10249"
clusterCIDR: $POD_CIDR
# NodePorts on loopback and the node address only, never on an outside interface.
nodePortAddresses: ["127.0.0.0/8", "$NODE_IP/32"]
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# -- network guard ---------------------------------------------------------------------------

default_interface() { ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' | head -n1; }

add_guard() {
    local out cidr
    out="$(default_interface)"
    iptables -N "$CHAIN_GUARD"
    for cidr in "$NODE_RANGE" "$POD_CIDR" "$SERVICE_CIDR"; do
        iptables -A "$CHAIN_GUARD" -d "$cidr" -j REJECT
        iptables -A "$CHAIN_GUARD" -s "$cidr" -j REJECT
    done
    iptables -N "$CHAIN_FORWARD"
    [[ -z $out ]] || iptables -A "$CHAIN_FORWARD" -o "$out" -j "$CHAIN_GUARD"
    # Docker's engine may have set the FORWARD policy to DROP; bridged pod traffic crosses FORWARD.
    iptables -A "$CHAIN_FORWARD" -i "$BRIDGE" -j ACCEPT
    iptables -A "$CHAIN_FORWARD" -o "$BRIDGE" -j ACCEPT
    iptables -I FORWARD 1 -j "$CHAIN_FORWARD"
    [[ -z $out ]] || iptables -I OUTPUT 1 -o "$out" -j "$CHAIN_GUARD"
    log "REJECT $NODE_RANGE $POD_CIDR $SERVICE_CIDR through ${out:-(no default route)}"
}

# Rules in built-in chains that jump to chains made here or by the kubelet, kube-proxy or the
# CNI plugins, as `-D` commands; then those chains.
remove_chains() {
    local table rule chain
    for table in filter nat mangle; do
        iptables-save -t "$table" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j (KUBE-|CNI-|NEOPLASMA-)' \
            | sed 's/^-A /-D /' | while read -r rule; do
                eval "iptables -t $table $rule" 2>/dev/null || true
            done
        for chain in $(iptables-save -t "$table" 2>/dev/null | sed -nE 's/^:((KUBE-|CNI-|NEOPLASMA-)[^ ]*) .*/\1/p'); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $(iptables-save -t "$table" 2>/dev/null | sed -nE 's/^:((KUBE-|CNI-|NEOPLASMA-)[^ ]*) .*/\1/p'); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

# -- up --------------------------------------------------------------------------------------

preflight() {
    if [[ -e "$STATE" ]]; then
        [[ -z "$(pids_of "$STATE")" ]] || die "a node is up ($STATE): scripts/k8s-node.sh down first"
        log "$STATE is left from a node that is gone; tearing it down first"
        down
    fi
    if iptables-save 2>/dev/null | grep -qE '^:(KUBE-|CNI-|NEOPLASMA-)'; then
        die "iptables already has KUBE-/CNI-/NEOPLASMA- chains (another node? scripts/k8s-node.sh down)"
    fi
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || die "interface $BRIDGE exists already"
    local cidr
    for cidr in "$NODE_RANGE" "$POD_CIDR" "$SERVICE_CIDR"; do
        [[ -z "$(ip -4 route show to match "$cidr" | grep -v '^default' || true)" ]] \
            || die "$cidr overlaps a route of this machine: $(ip -4 route show to match "$cidr")"
    done
}

up() {
    install
    "$REPO/scripts/k8s-control-plane.sh" --node >&2
    preflight
    mkdir -p "$STATE/pids"
    OWN_NODE=1
    rm -f "$LOGS"/*.log
    local name
    for name in "${SYSCTLS[@]}"; do echo "$name=$(sysctl -n "$name")"; done >"$STATE/sysctl.saved"
    ls /var/run/netns 2>/dev/null | sort >"$STATE/netns.before" || true

    ip addr add "$NODE_IP/32" dev lo
    touch "$STATE/address"
    [[ "$(ip route get "$NODE_IP")" == local* ]] || die "$NODE_IP on lo is not routed locally: $(ip route get "$NODE_IP")"
    add_guard
    write_config
    [[ -f "$IMAGES/pause.tar" ]] || image "$PAUSE_IMAGE"

    start "$STATE" containerd containerd --config "$STATE/containerd.toml"
    wait_until 30 "containerd" ctr --address "$STATE/containerd.sock" version
    load "$PAUSE_IMAGE"

    start "$STATE" etcd etcd --name "$NODE_NAME" --data-dir "$STATE/etcd" \
        --listen-client-urls "http://$NODE_IP:2379" --advertise-client-urls "http://$NODE_IP:2379" \
        --listen-peer-urls "http://$NODE_IP:2380" --initial-advertise-peer-urls "http://$NODE_IP:2380" \
        --initial-cluster "$NODE_NAME=http://$NODE_IP:2380" --log-level warn --logger zap
    wait_until 30 "etcd" curl -fsS "http://$NODE_IP:2379/health"

    local pki="$STATE/pki"
    start "$STATE" kube-apiserver "$BIN/kube-apiserver" --etcd-servers="http://$NODE_IP:2379" \
        --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
        --cert-dir="$STATE/apiserver" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" --authorization-mode=Node,RBAC \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range="$SERVICE_CIDR" \
        --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=InternalIP --allow-privileged=true --profiling=false --v=1
    export KUBECONFIG="$STATE/kubeconfig"
    wait_until 60 "kube-apiserver" kubectl get --raw /readyz
    start "$STATE" kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig="$STATE/system:kube-controller-manager.kubeconfig" \
        --bind-address="$NODE_IP" --secure-port=10257 --port=0 --leader-elect=false \
        --use-service-account-credentials=true --service-account-private-key-file="$pki/sa.key" \
        --root-ca-file="$pki/ca.crt" --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route' --v=1
    start "$STATE" kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$STATE/system:kube-scheduler.kubeconfig" \
        --authentication-kubeconfig="$STATE/system:kube-scheduler.kubeconfig" \
        --authorization-kubeconfig="$STATE/system:kube-scheduler.kubeconfig" \
        --bind-address="$NODE_IP" --secure-port=10259 --port=0 --leader-elect=false --v=1
    start "$STATE" kubelet "$BIN/kubelet" --config="$STATE/kubelet.yaml" \
        --kubeconfig="$STATE/system:node:$NODE_NAME.kubeconfig" --root-dir="$STATE/kubelet" \
        --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
        --container-runtime=remote --container-runtime-endpoint="unix://$STATE/containerd.sock" --v=1
    start "$STATE" kube-proxy "$BIN/kube-proxy" --config="$STATE/kube-proxy.yaml" --v=1
    wait_until 120 "node $NODE_NAME to be Ready" \
        kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
    wait_until 60 "ServiceAccount default" kubectl get serviceaccount default
    printf 'export KUBECONFIG=%q\n' "$KUBECONFIG" >"$STATE/env"
    log "node $NODE_NAME is Ready; to use it: source $STATE/env"
}

# -- images ----------------------------------------------------------------------------------

engine_up() {
    [[ ! -e "$ENGINE" ]] || die "$ENGINE exists: another build runs, or one was not cleaned up (remove it)"
    mkdir -p "$ENGINE" "$IMAGES"
    start "$ENGINE" dockerd dockerd --data-root "$DOCKER_ROOT" --exec-root "$ENGINE/exec" \
        --pidfile "$ENGINE/docker.pid" --host "unix://$ENGINE/docker.sock" --bridge=none \
        --iptables=false --ip-forward=false --ip-masq=false --storage-driver=overlay2
    OWN_ENGINE=1
    export DOCKER_HOST="unix://$ENGINE/docker.sock" DOCKER_BUILDKIT=0
    wait_until 60 "the Docker engine" docker version
}

engine_down() {
    OWN_ENGINE=0
    stop "$ENGINE" dockerd 60
    local pid
    for pid in $(pids_of "$ENGINE"); do kill -KILL "$pid" 2>/dev/null || true; done
    unmount_under "$ENGINE" "$DOCKER_ROOT"
    find /sys/fs/cgroup/*/docker -depth -type d -exec rmdir {} + 2>/dev/null || true
    rm -rf "$ENGINE"
}

# The Dockerfile's base without a registry: Debian bookworm by debootstrap, with Python 3.11
# as python:3.11-slim-bookworm has it, trusting this machine's extra CAs (for pip).
base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return
    local root uri
    root="$(mktemp -d)"
    uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -E '/debian/?$' | head -n1 || true)"
    log "debootstrap bookworm (${uri:-http://deb.debian.org/debian}) for $BASE_IMAGE"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
        "${uri:-http://deb.debian.org/debian}" >"$LOGS/debootstrap.log" 2>&1 \
        || { tail -n 20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | docker import \
        --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
}

# image NAME: build NAME (the pause image, or the project's from the Dockerfile) with a Docker
# engine started for it, save it to $IMAGES, and load it into the node if that is up.
image() {
    install
    engine_up
    local ctx
    if [[ $1 == "$PAUSE_IMAGE" ]]; then
        ctx="$(mktemp -d)"
        cp "$BIN/pause" "$ctx/pause"
        printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
        docker build -q -t "$1" "$ctx" >/dev/null
        rm -rf "$ctx"
    else
        base_image
        log "docker build -t $1 (Dockerfile, FROM $BASE_IMAGE)"
        docker build --network host --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -t "$1" "$REPO" \
            >"$LOGS/image-build.log" 2>&1 \
            || { tail -n 30 "$LOGS/image-build.log" >&2; die "docker build failed (log: $LOGS/image-build.log)"; }
    fi
    docker save -o "$(saved "$1").tmp" "$1"
    mv -f "$(saved "$1").tmp" "$(saved "$1")"
    engine_down
    if [[ -S "$STATE/containerd.sock" ]]; then load "$1"; fi
}

saved() { if [[ $1 == "$PAUSE_IMAGE" ]]; then echo "$IMAGES/pause.tar"; else echo "$IMAGES/${1//[\/:]/_}.tar"; fi; }

load() {
    [[ -f "$(saved "$1")" ]] || die "no saved image $1 (scripts/k8s-node.sh image $1)"
    ctr --address "$STATE/containerd.sock" --namespace k8s.io images import - <"$(saved "$1")" >/dev/null
    log "loaded $1 into the node"
}

# -- down ------------------------------------------------------------------------------------

down() {
    set +e
    [[ -d "$STATE" ]] || { log "no node state in $STATE: nothing to tear down"; return 0; }
    export KUBECONFIG="$STATE/kubeconfig"
    # No new pods, then every pod gone through the kubelet (CNI DEL: veths, addresses, chains).
    stop "$STATE" kube-controller-manager
    stop "$STATE" kube-scheduler
    if running "$STATE" kubelet && running "$STATE" kube-apiserver; then
        kubectl delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1
        wait_until 90 "the kubelet to remove every pod" \
            bash -c "[[ -z \"\$(ctr --address '$STATE/containerd.sock' -n k8s.io tasks ls -q)\" ]]" \
            || log "pods left; removing them through containerd"
    fi
    stop "$STATE" kubelet
    stop "$STATE" kube-proxy
    "$BIN/kube-proxy" --cleanup --config="$STATE/kube-proxy.yaml" >/dev/null 2>&1
    stop "$STATE" kube-apiserver 30
    stop "$STATE" etcd
    local ctr=(ctr --address "$STATE/containerd.sock") ns id
    if running "$STATE" containerd; then
        for id in $("${ctr[@]}" -n k8s.io tasks ls -q 2>/dev/null); do
            "${ctr[@]}" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1
            "${ctr[@]}" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1
        done
    fi
    stop "$STATE" containerd
    local pid
    for pid in $(pids_of "$STATE"); do kill -KILL "$pid" 2>/dev/null; done
    # Network namespaces the runtime made, and the pods' bridge.
    for ns in $(comm -13 "$STATE/netns.before" <(ls /var/run/netns 2>/dev/null | sort)); do
        ip netns delete "$ns" 2>/dev/null || { umount "/var/run/netns/$ns"; rm -f "/var/run/netns/$ns"; }
    done
    ip link delete "$BRIDGE" 2>/dev/null
    remove_chains
    unmount_under "$STATE"
    # The kubelet's cgroups (all empty now).
    find /sys/fs/cgroup/*/kubepods -depth -type d -exec rmdir {} + 2>/dev/null
    [[ ! -f "$STATE/address" ]] || ip addr delete "$NODE_IP/32" dev lo 2>/dev/null
    if [[ -f "$STATE/sysctl.saved" ]]; then
        while IFS= read -r line; do sysctl -q -w "$line" >/dev/null 2>&1; done <"$STATE/sysctl.saved"
    fi
    rm -rf "$STATE"
    set -e
    log "torn down"
    check_clean
}

# What `down` must have removed; prints each leftover, fails when there is one.
check_clean() {
    local left=() dir
    for dir in "$STATE" "$ENGINE"; do
        [[ -z "$(pids_of "$dir")" ]] || left+=("processes: $(pids_of "$dir" | tr '\n' ' ')")
        ! grep -qE " $dir(/| )" /proc/self/mountinfo || left+=("mounts under $dir")
    done
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || left+=("interface $BRIDGE")
    [[ -z "$(ip -4 addr show dev lo to "$NODE_IP/32")" ]] || left+=("address $NODE_IP on lo")
    ! iptables-save 2>/dev/null | grep -qE '(KUBE-|CNI-|NEOPLASMA-)' || left+=("iptables chains or rules")
    ! compgen -G "/sys/fs/cgroup/*/kubepods" >/dev/null || left+=("kubepods cgroups")
    if [[ ${#left[@]} -gt 0 ]]; then
        log "left behind: ${left[*]}"
        return 1
    fi
}

# -- main ------------------------------------------------------------------------------------

# On exit: stop an engine this run started; tear down a node this run started when it failed
# (or always, for `run`); a teardown that leaves something behind fails the run.
OWN_ENGINE=0 OWN_NODE=0 TEARDOWN=on-failure
on_exit() {
    local rc=$?
    [[ $OWN_ENGINE == 0 ]] || engine_down
    if [[ $OWN_NODE == 1 && ($rc -ne 0 || $TEARDOWN == always) ]]; then
        ((rc == 0)) || log "failed (exit $rc); tearing down"
        down || rc=1
    fi
    exit "$rc"
}
trap on_exit EXIT

main() {
    case "${1:-}" in
        install) install ;;
        up) up; cat "$STATE/env" ;;
        down) down ;;
        image) [[ $# -eq 2 ]] || die "usage: $0 image IMAGE"; image "$2" ;;
        load) [[ $# -eq 2 ]] || die "usage: $0 load IMAGE"; load "$2" ;;
        run)
            shift
            [[ $# -gt 0 ]] || die "usage: $0 run COMMAND..."
            TEARDOWN=always
            up
            "$@"
            ;;
        *) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

# One line, so that bash has read it whole before running it (an edited script stays safe).
main "$@"; exit
