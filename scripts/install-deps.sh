#!/usr/bin/env bash
# Install what regobox and its tests need on a fresh Debian/Ubuntu machine, if missing:
# the PostgreSQL server binaries. Idempotent; uses sudo when not root.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have_pg_server() {
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ] && return 0
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
}

if ! have_pg_server; then
    echo "install-deps: installing the PostgreSQL server (Debian package postgresql)"
    # regobox runs its own cluster: keep the package from creating and starting one on 5432.
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        postgresql postgresql-contrib
fi
