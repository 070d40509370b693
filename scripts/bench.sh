#!/usr/bin/env bash
# CPU per request of Apex against nginx and HAProxy as reverse proxies, same run, same machine.
#
#   scripts/bench.sh [ROUNDS] [SECONDS]        (defaults: 5 rounds of 5 s per mode and size)
#   SIZES="64 4k 64k" MODES="direct apex-io_uring apex-epoll apex-tokio nginx haproxy" scripts/bench.sh
#
# Layout: an nginx backend (static bodies of 64 B, 4 KiB and 64 KiB) and wrk (1 thread, 64
# keep-alive connections) share CPU 1; the proxy under test runs alone on CPU 0 with one worker.
# Both cores saturate, so req/s against "direct" says little about proxy overhead; the figure
# that holds is the proxy's CPU time (utime+stime from /proc/PID/stat over the run) divided by
# the requests wrk completed. Modes run interleaved, the order alternating every round; each
# mode is compared with nginx-as-proxy measured in the same round. Writes a markdown table and
# JSON to benches/results/, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
SECS=${2:-5}
SIZES=${SIZES:-"64 4k 64k"}
MODES=${MODES:-"direct apex-io_uring apex-epoll apex-tokio nginx haproxy"}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-5000}

BACKEND_PORT=18080
PROXY_PORT=18081
WORK=$(mktemp -d /tmp/apex-bench.XXXXXX)
# nginx workers run as an unprivileged user and must read the bodies.
chmod 755 "$WORK"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    [ -f "$WORK/backend.pid" ] && kill "$(cat "$WORK/backend.pid")" 2>/dev/null || true
    sleep 0.2
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}" >&2
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
    # Debian starts the packaged services where it can; they must not share the CPUs.
    pkill -x nginx 2>/dev/null || true
    pkill -x haproxy 2>/dev/null || true
}

wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# The http-block settings both nginx instances share: no access log, keep-alive without limit,
# temporary files inside the work directory.
nginx_http_common() {
    cat <<CONF
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/backend;
    proxy_temp_path $WORK/backend;
    fastcgi_temp_path $WORK/backend;
    uwsgi_temp_path $WORK/backend;
    scgi_temp_path $WORK/backend;
CONF
}

start_backend() {
    mkdir -p "$WORK/www" "$WORK/backend"
    head -c 64 /dev/zero | tr '\0' 'a' >"$WORK/www/64"
    head -c 4096 /dev/zero | tr '\0' 'b' >"$WORK/www/4k"
    head -c 65536 /dev/zero | tr '\0' 'c' >"$WORK/www/64k"
    cat >"$WORK/backend.conf" <<CONF
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend/error.log;
daemon on;
events { worker_connections 4096; }
http {
$(nginx_http_common)
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        root $WORK/www;
        default_type application/octet-stream;
    }
}
CONF
    taskset -c 1 nginx -c "$WORK/backend.conf"
    wait_port $BACKEND_PORT
}

write_proxy_configs() {
    cat >"$WORK/apex.yaml" <<CONF
workers: 1
listeners:
  - name: bench
    address: 127.0.0.1:$PROXY_PORT
routes:
  - match: { path_prefix: "/" }
    cluster: backend
clusters:
  - name: backend
    endpoints: [ "127.0.0.1:$BACKEND_PORT" ]
    pool_max_idle: 256
    pool_idle_timeout: 30s
CONF
    cat >"$WORK/nginx-proxy.conf" <<CONF
worker_processes 1;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy.error.log;
daemon off;
events { worker_connections 4096; }
http {
$(nginx_http_common)
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
    server {
        listen 127.0.0.1:$PROXY_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 4 16k;
        }
    }
}
CONF
    cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend bench
    bind 127.0.0.1:$PROXY_PORT
    default_backend be
backend be
    server b1 127.0.0.1:$BACKEND_PORT
CONF
}

# Starts the proxy for a mode on CPU 0; prints the PIDs whose CPU time counts.
start_proxy() {
    local mode=$1 pid
    case $mode in
    direct) echo ""; return ;;
    apex-io_uring | apex-epoll | apex-tokio)
        RUST_LOG=warn taskset -c 0 target/release/apex --config "$WORK/apex.yaml" \
            --runtime "${mode#apex-}" >"$WORK/apex.log" 2>&1 &
        pid=$! ;;
    nginx)
        taskset -c 0 nginx -c "$WORK/nginx-proxy.conf" >/dev/null 2>&1 &
        pid=$! ;;
    haproxy)
        taskset -c 0 haproxy -f "$WORK/haproxy.cfg" >/dev/null 2>&1 &
        pid=$! ;;
    esac
    PIDS+=("$pid")
    wait_port $PROXY_PORT
    # The master and its workers (nginx forks one).
    echo "$pid $(pgrep -P "$pid" | tr '\n' ' ')"
}

stop_proxy() {
    local pids=$1
    [ -z "$pids" ] && return
    kill $pids 2>/dev/null || true
    for p in $pids; do
        while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
    done
    PIDS=()
}

cpu_ticks() {
    local total=0
    for p in $1; do
        # utime and stime are fields 14 and 15; the command name (field 2) has no spaces here.
        local t
        t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo $total
}

run_one() {
    local mode=$1 size=$2 round=$3 port pids t0 t1 out
    port=$PROXY_PORT
    [ "$mode" = direct ] && port=$BACKEND_PORT
    pids=$(start_proxy "$mode")
    # Warm-up: fills pools and caches; not measured.
    taskset -c 1 wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/$size" >/dev/null
    t0=$(cpu_ticks "$pids")
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$port/$size")
    t1=$(cpu_ticks "$pids")
    stop_proxy "$pids"
    python3 - "$mode" "$size" "$round" "$((t1 - t0))" "$(getconf CLK_TCK)" <<PY >>"$WORK/results.jsonl"
import json, re, sys
mode, size, rnd, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out = """$out"""
def lat(label):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\s*$" % label, out, re.M)
    if not m: return None
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1000, "s": 1e6}[u]
reqs = int(re.search(r"(\d+) requests in", out).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
sock = re.search(r"Socket errors: (.*)", out)
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
cpu_us = ticks * 1e6 / hz
print(json.dumps({"mode": mode, "size": size, "round": rnd, "requests": reqs, "rps": rps,
    "p50_us": lat("50"), "p99_us": lat("99"),
    "cpu_us_per_req": (cpu_us / reqs) if mode != "direct" and reqs else None,
    "non_2xx": int(errs.group(1)) if errs else 0, "socket_errors": sock.group(1) if sock else ""}))
PY
    tail -1 "$WORK/results.jsonl" >&2
}

main() {
    need
    if [[ " $MODES " == *" apex-"* ]]; then
        cargo build --release -q
    fi
    start_backend
    write_proxy_configs
    : >"$WORK/results.jsonl"
    local modes=($MODES)
    for round in $(seq 1 "$ROUNDS"); do
        local order=("${modes[@]}")
        if [ $((round % 2)) -eq 0 ]; then
            order=()
            for ((i = ${#modes[@]} - 1; i >= 0; i--)); do order+=("${modes[$i]}"); done
        fi
        for size in $SIZES; do
            for mode in "${order[@]}"; do
                run_one "$mode" "$size" "$round"
            done
        done
    done
    # Idle memory: RSS growth per idle keep-alive client connection, once per proxy mode.
    : >"$WORK/idle.jsonl"
    for mode in "${modes[@]}"; do
        [ "$mode" = direct ] && continue
        local pids first
        pids=$(start_proxy "$mode")
        first=${pids%% *}
        taskset -c 1 wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$PROXY_PORT/64" >/dev/null
        local line
        line=$(python3 scripts/idle_memory.py $PROXY_PORT "$first" "$IDLE_CONNS" || echo "failed")
        stop_proxy "$pids"
        echo "idle $mode: $line" >&2
        python3 -c 'import json,sys; kv=dict(x.split("=") for x in sys.argv[2].split()) if "=" in sys.argv[2] else {}; print(json.dumps({"mode": sys.argv[1], **kv}))' "$mode" "$line" >>"$WORK/idle.jsonl"
    done
    local stamp commit
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    python3 scripts/bench_report.py "$WORK/results.jsonl" "$commit" "$(uname -r)" \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" \
        "$ROUNDS" "$SECS" "$CONNS" "benches/results/bench-$stamp" "$WORK/idle.jsonl"
}

main "$@"
