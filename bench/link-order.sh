#!/usr/bin/env bash
# Writes mesh-proxy/link-order.txt: the release binary's functions that run, hottest first, for
# the linker's --symbol-ordering-file (mesh-proxy/build.rs passes it). Code that runs ends up in
# a few contiguous megabytes of .text instead of being spread over all of it, so the pages a
# running proxy maps (its RSS) and its instruction TLB misses fall.
#
# It runs the release binary under valgrind's callgrind, on loopback:
#   - the full outbound stack (bench/full-start.sh: the seeds, an identity, retries, outlier
#     detection, metrics), HTTP/1.1 and h2c clients;
#   - two sidecars with mTLS and h2 between them (bench/pair-start.sh);
# and orders: the functions that ran only at start-up, those that ran at start-up and on
# requests, those of the first request, then those of the rest; each group hottest first.
# Symbols that a later build no longer has are skipped by the linker, so a stale file only
# costs locality. Symbol names carry hashes of the crate graph and the compiler version, so
# the file's first line records both (LLD skips `#` lines): rerun this after a toolchain or
# dependency update. `--check` (in CI) says when that is due.
#   bench/link-order.sh [REQUESTS]          (default 300 per client and protocol)
#   bench/link-order.sh --check BINARY      with the recorded compiler and Cargo.lock: fails when
#                                           under 80 % of the listed functions are in BINARY or
#                                           BINARY's code does not start with them; with
#                                           another, says the file is due for a rerun
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
stamp() { echo "# $(rustc -vV | grep '^release:'); Cargo.lock $(sha256sum "$here/Cargo.lock" | cut -c1-16)"; }
if [ "${1:-}" = --check ]; then
  recorded=$(head -1 "$here/mesh-proxy/link-order.txt")
  if [ "$recorded" != "$(stamp)" ]; then
    echo "link order: written for '${recorded#\# }', this build has '$(stamp | cut -c3-)': rerun bench/link-order.sh"
    exit 0
  fi
  nm -n "$2" | python3 -c '
import sys
listed = [l for l in open(sys.argv[1]).read().splitlines() if l and not l.startswith("#")]
if not listed:
    sys.exit("link order: the file lists no functions")
text = [l.split()[2] for l in sys.stdin if len(l.split()) == 3 and l.split()[1] in "tTwW"]
have = set(text)
share = sum(name in have for name in listed) / len(listed)
index = {name: i for i, name in reversed(list(enumerate(text)))}
head = [index[name] for name in listed if name in index][:50]
starts = bool(head) and head == sorted(head) and head[-1] < 100
verb = "starts" if starts else "does not start"
print(f"link order: {share:.0%} of {len(listed)} listed functions are in the binary; "
      f"its code {verb} with them")
if share < 0.8 or not starts:
    sys.exit("link order: stale; run bench/link-order.sh")
' "$here/mesh-proxy/link-order.txt"
  exit
fi
harness=${HARNESS:-$here/../shared/bench}
seeds=${SEEDS:-$here/../shared/fixtures/seeds}
requests=${1:-300}
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
work=$here/target/link-order
rm -rf "$work"
mkdir -p "$work/cg"
(cd "$here" && cargo build --release --locked -p mesh-proxy)
# The harness's backend: HTTP/1.1 and h2c on one port.
(cd "$harness/backend" && cargo build --release -q)
bin=$work/mesh-proxy
cp "$here/target/release/mesh-proxy" "$bin"
certs=$work/certs
$bin certs ca --trust-domain cluster.local --out "$certs/ca" >/dev/null
for id in client backend; do $bin certs issue --ca "$certs/ca" --id "default/$id" --out "$certs/$id" >/dev/null; done

# Every mesh-proxy process runs under callgrind; its output is named by its pid.
cat > "$work/vg" <<SH
#!/usr/bin/env bash
exec valgrind -q --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \
  --dump-line=no --callgrind-out-file=$work/cg/%p.out $bin "\$@"
SH
chmod +x "$work/vg"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
backend_port=$(free_port)
"$harness/backend/target/release/backend" "127.0.0.1:$backend_port" >/dev/null 2>&1 &
backend=$!
pids=()
trap 'kill $backend "${pids[@]}" 2>/dev/null; pkill -TERM -f "$bin --" || true' EXIT

wait_port() { for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never listened" >&2; return 1; }
# Requests of each kind through a proxy: HTTP/1.1, h2c, and POSTs with a body.
drive() { # port
  curl -sf --fail-early -o /dev/null "http://127.0.0.1:$1/[1-$requests]"
  # h2c: curl 7.88 sends nothing for a second request on a prior-knowledge connection
  h2load -n "$requests" -c 2 -m 8 "http://127.0.0.1:$1/" | grep "succeeded, 0 failed" >/dev/null \
    || { echo "h2c requests failed on $1" >&2; return 1; }
  curl -sf -o /dev/null -H 'x-request-id: order' -X POST -d 'x=1' "http://127.0.0.1:$1/post/[1-20]" || true
}

full_port=$(free_port)
MESH_BIN=$work/vg VALIDATE_BIN=$bin MESH_CERTS=$certs SEEDS=$seeds \
  "$here/bench/full-start.sh" "$full_port" "$backend_port" "$work/full" >"$work/full.log" 2>&1 &
full_pid=$!   # the same process through the exec chain: its dumps are $work/cg/$full_pid.out*
pids+=($!)
pair_port=$(free_port)
MESH_BIN=$work/vg MESH_CERTS=$certs "$here/bench/pair-start.sh" mtls "$pair_port" "$backend_port" "$work/pair" \
  >"$work/pair.log" 2>&1 &
pids+=($!)
wait_port "$full_port"
wait_port "$pair_port"
sleep 2
# `callgrind_control -d` dumps every callgrind process's counters so far and zeroes them.
callgrind_control -d >/dev/null   # …out.1: start-up
curl -sf -o /dev/null "http://127.0.0.1:$full_port/"
curl -sf -o /dev/null "http://127.0.0.1:$pair_port/"
callgrind_control -d >/dev/null   # …out.2: the first request
drive "$full_port"
drive "$pair_port"
# SIGTERM: the proxies drain and exit, and callgrind writes the request phase.
pkill -TERM -f "$bin --" || true
for _ in $(seq 300); do pgrep -f "$bin --" >/dev/null || break; sleep 0.1; done
if pgrep -f "$bin --" >/dev/null; then echo "the proxies did not exit" >&2; exit 1; fi
# Three processes, three dumps each.
[ "$(ls "$work/cg" | wc -l)" -eq 9 ] || { ls "$work/cg" >&2; echo "missing callgrind dumps" >&2; exit 1; }

python3 - "$work/cg" "$bin" "$here/mesh-proxy/link-order.txt" "$full_pid" "$(stamp)" <<'PY'
import collections, glob, os, sys
cgdir, binary, out, full_pid, stamp = sys.argv[1:]
def costs(path):
    """Self cost (instructions) per function of the binary in one callgrind dump."""
    cost = collections.Counter()
    ob = fn = None
    skip = False
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("fn="):
            # callgrind names recursion levels `name'2`; `(below main)` is not a symbol
            fn = line[3:].strip().split("'")[0]
            if " " in fn or "(" in fn:
                fn = None
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if fn and ob and os.path.basename(ob) == os.path.basename(binary) and len(parts) > 1:
                cost[fn] += int(parts[1])
    return cost
startup, first, first_full, rest = (collections.Counter() for _ in range(4))
for path in glob.glob(os.path.join(cgdir, "*.out*")):
    # …out.1 is a process's start-up, …out.2 its first request, …out the rest
    phase = path.rsplit(".", 1)[-1]
    counts = costs(path)
    {"1": startup, "2": first}.get(phase, rest).update(counts)
    if phase == "2" and os.path.basename(path).startswith(full_pid + "."):
        first_full.update(counts)
# Start-up only; start-up code that requests run too; the rest of the full stack's first
# request; the rest of the sidecar pair's first request; the rest. So what an idle proxy has
# run (its start-up and the readiness probe's request) is one contiguous range, and the
# request path another.
S, F, FF, R = set(startup), set(first), set(first_full), set(rest)
blocks = [(startup, S - F - R), (startup, S & (F | R)), (first_full, FF - S), (first, F - S - FF),
          (rest, R - S - F)]
names = [f for counts, members in blocks for f, _ in counts.most_common()
         if f in members and not f.startswith("0x")]
with open(out, "w") as o:
    o.write(stamp + "\n" + "\n".join(names) + "\n")
print(f"{out}: {len(names)} functions ({len(S)} at start-up, {len(F)} in the first request, {len(R)} after)")
PY
