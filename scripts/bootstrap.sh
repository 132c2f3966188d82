#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (root): apt packages,
# bpf-linker, the Helm venv for the chart tests, the Kubernetes control plane
# for the API tests (scripts/kube-control-plane.sh), cgroup v2 and bpffs checks.
# A second run does nothing and takes seconds. Called by both README
# commands; safe to run by hand.
set -euo pipefail

say()  { printf '\033[1mbootstrap:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31mbootstrap: %s\033[0m\n' "$*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
  die "tlsmesh needs root (eBPF, network namespaces, apt). Re-run as root, e.g.: sudo $0"
fi

APT_PACKAGES=(
  rustc-web cargo-web rust-web-src
  llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev
  nftables libnftnl-dev libmnl-dev pkg-config
  iproute2 iperf3 stunnel4 openssl bpftool tcpdump util-linux procps
  build-essential ca-certificates curl
  ruby python3 python3-venv
  # The real Kubernetes control plane the API tests run against
  # (scripts/kube-control-plane.sh builds it from Debian's source package).
  golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev etcd-server
  # The real Prometheus (and promtool) the prometheus_* tests scrape the
  # daemons with (tests/tests/prometheus.rs starts its own, in a netns).
  prometheus
  # A real node for the local cluster (scripts/cluster.sh, `cargo xtask
  # cluster`): container runtime, CNI plugins, a static userland for the
  # locally built images, what kubelet and kube-proxy call.
  containerd runc containernetworking-plugins busybox-static conntrack socat iptables
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # llvm-22 and rustc-web 1.96 arrive with bookworm updates: refresh first.
  apt-get update -qq || die "apt-get update failed: check the network/proxy to deb.debian.org"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
fi

# rustup's cargo (stable) is the host toolchain; bpf-linker is built with it.
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "no cargo on PATH. Install Rust with rustup (https://rustup.rs) or: apt-get install cargo-web"

BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "building bpf-linker $BPF_LINKER_VERSION against llvm-22 (about a minute)"
  PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features llvm-22 >/dev/null 2>&1 \
    || PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
      cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features llvm-22 \
    || die "could not build bpf-linker; see the cargo output above"
fi

# Real Helm for the chart tests (tests/tests/deploy_tools.rs): helm-python-sdk
# ships Helm v4 as a native library, in a venv under target/ (no helm binary).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELM_VENV="$REPO/target/tools/helm-venv"
HELM_SDK=helm-python-sdk==0.2.2
if ! "$HELM_VENV/bin/python" -c 'import helm_python' 2>/dev/null; then
  command -v python3 >/dev/null || die "no python3 on PATH: apt-get install python3 python3-venv"
  say "installing $HELM_SDK (Helm v4 as a library) into $HELM_VENV"
  rm -rf "$HELM_VENV"
  mkdir -p "$(dirname "$HELM_VENV")"
  python3 -m venv "$HELM_VENV" \
    || die "python3 -m venv $HELM_VENV failed (with Debian's python3: apt-get install python3-venv)"
  "$HELM_VENV/bin/python" -m pip install -q --disable-pip-version-check "$HELM_SDK" \
    || die "pip install $HELM_SDK into $HELM_VENV failed: check the network/proxy to pypi.org"
  "$HELM_VENV/bin/python" -c 'import helm_python' \
    || die "$HELM_SDK installed but 'import helm_python' fails in $HELM_VENV"
fi

# kube-apiserver and kube-controller-manager v1.20.2 for the real-API-server
# tests (kubeharness/): built once per machine into /var/cache/tlsmesh (the
# script says why there), linked into target/tools/kubernetes/bin.
bash "$REPO/scripts/kube-control-plane.sh" \
  || die "could not build the Kubernetes control plane; see the message above"

# Kernel checks.
[[ -d /proc/sys/net/ipv4 ]] || die "no IPv4 networking in this kernel"
if ! grep -qw cgroup2 /proc/filesystems; then
  die "this kernel has no cgroup v2; tlsmesh needs a kernel with CONFIG_CGROUPS and cgroup2"
fi
cg2=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
if [[ -z $cg2 ]]; then
  say "no cgroup v2 mounted: mounting one at /sys/fs/cgroup/unified"
  mkdir -p /sys/fs/cgroup/unified 2>/dev/null || mkdir -p /run/tlsmesh/cgroup2
  mount -t cgroup2 none /sys/fs/cgroup/unified 2>/dev/null \
    || { mkdir -p /run/tlsmesh/cgroup2 && mount -t cgroup2 none /run/tlsmesh/cgroup2; } \
    || die "could not mount cgroup v2; mount one by hand: mount -t cgroup2 none /sys/fs/cgroup/unified"
fi
# The tests, the demo and the benchmark mount a bpffs of their own per
# topology and unmount it afterwards (tests/src/lib.rs, pin_dir): each bpffs
# mount carries the kernel's maps.debug/progs.debug iterators
# (CONFIG_BPF_PRELOAD), which cannot be unlinked, so none is left behind.
# Only check that the kernel can mount one.
grep -qw bpf /proc/filesystems \
  || die "the kernel has no bpffs (bpf in /proc/filesystems); it needs CONFIG_BPF_SYSCALL"
[[ -e /sys/kernel/btf/vmlinux ]] || say "warning: no /sys/kernel/btf/vmlinux (BTF); programs still load without CO-RE"
say "ok"
