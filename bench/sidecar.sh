#!/usr/bin/env bash
# The whole sidecar, in one run of the shared harness (PIN placement: the proxies on CPU 1,
# wrk / h2load and the backend on CPU 0), interleaved:
#   one-hop        mesh-proxy forwarding, no configuration (the baseline)
#   full-outbound  mesh-proxy with every seed file that validates, its workload identity, and a
#                  route for the benchmark's host: Istio's default retries, outlier detection,
#                  a connection pool, Istio's metrics (the seeds' Telemetry)
#   mesh-mtls      two mesh-proxy sidecars in series: client sidecar -> (mTLS, h2) -> server
#                  sidecar (STRICT, an ALLOW policy by principal) -> backend
#   envoy-mtls     the same pair with two Envoys (concurrency 1 each): retries as Istio's
#                  default, upstream TLS with a client certificate and SAN check, downstream
#                  TLS requiring a client certificate, RBAC by principal, h2 between them
#   nginx-mtls     two nginx (1 worker each): proxy_next_upstream as the retry, TLS with a
#                  client certificate between them (HTTP/1.1: nginx has no h2 upstream); the
#                  client side does not verify the server (nginx verifies a chain only with a
#                  DNS or IP name, and SPIFFE certificates carry a URI), no authorization by SAN
#   haproxy-mtls   two haproxy (1 thread each): retries, TLS with a client certificate and h2
#                  (ALPN) between them, chains verified both ways but no name check and no
#                  authorization by SAN (haproxy matches DNS names only)
# CPU is each configuration's whole process tree (both processes of a pair). Prints a table.
#   bench/sidecar.sh [PASSES] [DURATION_S]        (defaults: 2 passes of 8 s)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$here/../shared/bench}
seeds=${SEEDS:-$here/../shared/fixtures/seeds}
passes=${1:-2}
duration=${2:-8}
work=$here/target/bench/sidecar
out=$work/results.jsonl
rm -rf "$work"
mkdir -p "$work"
SKIP_PINGORA=1 "$harness/setup.sh" >/dev/null
envoy=${ENVOY_BIN:-$harness/.tools/envoy/envoy/_bin/envoy}
(cd "$here" && cargo build --release --locked -p mesh-proxy)
bin=$work/mesh-proxy
cp "$here/target/release/mesh-proxy" "$bin"

# Certificates: a dev CA and two SPIFFE identities (tls.crt, tls.key, ca.crt), and the
# concatenations haproxy reads.
certs=$work/certs
$bin certs ca --trust-domain cluster.local --out "$certs/ca" >/dev/null
for id in client backend; do
  $bin certs issue --ca "$certs/ca" --id "default/$id" --out "$certs/$id" >/dev/null
  cat "$certs/$id/tls.crt" "$certs/$id/tls.key" > "$certs/$id/both.pem"
done

# --- envoy-mtls ---
cat > "$work/envoy-pair.sh" <<SH
#!/usr/bin/env bash
# usage: envoy-pair.sh PORT UPSTREAM_PORT RUNDIR
port=\$1; upstream=\$2; run=\$3
mkdir -p "\$run"
inbound=\$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
router='{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, dynamic_stats: false}}'
cat > "\$run/b.yaml" <<YAML
static_resources:
  listeners:
  - name: inbound
    address: {socket_address: {address: 127.0.0.1, port_value: \$inbound}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{certificate_chain: {filename: $certs/backend/tls.crt}, private_key: {filename: $certs/backend/tls.key}}]
            validation_context: {trusted_ca: {filename: $certs/backend/ca.crt}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          generate_request_id: false
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: app}}]}]
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  client:
                    permissions: [{any: true}]
                    principals: [{authenticated: {principal_name: {exact: spiffe://cluster.local/ns/default/sa/client}}}]
          - \$router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    circuit_breakers: {thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]}
    load_assignment: {cluster_name: app, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: \$upstream}}}}]}]}
YAML
cat > "\$run/a.yaml" <<YAML
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 127.0.0.1, port_value: \$port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          codec_type: AUTO
          generate_request_id: false
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: backend
                  retry_policy: {retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2, retriable_status_codes: [503]}
          http_filters: [\$router]
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    circuit_breakers: {thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates: [{certificate_chain: {filename: $certs/client/tls.crt}, private_key: {filename: $certs/client/tls.key}}]
          validation_context:
            trusted_ca: {filename: $certs/client/ca.crt}
            match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: spiffe://cluster.local/ns/default/sa/backend}}]
    load_assignment: {cluster_name: backend, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: \$inbound}}}}]}]}
YAML
$envoy -c "\$run/b.yaml" --concurrency 1 -l warn --disable-hot-restart --base-id-path "\$run/b.base-id" >"\$run/b.log" 2>&1 &
b=\$!
trap 'kill \$b 2>/dev/null' EXIT TERM INT
for _ in \$(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/\$inbound) 2>/dev/null && break; sleep 0.05; done
$envoy -c "\$run/a.yaml" --concurrency 1 -l warn --disable-hot-restart --base-id-path "\$run/a.base-id" &
wait -n
SH

# --- nginx-mtls ---
cat > "$work/nginx-pair.sh" <<SH
#!/usr/bin/env bash
# usage: nginx-pair.sh PORT H2PORT UPSTREAM_PORT RUNDIR
port=\$1; h2port=\$2; upstream=\$3; run=\$4
mkdir -p "\$run/a" "\$run/b"
inbound=\$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
common() { # dir
  cat <<CONF
worker_processes 1;
pid \$1/nginx.pid;
error_log stderr warn;
daemon off;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path \$1/body; proxy_temp_path \$1/proxy;
  fastcgi_temp_path \$1/fcgi; uwsgi_temp_path \$1/uwsgi; scgi_temp_path \$1/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
CONF
}
{ common "\$run/b"; cat <<CONF
  upstream app { server 127.0.0.1:\$upstream; keepalive 256; keepalive_requests 10000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:\$inbound ssl backlog=4096;
    ssl_certificate $certs/backend/tls.crt;
    ssl_certificate_key $certs/backend/tls.key;
    ssl_client_certificate $certs/backend/ca.crt;
    ssl_verify_client on;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
} > "\$run/b/nginx.conf"
{ common "\$run/a"; cat <<CONF
  upstream backend { server 127.0.0.1:\$inbound; keepalive 256; keepalive_requests 10000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:\$port backlog=4096;
    listen 127.0.0.1:\$h2port http2 backlog=4096;
    location / {
      proxy_pass https://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_503;
      proxy_next_upstream_tries 3;
      proxy_ssl_certificate $certs/client/tls.crt;
      proxy_ssl_certificate_key $certs/client/tls.key;
      # nginx checks a certificate's chain only together with a DNS or IP name, and a SPIFFE
      # certificate has a URI name only: no verification of the server (less work for nginx).
      proxy_ssl_verify off;
      proxy_ssl_session_reuse on;
    }
  }
}
CONF
} > "\$run/a/nginx.conf"
/usr/sbin/nginx -p "\$run/b" -c "\$run/b/nginx.conf" >"\$run/b.log" 2>&1 &
b=\$!
trap 'kill \$b 2>/dev/null' EXIT TERM INT
for _ in \$(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/\$inbound) 2>/dev/null && break; sleep 0.05; done
/usr/sbin/nginx -p "\$run/a" -c "\$run/a/nginx.conf" &
wait -n
SH

# --- haproxy-mtls ---
cat > "$work/haproxy-pair.sh" <<SH
#!/usr/bin/env bash
# usage: haproxy-pair.sh PORT UPSTREAM_PORT RUNDIR
port=\$1; upstream=\$2; run=\$3
mkdir -p "\$run"
inbound=\$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
common='global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  http-reuse always'
cat > "\$run/b.cfg" <<CONF
\$common
frontend inbound
  bind 127.0.0.1:\$inbound ssl crt $certs/backend/both.pem ca-file $certs/backend/ca.crt verify required alpn h2,http/1.1
  default_backend app
backend app
  server s1 127.0.0.1:\$upstream maxconn 8000
CONF
cat > "\$run/a.cfg" <<CONF
\$common
  retries 2
  retry-on conn-failure empty-response 503
frontend outbound
  bind 127.0.0.1:\$port
  default_backend backend
backend backend
  server b 127.0.0.1:\$inbound ssl crt $certs/client/both.pem ca-file $certs/client/ca.crt verify required alpn h2 maxconn 8000
CONF
/usr/sbin/haproxy -db -f "\$run/b.cfg" >"\$run/b.log" 2>&1 &
b=\$!
trap 'kill \$b 2>/dev/null' EXIT TERM INT
for _ in \$(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/\$inbound) 2>/dev/null && break; sleep 0.05; done
/usr/sbin/haproxy -db -f "\$run/a.cfg" &
wait -n
SH
chmod +x "$work"/*.sh

configs_all=("one-hop|$bin --listen 127.0.0.1:{port} --upstream {upstream} --admin off|"
         "full-outbound|env MESH_BIN=$bin MESH_CERTS=$certs SEEDS=$seeds $here/bench/full-start.sh {port} {upstream_port} {rundir}|"
         "mesh-mtls|env MESH_BIN=$bin MESH_CERTS=$certs $here/bench/pair-start.sh mtls {port} {upstream_port} {rundir}|"
         "envoy-mtls|$work/envoy-pair.sh {port} {upstream_port} {rundir}|"
         "nginx-mtls|$work/nginx-pair.sh {port} {h2port} {upstream_port} {rundir}|--h2port 47082"
         "haproxy-mtls|$work/haproxy-pair.sh {port} {upstream_port} {rundir}|")
# ONLY="name …" runs a subset.
configs=()
for c in "${configs_all[@]}"; do
  if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" ${c%%|*} "* ]]; then configs+=("$c"); fi
done
for pass in $(seq 1 "$passes"); do
  for cfg in "${configs[@]}"; do
    IFS='|' read -r name start extra <<<"$cfg"
    echo "=== pass $pass: $name"
    # shellcheck disable=SC2086
    python3 "$harness/bench.py" --name "$name" --start "$start" --h1 --h2 --conc 16,64 --h2conc 4x16 $extra \
      --proxy-cpus 1 --load-cpus 0 --backend-cpus 0 --duration "$duration" --runs 1 --first-run "$pass" \
      --out "$out" --quiet-wait 5 --quiet-threshold 15
  done
done
python3 - "$out" <<'PY'
import json, sys, collections, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(lambda: collections.defaultdict(list))
idle = collections.defaultdict(list)
for r in rows:
    by[(r["proto"], r["conc"])][r["name"]].append(r)
    if r.get("rss_idle_kb"):
        idle[r["name"]].append(r["rss_idle_kb"])
names = ["one-hop", "full-outbound", "mesh-mtls", "envoy-mtls", "nginx-mtls", "haproxy-mtls"]
med = lambda xs: statistics.median(xs) if xs else None
print("| load | config | CPU s/100k (median) | / one hop | p50 | p99 | RSS under load | non-2xx |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted(by, key=str):
    d = by[key]
    base = med([r["proxy_cpu_s_per_100k"] for r in d.get("one-hop", []) if r.get("proxy_cpu_s_per_100k")])
    for n in names:
        rs = d.get(n, [])
        if not rs:
            continue
        cpu = med([r["proxy_cpu_s_per_100k"] for r in rs if r.get("proxy_cpu_s_per_100k")])
        p50 = med([r["p50_us"] for r in rs if r.get("p50_us")])
        p99 = med([r["p99_us"] for r in rs if r.get("p99_us")])
        rss = max((r.get("rss_load_max_kb") or 0) for r in rs)
        bad = sum((r.get("non2xx") or 0) + (r.get("errors") or 0) for r in rs)
        ratio = f"{cpu / base:.2f}x" if (cpu and base) else "-"
        print(f"| {key[0]} c={key[1]} | {n} | {cpu:.3f} | {ratio} | {p50} us | {p99} us | {rss / 1024:.1f} MiB | {bad} |")
print()
print("| config | idle RSS (process tree) |")
print("|---|---|")
for n in names:
    if idle[n]:
        print(f"| {n} | {max(idle[n]) / 1024:.1f} MiB |")
PY
