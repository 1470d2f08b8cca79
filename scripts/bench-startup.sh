#!/usr/bin/env bash
# Time from launching `regobox run` to "regobox is ready" (a real connection succeeded and the
# bootstrap is done), on a fresh volume and on an existing one: median of N runs (default 5).
# Usage: scripts/bench-startup.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-5}"
cargo build --release -q
BIN="$PWD/target/release/regobox"
WORK="$(mktemp -d /tmp/regobox-bench.XXXXXX)"
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
PORT=$(( 20000 + RANDOM % 20000 ))

now_ms() { date +%s%3N; }

# Start `run` on volume $1, wait for readiness, stop it; print the milliseconds to ready.
one_run() {
    local vol="$1" log="$WORK/run.log"
    local t0; t0=$(now_ms)
    REGOBOX_VOLUMES__ROOT="$vol" REGOBOX_RUNTIME_DIR="$WORK/run" REGOBOX_POSTGRES__PORT="$PORT" \
        "$BIN" --config-dir "$WORK/config" run >"$log" 2>&1 &
    local pid=$!
    until grep -q "regobox is ready" "$log"; do
        if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; exit 1; fi
        sleep 0.005
    done
    local t1; t1=$(now_ms)
    kill -TERM "$pid"; wait "$pid"
    echo $(( t1 - t0 ))
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

mkdir -p "$WORK/config"
fresh=(); existing=()
for i in $(seq "$N"); do fresh+=("$(one_run "$WORK/fresh-$i")"); done
for i in $(seq "$N"); do existing+=("$(one_run "$WORK/fresh-1")"); done
echo "runs: $N; PostgreSQL: $("$(pg_config --bindir)/postgres" --version)"
echo "fresh volume    (initdb + start + bootstrap): ${fresh[*]} ms -> median $(printf '%s\n' "${fresh[@]}" | median) ms"
echo "existing volume (start + bootstrap):          ${existing[*]} ms -> median $(printf '%s\n' "${existing[@]}" | median) ms"
