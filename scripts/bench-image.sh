#!/usr/bin/env bash
# The image's figures for the README: size; `docker run` to Docker's `healthy` on an empty volume
# and on an existing one; idle memory of the whole container; `docker stop` time and exit code.
# Builds regobox:local with docker/build-offline.sh (release binary) unless SKIP_BUILD=1.
# Usage: scripts/bench-image.sh [IMAGE]   (default regobox:local)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${1:-regobox:local}"
[ "${SKIP_BUILD:-0}" = 1 ] || docker/build-offline.sh "$IMAGE" >/dev/null
WORK="$(mktemp -d /tmp/regobox-bench-image.XXXXXX)"
NAME="regobox-bench-$$"
trap 'docker rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
echo "image $IMAGE: $(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 )) MB"
now() { date +%s%N; }
for volume in empty existing; do
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    t0=$(now)
    docker run -d --name "$NAME" -p 127.0.0.1::80 -p 127.0.0.1::443 -v "$WORK/volumes:/volumes" \
        -v /var/run/docker.sock:/var/run/docker.sock "$IMAGE" >/dev/null
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do sleep 0.05; done
    t1=$(now)
    ready=$(docker logs "$NAME" 2>&1 | sed -n 's/.*regobox is ready elapsed_ms=\([0-9]*\).*/\1/p' | tail -1)
    sleep 10
    mem=$(docker stats --no-stream --format '{{.MemUsage}}' "$NAME" | cut -d/ -f1)
    t2=$(now)
    docker stop "$NAME" >/dev/null
    t3=$(now)
    code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
    clean=$(docker logs "$NAME" 2>&1 | grep -c "database system is shut down" || true)
    printf "%-8s volume: docker run to healthy %5d ms (regobox ready after %s ms); idle memory %s; docker stop %4d ms, exit code %s, clean PostgreSQL shutdown: %s\n" \
        "$volume" $(( (t1 - t0) / 1000000 )) "${ready:-?}" "$mem" $(( (t3 - t2) / 1000000 )) "$code" "$([ "$clean" -ge 1 ] && echo yes || echo no)"
done
