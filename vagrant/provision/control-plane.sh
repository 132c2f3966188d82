#!/usr/bin/env bash
# Control plane: kubeadm init, flannel, the tlsmesh CA secret, the Helm
# release, and a labelled demo namespace.
set -euo pipefail
NODE_IP="$1"
TOKEN="$2"
NET="$3"
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f /etc/kubernetes/admin.conf ]; then
  kubeadm init --apiserver-advertise-address="$NODE_IP" --pod-network-cidr=10.244.0.0/16 \
    --node-name cp --token "$TOKEN" --token-ttl 0
fi
mkdir -p /home/vagrant/.kube
cp /etc/kubernetes/admin.conf /home/vagrant/.kube/config
chown -R vagrant: /home/vagrant/.kube

# Flannel on the private network's interface (its name depends on the box
# and provider; all nodes use the same box, so the same name).
IFACE=$(ip -o -4 addr show | awk -v net="$NET." 'index($4, net) == 1 {print $2; exit}')
curl -fsSL https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml \
  | sed "s|- --kube-subnet-mgr|- --kube-subnet-mgr\n        - --iface=${IFACE}|" \
  | kubectl apply -f -

# Helm.
if ! command -v helm >/dev/null; then
  curl -fsSL https://raw.githubusercontent.com/helm/helm/main/scripts/get-helm-3 | bash
fi

# The CA's signing certificate: a self-signed ECDSA P-256 root (an
# "external CA" as far as tlsmesh is concerned; `tlsmesh ca init` makes the
# same thing).
kubectl create namespace tlsmesh-system --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace tlsmesh-system pod-security.kubernetes.io/enforce=privileged --overwrite
if ! kubectl -n tlsmesh-system get secret tlsmesh-ca >/dev/null 2>&1; then
  d=$(mktemp -d)
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$d/tls.key" -out "$d/tls.crt" -days 3650 -subj "/CN=tlsmesh root CA cluster.local vagrant" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  kubectl -n tlsmesh-system create secret generic tlsmesh-ca --from-file="$d/tls.crt" --from-file="$d/tls.key"
  kubectl -n tlsmesh-system create configmap tlsmesh-ca-root --from-file=ca.crt="$d/tls.crt"
  rm -rf "$d"
fi

helm upgrade --install tlsmesh /tlsmesh/deploy/helm/tlsmesh -n tlsmesh-system \
  --set image.repository=localhost/tlsmesh --set image.tag=dev --set image.pullPolicy=Never

# The demo: a server and a client in an enrolled namespace, and a plaintext
# client in another one (refused by the strict server).
kubectl apply -f /tlsmesh/vagrant/demo.yaml
echo "control plane ready; see vagrant/README.md for what to try"
