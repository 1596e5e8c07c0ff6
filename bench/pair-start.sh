#!/usr/bin/env bash
# Two mesh-proxy sidecars in series for the harness: a client sidecar on PORT -> the server
# sidecar's inbound listener -> the backend on UPSTREAM_PORT, HTTP/2 between them; MODE mtls
# (ISTIO_MUTUAL, STRICT, an ALLOW policy by principal) or plain. Used by bench/mtls.sh and
# bench/sidecar.sh.
# usage: MESH_BIN=… MESH_CERTS=… pair-start.sh MODE PORT UPSTREAM_PORT RUNDIR
#   MESH_CERTS holds client/ and backend/ (tls.crt, tls.key, ca.crt), as `mesh-proxy certs` makes
set -u
mode=$1; port=$2; upstream=$3; run=$4
mkdir -p "$run/a" "$run/b"
inbound=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ "$mode" = mtls ]; then tls=ISTIO_MUTUAL; peer=STRICT; else tls=DISABLE; peer=DISABLE; fi
cat > "$run/b/mesh.yaml" <<YAML
apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {name: backend}
spec:
  listen: 127.0.0.1:0
  admin: "off"
  inbound: {listen: 127.0.0.1:$inbound, app: 127.0.0.1:$upstream, appProtocol: downstream}
  identity: {secretDir: $MESH_CERTS/backend}
  workload: {name: backend, namespace: default, labels: {app: backend}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: $peer}}
YAML
if [ "$mode" = mtls ]; then cat >> "$run/b/mesh.yaml" <<YAML
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: default}
spec:
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
YAML
fi
cat > "$run/a/mesh.yaml" <<YAML
apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {name: client}
spec:
  identity: {secretDir: $MESH_CERTS/client}
  workload: {name: client, namespace: default}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend, namespace: default}
spec:
  hosts: [backend]
  ports: [{number: 80, name: http}]
  endpoints: [{address: 127.0.0.1, ports: {http: $inbound}, serviceAccount: backend}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: default}
spec:
  host: backend
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
    tls: {mode: $tls}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: default}
spec:
  hosts: ["*"]
  http: [{route: [{destination: {host: backend}}]}]
YAML
"$MESH_BIN" --admin off --config "$run/b/mesh.yaml" >"$run/b.log" 2>&1 &
b=$!
trap 'kill $b 2>/dev/null' EXIT TERM INT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$inbound) 2>/dev/null && break; sleep 0.05; done
"$MESH_BIN" --listen 127.0.0.1:$port --admin off --config "$run/a/mesh.yaml" &
wait -n
