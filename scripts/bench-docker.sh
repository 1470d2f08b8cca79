#!/usr/bin/env bash
# Latency the Docker bridge adds, proxy socket vs the engine's own socket (median of N, default 20):
#  1. GET /containers/json;
#  2. create + start + wait of a trivial container (busybox `true`), as three API calls.
# Needs the Docker engine on /var/run/docker.sock, curl and a static busybox (scripts/install-deps.sh).
# Usage: scripts/bench-docker.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20}"
cargo build --release -q
BIN="$PWD/target/release/regobox"
WORK="$(mktemp -d /tmp/regobox-bench.XXXXXX)"
chmod 755 "$WORK"
ENGINE=/var/run/docker.sock
cleanup() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    docker rm -f $(docker ps -aq --filter label=regobox-bench=1) >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(( 20000 + RANDOM % 20000 )); HEALTH=$(( PORT + 1 ))
export REGOBOX_VOLUMES__ROOT="$WORK/vol" REGOBOX_RUNTIME_DIR="$WORK/run" REGOBOX_POSTGRES__PORT="$PORT" \
       REGOBOX_SUPERVISION__LISTEN=127.0.0.1 REGOBOX_SUPERVISION__PORT="$HEALTH" \
       REGOBOX_DOCKER__HOST="unix://$ENGINE"
mkdir -p "$WORK/config"
"$BIN" --config-dir "$WORK/config" run >"$WORK/run.log" 2>&1 &
PID=$!
until grep -q "regobox is ready" "$WORK/run.log"; do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/run.log" >&2; exit 1; }
    sleep 0.05
done
PROXY="$WORK/run/docker.sock"
[ -S "$PROXY" ] || { echo "no proxy socket: is the engine up?" >&2; cat "$WORK/run.log" >&2; exit 1; }

# The job image, imported through the proxy (so that it is the instance's) under one tag.
mkdir -p "$WORK/rootfs/bin"
cp /bin/busybox "$WORK/rootfs/bin/busybox"
ln -s busybox "$WORK/rootfs/bin/true"
tar -C "$WORK/rootfs" -c . | DOCKER_HOST="unix://$PROXY" docker import - regobox-bench/busybox:1 >/dev/null

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.2f", m / 1e6}'; }

list() { # socket
    local t0 t1
    for _ in $(seq "$N"); do
        t0=$(now); curl -sf --unix-socket "$1" http://d/v1.41/containers/json >/dev/null; t1=$(now)
        echo $((t1 - t0))
    done | median
}
job() { # socket
    local t0 t1 id
    for _ in $(seq "$N"); do
        t0=$(now)
        id=$(curl -sf --unix-socket "$1" -H 'Content-Type: application/json' \
            -d '{"Image":"regobox-bench/busybox:1","Cmd":["true"],"Labels":{"regobox-bench":"1"}}' \
            http://d/v1.41/containers/create | sed 's/.*"Id":"\([0-9a-f]*\)".*/\1/')
        curl -sf --unix-socket "$1" -X POST "http://d/v1.41/containers/$id/start" >/dev/null
        curl -sf --unix-socket "$1" -X POST "http://d/v1.41/containers/$id/wait" >/dev/null
        t1=$(now)
        echo $((t1 - t0))
        docker rm "$id" >/dev/null
    done | median
}
# Warm up both paths once.
list "$ENGINE" >/dev/null; list "$PROXY" >/dev/null
echo "GET /containers/json, median of $N (ms): engine $(list "$ENGINE"), proxy $(list "$PROXY")"
echo "create+start+wait of busybox true, median of $N (ms): engine $(job "$ENGINE"), proxy $(job "$PROXY")"
docker rmi regobox-bench/busybox:1 >/dev/null
