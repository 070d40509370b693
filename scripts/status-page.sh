#!/usr/bin/env bash
# Renders Apex's admin status page in a real headless browser and saves a screenshot.
#
#   scripts/status-page.sh [OUT.png]      (default /tmp/apex-status.png)
#
# Starts Apex (debug build, or APEX_BIN) on a demo config with two clusters: one with a live
# endpoint (a `respond` listener of the same Apex) and a dead one under a health check, one
# whose endpoints come from a DNS name that does not resolve. Sends some requests, then has
# Debian's chromium (installed if missing) load http://ADMIN/ and take a screenshot. Stops only
# the process it started. The HTML structure itself is tested in CI (tests/status_page.rs);
# this is the check that a browser renders it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/apex-status.png}
WORK=$(mktemp -d /tmp/apex-status.XXXXXX)
APEX_PID=""
cleanup() {
    if [ -n "$APEX_PID" ]; then kill "$APEX_PID" 2>/dev/null || true; wait "$APEX_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v chromium >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
if [ -z "${APEX_BIN:-}" ]; then
    cargo build -q
    APEX_BIN=target/debug/apex
fi

# Four free ports on 127.0.0.1, from the kernel.
read -r PUBLIC BACKEND DEAD ADMIN < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
cat >"$WORK/apex.yaml" <<CONF
workers: 2
admin: 127.0.0.1:$ADMIN
resolvers: ["127.0.0.1:9"]
listeners:
  - { name: public, address: "127.0.0.1:$PUBLIC" }
  - { name: backend, address: "127.0.0.1:$BACKEND" }
routes:
  - match: { path: "/healthz" }
    respond: { status: 200, body: "ok\n" }
  - match: { host: "backend.local" }
    respond: { status: 200, body: "ok\n" }
  - match: { path_prefix: "/" }
    cluster: web
    host_rewrite: backend.local
clusters:
  - name: web
    endpoints: [ "127.0.0.1:$BACKEND", { address: "127.0.0.1:$DEAD", weight: 2 } ]
    health_check: { path: /healthz, interval: 500ms, unhealthy_threshold: 1 }
  - name: discovered
    endpoints: [ { dns: "api.service.consul:8080" } ]
CONF
"$APEX_BIN" --config "$WORK/apex.yaml" 2>"$WORK/apex.log" &
APEX_PID=$!
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null && break
    sleep 0.1
done
for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$PUBLIC/"; done
curl -sf "http://127.0.0.1:$ADMIN/" >"$WORK/page.html"   # the first sample of the page's rates
for _ in $(seq 1 20); do curl -s -o /dev/null "http://127.0.0.1:$PUBLIC/"; done
sleep 1.5   # a rate window (rates need samples a second apart), not a synchronisation

chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$WORK/chromium" --window-size=1280,640 \
    --screenshot="$OUT" "http://127.0.0.1:$ADMIN/" 2>"$WORK/chromium.log" \
    || { cat "$WORK/chromium.log"; exit 1; }
[ -s "$OUT" ] || { echo "no screenshot written" >&2; exit 1; }
echo "screenshot: $OUT ($(stat -c %s "$OUT") bytes); rows: $(grep -c '<tr class="state-' "$WORK/page.html")"
