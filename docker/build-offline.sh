#!/usr/bin/env bash
# Build the image without a registry: make the Debian base image from Debian packages
# (debootstrap, then docker import; reused when present), build regobox on the host, and build
# the same docker/Dockerfile on top through build arguments.
# Usage: docker/build-offline.sh [TAG]   (default regobox:local)
# REGOBOX_BINARY=path uses that binary (built for this Debian) instead of a release build.
# PG_UPGRADE_FROM="13" adds the server binaries of PostgreSQL 13 (from a bullseye base, made the
# same way) so that the image upgrades a volume of that major in place.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-regobox:local}"
BASE="${REGOBOX_BASE_IMAGE:-regobox-base/debian:bookworm}"
SUITE="${REGOBOX_DEBIAN_SUITE:-bookworm}"
MIRROR="${REGOBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# A Debian base image made with debootstrap: base_image SUITE TAG.
base_image() {
    local suite="$1" tag="$2" rootfs
    docker image inspect "$tag" > /dev/null 2>&1 && return 0
    command -v debootstrap > /dev/null || {
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
    }
    rootfs="$(mktemp -d /tmp/regobox-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-offline: debootstrap $suite into $rootfs"
    debootstrap --variant=minbase "$suite" "$rootfs" "$MIRROR" > /dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$tag" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "build-offline: base image $tag"
}

base_image "$SUITE" "$BASE"
# PG_UPGRADE_FROM (e.g. "13"): the server binaries of older majors the image upgrades from,
# from a Debian release that carries them (bullseye carries 13).
PG_UPGRADE_FROM="${PG_UPGRADE_FROM:-}"
UPGRADE_BASE="$BASE"
if [ -n "$PG_UPGRADE_FROM" ]; then
    UPGRADE_BASE="${REGOBOX_UPGRADE_BASE_IMAGE:-regobox-base/debian:bullseye}"
    base_image "${REGOBOX_UPGRADE_SUITE:-bullseye}" "$UPGRADE_BASE"
fi
if [ "${1:-}" = "--bases-only" ]; then
    exit 0
fi

if [ -n "${REGOBOX_BINARY:-}" ]; then
    install -m 0755 "$REGOBOX_BINARY" docker/prebuilt/regobox
else
    cargo build --release --locked
    install -m 0755 target/release/regobox docker/prebuilt/regobox
fi
trap 'rm -f docker/prebuilt/regobox' EXIT
docker build -f docker/Dockerfile \
    --build-arg DEBIAN_IMAGE="$BASE" \
    --build-arg COMPILER_IMAGE="$BASE" \
    --build-arg UPGRADE_FROM_IMAGE="$UPGRADE_BASE" \
    --build-arg PG_UPGRADE_FROM="$PG_UPGRADE_FROM" \
    -t "$TAG" .
echo "build-offline: $TAG"
