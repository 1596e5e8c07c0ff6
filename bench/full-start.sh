#!/usr/bin/env bash
# mesh-proxy with the full outbound stack for the harness: every seed file that validates (000,
# 002 and 003; 001 has a VirtualService without hosts, 004 and its variants are the documents'
# mistakes), a workload identity, and a route for the benchmark's host with Istio's default
# retries, a timeout, outlier detection and a connection pool. Used by bench/sidecar.sh and
# bench/link-order.sh.
# usage: MESH_BIN=… MESH_CERTS=… SEEDS=… full-start.sh PORT UPSTREAM_PORT RUNDIR
#   MESH_CERTS holds client/ (tls.crt, tls.key, ca.crt), as `mesh-proxy certs` makes it
set -u
port=$1; upstream=$2; run=$3
rm -rf "$run/config"
mkdir -p "$run/config"
for f in "$SEEDS"/*.yaml; do
  "${VALIDATE_BIN:-$MESH_BIN}" validate "$f" >/dev/null 2>&1 && cp "$f" "$run/config/"
done
cat > "$run/config/zz-bench.yaml" <<YAML
apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {name: frontend}
spec:
  identity: {secretDir: $MESH_CERTS/client}
  workload: {name: frontend, namespace: default, labels: {app: frontend, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench-backend, namespace: default}
spec:
  hosts: [bench-backend]
  ports: [{number: 80, name: http}]
  endpoints: [{address: 127.0.0.1, ports: {http: $upstream}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bench-backend, namespace: default}
spec:
  host: bench-backend
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1000}, http: {http1MaxPendingRequests: 1000}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench, namespace: default}
spec:
  hosts: ["*"]
  http: [{route: [{destination: {host: bench-backend}}], timeout: 10s}]
YAML
exec "$MESH_BIN" --listen "127.0.0.1:$port" --admin off --config "$run/config"
