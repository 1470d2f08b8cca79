#!/usr/bin/env bash
# Build the image without a registry: make the Debian base image from Debian packages
# (debootstrap, then docker import; reused when present), build regobox on the host, and build
# the same docker/Dockerfile on top through build arguments.
# Usage: docker/build-offline.sh [TAG]   (default regobox:local)
# REGOBOX_BINARY=path uses that binary (built for this Debian) instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-regobox:local}"
BASE="${REGOBOX_BASE_IMAGE:-regobox-base/debian:bookworm}"
SUITE="${REGOBOX_DEBIAN_SUITE:-bookworm}"
MIRROR="${REGOBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! docker image inspect "$BASE" > /dev/null 2>&1; then
    command -v debootstrap > /dev/null || {
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
    }
    ROOTFS="$(mktemp -d /tmp/regobox-rootfs.XXXXXX)"
    trap 'rm -rf "$ROOTFS"' EXIT
    echo "build-offline: debootstrap $SUITE into $ROOTFS"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" > /dev/null
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import - "$BASE" > /dev/null
    rm -rf "$ROOTFS"
    trap - EXIT
    echo "build-offline: base image $BASE"
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
    -t "$TAG" .
echo "build-offline: $TAG"
