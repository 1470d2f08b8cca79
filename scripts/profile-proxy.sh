#!/usr/bin/env bash
# Instructions per request in regobox's proxy, counted by callgrind (deterministic, unlike
# timings): the release binary (one proxy worker) under `valgrind --tool=callgrind`, the same
# upstream as scripts/bench-proxy.sh (an nginx answering a 1 KiB body), a warm-up load, the
# counters zeroed, then N requests from h2load (8 connections, one thread; HTTP/2 with 10
# streams each, or HTTP/1.1), and the counters dumped. Prints instructions per request (the
# whole process, every thread) and keeps the profile for callgrind_annotate.
# Needs valgrind, nginx-light and nghttp2-client (h2load): installed if missing.
# Usage: scripts/profile-proxy.sh [h2|h1] [REQUESTS (10000)] [OUT (/tmp/regobox-callgrind.<kind>.out)]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
KIND="${1:-h2}"
N="${2:-10000}"
OUT="$(realpath -m "${3:-/tmp/regobox-callgrind.$KIND.out}")"
bench_need valgrind:valgrind nginx:nginx-light h2load:nghttp2-client openssl:openssl
bench_bin
WORK="$(mktemp -d /tmp/regobox-profile.XXXXXX)"
chmod 755 "$WORK"
cleanup() {
    [ -n "${RBXPID:-}" ] && kill "$RBXPID" 2>/dev/null || true
    [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT
base=$(( 20000 + RANDOM % 20000 ))
UP=$base; RBX=$((base + 1)); RBX80=$((base + 2)); PG=$((base + 3)); HEALTH=$((base + 4))
bench_cert "$WORK"
bench_regobox_config "$WORK" "$RBX" "$RBX80" "$UP" 1
bench_upstream "$WORK" "$UP"
bench_regobox_start "$WORK" "$PG" "$HEALTH" \
    valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$OUT"
if [ "$KIND" = h1 ]; then proto=(--h1); else proto=(-m10); fi
load() { h2load "${proto[@]}" -c8 -t1 -n"$1" "https://localhost:$RBX/" | awk '/^status codes:/ {print "status codes:", $3, "2xx of", '"$1"'}'; }
load 2000
callgrind_control -z "$RBXPID" >/dev/null 2>&1
load "$N"
callgrind_control -d "$RBXPID" >/dev/null 2>&1
sleep 1
# The dump's file is OUT.<n> (the first dump); its total line is "totals: <Ir>".
dump=$(ls -t "$OUT".* | head -1)
total=$(awk '/^totals:/ {print $2}' "$dump")
echo "$KIND: $total instructions for $N requests: $((total / N)) per request (profile: $dump)"
