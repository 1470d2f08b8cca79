#!/usr/bin/env bash
# Supervision figures for the README:
#  1. regobox's own idle RSS and CPU with PostgreSQL and two services running (sampled over
#     IDLE_SECONDS, default 30);
#  2. time from SIGTERM to regobox's exit with PostgreSQL under a pgbench write load
#     (median of N runs, default 5).
# Usage: scripts/bench-supervisor.sh [N] [IDLE_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-5}"
IDLE="${2:-30}"
cargo build --release -q
BIN="$PWD/target/release/regobox"
BINDIR="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
WORK="$(mktemp -d /tmp/regobox-bench.XXXXXX)"
chmod 755 "$WORK"
trap 'kill %1 2>/dev/null || true; rm -rf "$WORK"' EXIT
PORT=$(( 20000 + RANDOM % 20000 )); HEALTH=$(( PORT + 1 )); HTTP=$(( PORT + 2 ))
mkdir -p "$WORK/config"
cat > "$WORK/config/50_bench.toml" <<TOML
[services.web]
command = ["python3", "-m", "http.server", "$HTTP", "--bind", "127.0.0.1"]
ready = { tcp = "127.0.0.1:$HTTP" }
[services.worker]
command = ["sh", "-c", "while :; do sleep 1; done"]
depends_on = ["web"]
TOML
export REGOBOX_VOLUMES__ROOT="$WORK/vol" REGOBOX_RUNTIME_DIR="$WORK/run" REGOBOX_POSTGRES__PORT="$PORT" \
       REGOBOX_SUPERVISION__LISTEN=127.0.0.1 REGOBOX_SUPERVISION__PORT="$HEALTH"

start() {
    "$BIN" --config-dir "$WORK/config" run >"$WORK/run.log" 2>&1 &
    PID=$!
    until grep -q "regobox is ready" "$WORK/run.log"; do
        kill -0 "$PID" 2>/dev/null || { cat "$WORK/run.log" >&2; exit 1; }
        sleep 0.05
    done
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# 1. Idle footprint.
start
sleep 2
t0=$(cpu_ticks "$PID"); s0=$(date +%s.%N)
sleep "$IDLE"
t1=$(cpu_ticks "$PID"); s1=$(date +%s.%N)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
hz=$(getconf CLK_TCK)
cpu=$(awk -v a="$t0" -v b="$t1" -v s="$s0" -v e="$s1" -v hz="$hz" 'BEGIN {printf "%.3f", 100 * (b - a) / hz / (e - s)}')
echo "idle (PostgreSQL + 2 services, ${IDLE}s): regobox RSS ${rss} KiB, CPU ${cpu}% of one core ($((t1 - t0)) ticks)"

# 2. SIGTERM to exit under a write load.
PASS="$(cat "$WORK/vol/secrets/postgres-password")"
export PGPASSWORD="$PASS"
"$BINDIR/pgbench" -h 127.0.0.1 -p "$PORT" -U app -i -s 5 -q app >/dev/null 2>&1
kill -TERM "$PID"; wait "$PID" || true
times=()
for i in $(seq "$N"); do
    start
    "$BINDIR/pgbench" -h 127.0.0.1 -p "$PORT" -U app -c 4 -j 2 -T 60 app >/dev/null 2>&1 &
    LOAD=$!
    sleep 3
    a=$(date +%s%3N)
    kill -TERM "$PID"; wait "$PID" || true
    b=$(date +%s%3N)
    wait "$LOAD" 2>/dev/null || true
    grep -q "database system is shut down" "$WORK/run.log" || { echo "no clean shutdown" >&2; exit 1; }
    times+=($((b - a)))
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "SIGTERM to exit under pgbench (4 clients, scale 5): ${times[*]} ms -> median ${median} ms"
