#!/usr/bin/env bash
# regobox's proxy against nginx and haproxy on this machine: the same certificate (ECDSA P-256)
# and TLS 1.3 suite preference (AES-128-GCM), the same upstream (an nginx answering a 1 KiB body)
# with keep-alive to it, access logs on for all three, TLS 1.2 and 1.3 offered by all (so every
# row runs TLS 1.3 with X25519), loads from wrk and h2load on loopback. Rows: HTTP/1.1 keep-alive
# (from wrk, and from h2load), HTTP/2, a new TLS connection per request; requests/s, p99
# latency, CPU time per request and its inverse, requests per CPU-second (medians of RUNS runs,
# the proxies taking turns; each run's p99 shown too), what a request cost the clients' side (the
# load generator, the upstream), RSS after the runs.
# ONE_CORE=1: one core each: every proxy with one worker (nginx worker_processes 1, haproxy
# nbthread 1, regobox proxy.workers 1) pinned to the first core, the clients (one thread) and the
# upstream on the second; how busy each core was is shown, since the clients' core can be the
# one that bounds a row (a new TLS connection costs the client as much as the proxy): there,
# requests/s measure the clients, and requests per CPU-second compare the proxies.
# Needs nginx-light, haproxy, wrk, nghttp2-client (h2load) and time: installed if missing.
# ROWS: the rows to run (of "h1 h1b h2 tls", all by default).
# Usage: [ONE_CORE=1] [BENCH_BIN=path] [ROWS=...] scripts/bench-proxy.sh [SECONDS (5)] [CONNECTIONS (32)] [RUNS (10)]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
DURATION="${1:-5}"
CONNS="${2:-32}"
REPEAT="${3:-10}"
ONE_CORE="${ONE_CORE:-0}"
ROWS="${ROWS:-h1 h1b h2 tls}"
for kind in $ROWS; do
    case $kind in h1 | h1b | h2 | tls) ;; *) echo "ROWS: unknown row $kind (h1 h1b h2 tls)" >&2; exit 2 ;; esac
done
bench_need nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl /usr/bin/time:time
bench_bin
WORK="$(mktemp -d /tmp/regobox-bench-proxy.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    [ -n "${HAPPID:-}" ] && kill "$HAPPID" 2>/dev/null || true
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT
base=$(( 20000 + RANDOM % 20000 ))
UP=$base; NGX=$((base + 1)); RBX=$((base + 2)); RBX80=$((base + 3)); PG=$((base + 4)); HEALTH=$((base + 5))
HAP=$((base + 6))
# Where the proxies run, and where the clients and the upstream do.
if [ "$ONE_CORE" = 1 ]; then
    PROXY_CPU=(taskset -c 0); CLIENT_CPU=(taskset -c 1); CLIENT_THREADS=1
    NGX_WORKERS=1; HAP_THREADS="nbthread 1"; RBX_WORKERS=1
else
    PROXY_CPU=(); CLIENT_CPU=(); CLIENT_THREADS=2
    NGX_WORKERS=auto; HAP_THREADS=""; RBX_WORKERS=0
fi

bench_cert "$WORK"

# nginx as the proxy (the upstream is another nginx, started below).
mkdir -p "$WORK/ngx"
cat > "$WORK/nginx.conf" <<CONF
worker_processes $NGX_WORKERS;
pid $WORK/nginx.pid;
error_log $WORK/ngx/error.log;
events { worker_connections 4096; }
http {
    access_log $WORK/ngx/access.log;
    client_body_temp_path $WORK/ngx;
    proxy_temp_path $WORK/ngx; fastcgi_temp_path $WORK/ngx; uwsgi_temp_path $WORK/ngx; scgi_temp_path $WORK/ngx;
    keepalive_requests 1000000;
    upstream app { server 127.0.0.1:$UP; keepalive 256; }
    server {
        listen 127.0.0.1:$NGX ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        # The protocols regobox speaks: nginx before 1.23.4 (bookworm has 1.22) leaves TLS 1.3
        # out by default, and a TLS 1.2 resumption skips the key exchange a TLS 1.3 one does.
        ssl_protocols TLSv1.2 TLSv1.3;
        # The TLS 1.3 suite order regobox uses (server's choice, AES-128-GCM first).
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384;
        ssl_prefer_server_ciphers on;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
CONF
# haproxy as Debian ships it (2.6), one frontend with TLS and ALPN, connections to the upstream
# reused by every client ("http-reuse always", as nginx's keepalive and regobox's pool do).
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"
cat > "$WORK/haproxy.cfg" <<CONF
global
    maxconn 4000
    $HAP_THREADS
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAP ssl crt $WORK/haproxy.pem alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    default_backend app
backend app
    server app 127.0.0.1:$UP
CONF

bench_upstream "$WORK" "$UP" "${CLIENT_CPU[@]}"
"${PROXY_CPU[@]}" nginx -c "$WORK/nginx.conf" -e "$WORK/ngx/error.log"
"${PROXY_CPU[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy-access.log" 2>&1 &
HAPPID=$!

bench_regobox_config "$WORK" "$RBX" "$RBX80" "$UP" "$RBX_WORKERS"
bench_regobox_start "$WORK" "$PG" "$HEALTH" "${PROXY_CPU[@]}"
PIDS+=("$RBXPID")
sleep 1

ngx_pids() { echo "$(cat "$WORK/nginx.pid") $(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')"; }
UPPIDS="$(cat "$WORK/upstream.pid") $(pgrep -P "$(cat "$WORK/upstream.pid")" | tr '\n' ' ')"
ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
# The system (kernel) part of those.
sys_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $15}' "/proc/$p/stat"))); done; echo $t; }
rss_kib() { local r=0; for p in $1; do r=$((r + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $r; }
anon_kib() { local r=0; for p in $1; do r=$((r + $(awk '/RssAnon/ {print $2}' "/proc/$p/status"))); done; echo $r; }
HZ=$(getconf CLK_TCK)

# p99 (ms) from an h2load log (third column: request time in microseconds).
p99_h2load() { sort -n -k3 "$1" | awk '{a[NR]=$3} END {i = int(NR * 0.99); if (i < 1) i = 1; printf "%.2f", a[i] / 1000}'; }
wrk_p99() { awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.2f", v}'; }
wrk_rps() { awk '/^Requests\/sec/ {printf "%.0f", $2}'; }
wrk_n() { awk '/requests in/ {print $1}'; }
wrk_bad() { awk '/Non-2xx or 3xx responses:/ {n = $5} END {print n + 0}'; }

# Busy and total jiffies of core $1 ("cpuN" line of /proc/stat: user, nice, system, irq, softirq
# busy; idle and iowait not; steal, time the host gave to others, in neither).
core_jiffies() { awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
# The percentage of core $1 busy between two core_jiffies readings.
core_busy() { awk -v a="$2" -v b="$3" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0)}'; }

# One load against one proxy; prints "requests/s p99-ms cpu-µs-per-request answers-not-2xx
# system-cpu-µs-per-request core0-busy-% core1-busy-% load-generator-cpu-µs-per-request
# upstream-cpu-µs-per-request" (with ONE_CORE, core 0 is the proxy's and core 1 the clients' and
# the upstream's: which of the two bounds the row, and what on core 1 a request cost).
# The load generator runs under GNU time, which writes its CPU seconds to $WORK/client.time.
load() { # kind port pids
    local kind=$1 port=$2 pids=$3 t0 t1 out n rps p99 bad c0 c1 u0 u1
    local timed=(/usr/bin/time -f "%U %S" -o "$WORK/client.time")
    t0=$(ticks "$pids"); s0=$(sys_ticks "$pids"); u0=$(ticks "$UPPIDS")
    c0=$(core_jiffies 0); c1=$(core_jiffies 1)
    case $kind in
    h1)
        out=$("${timed[@]}" "${CLIENT_CPU[@]}" wrk -t"$CLIENT_THREADS" -c"$CONNS" -d"${DURATION}s" --latency "https://localhost:$port/")
        n=$(echo "$out" | wrk_n); rps=$(echo "$out" | wrk_rps); p99=$(echo "$out" | wrk_p99); bad=$(echo "$out" | wrk_bad) ;;
    h1b | h2)
        # h1b: the h1 load from h2load, whose per-request log gives the p99 as for HTTP/2.
        # h2load appends to its log: each run starts from an empty one.
        rm -f "$WORK/h2.log"
        if [ "$kind" = h1b ]; then proto=(--h1); else proto=(-m10); fi
        out=$("${timed[@]}" "${CLIENT_CPU[@]}" h2load "${proto[@]}" -c"$CONNS" -t"$CLIENT_THREADS" -D"$DURATION" --log-file="$WORK/h2.log" "https://localhost:$port/" 2>&1)
        n=$(echo "$out" | awk '/^requests:/ {print $8}')
        rps=$(echo "$out" | awk '/^finished in/ {gsub(/,/,""); printf "%.0f", $4}')
        p99=$(p99_h2load "$WORK/h2.log")
        bad=$(echo "$out" | awk '/^status codes:/ {gsub(/,/,""); print $5 + $7 + $9}') ;;
    tls)
        out=$("${timed[@]}" "${CLIENT_CPU[@]}" wrk -t"$CLIENT_THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Connection: close" "https://localhost:$port/")
        n=$(echo "$out" | wrk_n); rps=$(echo "$out" | wrk_rps); p99=$(echo "$out" | wrk_p99); bad=$(echo "$out" | wrk_bad) ;;
    esac
    t1=$(ticks "$pids"); s1=$(sys_ticks "$pids"); u1=$(ticks "$UPPIDS")
    echo "$rps $p99 $(awk -v t=$((t1 - t0)) -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.1f", 1e6 * t / hz / n}') ${bad:-0}" \
        "$(awk -v t=$((s1 - s0)) -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.1f", 1e6 * t / hz / n}')" \
        "$(core_busy 0 "$c0" "$(core_jiffies 0)") $(core_busy 1 "$c1" "$(core_jiffies 1)")" \
        "$(awk -v n="$n" '{printf "%.1f", 1e6 * ($1 + $2) / n}' "$WORK/client.time")" \
        "$(awk -v t=$((u1 - u0)) -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.1f", 1e6 * t / hz / n}')"
}

# The median of each column over the runs (one line per run).
median() { awk '{for (i = 1; i <= NF; i++) v[i, NR] = $i} END {
    for (i = 1; i <= NF; i++) {
        for (j = 1; j <= NR; j++) a[j] = v[i, j]
        for (j = 1; j <= NR; j++) for (k = j + 1; k <= NR; k++) if (a[k] + 0 < a[j] + 0) {t = a[j]; a[j] = a[k]; a[k] = t}
        printf "%s%s", a[int((NR + 1) / 2)], (i < NF ? " " : "\n")
    }}'; }

# Same certificate, same upstream, same clients; resolve localhost to 127.0.0.1.
grep -q "^127.0.0.1[[:space:]].*localhost" /etc/hosts || echo "warning: localhost does not resolve to 127.0.0.1" >&2
NGXPIDS=$(ngx_pids)
PROXIES=(nginx haproxy regobox)
declare -A PORT=([nginx]=$NGX [haproxy]=$HAP [regobox]=$RBX)
declare -A PROCS=([nginx]="$NGXPIDS" [haproxy]="$HAPPID" [regobox]="$RBXPID")
declare -A RESULTS
for kind in $ROWS; do
    # The proxies take turns, so that a slow moment of the machine does not fall on one.
    for ((r = 1; r <= REPEAT; r++)); do
        for name in "${PROXIES[@]}"; do
            RESULTS[$name,$kind]+="$(load "$kind" "${PORT[$name]}" "${PROCS[$name]}")"$'\n'
        done
    done
done
sleep 1
label() {
    case $1 in
    h1) echo "HTTP/1.1 keep-alive (wrk)" ;;
    h1b) echo "HTTP/1.1 keep-alive (h2load --h1)" ;;
    h2) echo "HTTP/2 (10 streams/conn)" ;;
    tls) echo "new TLS connection per request" ;;
    esac
}
# Requests per second of the proxy's own CPU (1 / CPU per request): what the proxy would serve
# with a whole core to itself, whichever core bounded the run.
echo "| load | proxy | requests/s | p99 | CPU per request (of which system) | requests per CPU-second | cores busy: proxy / clients | clients' CPU per request: load / upstream | p99 of each run (ms) | answers not 2xx (all runs) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
declare -A MEDIAN CAPACITY
for kind in $ROWS; do
    label=$(label "$kind")
    for name in "${PROXIES[@]}"; do
        read -r rps p99 cpu _ sys busy0 busy1 gen up < <(printf "%s" "${RESULTS[$name,$kind]}" | median)
        bad=$(printf "%s" "${RESULTS[$name,$kind]}" | awk '{n += $4} END {print n + 0}')
        MEDIAN[$name,$kind]=$rps
        CAPACITY[$name,$kind]=$(awk -v c="$cpu" 'BEGIN {printf "%.0f", (c > 0 ? 1e6 / c : 0)}')
        runs=$(printf "%s" "${RESULTS[$name,$kind]}" | awk '{printf "%s%s", (NR > 1 ? " " : ""), $2}')
        if [ "$ONE_CORE" = 1 ]; then cores="$busy0 % / $busy1 %"; else cores="-"; fi
        printf "| %s | %s | %s | %s ms | %s µs (%s) | %s | %s | %s µs / %s µs | %s | %s |\n" "$label" "$name" "$rps" "$p99" "$cpu" "$sys" \
            "${CAPACITY[$name,$kind]}" "$cores" "$gen" "$up" "$runs" "$bad"
    done
done
echo
# regobox against the best peer of each row (its median requests/s), and paired: each regobox
# run against the runs of the same turn (the machine's state drifts over minutes; a turn shares
# it).
# And the same on requests per CPU-second, against the peer with the most of those.
echo "| load | best peer | regobox / best peer (medians) | turns where regobox's requests/s is the highest | best peer per CPU-second | regobox / it |"
echo "|---|---|---|---|---|---|"
for kind in $ROWS; do
    best=nginx
    [ "${MEDIAN[haproxy,$kind]}" -gt "${MEDIAN[nginx,$kind]}" ] && best=haproxy
    ratio=$(awk -v a="${MEDIAN[regobox,$kind]}" -v b="${MEDIAN[$best,$kind]}" 'BEGIN {printf "%.2fx", a / b}')
    cbest=nginx
    [ "${CAPACITY[haproxy,$kind]}" -gt "${CAPACITY[nginx,$kind]}" ] && cbest=haproxy
    cratio=$(awk -v a="${CAPACITY[regobox,$kind]}" -v b="${CAPACITY[$cbest,$kind]}" 'BEGIN {printf "%.2fx", (b > 0 ? a / b : 0)}')
    wins=$(paste -d' ' <(printf "%s" "${RESULTS[nginx,$kind]}") <(printf "%s" "${RESULTS[haproxy,$kind]}") <(printf "%s" "${RESULTS[regobox,$kind]}") |
        awk '{k = NF / 3; n++; if ($(2 * k + 1) > $1 && $(2 * k + 1) > $(k + 1)) r++} END {printf "%d of %d", r, n}')
    printf "| %s | %s | %s | %s | %s | %s |\n" "$(label "$kind")" "$best" "$ratio" "$wins" "$cbest" "$cratio"
done
echo
echo "| proxy | RSS after the runs | of which anonymous | negotiated |"
echo "|---|---|---|---|"
for name in "${PROXIES[@]}"; do
    pids=${PROCS[$name]} port=${PORT[$name]}
    printf "| %s | %s KiB | %s KiB | %s |\n" "$name" "$(rss_kib "$pids")" "$(anon_kib "$pids")" \
        "$(echo | openssl s_client -connect "localhost:$port" 2>/dev/null | awk '/^New,/ {sub(/,$/, "", $2); print $2, $5}')"
done
echo
if [ "$ONE_CORE" = 1 ]; then
    where="one core each: every proxy with one worker on core 0, the clients (one thread) and the upstream on core 1"
else
    where="$(nproc) cores shared by clients, proxies and upstream; nginx: master + workers, haproxy: one process with a thread per core"
fi
echo "(median of $REPEAT runs of ${DURATION}s per row, the proxies taking turns; $CONNS connections; $where; access logs on for all)"
