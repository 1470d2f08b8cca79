#!/usr/bin/env bash
# What an idle keep-alive connection costs each proxy: N plain HTTP/1.1 connections each make one
# request (a 1 KiB answer from the same upstream, through the proxy) and then stay open, idle;
# the proxy's RSS is read before, with them open, and after they are closed. nginx (one worker)
# and haproxy (one thread) beside regobox (one worker), the same upstream, access logs on.
# Needs nginx-light and haproxy: installed if missing.
# Usage: scripts/bench-idle.sh [CONNECTIONS (10000)]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
N="${1:-10000}"
bench_need nginx:nginx-light haproxy:haproxy
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# haproxy takes two descriptors per connection it allows.
HAP_MAXCONN=$(( ($(ulimit -n) - 200) / 2 ))
bench_bin
WORK="$(mktemp -d /tmp/regobox-bench-idle.XXXXXX)"
chmod 755 "$WORK"
cleanup() {
    [ -n "${RBXPID:-}" ] && kill "$RBXPID" 2>/dev/null || true
    [ -n "${HAPPID:-}" ] && kill "$HAPPID" 2>/dev/null || true
    for f in upstream.pid nginx.pid; do
        [ -f "$WORK/$f" ] && kill "$(cat "$WORK/$f")" 2>/dev/null || true
    done
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT
base=$(( 20000 + RANDOM % 20000 ))
UP=$base; NGX=$((base + 1)); HAP=$((base + 2)); RBX=$((base + 3)); PG=$((base + 4)); HEALTH=$((base + 5))
mkdir -p "$WORK/ngx"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 1048576;
pid $WORK/nginx.pid;
error_log $WORK/ngx/error.log;
events { worker_connections 100000; }
http {
    access_log $WORK/ngx/access.log;
    keepalive_timeout 300s;
    client_body_temp_path $WORK/ngx;
    proxy_temp_path $WORK/ngx; fastcgi_temp_path $WORK/ngx; uwsgi_temp_path $WORK/ngx; scgi_temp_path $WORK/ngx;
    upstream app { server 127.0.0.1:$UP; keepalive 256; }
    server {
        listen 127.0.0.1:$NGX;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
    maxconn $HAP_MAXCONN
    nbthread 1
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAP
    default_backend app
backend app
    server app 127.0.0.1:$UP
CONF
mkdir -p "$WORK/config"
cat > "$WORK/config/50_bench.toml" <<TOML
[proxy]
listen = "127.0.0.1"
http_port = $RBX
https_port = 0
redirect_http = false
upstream = "http://127.0.0.1:$UP"
workers = 1
idle_timeout = "300s"
[docker]
enabled = false
TOML
bench_upstream "$WORK" "$UP"
nginx -c "$WORK/nginx.conf" -e "$WORK/ngx/error.log"
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy-access.log" 2>&1 &
HAPPID=$!
bench_regobox_start "$WORK" "$PG" "$HEALTH"
sleep 1
NGXWORKER=$(pgrep -P "$(cat "$WORK/nginx.pid")")

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# Open N connections to 127.0.0.1:PORT, one request each, then hold them idle until stdin closes;
# prints "ready" once all have their answer.
cat > "$WORK/hold.py" <<'PY'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
        await r.readexactly(length)
        return r, w
async def main():
    sem = asyncio.Semaphore(500)
    conns = await asyncio.gather(*(one(sem) for _ in range(n)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.close()
asyncio.run(main())
PY

echo "| proxy | RSS before | with $N connections idle for 5 s | per connection | 2 s after they closed |"
echo "|---|---|---|---|---|"
for name in nginx haproxy regobox; do
    case $name in
    nginx) pid=$NGXWORKER port=$NGX ;;
    haproxy) pid=$HAPPID port=$HAP ;;
    regobox) pid=$RBXPID port=$RBX ;;
    esac
    before=$(rss "$pid")
    coproc HOLD { python3 "$WORK/hold.py" "$port" "$N"; }
    read -r line <&"${HOLD[0]}"
    [ "$line" = ready ] || { echo "hold.py: $line" >&2; exit 1; }
    # Past regobox's PARK_AFTER (1 s) and its next trim.
    sleep 5
    held=$(rss "$pid")
    eval "exec ${HOLD[1]}>&-"
    wait "$HOLD_PID" 2>/dev/null || true
    sleep 2
    after=$(rss "$pid")
    printf "| %s | %s KiB | %s KiB | %.1f KiB | %s KiB |\n" "$name" "$before" "$held" \
        "$(awk -v a="$held" -v b="$before" -v n="$N" 'BEGIN {print (a - b) / n}')" "$after"
done
echo
echo "(nginx: its one worker's RSS; haproxy: one thread; regobox: the whole process, one proxy worker; plain HTTP/1.1, one request per connection then idle)"
