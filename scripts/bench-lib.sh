# Shared by the proxy benchmarks (bench-proxy.sh, bench-idle.sh, profile-proxy.sh): sourced, not
# run. Each caller has its own WORK directory and kills "$WORK/upstream.pid" when it ends.

# An ECDSA P-256 certificate for localhost: $1/cert.pem and $1/key.pem.
bench_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# The application every proxy forwards to: an nginx answering a 1 KiB body on 127.0.0.1:$2,
# started (its pid in $1/upstream.pid), with what follows $2 as the command's prefix (taskset).
bench_upstream() {
    local work=$1 port=$2 body
    shift 2
    body=$(head -c 1024 /dev/zero | tr '\0' 'x')
    mkdir -p "$work/ngx-up"
    cat > "$work/upstream.conf" <<CONF
worker_processes 1;
pid $work/upstream.pid;
error_log $work/ngx-up/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/ngx-up;
    proxy_temp_path $work/ngx-up; fastcgi_temp_path $work/ngx-up; uwsgi_temp_path $work/ngx-up; scgi_temp_path $work/ngx-up;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$port; location / { default_type text/plain; return 200 '$body'; } }
}
CONF
    "$@" nginx -c "$work/upstream.conf" -e "$work/ngx-up/error.log"
}

# Install the Debian packages of the commands missing among "command:package" pairs.
bench_need() {
    local tool missing=""
    for tool in "$@"; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
    done
    [ -z "$missing" ] && return 0
    local sudo=""
    [ "$(id -u)" != 0 ] && sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

# BIN: $BENCH_BIN, a regobox binary built already, else the release build of this tree (built).
bench_bin() {
    if [ -z "${BENCH_BIN:-}" ]; then cargo build --release -q; fi
    BIN="${BENCH_BIN:-$PWD/target/release/regobox}"
}

# regobox's configuration for the benchmarks in $1/config (no Docker; its HTTPS with $1's
# certificate): listening on 127.0.0.1, https on $2, http on $3, forwarding to 127.0.0.1:$4,
# with $5 proxy workers (0: one per core).
bench_regobox_config() {
    mkdir -p "$1/config"
    cat > "$1/config/50_bench.toml" <<TOML
[proxy]
listen = "127.0.0.1"
https_port = $2
http_port = $3
upstream = "http://127.0.0.1:$4"
# nginx's "keepalive 256" (bench-proxy.sh).
upstream_keepalive = 256
# All the load comes from one address, 320 requests at once on bench-proxy.sh's HTTP/2 row (32
# connections, 10 streams each): above the default cap per client address (256), where regobox
# answers 503 (cheaper than proxying; nginx and haproxy have no such cap). bench-proxy.sh counts
# the answers that are not 2xx.
upstream_max_per_address = 1024
workers = $5
[proxy.tls]
cert = "$1/cert.pem"
key = "$1/key.pem"
[docker]
enabled = false
TOML
}

# Start regobox ($BIN, `run`, configured in $1/config) with its volume and runtime directory in
# $1, PostgreSQL on port $2 and the supervision endpoint on 127.0.0.1:$3, its output in
# $1/regobox.log, behind the command prefix in the remaining arguments (taskset, valgrind...);
# sets RBXPID and returns once regobox says it is ready (exits with its log if it dies first).
bench_regobox_start() {
    local work=$1 pg=$2 health=$3
    shift 3
    REGOBOX_VOLUMES__ROOT="$work/vol" REGOBOX_RUNTIME_DIR="$work/run" REGOBOX_POSTGRES__PORT="$pg" \
    REGOBOX_SUPERVISION__LISTEN=127.0.0.1 REGOBOX_SUPERVISION__PORT="$health" \
        "$@" "$BIN" --config-dir "$work/config" run >"$work/regobox.log" 2>&1 &
    RBXPID=$!
    until grep -q "regobox is ready" "$work/regobox.log"; do
        kill -0 "$RBXPID" 2>/dev/null || { cat "$work/regobox.log" >&2; exit 1; }
        sleep 0.1
    done
}
