#!/usr/bin/env bash
# Keep-alive load through Apex to upstreams that misbehave, for a bounded time.
#
#   scripts/soak.sh [SECONDS]     (default 60)
#
# Three upstreams (scripts/soak_upstream.py): one closes idle connections at random, one
# closes some reused connections right after reading a request, one delays its answers. wrk
# drives GETs (64 keep-alive connections) through Apex for SECONDS. Reports the errors the
# client saw (must be 0: every failure is on a reused connection, where a GET is retried) and
# Apex's RSS at the start and the end (it must level off, not grow with time).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
BASE=19100
WORK=$(mktemp -d /tmp/apex-soak.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
cargo build --release -q

i=0
for mode in idle-close close-after-read delay; do
    python3 scripts/soak_upstream.py $((BASE + i)) "$mode" &
    PIDS+=($!)
    i=$((i + 1))
done
cat >"$WORK/apex.yaml" <<CONF
workers: 1
listeners:
  - { name: soak, address: "127.0.0.1:$((BASE + 10))" }
routes:
  - match: { path_prefix: "/" }
    cluster: flaky
clusters:
  - name: flaky
    endpoints: [ "127.0.0.1:$BASE", "127.0.0.1:$((BASE + 1))", "127.0.0.1:$((BASE + 2))" ]
    response_timeout: 2s
CONF
RUST_LOG=error target/release/apex --config "$WORK/apex.yaml" 2>"$WORK/apex.log" &
APEX=$!
PIDS+=($APEX)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$((BASE + 10))") 2>/dev/null && break
    sleep 0.05
done

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$APEX/status"; }
# Warm up so the allocator's first growth is not counted as a trend.
wrk -t1 -c64 -d2s "http://127.0.0.1:$((BASE + 10))/" >/dev/null
RSS_START=$(rss)
: >"$WORK/rss"
( for _ in $(seq 1 "$SECS"); do sleep 1; rss >>"$WORK/rss" 2>/dev/null || exit 0; done ) &
SAMPLER=$!
OUT=$(wrk -t1 -c64 -d"${SECS}s" --timeout 5s "http://127.0.0.1:$((BASE + 10))/")
wait $SAMPLER 2>/dev/null || true
RSS_END=$(rss)

REQS=$(echo "$OUT" | awk '/requests in/ {print $1}')
NON2XX=$(echo "$OUT" | awk '/Non-2xx/ {print $5}')
SOCK=$(echo "$OUT" | grep -o "Socket errors:.*" || true)
echo "$OUT" | grep -E "Requests/sec|Latency"
echo "requests:        $REQS"
echo "non-2xx:         ${NON2XX:-0}"
echo "socket errors:   ${SOCK:-none}"
echo "apex RSS (KiB):  start $RSS_START, end $RSS_END, samples: $(tr '\n' ' ' <"$WORK/rss")"
echo "apex errors logged: $(grep -c ERROR "$WORK/apex.log" || true)"
[ "${NON2XX:-0}" = 0 ] && [ -z "$SOCK" ]
