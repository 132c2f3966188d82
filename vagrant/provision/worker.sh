#!/usr/bin/env bash
# Worker: join the control plane with the fixed bootstrap token (test
# cluster only: the CA pin is skipped).
set -euo pipefail
CP_IP="$1"
TOKEN="$2"
if [ -f /etc/kubernetes/kubelet.conf ]; then
  exit 0
fi
for _ in $(seq 1 60); do
  curl -ksf "https://${CP_IP}:6443/readyz" >/dev/null 2>&1 && break
  sleep 5
done
kubeadm join "${CP_IP}:6443" --token "$TOKEN" --discovery-token-unsafe-skip-ca-verification
