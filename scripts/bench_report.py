#!/usr/bin/env python3
"""Summarises scripts/bench.sh rounds: per mode and size, medians, and the median of each
round's CPU-per-request ratio against nginx measured in the same round."""
import json
import statistics
import sys

path, commit, kernel, cpu, rounds, secs, conns, out = sys.argv[1:9]
idle_path = sys.argv[9] if len(sys.argv) > 9 else None
idle = [json.loads(l) for l in open(idle_path) if l.strip()] if idle_path else []
rows = [json.loads(l) for l in open(path) if l.strip()]
sizes = list(dict.fromkeys(r["size"] for r in rows))
modes = list(dict.fromkeys(r["mode"] for r in rows))

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

summary = []
for size in sizes:
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode and r["size"] == size]
        if not rs:
            continue
        ratios = []
        for r in rs:
            # TLS modes compare with nginx terminating TLS, the others with plain nginx.
            ref = "nginx-tls" if mode.endswith("-tls") else "nginx-h2" if mode.endswith("-h2") else "nginx"
            base = [b for b in rows if b["mode"] == ref and b["size"] == size and b["round"] == r["round"]]
            if base and r["cpu_us_per_req"] and base[0]["cpu_us_per_req"]:
                ratios.append(r["cpu_us_per_req"] / base[0]["cpu_us_per_req"])
        summary.append({
            "size": size, "mode": mode, "rounds": len(rs),
            "rps": med([r["rps"] for r in rs]),
            "p50_us": med([r["p50_us"] for r in rs]),
            "p99_us": med([r["p99_us"] for r in rs]),
            "cpu_us_per_req": med([r["cpu_us_per_req"] for r in rs]),
            "cpu_ratio_vs_nginx": med(ratios),
            "errors": sum(r["non_2xx"] for r in rs),
        })

def fmt(v, f="{:.2f}"):
    return "–" if v is None else f.format(v)

lines = [
    f"commit {commit}, kernel {kernel}, CPU {cpu}; {rounds} rounds x {secs} s, wrk -t1 -c{conns};",
    "proxy pinned to CPU 0 with one worker, nginx backend and wrk on CPU 1.",
    "",
    "| size | mode | req/s | p50 µs | p99 µs | CPU µs/req | CPU ÷ nginx (or nginx-tls, nginx-h2; median of rounds) | non-2xx |",
    "|---|---|---|---|---|---|---|---|",
]
for s in summary:
    lines.append(
        f"| {s['size']} | {s['mode']} | {fmt(s['rps'], '{:.0f}')} | {fmt(s['p50_us'], '{:.0f}')} | "
        f"{fmt(s['p99_us'], '{:.0f}')} | {fmt(s['cpu_us_per_req'])} | {fmt(s['cpu_ratio_vs_nginx'])} | {s['errors']} |"
    )
if idle:
    lines += ["", "| mode | idle keep-alive connections | RSS growth KiB per connection |", "|---|---|---|"]
    for i in idle:
        lines.append(f"| {i['mode']} | {i.get('connections', '–')} | {i.get('kib_per_connection', 'failed')} |")
table = "\n".join(lines) + "\n"
open(out + ".md", "w").write(table)
json.dump({"commit": commit, "kernel": kernel, "cpu": cpu, "rounds": int(rounds), "seconds": int(secs),
           "connections": int(conns), "summary": summary, "idle_memory": idle, "runs": rows}, open(out + ".json", "w"), indent=1)
print(table)
print(f"written: {out}.md {out}.json")
