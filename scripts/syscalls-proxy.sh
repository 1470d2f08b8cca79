#!/usr/bin/env bash
# System calls per request in regobox's proxy, counted by `strace -c` (counts, not timings: the
# same load gives the same figures to within a few calls in a thousand, whatever else the machine
# is doing): the release binary (one proxy worker), the same upstream as scripts/bench-proxy.sh
# (an nginx answering a 1 KiB body), a warm-up load, then N requests from h2load (32
# connections, one thread; HTTP/2 with 10 streams each, or HTTP/1.1) with strace attached to
# every thread. Prints each system call's count per request, and the failed ones (EAGAIN).
# Needs strace, nginx-light and nghttp2-client (h2load): installed if missing.
# Usage: scripts/syscalls-proxy.sh [h2|h1] [REQUESTS (20000)]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
KIND="${1:-h2}"
N="${2:-20000}"
bench_need strace:strace nginx:nginx-light h2load:nghttp2-client openssl:openssl
bench_bin
WORK="$(mktemp -d /tmp/regobox-syscalls.XXXXXX)"
chmod 755 "$WORK"
cleanup() {
    [ -n "${STRACEPID:-}" ] && kill "$STRACEPID" 2>/dev/null || true
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
bench_regobox_start "$WORK" "$PG" "$HEALTH"
if [ "$KIND" = h1 ]; then proto=(--h1); else proto=(-m10); fi
load() { h2load "${proto[@]}" -c32 -t1 -n"$1" "https://localhost:$RBX/" | awk '/^status codes:/ {print "status codes:", $3, "2xx of", '"$1"'}'; }
load 5000
strace -f -c -p "$RBXPID" -o "$WORK/strace.txt" 2>/dev/null &
STRACEPID=$!
sleep 2
load "$N"
sleep 1
kill -INT "$STRACEPID"
wait "$STRACEPID" 2>/dev/null || true
STRACEPID=
# strace -c's table: "% time seconds usecs/call calls [errors] syscall".
echo "$KIND: system calls per request over $N requests (failed ones in brackets)"
# The calls of at least one in a thousand requests, the most frequent first, then all of them.
awk -v n="$N" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" && $4 / n >= 0.001 {
    errors = (NF == 6 ? $5 : 0)
    printf "  %-14s %6.3f%s\n", $NF, $4 / n, (errors > 0 ? sprintf(" [%.3f]", errors / n) : "")
}' "$WORK/strace.txt" | sort -k2 -nr
awk -v n="$N" '$NF == "total" {printf "  %-14s %6.3f\n", "all", $4 / n}' "$WORK/strace.txt"
