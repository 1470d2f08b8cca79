#!/usr/bin/env bash
# Run regobox on its embedded defaults on this machine: installs PostgreSQL if missing, builds,
# and runs `regobox run` with the data volume in ./volumes. Extra arguments go to `regobox run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release
export REGOBOX_VOLUMES__ROOT="${REGOBOX_VOLUMES__ROOT:-$PWD/volumes}"
export REGOBOX_RUNTIME_DIR="${REGOBOX_RUNTIME_DIR:-${XDG_RUNTIME_DIR:-/tmp}/regobox-$(id -u)}"
# Not root: the proxy cannot bind 80/443, so it listens on 8080/8443 unless told otherwise.
if [ "$(id -u)" != 0 ]; then
    export REGOBOX_PROXY__HTTP_PORT="${REGOBOX_PROXY__HTTP_PORT:-8080}"
    export REGOBOX_PROXY__HTTPS_PORT="${REGOBOX_PROXY__HTTPS_PORT:-8443}"
fi
HTTPS_PORT="${REGOBOX_PROXY__HTTPS_PORT:-443}"
cat >&2 <<EOF
regobox: data volume $REGOBOX_VOLUMES__ROOT, runtime directory $REGOBOX_RUNTIME_DIR.
From another terminal (in $PWD):
  REGOBOX_VOLUMES__ROOT=$REGOBOX_VOLUMES__ROOT REGOBOX_RUNTIME_DIR=$REGOBOX_RUNTIME_DIR target/release/regobox --config-dir config psql
  curl -s localhost:8081/status
  https://localhost:$HTTPS_PORT/ (self-signed: $REGOBOX_VOLUMES__ROOT/secrets/tls/self-signed.pem)
Stop with Ctrl-C.
EOF
exec target/release/regobox --config-dir config run "$@"
