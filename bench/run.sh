#!/usr/bin/env bash
# End-to-end comparison: mesh-proxy next to nginx, haproxy and direct connections, using the
# shared harness in ../shared/bench (loopback only, every run bounded in time).
#   bench/run.sh [PASSES] [DURATION_S]      (defaults: 2 passes of 8 s per configuration)
# Writes target/bench/results.jsonl and prints the ratio tables of BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$here/../shared/bench}
passes=${1:-2}
duration=${2:-8}
out=$here/target/bench/results.jsonl
mkdir -p "$(dirname "$out")"
rm -f "$out"

SKIP_PINGORA=${SKIP_PINGORA-1} "$harness/setup.sh" >/dev/null   # wrk, h2load, nginx, haproxy; the backend (idempotent)
(cd "$here" && cargo build --release -p mesh-proxy)
cp "$here/target/release/mesh-proxy" "$here/target/bench/mesh-proxy"

EXTRA="mesh-proxy|$here/target/bench/mesh-proxy --listen 127.0.0.1:{port} --upstream {upstream} --admin off|PIN|--h1 --h2" \
ONLY=${ONLY:-direct,nginx-w1,haproxy-t1,mesh-proxy} QUIET_WAIT=${QUIET_WAIT:-5} \
  "$harness/run_all.sh" "$out" "$passes" "$duration"
python3 "$here/bench/ratios.py" "$out"
