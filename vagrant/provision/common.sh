#!/usr/bin/env bash
# Every node: containerd, kubeadm/kubelet/kubectl, kernel settings, and the
# tlsmesh image imported into containerd's k8s.io namespace.
set -euo pipefail
K8S_MINOR="$1"
NODE_IP="$2"
export DEBIAN_FRONTEND=noninteractive

swapoff -a
sed -i '/\sswap\s/d' /etc/fstab
cat >/etc/modules-load.d/k8s.conf <<MODS
overlay
br_netfilter
MODS
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/k8s.conf <<SYSCTL
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
SYSCTL
sysctl --system >/dev/null

apt-get update -q
apt-get install -y -q containerd apt-transport-https ca-certificates curl gpg tcpdump jq
mkdir -p /etc/containerd
containerd config default >/etc/containerd/config.toml
sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
systemctl restart containerd

install -d -m 0755 /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/Release.key" \
  | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/ /" \
  >/etc/apt/sources.list.d/kubernetes.list
apt-get update -q
apt-get install -y -q kubelet kubeadm kubectl
apt-mark hold kubelet kubeadm kubectl
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" >/etc/default/kubelet

# bpffs where the daemon pins its programs (systemd usually mounts it).
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The tlsmesh image, built from the binaries the host built (README.md).
for f in release/tlsmesh x86_64-unknown-linux-musl/release/tlsmesh-cni; do
  if [ ! -f "/tlsmesh/target/$f" ]; then
    echo "target/$f is missing: build it on the host first (vagrant/README.md), then 'vagrant rsync' and 'vagrant provision'" >&2
    exit 1
  fi
done
apt-get install -y -q buildah
buildah build --quiet -f /tlsmesh/deploy/Dockerfile -t localhost/tlsmesh:dev /tlsmesh/target
rm -f /tmp/tlsmesh.tar
buildah push localhost/tlsmesh:dev docker-archive:/tmp/tlsmesh.tar:localhost/tlsmesh:dev
ctr -n k8s.io images import /tmp/tlsmesh.tar
