#!/usr/bin/env bash
# A real two-node Kubernetes cluster on this machine, and tlsmesh installed
# into it with Helm (`cargo xtask cluster up|down|status|install`, `cargo
# xtask demo --cluster`; docs/CLUSTER.md). Everything runs as processes of
# this machine, nothing in VMs:
#
#   host netns   bridge tmc0 172.30.0.1/24 — etcd (127.0.0.1:12379),
#                kube-apiserver (172.30.0.1:6443), kube-controller-manager,
#                kube-scheduler
#   netns tmc-nN eth0 172.30.0.1N/24 on tmc0 (veth tmc-nN) — the node:
#                its own containerd (root, state and socket under
#                $DIR/nodes/tmc-nN), kubelet, kube-proxy, the bridge CNI
#                (cni0, pods in 10.244.N.0/24, routes to the other nodes'
#                pod ranges via their eth0 addresses)
#
# so cross-node pod traffic crosses the tmc0 bridge, where a capture sees it.
# Each node's containerd and kubelet also share a mount namespace of their
# own (node_up says which paths are the node's). Images are built locally
# (no registry is reachable) as OCI archives imported into each node's
# containerd: tlsmesh.local/pause (scripts/cluster/pause.c, static),
# tlsmesh.local/busybox (Debian's busybox-static) and tlsmesh.local/tlsmesh.
#
# Processes run detached (setsid) with their PID in $DIR/pids and their log
# in $DIR/logs; `down` ends exactly those (and the containers their
# containerds started, and the shims, by the $DIR on their command lines),
# removes the netns, links, routes, cgroups, the mount points `up` made and
# $DIR, and checks that nothing is left. `up` is idempotent: what runs is
# kept, what is missing is started. Components enter a node with nsenter
# (--net, and --mount for the kubelet), not `ip netns exec`, which remounts
# /sys and would hide /sys/fs/cgroup from the kubelet.
set -euo pipefail

say()  { printf '\033[1mcluster:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31mcluster: %s\033[0m\n' "$*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${TLSMESH_CLUSTER_DIR:-/var/lib/tlsmesh-cluster}
KUBE_CACHE=/var/cache/tlsmesh/kubernetes-v1.20.2
KBIN=${TLSMESH_KUBE_BIN:-$REPO/target/tools/kubernetes/bin}
[[ -d $KBIN ]] || KBIN=$KUBE_CACHE/bin
NODES=${TLSMESH_CLUSTER_NODES:-2}
BRIDGE=tmc0
HOST_IP=172.30.0.1
API_PORT=6443
ETCD_PORT=12379
ETCD_PEER_PORT=12380
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
CLUSTER_DNS=10.96.0.10
# The tlsmesh CA's Service, pinned: no DNS server runs in the local cluster.
CA_SERVICE_IP=10.96.0.12
POD_CIDR=10.244.0.0/16
PAUSE_IMAGE=tlsmesh.local/pause:3.2
BUSYBOX_IMAGE=tlsmesh.local/busybox:1.35
TLSMESH_IMAGE=tlsmesh.local/tlsmesh
TLSMESH_VERSION=0.1.0
HELM_PYTHON=$REPO/target/tools/helm-venv/bin/python
# The tlsmesh binaries the image is built from (and `tlsmesh ca init` run).
BINARIES=${TLSMESH_BINARIES:-$REPO/target/release}
CNI_BIN=/usr/lib/cni
CGROUP_V1=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)
READY_TIMEOUT=${TLSMESH_CLUSTER_TIMEOUT:-180}

node_name() { echo "tmc-n$1"; }
node_ip()   { echo "172.30.0.1$1"; }
pod_cidr()  { echo "10.244.$1.0/24"; }
node_dir()  { echo "$DIR/nodes/$(node_name "$1")"; }
kubectl()   { "$KBIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" "$@"; }

# --- processes -------------------------------------------------------------

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }

running() {
  local pid
  pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null \
    && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$DIR"* ]]
}

# start NAME NETNS|- BINARY ARGS…: detached, logged, PID recorded; kept if
# running. With MNTNS_OF=<name> in the environment it also joins the mount
# namespace of that running component (a node's, see node_up).
start() {
  local name=$1 netns=$2
  shift 2
  if running "$name"; then
    return
  fi
  mkdir -p "$DIR/pids" "$DIR/logs"
  local pre=()
  [[ $netns == - ]] || pre=(nsenter "--net=/run/netns/$netns")
  [[ -z ${MNTNS_OF:-} ]] || pre+=("--mount=/proc/$(pid_of "$MNTNS_OF")/ns/mnt")
  ((${#pre[@]} == 0)) || pre+=(--)
  # The state directory is on every command line: `running` and `down`
  # recognise our processes by it (a recycled PID is not ours).
  TLSMESH_CLUSTER_DIR=$DIR setsid "${pre[@]}" "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}

stop() {
  local name=$1 pid i
  pid=$(pid_of "$name")
  if [[ -n $pid ]] && running "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/pids/$name.pid"
}

log_tail() { tail -n "${2:-20}" "$DIR/logs/$1.log" 2>/dev/null | sed "s/^/  $1| /" >&2 || true; }

# wait_for WHAT SECONDS COMMAND…
wait_for() {
  local what=$1 secs=$2 t
  shift 2
  for ((t = 0; t < secs * 5; t++)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  say "timed out after ${secs}s waiting for $what"
  return 1
}

# --- checks ----------------------------------------------------------------

preflight() {
  [[ $(id -u) -eq 0 ]] || die "the cluster needs root (netns, cgroups, containerd). Re-run as root."
  local b missing=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    [[ -x $KBIN/$b ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    if [[ -f $KUBE_CACHE/node-build.failed ]]; then
      die "the Kubernetes node binaries did not build on this machine: $(cat "$KUBE_CACHE/node-build.failed")"
    fi
    die "missing ${missing[*]} in $KBIN: run scripts/bootstrap.sh (cargo xtask setup) as root first"
  fi
  for b in etcd containerd containerd-shim-runc-v2 runc ctr nsenter openssl gcc strip jq tcpdump conntrack iptables; do
    command -v "$b" >/dev/null || die "no $b on PATH: run scripts/bootstrap.sh (cargo xtask setup) as root first"
  done
  for b in bridge host-local loopback portmap; do
    [[ -x $CNI_BIN/$b ]] || die "no CNI plugin $CNI_BIN/$b: apt-get install containernetworking-plugins (bootstrap.sh does)"
  done
  [[ -x /bin/busybox ]] || die "no /bin/busybox: apt-get install busybox-static (bootstrap.sh does)"
  local c
  for c in cpu cpuacct cpuset memory; do
    [[ -d /sys/fs/cgroup/$c ]] \
      || die "the kubelet (v1.20, cgroupfs driver) needs the cgroup v1 '$c' controller mounted at /sys/fs/cgroup/$c; this machine has: $(ls /sys/fs/cgroup | tr '\n' ' ')"
  done
}

# --- network ---------------------------------------------------------------

network_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local i j ns
  for ((i = 1; i <= NODES; i++)); do
    ns=$(node_name "$i")
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
    fi
    if ! ip link show "$ns" >/dev/null 2>&1; then
      ip link add "$ns" type veth peer name eth0 netns "$ns"
      ip link set "$ns" master "$BRIDGE" up
      ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
    fi
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$HOST_IP"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.rp_filter=0
    for ((j = 1; j <= NODES; j++)); do
      ((j == i)) || ip -n "$ns" route replace "$(pod_cidr "$j")" via "$(node_ip "$j")"
    done
    # The host reaches the pods (the API server's calls into pods, kubectl port-forward).
    ip route replace "$(pod_cidr "$i")" via "$(node_ip "$i")"
  done
}

network_down() {
  local i ns
  for ((i = 1; i <= 9; i++)); do
    ns=$(node_name "$i")
    ip route del "$(pod_cidr "$i")" 2>/dev/null || true
    ip link del "$ns" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

# --- PKI -------------------------------------------------------------------

# cert NAME CN ORG|- EXT CA: key and certificate signed by CA (ca.crt/ca.key).
cert() {
  local name=$1 cn=$2 org=$3 ext=$4 ca=$5 subj
  subj="/CN=$cn"
  [[ $org == - ]] || subj="/O=$org$subj"
  [[ -f $DIR/pki/$name.crt ]] && return
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$DIR/pki/$name.key" -subj "$subj" -out "$DIR/pki/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$DIR/pki/$name.ext"
  openssl x509 -req -in "$DIR/pki/$name.csr" -CA "$DIR/pki/$ca.crt" -CAkey "$DIR/pki/$ca.key" \
    -CAcreateserial -days 365 -extfile "$DIR/pki/$name.ext" -out "$DIR/pki/$name.crt" 2>/dev/null
  rm -f "$DIR/pki/$name.csr" "$DIR/pki/$name.ext"
}

pki() {
  mkdir -p "$DIR/pki"
  [[ -f $DIR/pki/ca.crt ]] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$DIR/pki/ca.key" -subj "/CN=tlsmesh local cluster CA" -days 365 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$DIR/pki/ca.crt" 2>/dev/null
  local client='extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature'
  cert apiserver kube-apiserver - "extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment
subjectAltName=IP:$HOST_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" ca
  cert admin admin system:masters "$client" ca
  cert kube-controller-manager system:kube-controller-manager - "$client" ca
  cert kube-scheduler system:kube-scheduler - "$client" ca
  cert kube-proxy system:kube-proxy - "$client" ca
  local i
  for ((i = 1; i <= NODES; i++)); do
    cert "kubelet-$(node_name "$i")" "system:node:$(node_name "$i")" system:nodes "$client" ca
    cert "kubelet-serving-$(node_name "$i")" "$(node_name "$i")" - "extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment
subjectAltName=IP:$(node_ip "$i"),DNS:$(node_name "$i")" ca
  done
  [[ -f $DIR/pki/sa.key ]] || {
    openssl genrsa -out "$DIR/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub" 2>/dev/null
  }
  local who
  for who in admin kube-controller-manager kube-scheduler kube-proxy; do
    kubeconfig "$who" >"$DIR/$who.kubeconfig"
  done
  for ((i = 1; i <= NODES; i++)); do
    kubeconfig "kubelet-$(node_name "$i")" >"$DIR/kubelet-$(node_name "$i").kubeconfig"
  done
}

kubeconfig() {
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tlsmesh-local
  cluster:
    server: https://$HOST_IP:$API_PORT
    certificate-authority: $DIR/pki/ca.crt
contexts:
- name: tlsmesh-local
  context:
    cluster: tlsmesh-local
    user: $1
current-context: tlsmesh-local
users:
- name: $1
  user:
    client-certificate: $DIR/pki/$1.crt
    client-key: $DIR/pki/$1.key
EOF
}

# --- images ----------------------------------------------------------------

# oci_image OUT.tar NAME ROOTFS ENTRYPOINT-JSON [PATH]: an OCI image archive
# with one uncompressed layer, reproducible (sorted, owner 0, mtime 0).
oci_image() {
  local out=$1 name=$2 rootfs=$3 entry=$4 path=${5:-/bin} work ld ls cfg cd cs man md ms
  work=$(mktemp -d)
  mkdir -p "$work/blobs/sha256"
  tar -C "$rootfs" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$work/layer.tar" .
  ld=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  ls=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$work/blobs/sha256/$ld"
  cfg="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Entrypoint\":$entry,\"Env\":[\"PATH=$path\"],\"WorkingDir\":\"/\"},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$ld\"]}}"
  printf '%s' "$cfg" >"$work/cfg"
  cd=$(sha256sum "$work/cfg" | cut -d' ' -f1)
  cs=$(stat -c %s "$work/cfg")
  mv "$work/cfg" "$work/blobs/sha256/$cd"
  man="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cd\",\"size\":$cs},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$ld\",\"size\":$ls}]}"
  printf '%s' "$man" >"$work/man"
  md=$(sha256sum "$work/man" | cut -d' ' -f1)
  ms=$(stat -c %s "$work/man")
  mv "$work/man" "$work/blobs/sha256/$md"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$md" "$ms" "$name" "${name##*:}" >"$work/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$out.tmp" oci-layout index.json blobs
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

images() {
  local out=$REPO/target/cluster/images root
  mkdir -p "$out"
  if [[ ! -f $out/pause.tar || $REPO/scripts/cluster/pause.c -nt $out/pause.tar ]]; then
    root=$(mktemp -d)
    gcc -static -Os -s -o "$root/pause" "$REPO/scripts/cluster/pause.c" \
      || die "cannot build the pause binary (gcc -static; libc6-dev is needed)"
    oci_image "$out/pause.tar" "$PAUSE_IMAGE" "$root" '["/pause"]'
    rm -rf "$root"
  fi
  if [[ ! -f $out/busybox.tar || $0 -nt $out/busybox.tar ]]; then
    root=$(mktemp -d)
    mkdir -p "$root/bin" "$root/etc" "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    local app
    for app in $(/bin/busybox --list); do
      [[ $app == busybox ]] || ln -s busybox "$root/bin/$app"
    done
    # The test app: `httpd -f -p 8080 -h /www` answers /cgi-bin/whoami with
    # the serving pod's name and the address the connection came from.
    mkdir -p "$root/www/cgi-bin"
    printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%%s %%s\\n" "$(hostname)" "$REMOTE_ADDR"\n' \
      >"$root/www/cgi-bin/whoami"
    chmod 755 "$root/www/cgi-bin/whoami"
    # Its client: `ask HOST PORT` prints that line. (nc, not wget: Debian's
    # static busybox wget crashes; names do not resolve in a static image.)
    printf '#!/bin/sh\nprintf "GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n" | nc -w 5 "$1" "$2" 2>/dev/null | tail -n 1\n' \
      >"$root/bin/ask"
    chmod 755 "$root/bin/ask"
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
    oci_image "$out/busybox.tar" "$BUSYBOX_IMAGE" "$root" '["/bin/sh"]'
    rm -rf "$root"
  fi
}

# The tlsmesh image: the release binaries (daemon/CA/CLI, CNI plugin) and
# what the daemon runs (nsenter, ip), each with the shared libraries ldd
# names — the machine's own glibc, so the CNI plugin the installer copies to
# the node runs there too. No shell, no package manager.
tlsmesh_image() {
  local out=$REPO/target/cluster/images rel=$BINARIES root b lib
  for b in tlsmesh tlsmesh-cni; do
    [[ -x $rel/$b ]] || die "no $rel/$b: cargo build --release -p tlsmesh -p tlsmesh-cni (cargo xtask cluster install does; TLSMESH_BINARIES names another directory)"
  done
  # The tag names the binaries' content: a rebuilt daemon is a new image,
  # and `install` again rolls the DaemonSet to it (an upgrade).
  TLSMESH_TAG=$TLSMESH_VERSION-$(cat "$rel/tlsmesh" "$rel/tlsmesh-cni" | sha256sum | cut -c1-12)
  if [[ -f $out/tlsmesh.tar && $(cat "$out/tlsmesh.tag" 2>/dev/null) == "$TLSMESH_TAG" ]]; then
    return
  fi
  root=$(mktemp -d)
  mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/etc" "$root/tmp" "$root/run"
  # Without their DWARF (the release profile keeps it for profiling): ten
  # times smaller, the same code.
  strip --strip-debug -o "$root/usr/local/bin/tlsmesh" "$rel/tlsmesh"
  strip --strip-debug -o "$root/usr/local/bin/tlsmesh-cni" "$rel/tlsmesh-cni"
  cp "$(command -v nsenter)" "$(command -v ip)" "$root/usr/bin/"
  for b in "$root"/usr/local/bin/* "$root"/usr/bin/*; do
    for lib in $(ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      cp -L --parents "$lib" "$root/"
    done
  done
  printf 'root:x:0:0:root:/:/usr/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\n' >"$root/etc/group"
  oci_image "$out/tlsmesh.tar" "$TLSMESH_IMAGE:$TLSMESH_TAG" "$root" '["/usr/local/bin/tlsmesh"]' \
    /usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
  echo "$TLSMESH_TAG" >"$out/tlsmesh.tag"
  rm -rf "$root"
}

# --- control plane ---------------------------------------------------------

control_plane_up() {
  mkdir -p "$DIR/etcd"
  start etcd - etcd --name=tmc --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="tmc=http://127.0.0.1:$ETCD_PEER_PORT" --logger=zap --log-level=warn
  start kube-apiserver - "$KBIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$HOST_IP" --advertise-address="$HOST_IP" --secure-port="$API_PORT" \
    --tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" \
    --kubelet-client-certificate="$DIR/pki/admin.crt" --kubelet-client-key="$DIR/pki/admin.key" \
    --kubelet-certificate-authority="$DIR/pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$DIR/pki/sa.pub" --service-account-signing-key-file="$DIR/pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --cert-dir="$DIR/apiserver-certs" --profiling=false
  wait_for "kube-apiserver /readyz" 90 kubectl get --raw /readyz \
    || { log_tail etcd; log_tail kube-apiserver; die "kube-apiserver did not become ready (logs in $DIR/logs)"; }
  start kube-controller-manager - "$KBIN/kube-controller-manager" \
    --kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --leader-elect=false --port=0 --bind-address=127.0.0.1 --secure-port=10257 \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$DIR/pki/sa.key" --root-ca-file="$DIR/pki/ca.crt" \
    --cluster-signing-cert-file="$DIR/pki/ca.crt" --cluster-signing-key-file="$DIR/pki/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --cluster-cidr="$POD_CIDR" --allocate-node-cidrs=false \
    --controllers='*,-nodeipam,-cloud-node-lifecycle'
  start kube-scheduler - "$KBIN/kube-scheduler" \
    --kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --leader-elect=false --port=0 --bind-address=127.0.0.1 --secure-port=10259
}

# --- nodes -----------------------------------------------------------------

cgroup_root_create() {
  local name=$1 c
  for c in "${CGROUP_V1[@]}"; do
    [[ -d /sys/fs/cgroup/$c ]] || continue
    mkdir -p "/sys/fs/cgroup/$c/$name"
    if [[ $c == cpuset ]]; then
      cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$name/cpuset.cpus"
      cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$name/cpuset.mems"
    fi
  done
}

# The node's own mount namespace, entered by its containerd (which holds it)
# and kubelet: the paths a real node has to itself are bind-mounted from
# $DIR/nodes/<node>/fs, so the two kubelets do not garbage-collect each
# other's pod logs, and each node has its own CNI configuration and plugins
# (where tlsmesh's installer writes), pod netns, kubelet root and bpffs.
# Slave propagation: the host's mounts reach the node, not the other way;
# the namespace ends with the node's processes and takes its mounts along.
NODE_PATHS=(/var/log /etc/cni /opt/cni/bin /var/lib/cni /run/netns /run/tlsmesh /var/lib/kubelet)

# The mount points must exist on the host: those this script creates are
# listed in $DIR/created-paths and removed (when empty) by `down`.
node_mountpoints() {
  local p q
  for p in "${NODE_PATHS[@]}"; do
    q=$p
    # The outermost missing directory is the one to remove later.
    while [[ ! -e $(dirname "$q") ]]; do q=$(dirname "$q"); done
    if [[ ! -e $q ]]; then
      echo "$q" >>"$DIR/created-paths"
      mkdir -p "$p"
    fi
  done
}

node_mounts_script() {
  local dir=$1 p script=""
  for p in "${NODE_PATHS[@]}"; do
    script+="mkdir -p '$dir/fs$p' && mount --bind '$dir/fs$p' '$p' && "
  done
  # rshared, as on a node run by systemd: the kubelet's HostToContainer
  # volumes (the daemon's /var/run/netns and /sys/fs/bpf) need a shared or
  # slave source. Still a slave of the host: nothing propagates back.
  script+="mount -t bpf bpf /sys/fs/bpf && mount --make-rshared / && "
  printf '%s' "$script"
}

node_up() {
  local i=$1 name dir
  name=$(node_name "$i")
  dir=$(node_dir "$i")
  mkdir -p "$dir/containerd" "$dir/fs/etc/cni/net.d" "$dir/fs/opt/cni/bin" "$dir/fs/var/lib/kubelet"
  # A node whose containerd (the mount namespace's holder) is gone starts
  # afresh: its kubelet would be in a namespace nothing else shares.
  if ! running "containerd-$name"; then
    stop "kube-proxy-$name"
    stop "kubelet-$name"
  fi
  cp -u "$CNI_BIN"/* "$dir/fs/opt/cni/bin/"
  node_mountpoints
  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # The kubelet asks for oom_score_adj -998 for sandboxes; lowering it needs
  # CAP_SYS_RESOURCE, which a machine that is itself a container may lack
  # (runc then fails with "failed to update /proc/self/oom_score_adj").
  # Clamped to containerd's own value instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
EOF
  # The chain: bridge (pod addresses from this node's range) then portmap.
  # tlsmesh's chart appends its own plugin to this list (its init container).
  [[ -f $dir/fs/etc/cni/net.d/10-tmc.conflist ]] || cat >"$dir/fs/etc/cni/net.d/10-tmc.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "tmc",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$(pod_cidr "$i")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  start "containerd-$name" "$name" unshare --mount --propagation slave -- \
    sh -c "$(node_mounts_script "$dir")exec containerd --config '$dir/containerd/config.toml'"
  wait_for "containerd on $name" 30 ctr --address "$dir/containerd.sock" version \
    || { log_tail "containerd-$name"; die "containerd on $name did not start"; }
  local img
  for img in pause busybox; do
    ctr --address "$dir/containerd.sock" -n k8s.io images import \
      "$REPO/target/cluster/images/$img.tar" >/dev/null \
      || die "cannot import $img.tar into containerd on $name"
  done

  cgroup_root_create "$name"
  mkdir -p "$dir/kubelet"
  cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$i")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  x509: {clientCAFile: $DIR/pki/ca.crt}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
tlsCertFile: $DIR/pki/kubelet-serving-$name.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving-$name.key
cgroupDriver: cgroupfs
cgroupRoot: /$name
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$CLUSTER_DNS]
podCIDR: $(pod_cidr "$i")
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {}
evictionSoft: {}
serializeImagePulls: false
resolvConf: ""
EOF
  MNTNS_OF="containerd-$name" start "kubelet-$name" "$name" "$KBIN/kubelet" \
    --config="$dir/kubelet/config.yaml" \
    --kubeconfig="$DIR/kubelet-$name.kubeconfig" \
    --root-dir=/var/lib/kubelet --cert-dir="$dir/kubelet/pki" \
    --container-runtime=remote --container-runtime-endpoint="unix://$dir/containerd.sock" \
    --containerd="$dir/containerd.sock" \
    --runtime-request-timeout=5m \
    --hostname-override="$name" --node-ip="$(node_ip "$i")" \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --register-node=true --v=1
  cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/kube-proxy.kubeconfig}
hostnameOverride: $name
bindAddress: $(node_ip "$i")
clusterCIDR: $POD_CIDR
mode: iptables
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {maxPerCore: 0}
EOF
  start "kube-proxy-$name" "$name" "$KBIN/kube-proxy" --config="$dir/kube-proxy.yaml"
}

node_ready() {
  kubectl get node "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

# --- tlsmesh, the way a user installs it -------------------------------------

# The CA's key and root (tlsmesh ca init), the Secret and ConfigMap the chart
# expects (deploy/README.md), then `helm install` of deploy/helm/tlsmesh with
# real Helm (v4, helm-python-sdk): the local image, the hybrid cgroup layout's
# v2 root, one CA replica. Waits until the DaemonSet runs on every node and
# the CA is available.
install() {
  status >/dev/null || die "the cluster is not up: cargo xtask cluster up"
  [[ -x $HELM_PYTHON ]] || die "no Helm venv at $HELM_PYTHON: run scripts/bootstrap.sh"
  tlsmesh_image
  local i dir
  for ((i = 1; i <= NODES; i++)); do
    dir=$(node_dir "$i")
    ctr --address "$dir/containerd.sock" -n k8s.io images import "$REPO/target/cluster/images/tlsmesh.tar" >/dev/null \
      || die "cannot import the tlsmesh image into $(node_name "$i")"
  done
  local ca=$DIR/tlsmesh-ca
  [[ -f $ca/ca.pem ]] || "$BINARIES/tlsmesh" ca init --dir "$ca" --trust-domain cluster.local >/dev/null \
    || die "tlsmesh ca init failed"
  kubectl create namespace tlsmesh-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n tlsmesh-system create secret generic tlsmesh-ca \
    --from-file=tls.crt="$ca/ca.pem" --from-file=tls.key="$ca/ca.key" --dry-run=client -o yaml \
    | kubectl apply -f - >/dev/null
  kubectl -n tlsmesh-system create configmap tlsmesh-ca-root --from-file=ca.crt="$ca/ca.pem" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  local values
  values=$(printf '{"image":{"repository":"%s","tag":"%s","pullPolicy":"Never"},"node":{"cgroupRoot":"%s"},"ca":{"replicas":1,"clusterIP":"%s","address":"%s:15012","serverName":"tlsmesh-ca.tlsmesh-system.svc"}}' \
    "$TLSMESH_IMAGE" "$TLSMESH_TAG" "$(cgroup2_root)" "$CA_SERVICE_IP" "$CA_SERVICE_IP")
  "$HELM_PYTHON" "$REPO/scripts/helm-install.py" install "$DIR/admin.kubeconfig" "$REPO/deploy/helm/tlsmesh" "$values" \
    || die "helm install failed (message above)"
  wait_for "the tlsmesh DaemonSet on $NODES nodes" 120 daemonset_ready \
    || { kubectl -n tlsmesh-system get pods -o wide >&2; daemon_logs_tail >&2; die "the tlsmesh DaemonSet is not ready"; }
  wait_for "the tlsmesh CA" 120 kubectl -n tlsmesh-system wait --for=condition=Available deployment/tlsmesh-ca --timeout=1s \
    || { kubectl -n tlsmesh-system get pods -o wide >&2; die "the tlsmesh CA is not available"; }
  say "tlsmesh installed: DaemonSet ready on $NODES nodes, CA available"
}

# The last lines of each daemon container (and of its previous run).
daemon_logs_tail() {
  local p
  for p in $(kubectl -n tlsmesh-system get pods -l app.kubernetes.io/name=tlsmesh-node -o name); do
    echo "--- $p (previous run) ---"
    kubectl -n tlsmesh-system logs "$p" -c node --previous --tail=15 2>&1 || true
    echo "--- $p ---"
    kubectl -n tlsmesh-system logs "$p" -c node --tail=15 2>&1 || true
  done
}

daemonset_ready() {
  local ready
  ready=$(kubectl -n tlsmesh-system get daemonset tlsmesh-node -o 'jsonpath={.status.numberReady}/{.status.desiredNumberScheduled}/{.status.updatedNumberScheduled}')
  [[ $ready == "$NODES/$NODES/$NODES" ]]
}

# The host's cgroup-v2 root (the hybrid layout has it at /sys/fs/cgroup/unified).
cgroup2_root() {
  awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts
}

# --- the demo on the cluster ---------------------------------------------------
#
# The story of the netns demo (README), with real pods: each step prints
# `demo: ok: …` or `demo: FAIL: …`; the exit status is 1 when any failed
# (tests/tests/cluster.rs asserts every step). Namespaces demo-*; run again
# and they are made afresh.

DEMO_FAILED=0
ok()   { printf '\033[1;32mdemo: ok:\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31mdemo: FAIL:\033[0m %s\n' "$*"; DEMO_FAILED=1; }
step() { printf '\n\033[1mdemo: step %s\033[0m\n' "$*"; }

# pod NS NAME NODE RESTART COMMAND…: a busybox pod (created, not waited for).
demo_pod() {
  local ns=$1 name=$2 node=$3 restart=$4 cmd a
  shift 4
  cmd="["
  for a in "$@"; do cmd+="$(jq -cn --arg a "$a" '$a'),"; done
  cmd="${cmd%,}]"
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "$name", "labels": {"app": "$name"}},
 "spec": {"nodeName": "$node", "restartPolicy": "$restart", "terminationGracePeriodSeconds": 1,
          "containers": [{"name": "main", "image": "$BUSYBOX_IMAGE", "command": $cmd}]}}
EOF
}

pod_phase() { kubectl -n "$1" get pod "$2" -o 'jsonpath={.status.phase}' 2>/dev/null; }
pod_ip_of() { kubectl -n "$1" get pod "$2" -o 'jsonpath={.status.podIP}'; }
pod_running() { [[ $(pod_phase "$1" "$2") == Running ]]; }
# A namespace takes pods once its `default` ServiceAccount has its token
# Secret: on 1.20 the ServiceAccount admission refuses a pod before that
# ("No API token found"), and the token controller adds it a moment after
# the ServiceAccount itself.
sa_ready() { [[ -n $(kubectl -n "$1" get serviceaccount default -o 'jsonpath={.secrets[0].name}' 2>/dev/null) ]]; }
pod_done() { [[ $(pod_phase "$1" "$2") =~ ^(Succeeded|Failed)$ ]]; }

# ask_from NS NAME NODE TARGET…: a one-shot client pod that asks each
# TARGET ("ip port"); prints its log (one line per answer, empty when refused).
ask_from() {
  local ns=$1 name=$2 node=$3 script="" t
  shift 3
  for t in "$@"; do script+="ask $t; echo '|'; "; done
  kubectl -n "$ns" delete pod "$name" --ignore-not-found --wait=true >/dev/null
  demo_pod "$ns" "$name" "$node" Never sh -c "$script"
  wait_for "pod $ns/$name to finish" 90 pod_done "$ns" "$name" || true
  kubectl -n "$ns" logs "$name" 2>/dev/null
}

enrolled() { daemon_log "$1" | grep '"pod enrolled"' | grep -q "\"pod\":\"$2\""; }
daemon_log() { kubectl -n tlsmesh-system logs "$(daemon_pod "$1")" -c node 2>/dev/null; }
daemon_pod() {
  kubectl -n tlsmesh-system get pods -l app.kubernetes.io/name=tlsmesh-node \
    --field-selector "spec.nodeName=$1" -o 'jsonpath={.items[0].metadata.name}'
}

# capture_start NAME / capture_stop NAME: tcpdump on the node-to-node bridge
# (the API server's and kubelets' own traffic left out); _stop prints how
# many packets carried the HTTP request line in the clear.
capture_start() {
  tcpdump -i "$BRIDGE" -nn -s0 -U -w "$DIR/$1.pcap" 'tcp and not port 6443 and not port 10250' >/dev/null 2>&1 &
  echo $! >"$DIR/pids/tcpdump-$1.pid"
  sleep 1
}
capture_stop() {
  local pid
  pid=$(cat "$DIR/pids/tcpdump-$1.pid")
  sleep 1
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$DIR/pids/tcpdump-$1.pid"
  tcpdump -r "$DIR/$1.pcap" -nn -A 2>/dev/null | grep -c 'GET /cgi-bin/whoami' || true
}

demo() {
  status >/dev/null || die "the cluster is not up: cargo xtask cluster up"
  daemonset_ready || die "tlsmesh is not installed: cargo xtask cluster install"
  local n1 n2 ns out2
  n1=$(node_name 1)
  n2=$(node_name 2)
  for ns in demo-strict demo-plain demo-permissive demo-late; do
    kubectl delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
    kubectl create namespace "$ns" >/dev/null
  done
  kubectl label namespace demo-strict tlsmesh.io/mode=strict >/dev/null
  kubectl label namespace demo-permissive tlsmesh.io/mode=permissive >/dev/null
  for ns in demo-strict demo-plain demo-permissive demo-late; do
    wait_for "the default ServiceAccount token of $ns" 30 sa_ready "$ns"
  done

  step "1: an enrolled server on $n1, a Service in front of it"
  demo_pod demo-strict server "$n1" Always httpd -f -p 8080 -h /www
  kubectl -n demo-strict apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
 "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
EOF
  wait_for "demo-strict/server Running" 90 pod_running demo-strict server || fail "the server pod does not run"
  local server svc
  server=$(pod_ip_of demo-strict server)
  svc=$(kubectl -n demo-strict get service server -o 'jsonpath={.spec.clusterIP}')
  echo "server pod $server on $n1, Service $svc:80"

  step "2: a client pod started on $n2 after the label asks it, by pod address and by ClusterIP"
  capture_start enrolled
  local out client
  out=$(ask_from demo-strict client "$n2" "$server 8080" "$svc 80")
  local plain
  plain=$(capture_stop enrolled)
  client=$(pod_ip_of demo-strict client)
  echo "$out" | sed 's/^/  client log| /'
  if [[ $(echo "$out" | grep -c "^server \[::ffff:$client\]$") == 2 ]]; then
    ok "the client pod ($client) got two answers; the server saw the client pod's own address"
  else
    fail "expected two answers 'server [::ffff:$client]', got: $(echo "$out" | tr '\n' ' ')"
  fi
  if [[ $plain == 0 ]]; then
    ok "a capture on the node-to-node link ($BRIDGE) found no plaintext request"
  else
    fail "the capture on $BRIDGE found the plaintext request $plain times"
  fi
  if daemon_log "$n2" | grep '"connection complete"' | grep -q '"direction":"outbound","route":"tunnel","pod":"demo-strict/client"'; then
    ok "$n2's daemon carried the client's first connection through the tunnel (enrolled before its first packet: the CNI hook)"
  else
    fail "$n2's daemon has no tunnelled connection from $client"
  fi
  local ids
  ids=$(daemon_log "$n1" | grep '"connection complete"' | grep '"route":"tunnel","pod":"demo-strict/server"' | grep -o '"src_identity":"[^"]*","dst_identity":"[^"]*"' | sort -u | head -1)
  [[ -n $ids ]] && ok "mTLS identities on $n1: $ids" || fail "no tunnelled connection in $n1's log"

  step "3: a pod that is not enrolled"
  demo_pod demo-permissive server "$n1" Always httpd -f -p 8080 -h /www
  wait_for "demo-permissive/server Running" 90 pod_running demo-permissive server || fail "the permissive server does not run"
  local permissive
  permissive=$(pod_ip_of demo-permissive server)
  capture_start plain
  out=$(ask_from demo-plain client "$n2" "$server 8080" "$permissive 8080")
  plain=$(capture_stop plain)
  local first second
  first=$(echo "$out" | sed -n 1p)
  second=$(echo "$out" | sed -n '2,$p' | grep -m1 '^server' || true)
  if [[ $first == "|" ]]; then
    ok "the strict server refused the plaintext connection from the pod that is not enrolled"
  else
    fail "the strict server answered a plaintext client: $first"
  fi
  if [[ -n $second ]]; then
    ok "the permissive server accepted it ($second)"
  else
    fail "the permissive server did not answer the plaintext client: $(echo "$out" | tr '\n' ' ')"
  fi
  if [[ $plain -ge 1 ]]; then
    ok "the same capture saw that plaintext request ($plain packets): the capture does see plaintext"
  else
    fail "the capture saw no plaintext request from the client that is not enrolled"
  fi

  step "4: a pod that runs before its namespace is labelled is enrolled without a restart"
  demo_pod demo-late server "$n1" Always httpd -f -p 8080 -h /www
  wait_for "demo-late/server Running" 90 pod_running demo-late server || fail "the late server does not run"
  local late cid
  late=$(pod_ip_of demo-late server)
  cid=$(kubectl -n demo-late get pod server -o 'jsonpath={.status.containerStatuses[0].containerID}')
  out=$(ask_from demo-plain client "$n2" "$late 8080")
  [[ $out == server* ]] && ok "before the label, the plaintext client reaches it" || fail "before the label, no answer: $out"
  kubectl label namespace demo-late tlsmesh.io/mode=strict >/dev/null
  wait_for "$n1's daemon to enrol demo-late/server" 60 enrolled "$n1" demo-late/server \
    && ok "$n1's daemon enrolled the running pod demo-late/server" || fail "$n1's daemon did not enrol demo-late/server"
  out=$(ask_from demo-plain client "$n2" "$late 8080")
  [[ $out == "|" ]] && ok "now the plaintext client is refused" || fail "after the label the plaintext client still gets: $out"
  out=$(ask_from demo-strict client "$n2" "$late 8080")
  [[ $out == "server [::ffff:$(pod_ip_of demo-strict client)]"* ]] \
    && ok "and the enrolled client gets through the tunnel" || fail "the enrolled client got: $out"
  local cid2 restarts
  cid2=$(kubectl -n demo-late get pod server -o 'jsonpath={.status.containerStatuses[0].containerID}')
  restarts=$(kubectl -n demo-late get pod server -o 'jsonpath={.status.containerStatuses[0].restartCount}')
  [[ $cid2 == "$cid" && $restarts == 0 ]] && ok "same container, 0 restarts" || fail "the pod was restarted ($cid -> $cid2, $restarts restarts)"

  step "5: kubectl rollout restart daemonset/tlsmesh-node while a client connects every 100 ms"
  kubectl -n demo-strict delete pod loop --ignore-not-found --wait=true >/dev/null
  demo_pod demo-strict loop "$n2" Never sh -c \
    "ok=0; bad=0; i=0; while [ \$i -lt 400 ]; do if [ -n \"\$(ask $svc 80)\" ]; then ok=\$((ok+1)); else bad=\$((bad+1)); fi; i=\$((i+1)); sleep 0.1; done; echo \"ok=\$ok refused=\$bad\""
  wait_for "the loop client to run" 60 pod_running demo-strict loop
  sleep 3
  kubectl -n tlsmesh-system rollout restart daemonset/tlsmesh-node >/dev/null
  kubectl -n tlsmesh-system rollout status daemonset/tlsmesh-node --timeout=180s >/dev/null \
    && ok "the DaemonSet rolled out on both nodes" || fail "the rollout did not finish"
  wait_for "the loop client to finish" 120 pod_done demo-strict loop
  out=$(kubectl -n demo-strict logs loop)
  echo "  $out"
  out2=$(ask_from demo-strict client "$n2" "$svc 80")
  [[ $out2 == "server [::ffff:$(pod_ip_of demo-strict client)]"* ]] \
    && ok "after the rollout a new client pod gets through the tunnel again" || fail "after the rollout: $out2"
  local refused=${out##*refused=}
  if [[ $refused == 0 ]]; then
    ok "no connection refused during the rollout ($out)"
  elif semver_ge_122; then
    fail "connections were refused during the rollout ($out)"
  else
    ok "Kubernetes $(server_version) has no DaemonSet maxSurge (1.22+): the old daemon stops before the new one starts, so connections in that gap are refused ($out); see docs/CLUSTER.md"
  fi

  echo
  if ((DEMO_FAILED)); then
    printf '\033[1;31mdemo: some steps failed\033[0m\n'
    return 1
  fi
  printf '\033[1;32mdemo: every step as expected\033[0m\n'
}

server_version() { kubectl version -o json 2>/dev/null | jq -r '.serverVersion.gitVersion'; }
semver_ge_122() {
  local v major minor
  v=$(server_version)
  v=${v#v}
  major=${v%%.*}
  minor=$(echo "$v" | cut -d. -f2)
  ((major > 1 || minor >= 22))
}

# --- commands --------------------------------------------------------------

up() {
  preflight
  local t0=$SECONDS i
  mkdir -p "$DIR"
  network_up
  pki
  images
  control_plane_up
  for ((i = 1; i <= NODES; i++)); do
    node_up "$i"
  done
  for ((i = 1; i <= NODES; i++)); do
    wait_for "node $(node_name "$i") Ready" "$READY_TIMEOUT" node_ready "$(node_name "$i")" \
      || { log_tail "kubelet-$(node_name "$i")" 30; die "node $(node_name "$i") is not Ready (logs in $DIR/logs)"; }
  done
  say "up in $((SECONDS - t0)) s: $NODES nodes Ready; export KUBECONFIG=$DIR/admin.kubeconfig"
  ln -sf "$DIR/admin.kubeconfig" "$REPO/target/cluster/kubeconfig"
}

status() {
  [[ -d $DIR ]] || { echo "cluster: down (no $DIR)"; return 3; }
  local name ok=0
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if running "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: not running"; ok=1; fi
  done
  local i n
  for ((i = 1; i <= NODES; i++)); do
    n=$(node_name "$i")
    for name in "containerd-$n" "kubelet-$n" "kube-proxy-$n"; do
      if running "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: not running"; ok=1; fi
    done
    if node_ready "$n"; then echo "node $n: Ready"; else echo "node $n: not Ready"; ok=1; fi
  done
  echo "kubeconfig: $DIR/admin.kubeconfig"
  return $ok
}

# Every process whose command line names $DIR: ours (containerd's shims and
# the containers' processes carry their bundle path under $DIR).
our_pids() {
  local p
  for p in /proc/[0-9]*; do
    [[ ${p#/proc/} == "$$" ]] && continue
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$DIR"; then
      echo "${p#/proc/}"
    fi
  done
}

down() {
  [[ $(id -u) -eq 0 ]] || die "needs root"
  local i n pid left
  for ((i = 1; i <= 9; i++)); do
    n=$(node_name "$i")
    stop "kube-proxy-$n"
    stop "kubelet-$n"
    if [[ -S $DIR/nodes/$n/containerd.sock ]] && running "containerd-$n"; then
      for pid in $(ctr --address "$DIR/nodes/$n/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
        ctr --address "$DIR/nodes/$n/containerd.sock" -n k8s.io tasks kill -s KILL "$pid" >/dev/null 2>&1 || true
      done
    fi
  done
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop "$name"
  done
  for ((i = 1; i <= 9; i++)); do
    stop "containerd-$(node_name "$i")"
  done
  # Shims (re-parented to init) and anything else that names our directory.
  for pid in $(our_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  for i in $(seq 30); do [[ -z $(our_pids) ]] && break; sleep 0.1; done
  # Mounts under $DIR (rootfs overlays, shm, kubelet volumes), deepest first.
  local m
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$DIR" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r)
  network_down
  # Cgroups: the per-node roots the kubelets made their pods' cgroups in.
  # (A killed container's cgroup empties a moment after its process dies.)
  local c t
  for ((t = 0; t < 50; t++)); do
    left=0
    for ((i = 1; i <= 9; i++)); do
      n=$(node_name "$i")
      for c in "${CGROUP_V1[@]}" unified; do
        [[ -d /sys/fs/cgroup/$c/$n ]] || continue
        find "/sys/fs/cgroup/$c/$n" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [[ -d /sys/fs/cgroup/$c/$n ]] && left=1
      done
    done
    ((left == 0)) && break
    sleep 0.1
  done
  # Mount points made on the host for the nodes' own paths (when empty).
  local p
  if [[ -f $DIR/created-paths ]]; then
    while read -r p; do
      find "$p" -depth -type d -empty -delete 2>/dev/null || true
    done < <(sort -ru "$DIR/created-paths")
  fi
  rm -rf "$DIR" "$REPO/target/cluster/kubeconfig"
  left=()
  for ((i = 1; i <= 9; i++)); do
    n=$(node_name "$i")
    ip netns list | grep -qw "$n" && left+=("netns $n")
    for c in "${CGROUP_V1[@]}" unified; do
      [[ -d /sys/fs/cgroup/$c/$n ]] && left+=("cgroup $c/$n")
    done
  done
  [[ -z $(our_pids) ]] || left+=("processes $(our_pids | tr '\n' ' ')")
  ((${#left[@]} == 0)) || die "down left behind: ${left[*]}"
  say "down: nothing left"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  images) images ;;
  install) install ;;
  demo) demo ;;
  *) die "usage: $0 up|down|status|install|demo|images" ;;
esac
