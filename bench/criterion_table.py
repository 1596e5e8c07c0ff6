#!/usr/bin/env python3
"""Each primitive next to its alternative, from one `cargo bench -p mesh-benches` run.

Reads criterion's estimates under target/criterion (the mean of each benchmark) and prints a
Markdown table: the mesh primitive, the alternative measured in the same run, both times and
mesh / alternative. For layers, the time the layer adds over the bare service of the same
group is given too (the layer's own cost, without the service it wraps).
usage: bench/criterion_table.py [target/criterion]
"""
import json
import os
import sys

# (group, mesh benchmark, alternative benchmark, whether both are layers around the group's
# bare service).
PAIRS = [
    ("one request, no retry needed", "mesh Retry (2 retries on 5xx, token budget)", "tower Retry + TpsBudget", True),
    ("rate limit: one admitted request", "mesh RateLimitLayer, one value (ready + call)",
     "tower RateLimit around the bare service", False),
    ("rate limit: one admitted request", "mesh RateLimiter::check, total bucket", "governor direct, tokio clock", False),
    ("rate limit: one admitted request", "mesh RateLimiter::check, keyed by header (10,000 keys)",
     "governor keyed (dashmap, 10,000 keys), tokio clock", False),
    ("concurrency limit: one request", "mesh CircuitBreakerLayer (maxRequests 1024) around the bare service",
     "tower ConcurrencyLimit (1024) around the bare service", True),
    ("pick over 100 endpoints", "mesh LeastRequest (P2C)", "tower p2c::Balance poll_ready+call", False),
    ("telemetry: one request", "mesh TraceLayer + MetricsLayer, caller's unsampled context",
     "tower-http TraceLayer::new_for_http", True),
    ("telemetry: one request", "mesh TraceLayer, caller's unsampled context", "tower-http TraceLayer::new_for_http",
     True),
    ("decide over 100 routes", "mesh RouteTable::decide, last route matches", "matchit Router::at, last path",
     False),
    ("cookie user=jason", "mesh CookieMatch by name", "regex::Regex on header &str", False),
    ("mtls_handshake", "mesh_tls_spiffe", "rustls_webpki", False),
    ("the whole stack: one request", "mesh: trace + metrics + rate limit + routing + retries + outlier",
     "bare service", False),
]


def load(root):
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) != "new" or "benchmark.json" not in files:
            continue
        meta = json.load(open(os.path.join(dirpath, "benchmark.json")))
        est = json.load(open(os.path.join(dirpath, "estimates.json")))
        key = (meta["group_id"], meta.get("function_id") or "")
        found[key] = est["mean"]["point_estimate"]
    return found


def fmt(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"


def main(root):
    found = load(root)
    print("| group | mesh | alternative | mesh | alternative | mesh / alternative | added over bare: mesh, alternative |")
    print("|---|---|---|---|---|---|---|")
    for group, mesh, alt, layers in PAIRS:
        m, a = found.get((group, mesh)), found.get((group, alt))
        if m is None or a is None:
            print(f"| {group} | {mesh} | {alt} | (not run) | | | |", file=sys.stderr)
            continue
        bare = found.get((group, "bare service"))
        added = f"{fmt(m - bare)}, {fmt(a - bare)}" if bare is not None and layers else ""
        print(f"| {group} | {mesh} | {alt} | {fmt(m)} | {fmt(a)} | {m / a:.2f}x | {added} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
