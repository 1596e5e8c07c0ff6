#!/usr/bin/env bash
# The routing bar: mesh-proxy forwarding plainly next to mesh-proxy routing by a
# VirtualService (a header match that never matches, then a 90/10 split between two subsets
# of one ServiceEntry whose endpoints are both the harness backend), interleaved, on the
# shared harness's PIN placement. Prints CPU s/100k per pass and the routed/plain ratio.
#   bench/routed.sh [PASSES] [DURATION_S]        (defaults: 3 passes of 8 s)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$here/../shared/bench}
passes=${1:-3}
duration=${2:-8}
out=$here/target/bench/routed.jsonl
mkdir -p "$(dirname "$out")"
rm -f "$out"
SKIP_PINGORA=1 "$harness/setup.sh" >/dev/null
(cd "$here" && cargo build --release -p mesh-proxy)
cp "$here/target/release/mesh-proxy" "$here/target/bench/mesh-proxy"
bin=$here/target/bench/mesh-proxy
# The routed proxy's configuration, written by a wrapper (the harness gives the ports).
cat > "$here/target/bench/routed-start.sh" <<SH
#!/usr/bin/env bash
# usage: routed-start.sh PORT UPSTREAM_PORT RUNDIR
mkdir -p "\$3"
cat > "\$3/mesh.yaml" <<YAML
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend}
spec:
  hosts: [backend.bench]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: \$2}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {http: \$2}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend.bench
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: ["*"]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: backend.bench, subset: v2}}]
  - route:
    - {destination: {host: backend.bench, subset: v1}, weight: 90}
    - {destination: {host: backend.bench, subset: v2}, weight: 10}
YAML
exec $bin --listen 127.0.0.1:\$1 --admin off --config "\$3/mesh.yaml" "\${@:4}"
SH
chmod +x "$here/target/bench/routed-start.sh"
configs=("mesh-proxy|$bin --listen 127.0.0.1:{port} --upstream {upstream} --admin off"
         "mesh-proxy-routed|$here/target/bench/routed-start.sh {port} {upstream_port} {rundir}")
# ACCESS_LOG=1: also the routed proxy writing every request's JSON line to a file.
if [[ ${ACCESS_LOG:-0} == 1 ]]; then
  configs+=("mesh-proxy-routed-logged|$here/target/bench/routed-start.sh {port} {upstream_port} {rundir} --access-log {rundir}/access.log")
fi
for pass in $(seq 1 "$passes"); do
  for cfg in "${configs[@]}"; do
    IFS='|' read -r name start <<<"$cfg"
    echo "=== pass $pass: $name"
    python3 "$harness/bench.py" --name "$name" --start "$start" --h1 --h2 --conc 16 --h2conc 4x16 \
      --proxy-cpus 1 --load-cpus 0 --backend-cpus 0 --duration "$duration" --runs 1 --first-run "$pass" \
      --out "$out" --quiet-wait 5 --quiet-threshold 15
  done
done
python3 - "$out" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(dict)
for r in rows:
    key = (r["proto"], r["conc"], r["run"])
    by[key][r["name"]] = r
print("| protocol | conc | pass | variant | plain CPU s/100k | variant CPU s/100k | variant / plain | plain p99 | variant p99 | non-2xx |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(by, key=str):
    d = by[key]
    for variant in ("mesh-proxy-routed", "mesh-proxy-routed-logged"):
        if "mesh-proxy" in d and variant in d:
            a = d["mesh-proxy"].get("proxy_cpu_s_per_100k"); b = d[variant].get("proxy_cpu_s_per_100k")
            if a and b:
                pa = d["mesh-proxy"].get("p99_us"); pb = d[variant].get("p99_us")
                nb = d[variant].get("non2xx")
                name = variant.removeprefix("mesh-proxy-")
                print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | {a:.3f} | {b:.3f} | {b/a:.3f}x | {pa} us | {pb} us | {nb} |")
PY
