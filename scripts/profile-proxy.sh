#!/usr/bin/env bash
# What a request costs regobox's proxy, in counts rather than timings (repeatable whatever else
# the machine is doing): the release binary (one proxy worker), the same upstream as
# scripts/bench-proxy.sh (an nginx answering a 1 KiB body), a warm-up load, then N requests from
# h2load (one thread; HTTP/2 with 10 streams a connection, HTTP/1.1, or HTTP/1.1 with a new TLS
# connection per request, `Connection: close`, as bench-proxy.sh's last row), and one of:
# - instructions (the default): regobox under `valgrind --tool=callgrind`, the counters zeroed
#   after the warm-up and dumped after the load (8 connections); prints instructions per request
#   (the whole process, every thread) and keeps the profile for callgrind_annotate;
# - COUNT=syscalls: `strace -c` attached to every thread for the load (32 connections); prints
#   each system call's count per request (those of at least one request in a thousand, the most
#   frequent first; failed ones, such as EAGAIN, in brackets) and their sum.
# Needs valgrind or strace, nginx-light and nghttp2-client (h2load): installed if missing.
# Usage: [COUNT=instructions|syscalls] scripts/profile-proxy.sh [h2|h1|tls] [REQUESTS (10000)] [OUT (/tmp/regobox-callgrind.<kind>.out)]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
KIND="${1:-h2}"
N="${2:-10000}"
OUT="$(realpath -m "${3:-/tmp/regobox-callgrind.$KIND.out}")"
COUNT="${COUNT:-instructions}"
case $COUNT in
instructions) bench_need valgrind:valgrind; CONNS=8 ;;
syscalls) bench_need strace:strace; CONNS=32 ;;
*) echo "COUNT is instructions or syscalls" >&2; exit 2 ;;
esac
bench_need nginx:nginx-light h2load:nghttp2-client openssl:openssl
bench_bin
WORK="$(mktemp -d /tmp/regobox-profile.XXXXXX)"
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
case $KIND in
h1) proto=(--h1) ;;
h2) proto=(-m10) ;;
tls) proto=(--h1 -H "Connection: close") ;;
*) echo "the kind is h2, h1 or tls" >&2; exit 2 ;;
esac
load() { h2load "${proto[@]}" -c"$CONNS" -t1 -n"$1" "https://localhost:$RBX/" | awk '/^status codes:/ {print "status codes:", $3, "2xx of", '"$1"'}'; }

if [ "$COUNT" = syscalls ]; then
    bench_regobox_start "$WORK" "$PG" "$HEALTH"
    load 5000
    strace -f -c -p "$RBXPID" -o "$WORK/strace.txt" 2>/dev/null &
    STRACEPID=$!
    sleep 2
    load "$N"
    sleep 1
    kill -INT "$STRACEPID"
    wait "$STRACEPID" 2>/dev/null || true
    STRACEPID=
    # strace -c's table: "% time, seconds, usecs/call, calls, [errors,] syscall".
    echo "$KIND: system calls per request over $N requests (failed ones in brackets)"
    awk -v n="$N" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" && $4 / n >= 0.001 {
        errors = (NF == 6 ? $5 : 0)
        printf "  %-14s %6.3f%s\n", $NF, $4 / n, (errors > 0 ? sprintf(" [%.3f]", errors / n) : "")
    }' "$WORK/strace.txt" | sort -k2 -nr
    awk -v n="$N" '$NF == "total" {printf "  %-14s %6.3f\n", "all", $4 / n}' "$WORK/strace.txt"
    exit 0
fi

bench_regobox_start "$WORK" "$PG" "$HEALTH" \
    valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$OUT"
load 2000
callgrind_control -z "$RBXPID" >/dev/null 2>&1
load "$N"
callgrind_control -d "$RBXPID" >/dev/null 2>&1
sleep 1
# The dump's file is OUT.<n> (the first dump); its total line is "totals: <Ir>".
dump=$(ls -t "$OUT".* | head -1)
total=$(awk '/^totals:/ {print $2}' "$dump")
echo "$KIND: $total instructions for $N requests: $((total / N)) per request (profile: $dump)"
