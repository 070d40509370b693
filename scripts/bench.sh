#!/usr/bin/env bash
# CPU per request of Apex against nginx and HAProxy as reverse proxies, same run, same machine.
# Run with --help for the arguments and settings.
#
# Layout: an nginx backend (static bodies of 64 B, 4 KiB and 64 KiB) and wrk (1 thread, 64
# keep-alive connections) share CPU 1; the proxy under test runs alone on CPU 0 with one worker.
# Both cores saturate, so req/s against "direct" says little about proxy overhead; the figure
# that holds is the proxy's CPU time (utime+stime from /proc/PID/stat over the run) divided by
# the requests wrk completed. Modes run interleaved, the order alternating every round; each
# mode is compared with nginx-as-proxy measured in the same round. Writes a markdown table and
# JSON to benches/results/, and stops everything it started, by PID: it never signals a process
# it did not start (a packaged nginx or HAProxy service is left alone).
set -euo pipefail

ALL_MODES="direct apex-io_uring apex-epoll apex-tokio nginx haproxy baseline-io_uring apex-tls nginx-tls haproxy-tls apex-h2 apex-tokio-h2 nginx-h2 haproxy-h2 baseline-h2 floor-monoio floor-compio floor-compio-ring floor-compio-multi floor-compio-zc floor-tokio"
ALL_SIZES="64 4k 32k 64k 1m 16k-gzip 64-newconn 64-resume"

usage() {
    cat <<USAGE
Usage: scripts/bench.sh [ROUNDS] [SECONDS]
       scripts/bench.sh --help

Measures the CPU time per request of Apex (io_uring, epoll and tokio runtimes) against nginx and
HAProxy as reverse proxies in front of an nginx backend, on this machine (needs CPUs 0 and 1).

Arguments:
  ROUNDS    rounds; each runs every mode for every size, the mode order alternating between
            rounds (integer 1-100, default 5)
  SECONDS   length of each measured wrk run (integer 1-600, default 5)

Environment:
  SIZES         body sizes, any of: $ALL_SIZES (default: "64 4k 64k")
                (16k-gzip: a 16 KiB HTML page each proxy compresses at gzip level 1;
                64-newconn: 64 B with Connection: close, a new connection, and over TLS a full
                handshake, per request;
                64-resume: TLS modes only, a resumed TLS 1.3 handshake (session ticket) and one
                HTTP/1.0 request per connection, from STIME_CLIENTS \`openssl s_time -reuse\`
                clients, since wrk never resumes; no latency figures)
                TLS modes (apex-tls, nginx-tls, haproxy-tls) terminate TLS 1.3 with one ECDSA
                P-256 certificate (session tickets on) and compare with nginx-tls;
                h2 modes (apex-h2, apex-tokio-h2, nginx-h2, haproxy-h2) do the same with
                HTTP/2 chosen by ALPN, loaded by h2load (CONNS clients x H2_STREAMS streams
                each), and compare with nginx-h2; upstreams stay HTTP/1.1 with keep-alive
  MODES         modes, any of: $ALL_MODES
                (baseline-io_uring runs the binary BASELINE_BIN, e.g. an older commit's build;
                baseline-h2 runs it as apex-h2 runs Apex;
                floor-* run the minimal relay of benches/runtime_floor on that runtime, built
                first with `cd benches/runtime_floor && cargo build --release`)
                (default: all of them; "direct" is wrk against the backend itself)
  CONNS         wrk keep-alive connections (default 64)
  STIME_CLIENTS parallel openssl s_time clients for 64-resume (default 4)
  H2_STREAMS    concurrent streams per h2load client in h2 modes (default 10)
  IDLE_CONNS    idle keep-alive connections for the idle-memory figure (default 5000)
  IDLE_SETTLE   seconds those connections stay idle before the RSS is read (default 3: past
                Apex's park_after of 1 s, as connections between page loads are idle)
  BACKEND_PORT  port of the nginx backend on 127.0.0.1 (default 18080)
  PROXY_PORT    port of the proxy under test on 127.0.0.1 (default 18081)

Installs wrk, nginx, haproxy (and h2load, for h2 modes) with apt-get if missing (as root; packaged services are kept from
starting during the install), builds target/release/apex if an apex mode is selected, and works
in a temporary directory under /tmp that it removes at the end. Writes the report to
benches/results/bench-<UTC time>.md and .json. Stops, by PID, only the processes it started.
USAGE
}

die_usage() {
    echo "bench.sh: $*" >&2
    echo >&2
    usage >&2
    exit 2
}

# A decimal integer in [MIN, MAX]; NAME is for the message.
check_int() {
    local name=$1 value=$2 min=$3 max=$4
    if ! [[ $value =~ ^[0-9]+$ ]] || [ ${#value} -gt 9 ] || ((10#$value < min || 10#$value > max)); then
        die_usage "$name must be an integer from $min to $max, got '$value'"
    fi
}

# Every word of LIST is one of ALLOWED, and LIST has at least one.
check_words() {
    local name=$1 list=$2 allowed=$3 w
    [ -n "${list// /}" ] || die_usage "$name is empty; choose from: $allowed"
    for w in $list; do
        [[ " $allowed " == *" $w "* ]] || die_usage "unknown $name value '$w'; choose from: $allowed"
    done
}

case ${1:-} in
-h | --help) usage; exit 0 ;;
-*) die_usage "unknown option '$1'" ;;
esac
[ $# -le 2 ] || die_usage "too many arguments: $*"

ROUNDS=${1:-5}
SECS=${2:-5}
SIZES=${SIZES:-64 4k 64k}
MODES=${MODES:-$ALL_MODES}
CONNS=${CONNS:-64}
STIME_CLIENTS=${STIME_CLIENTS:-4}
H2_STREAMS=${H2_STREAMS:-10}
IDLE_CONNS=${IDLE_CONNS:-5000}
BACKEND_PORT=${BACKEND_PORT:-18080}
PROXY_PORT=${PROXY_PORT:-18081}

check_int ROUNDS "$ROUNDS" 1 100
check_int SECONDS "$SECS" 1 600
check_words MODES "$MODES" "$ALL_MODES"
# Another Apex binary (an older commit's, say) measured in the same run as mode baseline-io_uring.
BASELINE_BIN=${BASELINE_BIN:-}
case " $MODES " in
*" baseline-io_uring "* | *" baseline-h2 "*)
    if [ -z "$BASELINE_BIN" ] || [ ! -x "$BASELINE_BIN" ]; then
        echo "modes baseline-io_uring and baseline-h2 need BASELINE_BIN=/path/to/an/apex/binary (executable)" >&2
        exit 2
    fi ;;
esac
# The minimal relays (benches/runtime_floor): each runtime's floor, measured beside Apex.
FLOOR_BIN=${FLOOR_BIN:-benches/runtime_floor/target/release/runtime-floor}
case " $MODES " in
*" floor-"*)
    if [ ! -x "$FLOOR_BIN" ]; then
        echo "floor-* modes need $FLOOR_BIN: cd benches/runtime_floor && cargo build --release" >&2
        exit 2
    fi ;;
esac
check_words SIZES "$SIZES" "$ALL_SIZES"
check_int CONNS "$CONNS" 1 100000
check_int STIME_CLIENTS "$STIME_CLIENTS" 1 64
check_int H2_STREAMS "$H2_STREAMS" 1 1000
check_int IDLE_CONNS "$IDLE_CONNS" 1 1000000
check_int BACKEND_PORT "$BACKEND_PORT" 1 65535
check_int PROXY_PORT "$PROXY_PORT" 1 65535
ROUNDS=$((10#$ROUNDS)) SECS=$((10#$SECS)) CONNS=$((10#$CONNS)) IDLE_CONNS=$((10#$IDLE_CONNS))
STIME_CLIENTS=$((10#$STIME_CLIENTS)) H2_STREAMS=$((10#$H2_STREAMS))
BACKEND_PORT=$((10#$BACKEND_PORT)) PROXY_PORT=$((10#$PROXY_PORT))
[ "$BACKEND_PORT" != "$PROXY_PORT" ] || die_usage "BACKEND_PORT and PROXY_PORT are both $PROXY_PORT"

cd "$(dirname "$0")/.."

# Fails unless nothing is bound to 127.0.0.1:PORT (the proxies bind with SO_REUSEADDR, so
# connections left in TIME_WAIT by an earlier run do not count; a listener does).
check_port_free() {
    local var=$1 port=$2 err
    if ! err=$(python3 - "$port" 2>&1 <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit(e.strerror)
PY
    ); then
        echo "bench.sh: port $port on 127.0.0.1 is not free ($err); set $var to a free port" >&2
        exit 1
    fi
}

check_ports() {
    check_port_free BACKEND_PORT "$BACKEND_PORT"
    check_port_free PROXY_PORT "$PROXY_PORT"
}
check_ports

WORK=""
# Every process this script started and has not stopped yet, as PID:STARTTIME, so that a PID
# the kernel has reused for someone else's process is never signalled.
PIDS=()
# Set when this script created /usr/sbin/policy-rc.d, so that it removes it.
POLICY_RC_CREATED=0
POLICY_RC=/usr/sbin/policy-rc.d

# Field N of /proc/PID/stat counted from the state (field 3), so that the command name,
# which may hold spaces, does not shift it: 1 is the state, 20 the start time.
stat_field() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    echo "$s" | cut -d' ' -f"$2"
}

# Records PIDs (just started by this script) for stop_pids and cleanup.
track() {
    local p t
    for p in "$@"; do
        t=$(stat_field "$p" 20) && PIDS+=("$p:$t")
    done
}

# True while the process recorded as ENTRY (PID:STARTTIME) runs; a zombie counts as stopped.
running() {
    local p=${1%%:*} t=${1#*:} state start
    state=$(stat_field "$p" 1) || return 1
    start=$(stat_field "$p" 20) || return 1
    [ "$state" != Z ] && [ "$start" = "$t" ]
}

# Stops the given PIDs, which must have been recorded with track: SIGTERM, then SIGKILL for
# any still running after 5 s; waits until they are gone and forgets them.
stop_pids() {
    local entries=() keep=() e p i
    for e in ${PIDS[@]+"${PIDS[@]}"}; do
        if [[ " $* " == *" ${e%%:*} "* ]]; then entries+=("$e"); else keep+=("$e"); fi
    done
    PIDS=(${keep[@]+"${keep[@]}"})
    for e in ${entries[@]+"${entries[@]}"}; do
        if running "$e"; then kill -TERM "${e%%:*}" 2>/dev/null || true; fi
    done
    for e in ${entries[@]+"${entries[@]}"}; do
        for ((i = 0; i < 100; i++)); do
            running "$e" || break
            sleep 0.05
        done
        if running "$e"; then
            echo "PID ${e%%:*} ignored SIGTERM; sending SIGKILL" >&2
            kill -KILL "${e%%:*}" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                running "$e" || break
                sleep 0.05
            done
        fi
        # Reaps the direct children of this shell.
        wait "${e%%:*}" 2>/dev/null || true
    done
    return 0
}

# The master PID in an nginx pid file under $WORK, if that process is still the nginx started
# with a configuration from $WORK.
nginx_pidfile_master() {
    local f=$1 p
    [ -f "$f" ] || return 1
    p=$(tr -dc '0-9' <"$f")
    [ -n "$p" ] || return 1
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$WORK/" || return 1
    echo "$p"
}

cleanup() {
    set +e
    # A second Ctrl-C must not cut the cleanup short.
    trap '' INT TERM HUP
    local all=() e f p
    for e in ${PIDS[@]+"${PIDS[@]}"}; do all+=("${e%%:*}"); done
    stop_pids ${all[@]+"${all[@]}"}
    # An nginx master that got as far as writing its pid file but was not recorded yet.
    if [ -n "$WORK" ]; then
        for f in "$WORK/backend.pid" "$WORK/nginx-proxy.pid" "$WORK/nginx-tls.pid" "$WORK/nginx-h2.pid"; do
            if p=$(nginx_pidfile_master "$f"); then
                track "$p" $(pgrep -P "$p")
                stop_pids "$p" $(pgrep -P "$p")
            fi
        done
        rm -rf "$WORK"
    fi
    if [ "$POLICY_RC_CREATED" = 1 ]; then
        rm -f "$POLICY_RC"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

WORK=$(mktemp -d /tmp/apex-bench.XXXXXX)
# nginx workers run as an unprivileged user and must read the bodies.
chmod 755 "$WORK"

need() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    if [[ " $MODES " == *"-h2 "* ]]; then
        command -v h2load >/dev/null || missing+=(nghttp2-client)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "bench.sh: missing ${missing[*]}; install them, or run as root on Debian/Ubuntu" >&2
            exit 1
        fi
        echo "installing ${missing[*]}" >&2
        # Keeps Debian's maintainer scripts from starting the packaged services (exit 101:
        # action forbidden) during this install only; an existing policy-rc.d is left as it is.
        if (set -C && printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC") 2>/dev/null; then
            POLICY_RC_CREATED=1
            chmod 755 "$POLICY_RC"
        else
            echo "note: keeping the existing $POLICY_RC; it decides whether packaged services start" >&2
        fi
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
        if [ "$POLICY_RC_CREATED" = 1 ]; then
            rm -f "$POLICY_RC"
            POLICY_RC_CREATED=0
        fi
    fi
    # Other nginx or HAProxy processes (a user's own, a packaged service) are not ours to stop.
    local name others
    for name in nginx haproxy; do
        others=$(pgrep -x "$name" | tr '\n' ' ' || true)
        if [ -n "$others" ]; then
            echo "warning: $name processes not started by this script are running (PIDs ${others% }); left alone, they may share CPUs 0 and 1 and skew the figures" >&2
        fi
    done
}

# Waits until something accepts connections on 127.0.0.1:PORT; with PID, fails at once if
# that process has exited.
wait_port() {
    local port=$1 pid=${2:-}
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited before listening on port $port (see the logs in $WORK)" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "nothing listens on port $port" >&2
    return 1
}

# Waits until PID has forked N children (an nginx master's workers); prints their PIDs.
wait_children() {
    local pid=$1 n=$2 kids
    for _ in $(seq 1 100); do
        kids=$(pgrep -P "$pid" | tr '\n' ' ' || true)
        if [ "$(wc -w <<<"$kids")" -ge "$n" ]; then
            echo "$kids"
            return 0
        fi
        sleep 0.05
    done
    echo "process $pid did not start its $n worker(s)" >&2
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
    local pid kids
    mkdir -p "$WORK/www" "$WORK/backend"
    head -c 64 /dev/zero | tr '\0' 'a' >"$WORK/www/64"
    head -c 4096 /dev/zero | tr '\0' 'b' >"$WORK/www/4k"
    head -c 32768 /dev/zero | tr '\0' 'c' >"$WORK/www/32k"
    head -c 65536 /dev/zero | tr '\0' 'c' >"$WORK/www/64k"
    head -c 1048576 /dev/zero | tr '\0' 'd' >"$WORK/www/1m"
    # 16k-gzip: a 16 KiB HTML page, requested with Accept-Encoding: gzip; every proxy
    # compresses it at gzip level 1 (nginx's and HAProxy's default level).
    mkdir -p "$WORK/www/gz"
    for i in $(seq 1 400); do echo "<p>line $i of a page that proxies compress</p>"; done \
        >"$WORK/www/gz/page"
    head -c 16384 "$WORK/www/gz/page" >"$WORK/www/gz/16k-gzip"
    # In the foreground of a background job rather than daemonised, so that its PID is known
    # at once; the pid file stays as a second record for cleanup.
    cat >"$WORK/backend.conf" <<CONF
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend/error.log;
daemon off;
events { worker_connections 4096; }
http {
$(nginx_http_common)
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        root $WORK/www;
        default_type application/octet-stream;
        location /gz/ { default_type text/html; }
    }
}
CONF
    taskset -c 1 nginx -c "$WORK/backend.conf" >"$WORK/backend.out" 2>&1 &
    pid=$!
    track "$pid"
    wait_port "$BACKEND_PORT" "$pid"
    kids=$(wait_children "$pid" 1)
    track $kids
}

# One ECDSA P-256 certificate for every TLS mode (HAProxy wants key and chain in one file).
make_certificate() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"
}

# The baseline binary (an older commit's) gets the same config when it accepts it; one that
# predates a key it uses (compression) gets the plain route only, and is then not compared in
# 16k-gzip (its requests would not be compressed).
BASELINE_GZIP=1
write_baseline_config() {
    if [ -n "$BASELINE_BIN" ] && "$BASELINE_BIN" check "$WORK/apex.yaml" >/dev/null 2>&1; then
        cp "$WORK/apex.yaml" "$WORK/apex-baseline.yaml"
        return
    fi
    BASELINE_GZIP=0
    awk '/path_prefix: "\/gz\/"/ { skip = 3 } skip > 0 { skip--; next } { print }' \
        "$WORK/apex.yaml" >"$WORK/apex-baseline.yaml"
}

write_tls_configs() {
    # Apex: the same config with a tls block on the listener.
    awk -v tls="    tls: { certificates: [ { cert: \"$WORK/cert.pem\", key: \"$WORK/key.pem\" } ], min_version: \"1.3\" }" \
        '{ print } /^    address: / { print tls }' "$WORK/apex.yaml" >"$WORK/apex-tls.yaml"
    sed -e "s|listen 127.0.0.1:$PROXY_PORT backlog=4096;|listen 127.0.0.1:$PROXY_PORT ssl backlog=4096; ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; ssl_protocols TLSv1.3; ssl_session_tickets on; ssl_session_cache shared:bench:10m;|" \
        -e "s|pid $WORK/nginx-proxy.pid;|pid $WORK/nginx-tls.pid;|" \
        "$WORK/nginx-proxy.conf" >"$WORK/nginx-tls.conf"
    sed "s|    bind 127.0.0.1:$PROXY_PORT|    bind 127.0.0.1:$PROXY_PORT ssl crt $WORK/haproxy.pem ssl-min-ver TLSv1.3|" \
        "$WORK/haproxy.cfg" >"$WORK/haproxy-tls.cfg"
    # HTTP/2 by ALPN on the same TLS listeners (nginx 1.22 spells it on the listen line).
    sed 's|min_version: "1.3" }|min_version: "1.3", alpn: [h2, http/1.1] }|' \
        "$WORK/apex-tls.yaml" >"$WORK/apex-h2.yaml"
    sed -e "s|listen 127.0.0.1:$PROXY_PORT ssl backlog=4096;|listen 127.0.0.1:$PROXY_PORT ssl http2 backlog=4096;|" \
        -e "s|pid $WORK/nginx-tls.pid;|pid $WORK/nginx-h2.pid;|" \
        "$WORK/nginx-tls.conf" >"$WORK/nginx-h2.conf"
    sed "s|ssl-min-ver TLSv1.3|ssl-min-ver TLSv1.3 alpn h2,http/1.1|" \
        "$WORK/haproxy-tls.cfg" >"$WORK/haproxy-h2.cfg"
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
  - match: { path_prefix: "/gz/" }
    cluster: backend
    compression: { encodings: [gzip], gzip_level: 1, min_size: 1, types: [text/html] }
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
        location /gz/ {
            gzip on;
            gzip_comp_level 1;
            gzip_min_length 0;
            gzip_proxied any;
            gzip_types text/html;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 4 16k;
        }
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
    compression algo gzip
    compression type text/html
    default_backend be
backend be
    server b1 127.0.0.1:$BACKEND_PORT
CONF
}

# Starts the proxy for a mode on CPU 0; sets PROXY_PIDS to the PIDs whose CPU time counts (the
# master first, then its workers: nginx forks one). Not to be called in a subshell: the PIDs
# must reach PIDS for cleanup.
PROXY_PIDS=""
start_proxy() {
    local mode=$1 pid kids=""
    PROXY_PIDS=""
    case $mode in
    direct) return ;;
    apex-io_uring | apex-epoll | apex-tokio)
        RUST_LOG=warn taskset -c 0 target/release/apex --config "$WORK/apex.yaml" \
            --runtime "${mode#apex-}" >"$WORK/apex.log" 2>&1 &
        pid=$! ;;
    apex-tls)
        RUST_LOG=warn taskset -c 0 target/release/apex --config "$WORK/apex-tls.yaml" \
            --runtime io_uring >"$WORK/apex.log" 2>&1 &
        pid=$! ;;
    nginx-tls)
        taskset -c 0 nginx -c "$WORK/nginx-tls.conf" >/dev/null 2>&1 &
        pid=$! ;;
    haproxy-tls)
        taskset -c 0 haproxy -f "$WORK/haproxy-tls.cfg" >/dev/null 2>&1 &
        pid=$! ;;
    apex-h2 | apex-tokio-h2)
        local rt=io_uring
        [ "$mode" = apex-tokio-h2 ] && rt=tokio
        RUST_LOG=warn taskset -c 0 target/release/apex --config "$WORK/apex-h2.yaml" \
            --runtime "$rt" >"$WORK/apex.log" 2>&1 &
        pid=$! ;;
    nginx-h2)
        taskset -c 0 nginx -c "$WORK/nginx-h2.conf" >/dev/null 2>&1 &
        pid=$! ;;
    haproxy-h2)
        taskset -c 0 haproxy -f "$WORK/haproxy-h2.cfg" >/dev/null 2>&1 &
        pid=$! ;;
    baseline-io_uring)
        RUST_LOG=warn taskset -c 0 "$BASELINE_BIN" --config "$WORK/apex-baseline.yaml" \
            --runtime io_uring >"$WORK/baseline.log" 2>&1 &
        pid=$! ;;
    baseline-h2)
        RUST_LOG=warn taskset -c 0 "$BASELINE_BIN" --config "$WORK/apex-h2.yaml" \
            --runtime io_uring >"$WORK/baseline.log" 2>&1 &
        pid=$! ;;
    nginx)
        taskset -c 0 nginx -c "$WORK/nginx-proxy.conf" >/dev/null 2>&1 &
        pid=$! ;;
    floor-*)
        taskset -c 0 "$FLOOR_BIN" "${mode#floor-}" "127.0.0.1:$PROXY_PORT" \
            "127.0.0.1:$BACKEND_PORT" >"$WORK/floor.log" 2>&1 &
        pid=$! ;;
    haproxy)
        taskset -c 0 haproxy -f "$WORK/haproxy.cfg" >/dev/null 2>&1 &
        pid=$! ;;
    esac
    track "$pid"
    wait_port "$PROXY_PORT" "$pid"
    # The master and its workers (nginx forks one, once it listens: wait for it).
    if [[ $mode == nginx || $mode == nginx-* ]]; then
        kids=$(wait_children "$pid" 1)
    else
        kids=$(pgrep -P "$pid" | tr '\n' ' ' || true)
    fi
    track $kids
    PROXY_PIDS="$pid $kids"
}

stop_proxy() {
    local pids=$1
    [ -z "$pids" ] && return
    stop_pids $pids
}

# Runs wrk on CPU 1 as a background job, so that cleanup can stop it by PID, and waits for it;
# its standard output goes to $WORK/wrk.out.
run_wrk() {
    local pid rc=0
    taskset -c 1 wrk "$@" >"$WORK/wrk.out" &
    pid=$!
    track "$pid"
    wait "$pid" || rc=$?
    stop_pids "$pid"
    return $rc
}

# Runs STIME_CLIENTS \`openssl s_time -reuse\` clients on CPU 1 against the proxy for SECONDS,
# as background jobs stopped by PID; writes wrk-like lines ("N requests in", "Requests/sec:")
# to $WORK/wrk.out, so the figures go through the same report. Fails if a client saw no
# resumption (s_time prints "r" per resumed connection, "*" per full handshake).
run_stime() {
    local secs=$1 pids=() i rc=0
    for i in $(seq 1 "$STIME_CLIENTS"); do
        taskset -c 1 openssl s_time -connect "127.0.0.1:$PROXY_PORT" -reuse -time "$secs" \
            -www /64 >"$WORK/stime.$i" 2>&1 &
        pids+=($!)
        track "$!"
    done
    for i in "${pids[@]}"; do wait "$i" || rc=$?; done
    stop_pids "${pids[@]}"
    [ $rc = 0 ] || return $rc
    python3 - "$WORK" "$STIME_CLIENTS" "$secs" >"$WORK/wrk.out" <<'PY'
import re, sys
work, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = 0
for i in range(1, n + 1):
    out = open(f"{work}/stime.{i}", errors="replace").read()
    # The reuse phase is the last "connections in N real seconds" line.
    counts = re.findall(r"(\d+) connections in \d+ real seconds", out)
    marks = out.split("starting")[-1]
    if not counts or marks.count("r") < marks.count("*"):
        sys.exit(f"s_time client {i}: sessions were not resumed:\n{out[-300:]}")
    total += int(counts[-1])
print(f"{total} requests in {secs}.00s")
print(f"Requests/sec: {total / secs:.2f}")
PY
}

# Runs h2load on CPU 1 for SECONDS (CONNS clients, H2_STREAMS streams each) as a background job
# stopped by PID, and writes wrk-like lines to $WORK/wrk.out (requests, req/s, non-2xx, and the
# 50th/99th latency percentiles computed from h2load's per-request log), so the figures go
# through the same report.
run_h2load() {
    local secs=$1 url=$2 pid rc=0
    rm -f "$WORK/h2load.log"
    taskset -c 1 h2load -c "$CONNS" -m "$H2_STREAMS" -t 1 -D "$secs" \
        --log-file="$WORK/h2load.log" "$url" >"$WORK/h2load.out" 2>&1 &
    pid=$!
    track "$pid"
    wait "$pid" || rc=$?
    stop_pids "$pid"
    [ $rc = 0 ] || { cat "$WORK/h2load.out" >&2; return $rc; }
    python3 - "$WORK" "$secs" >"$WORK/wrk.out" <<'PY'
import re, sys
work, secs = sys.argv[1], int(sys.argv[2])
out = open(f"{work}/h2load.out").read()
done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
non_2xx = int(codes.group(3)) + int(codes.group(4))
# h2load's log: one line per request, the third field its duration in microseconds.
lat = sorted(int(l.split()[2]) for l in open(f"{work}/h2load.log") if l.strip())
def pct(p):
    return lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else 0
print(f"{done} requests in {secs}.00s")
print(f"Requests/sec: {done / secs:.2f}")
print(f"     50%  {pct(50)}us")
print(f"     99%  {pct(99)}us")
if non_2xx:
    print(f"Non-2xx or 3xx responses: {non_2xx}")
PY
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
    start_proxy "$mode"
    pids=$PROXY_PIDS
    # The compressed size is asked for with Accept-Encoding, under /gz/; 64-newconn closes
    # every connection after one request.
    local path=$size header=() scheme=http
    case $size in
    16k-gzip) path=gz/$size; header=(-H "Accept-Encoding: gzip") ;;
    64-newconn) path=64; header=(-H "Connection: close") ;;
    esac
    case $mode in *-tls | *-h2) scheme=https ;; esac
    # Warm-up: fills pools and caches; not measured.
    if [[ $mode == *-h2 ]]; then
        run_h2load 1 "https://127.0.0.1:$port/$path"
        t0=$(cpu_ticks "$pids")
        run_h2load "$SECS" "https://127.0.0.1:$port/$path"
    elif [ "$size" = 64-resume ]; then
        run_stime 1
        t0=$(cpu_ticks "$pids")
        run_stime "$SECS"
    else
        run_wrk -t1 -c"$CONNS" -d1s "${header[@]}" "$scheme://127.0.0.1:$port/$path"
        t0=$(cpu_ticks "$pids")
        run_wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "${header[@]}" "$scheme://127.0.0.1:$port/$path"
    fi
    out=$(cat "$WORK/wrk.out")
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

# RSS growth per idle connection of the proxy whose master is PID; sets IDLE_LINE to
# idle_memory.py's line, or "failed". A background job, so that cleanup can stop it by PID;
# not to be called in a subshell.
IDLE_LINE=""
idle_memory() {
    local first=$1 tls=${2:-} pid
    python3 scripts/idle_memory.py "$PROXY_PORT" "$first" "$IDLE_CONNS" $tls >"$WORK/idle.out" &
    pid=$!
    track "$pid"
    if wait "$pid"; then IDLE_LINE=$(cat "$WORK/idle.out"); else IDLE_LINE="failed"; fi
    stop_pids "$pid"
}

main() {
    need
    if [[ " $MODES " == *" apex-"* ]]; then
        cargo build --release -q
    fi
    # Again: the install and the build take a while.
    check_ports
    start_backend
    write_proxy_configs
    write_baseline_config
    if [[ " $MODES " == *"-tls "* || " $MODES " == *"-h2 "* ]]; then
        make_certificate
        write_tls_configs
    fi
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
                # Resumption is a TLS figure; h2 modes measure keep-alive sizes only.
                [ "$size" = 64-resume ] && [[ $mode != *-tls ]] && continue
                [[ $mode == *-h2 ]] && [[ $size == 16k-gzip || $size == 64-* ]] && continue
                [ "$mode" = baseline-io_uring ] && [ "$size" = 16k-gzip ] &&
                    [ "$BASELINE_GZIP" = 0 ] && continue
                run_one "$mode" "$size" "$round"
            done
        done
    done
    # Idle memory: RSS growth per idle keep-alive client connection, once per proxy mode.
    : >"$WORK/idle.jsonl"
    for mode in "${modes[@]}"; do
        # Idle memory over h2 is not measured (the idle script speaks HTTP/1.1), nor that of
        # the minimal relays (each client connection holds an upstream connection of its own).
        [[ $mode == direct || $mode == *-h2 || $mode == floor-* ]] && continue
        local pids first scheme=http tls=""
        case $mode in *-tls) scheme=https; tls=tls ;; esac
        start_proxy "$mode"
        pids=$PROXY_PIDS
        first=${pids%% *}
        run_wrk -t1 -c"$CONNS" -d1s "$scheme://127.0.0.1:$PROXY_PORT/64"
        local line
        idle_memory "$first" "$tls"
        line=$IDLE_LINE
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
