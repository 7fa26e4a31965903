#!/usr/bin/env bash
# End-to-end smoke test on a real cluster: kind + KubeVirt (software emulation)
# + PostgreSQL + the vmpool Helm chart, then one lease and return with the
# `vmpool` CLI, checking that the leased VM is a real VirtualMachine and that
# returning it deletes it.
#
# Needs Docker, kind, kubectl, helm, and the `vmpool` CLI on PATH (pip install -e .),
# plus internet access to pull KubeVirt and container images. It CANNOT run on
# the CI machines (no Docker there): run it on a workstation.
#
#   deploy/kind/e2e.sh            # KEEP=1 keeps the cluster afterwards
#   KUBEVIRT_VERSION=v1.5.0 deploy/kind/e2e.sh
set -euo pipefail

CLUSTER=${CLUSTER:-vmpool-e2e}
KUBEVIRT_VERSION=${KUBEVIRT_VERSION:-v1.5.0}
NS=${NS:-vmpool}
IMAGE=vmpool:e2e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
PF_PID=""

for tool in docker kind kubectl helm vmpool python3; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is not on PATH" >&2; exit 2; }
done

cleanup() {
  [ -n "$PF_PID" ] && kill "$PF_PID" 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
kubectl label node --all topology.kubernetes.io/zone=kind-zone-a --overwrite

step "KubeVirt $KUBEVIRT_VERSION (emulation: kind has no nested virtualisation)"
KV_URL=https://github.com/kubevirt/kubevirt/releases/download/$KUBEVIRT_VERSION
kubectl apply -f "$KV_URL/kubevirt-operator.yaml"
kubectl apply -f "$KV_URL/kubevirt-cr.yaml"
kubectl -n kubevirt patch kubevirt kubevirt --type merge \
  -p '{"spec":{"configuration":{"developerConfiguration":{"useEmulation":true}}}}'
kubectl -n kubevirt wait kubevirt/kubevirt --for condition=Available --timeout=15m

step "PostgreSQL in namespace $NS"
kubectl create namespace "$NS"
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: postgres}
spec:
  selector: {matchLabels: {app: postgres}}
  template:
    metadata: {labels: {app: postgres}}
    spec:
      containers:
        - name: postgres
          image: postgres:16-alpine
          env:
            - {name: POSTGRES_USER, value: vmpool}
            - {name: POSTGRES_PASSWORD, value: vmpool}
            - {name: POSTGRES_DB, value: vmpool}
          ports: [{containerPort: 5432}]
          readinessProbe: {exec: {command: [pg_isready, -U, vmpool]}, periodSeconds: 2}
---
apiVersion: v1
kind: Service
metadata: {name: postgres}
spec:
  selector: {app: postgres}
  ports: [{port: 5432}]
YAML
kubectl -n "$NS" rollout status deployment/postgres --timeout=5m

step "vmpool image"
docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "vmpool chart"
cat >"$WORK/values.yaml" <<YAML
image: {repository: vmpool, tag: e2e, pullPolicy: Never}
replicaCount: 1
database: {url: "postgresql://vmpool:vmpool@postgres.$NS.svc:5432/vmpool"}
config:
  default_pool: small
  provider: {kind: kubevirt}
  pools:
    - name: small
      labels: {os: cirros}
      min_ready: 1
      max_size: 2
      max_provisioning: 1
      boot_timeout: 15m
      template:
        spec:
          template:
            spec:
              domain:
                devices:
                  disks: [{name: containerdisk, disk: {bus: virtio}}]
                memory: {guest: 128Mi}
              terminationGracePeriodSeconds: 0
              volumes:
                - name: containerdisk
                  containerDisk: {image: quay.io/kubevirt/cirros-container-disk-demo}
YAML
helm upgrade --install vmpool "$ROOT/deploy/helm/vmpool" -n "$NS" -f "$WORK/values.yaml" \
  --wait --timeout 10m

step "a pre-warmed VM becomes ready"
SELECTOR=app.kubernetes.io/managed-by=vmpool
for _ in $(seq 120); do
  [ -n "$(kubectl -n "$NS" get vm -l "$SELECTOR" -o name)" ] && break
  sleep 5
done
kubectl -n "$NS" wait vm -l "$SELECTOR" --for condition=Ready --timeout=15m

step "lease and return through the gRPC API"
kubectl -n "$NS" port-forward svc/vmpool 50051:50051 >"$WORK/port-forward.log" 2>&1 &
PF_PID=$!
export VMPOOL_SERVER=127.0.0.1:50051 VMPOOL_SERVICE_TAG=e2e
for _ in $(seq 30); do vmpool ping >/dev/null 2>&1 && break; sleep 1; done
vmpool ping
vmpool pools
vmpool lease --pool small --duration 10m --wait 15m --output json | tee "$WORK/lease.json"
INSTANCE=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print((d.get("lease") or d)["instance"])' "$WORK/lease.json")
kubectl -n "$NS" get vm "$INSTANCE" -o jsonpath='{.status.printableStatus}{"\n"}' | grep -qx Running
vmpool get "$INSTANCE"
vmpool return "$INSTANCE"
kubectl -n "$NS" wait "vm/$INSTANCE" --for=delete --timeout=5m

echo
echo "e2e: PASS (leased and returned $INSTANCE)"
