#!/usr/bin/env bash
# An image that upgrades (PG_UPGRADE_FROM=13), end to end on the real engine: build it
# (docker/build-offline.sh: PostgreSQL 13 from a bullseye stage beside the image's 15), make a
# PostgreSQL 13 cluster on a volume with the image itself (postgres.bin_dir pointing at 13), put
# rows in it, then start the image as a user would: the cluster is upgraded in place to 15 with
# every row, the old cluster kept beside it, and `regobox upgrade --rollback` gives 13 back.
# Too long for the suite (two debootstrapped bases, an apt install of PostgreSQL 13): run by hand.
# Usage: scripts/check-image-upgrade.sh   (REGOBOX_BINARY=path to use a binary already built)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=regobox:upgrade-check
PG_UPGRADE_FROM=13 docker/build-offline.sh "$TAG" >/dev/null
work="$(mktemp -d /tmp/regobox-upgrade-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT
run() { docker run --rm -v "$work/volumes:/volumes" "$@"; }
fail() { echo "check-image-upgrade: FAIL: $*" >&2; exit 1; }

docker run --rm --entrypoint sh "$TAG" -c 'ls -d /usr/lib/postgresql/*/bin' | grep -q '/13/bin' ||
    fail "the image has no PostgreSQL 13 binaries"
# The 13 binaries run on the image's Debian (their bullseye libraries found through the RPATH).
docker run --rm --entrypoint /usr/lib/postgresql/13/bin/postgres "$TAG" --version | grep -q ' 13\.' ||
    fail "PostgreSQL 13's postgres does not run in the image"

old=(-e REGOBOX_POSTGRES__BIN_DIR=/usr/lib/postgresql/13/bin)
run "${old[@]}" "$TAG" init >"$work/init13.log" 2>&1 || { cat "$work/init13.log"; fail "init with 13"; }
run "${old[@]}" "$TAG" psql -v ON_ERROR_STOP=1 -c \
    "CREATE TABLE samples(id serial PRIMARY KEY, name text);
     INSERT INTO samples(name) SELECT 's' || g FROM generate_series(1, 5000) g;" >/dev/null
[ "$(cat "$work/volumes/db/pgdata/PG_VERSION")" = 13 ] || fail "the cluster is not of 13"

# The image as a user starts it: upgraded on the way.
start=$(date +%s.%N)
run "$TAG" init >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "the upgrade"; }
end=$(date +%s.%N)
grep -q "PostgreSQL upgraded" "$work/upgrade.log" || { cat "$work/upgrade.log"; fail "no upgrade logged"; }
[ "$(cat "$work/volumes/db/pgdata/PG_VERSION")" = 15 ] || fail "the cluster is not of 15"
[ "$(run "$TAG" psql -XtAc 'SELECT count(*) FROM samples')" = 5000 ] || fail "rows lost"
ls -d "$work"/volumes/db/.pgdata.pg13-* >/dev/null || fail "the old cluster is not kept"

# The new server ran (the row count above): --force, which says what it would lose.
run "$TAG" upgrade --rollback --force >/dev/null 2>&1 || fail "rollback"
[ "$(cat "$work/volumes/db/pgdata/PG_VERSION")" = 13 ] || fail "the rollback did not give 13 back"
[ "$(run "${old[@]}" "$TAG" psql -XtAc 'SELECT count(*) FROM samples')" = 5000 ] || fail "rows lost in the rollback"
echo "check-image-upgrade: OK: a PostgreSQL 13 volume upgraded to 15 by the image in $(printf "%.1f" "$(echo "$end - $start" | bc)") s (container start included), every row kept, rolled back to 13"
