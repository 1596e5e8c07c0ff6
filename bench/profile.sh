#!/usr/bin/env bash
# Profiles the release mesh-proxy under wrk (HTTP/1.1, 16 connections), pinned like the
# harness's PIN placement, with perf's cpu-clock sampler (no hardware counters needed).
#   bench/profile.sh [extra mesh-proxy flags]     -> target/bench/profile.{data,txt}
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
backend=${BACKEND:-$here/../shared/bench/backend/target/release/backend}
out=$here/target/bench
mkdir -p "$out"
(cd "$here" && cargo build --release -p mesh-proxy)
taskset -c 0 "$backend" 127.0.0.1:47080 >/dev/null 2>&1 & bp=$!
taskset -c 1 "$here/target/release/mesh-proxy" --listen 127.0.0.1:47081 --upstream 127.0.0.1:47080 --admin off "$@" >/dev/null 2>&1 & pp=$!
trap 'kill $pp $bp 2>/dev/null' EXIT
sleep 0.5
taskset -c 0 wrk -t1 -c16 -d3s http://127.0.0.1:47081/ >/dev/null
taskset -c 0 wrk -t1 -c16 -d12s http://127.0.0.1:47081/ > "$out/profile.wrk" & wp=$!
sleep 1
perf record -e cpu-clock -F 2000 -g -p "$pp" -o "$out/profile.data" -- sleep 8 >/dev/null 2>&1
wait $wp
perf report -i "$out/profile.data" --no-children --sort dso,sym 2>/dev/null | grep -E '^ +[0-9]' | head -60 > "$out/profile.txt"
grep -E 'Requests/sec' "$out/profile.wrk"
echo "top symbols: $out/profile.txt"
