#!/usr/bin/env python3
"""Ratio tables for BENCHMARKS.md from the harness's JSON lines.

Per protocol and concurrency, the median over passes of each configuration, with
  - throughput and p99 as ratios against *direct* (the backend reached without a proxy) in the
    same run, and
  - proxy CPU seconds per 100k requests as a ratio against nginx in the same run.
Runs disturbed by other tenants (foreign CPU above 25 % of a core) are left out.
usage: ratios.py results.jsonl
"""
import json
import sys
from collections import defaultdict

NOISY = 25.0


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if (r.get("foreign_cpu_pct") or 0) <= NOISY]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["proto"], r["conc"], r["name"])].append(r)
    names = []
    for r in rows:
        if r["name"] not in names:
            names.append(r["name"])
    for proto in ("h1", "h2c"):
        concs = []
        for (p, c, _n) in groups:
            if p == proto and c not in concs:
                concs.append(c)
        if not concs:
            continue
        unit = "connections" if proto == "h1" else "clients x streams"
        print(f"\n### {proto} ({unit})\n")
        print("| conc | proxy | n | req/s | vs direct | p50 | p99 | p99 vs direct | CPU s/100k | CPU vs nginx | RSS idle / load MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in concs:
            def m(name, key):
                return median([r.get(key) for r in groups.get((proto, c, name), [])])
            d_rps, d_p99 = m("direct", "rps"), m("direct", "p99_us")
            ngx_cpu = m("nginx-w1", "proxy_cpu_s_per_100k")
            for name in names:
                runs = groups.get((proto, c, name), [])
                if not runs:
                    continue
                rps, p50, p99 = m(name, "rps"), m(name, "p50_us"), m(name, "p99_us")
                cpu = m(name, "proxy_cpu_s_per_100k")
                idle, load = m(name, "rss_idle_kb"), m(name, "rss_load_max_kb")
                ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"
                rss = "-" if idle is None else f"{idle / 1024:.1f} / {load / 1024:.1f}"
                print(f"| {c} | {name} | {len(runs)} | {rps / 1000:.1f}k | {ratio(rps, d_rps)} | {p50:.0f}us | {p99:.0f}us "
                      f"| {ratio(p99, d_p99)} | {'-' if cpu is None else f'{cpu:.2f}'} | {ratio(cpu, ngx_cpu)} | {rss} |")


if __name__ == "__main__":
    main(sys.argv[1])
