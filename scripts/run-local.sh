#!/usr/bin/env bash
# Run regobox on its embedded defaults on this machine: installs PostgreSQL if missing, builds,
# and runs `regobox run` with the data volume in ./volumes. Extra arguments go to `regobox run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release
export REGOBOX_VOLUMES__ROOT="${REGOBOX_VOLUMES__ROOT:-$PWD/volumes}"
export REGOBOX_RUNTIME_DIR="${REGOBOX_RUNTIME_DIR:-${XDG_RUNTIME_DIR:-/tmp}/regobox-$(id -u)}"
exec target/release/regobox --config-dir config run "$@"
