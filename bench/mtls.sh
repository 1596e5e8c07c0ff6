#!/usr/bin/env bash
# The mTLS bar: one plaintext hop (mesh-proxy forwarding) next to two sidecars in series
# (client sidecar -> server sidecar's inbound listener -> backend), first in plaintext, then
# with mTLS (ISTIO_MUTUAL origination, STRICT inbound, an ALLOW policy by principal), HTTP/2
# between the sidecars in both, interleaved on the shared harness's placement. The CPU is
# the whole process tree's (both sidecars). Prints CPU s/100k and the ratios to one hop.
#   bench/mtls.sh [PASSES] [DURATION_S]        (defaults: 3 passes of 8 s)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$here/../shared/bench}
passes=${1:-3}
duration=${2:-8}
out=$here/target/bench/mtls.jsonl
mkdir -p "$(dirname "$out")"
rm -f "$out"
SKIP_PINGORA=1 "$harness/setup.sh" >/dev/null
(cd "$here" && cargo build --release -p mesh-proxy)
cp "$here/target/release/mesh-proxy" "$here/target/bench/mesh-proxy"
bin=$here/target/bench/mesh-proxy
certs=$here/target/bench/mtls-certs
rm -rf "$certs"
$bin certs ca --trust-domain cluster.local --out "$certs/ca" >/dev/null
$bin certs issue --ca "$certs/ca" --id default/client --out "$certs/client" >/dev/null
$bin certs issue --ca "$certs/ca" --id default/backend --out "$certs/backend" >/dev/null
# The pair: bench/pair-start.sh (the harness gives the ports).
for pass in $(seq 1 "$passes"); do
  for cfg in "one-hop|$bin --listen 127.0.0.1:{port} --upstream {upstream} --admin off" \
             "pair-plain|env MESH_BIN=$bin MESH_CERTS=$certs $here/bench/pair-start.sh plain {port} {upstream_port} {rundir}" \
             "pair-mtls|env MESH_BIN=$bin MESH_CERTS=$certs $here/bench/pair-start.sh mtls {port} {upstream_port} {rundir}"; do
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
    by[(r["proto"], r["conc"], r["run"])][r["name"]] = r
print("| protocol | conc | pass | one hop CPU s/100k | pair plain | pair mTLS | plain pair / one hop | mTLS pair / one hop | mTLS p99 | non-2xx |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(by, key=str):
    d = by[key]
    if all(n in d for n in ("one-hop", "pair-plain", "pair-mtls")):
        a, p, m = (d[n].get("proxy_cpu_s_per_100k") for n in ("one-hop", "pair-plain", "pair-mtls"))
        if a and p and m:
            print(f"| {key[0]} | {key[1]} | {key[2]} | {a:.3f} | {p:.3f} | {m:.3f} | {p/a:.2f}x | {m/a:.2f}x | {d['pair-mtls'].get('p99_us')} us | {d['pair-mtls'].get('non2xx')} |")
PY
