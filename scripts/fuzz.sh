#!/usr/bin/env bash
# Runs the libFuzzer targets for a bounded time each: the request-head parser and the chunked
# decoder, the PROXY protocol parser, the TLS handshake path and the h2 server side.
#   scripts/fuzz.sh [SECONDS]   (default 60 per target)
#
# cargo-fuzz wants a nightly toolchain for its sanitizers; only stable is available here, so
# this builds with coverage instrumentation and no sanitizer (`--sanitizer none`, safe Rust
# panics and debug assertions still abort), letting stable accept cargo-fuzz's flags with
# RUSTC_BOOTSTRAP=1. Corpora persist in fuzz/corpus/<target>; crashes land in fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
for target in request_head chunked proxy_protocol tls_handshake h2_frames; do
    mkdir -p "fuzz/corpus/$target"
    cp -n fuzz/seeds/"$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
    echo "== $target: ${SECS}s"
    cargo fuzz run --sanitizer none --debug-assertions "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$SECS" -max_len=70000 -print_final_stats=1 2>&1 |
        grep -E "^(#[0-9]+ +DONE|stat::|==|SUMMARY|thread|panicked)|cov:" | tail -8
done
