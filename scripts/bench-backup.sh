#!/usr/bin/env bash
# Backup/restore benchmark: a database of about 1 GB (pgbench, scale SCALE, default 70) and about
# 1 GB of files (FILES_MB, default 1024: 80 % generated text like VCF lines, 20 % random bytes),
# then, on the same data, side by side:
#   regobox backup            vs  pg_dump -Fc + tar czf
#   regobox restore (fresh)   vs  pg_restore (into a new database) + tar xzf
# and the same restore through the running regobox: its time and its downtime (/readyz not 200).
# Usage: scripts/bench-backup.sh [SCALE] [FILES_MB]   (BENCH_BIN: a binary to use instead of
# building the release one). It stops everything it starts, and removes its work directory
# (under TMPDIR) only once nothing runs in it.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${1:-70}"
FILES_MB="${2:-1024}"
if [ -n "${BENCH_BIN:-}" ]; then
    BIN="$BENCH_BIN"
else
    cargo build --release -q
    BIN="$PWD/target/release/regobox"
fi
BINDIR="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/regobox-bench.XXXXXX")"
chmod 755 "$WORK"
cleanup() {
    status=$?
    if [ "$status" != 0 ]; then
        for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
    fi
    # regobox itself (not a subshell): SIGTERM stops its PostgreSQL cleanly; wait for it to exit
    # before the directory under it goes.
    if [ -n "${PID:-}" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(( 20000 + RANDOM % 20000 ))
mkdir -p "$WORK/config"
# Neither the proxy (80/443 may be taken) nor the Docker bridge has a part in a backup.
export REGOBOX_RUNTIME_DIR="$WORK/run" REGOBOX_POSTGRES__PORT="$PORT" REGOBOX_SUPERVISION__PORT=0 \
    REGOBOX_PROXY__ENABLED=false REGOBOX_DOCKER__ENABLED=false
rb() { REGOBOX_VOLUMES__ROOT="$1" "$BIN" --config-dir "$WORK/config" "${@:2}"; }
secs() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }

SRC="$WORK/src"
echo "preparing: pgbench scale $SCALE, $FILES_MB MiB of files..." >&2
# Started directly, not through rb(): `rb ... &` would put the function in a subshell, and $!
# would be that subshell rather than regobox.
REGOBOX_VOLUMES__ROOT="$SRC" "$BIN" --config-dir "$WORK/config" run > "$WORK/run.log" 2>&1 &
PID=$!
until grep -q "regobox is ready" "$WORK/run.log"; do
    kill -0 "$PID" 2>/dev/null || { PID=; echo "regobox run exited before it was ready" >&2; exit 1; }
    sleep 0.2
done
export PGPASSWORD="$(cat "$SRC/secrets/postgres-password")"
"$BINDIR/pgbench" -h 127.0.0.1 -p "$PORT" -U app -i -q -s "$SCALE" app > /dev/null 2>&1
python3 - "$SRC/files" "$FILES_MB" <<'PY'
import os, random, sys
root, total = sys.argv[1], int(sys.argv[2]) * 1024 * 1024
random.seed(42)
os.makedirs(root, exist_ok=True)
written, n = 0, 0
bases = "ACGT"
while written < total:
    n += 1
    size = min(8 * 1024 * 1024, total - written)
    path = os.path.join(root, f"run-{n // 20:03d}", f"sample-{n:04d}" + (".bin" if n % 5 == 0 else ".vcf"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        if n % 5 == 0:
            f.write(os.urandom(size))
        else:
            lines, got = [], 0
            while got < size:
                pos = random.randint(1, 248_000_000)
                line = f"chr{random.randint(1, 22)}\t{pos}\trs{random.randint(1, 99_999_999)}\t{random.choice(bases)}\t{random.choice(bases)}\t{random.randint(10, 99)}\tPASS\tDP={random.randint(5, 200)};AF={random.random():.3f}\tGT:AD\t0/1:{random.randint(0, 99)},{random.randint(0, 99)}\n"
                lines.append(line)
                got += len(line)
            f.write("".join(lines).encode()[:size])
    written += size
PY
DB_BYTES=$("$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U app -XAtc "select pg_database_size('app')" app)
FILE_BYTES=$(du -sb "$SRC/files" | cut -f1)
sync

# regobox backup, through the running server.
t0=$(secs); ARCHIVE=$(rb "$SRC" backup 2> "$WORK/backup.log"); t1=$(secs)
RB_BACKUP=$(elapsed "$t0" "$t1"); RB_SIZE=$(stat -c %s "$ARCHIVE")
# Baseline: pg_dump -Fc then tar czf.
mkdir -p "$WORK/base"
t0=$(secs)
"$BINDIR/pg_dump" -h 127.0.0.1 -p "$PORT" -U app -Fc -f "$WORK/base/db.dump" app
tar czf "$WORK/base/files.tgz" -C "$SRC" files
sync
t1=$(secs)
BASE_BACKUP=$(elapsed "$t0" "$t1")
BASE_SIZE=$(( $(stat -c %s "$WORK/base/db.dump") + $(stat -c %s "$WORK/base/files.tgz") ))

# regobox restore into a fresh volume (initdb, pg_restore, swap).
t0=$(secs); rb "$WORK/dst" restore "$ARCHIVE" 2> "$WORK/restore.log"; sync; t1=$(secs)
RB_RESTORE=$(elapsed "$t0" "$t1")
# Baseline: pg_restore into a new database of the running server, then tar xzf.
SUPW="$(cat "$SRC/secrets/postgres-superuser-password")"
PGPASSWORD="$SUPW" "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -XAqc "create database restored owner app" postgres
mkdir -p "$WORK/base/out"
t0=$(secs)
PGPASSWORD="$SUPW" "$BINDIR/pg_restore" -h 127.0.0.1 -p "$PORT" -U postgres -d restored "$WORK/base/db.dump"
tar xzf "$WORK/base/files.tgz" -C "$WORK/base/out"
sync
t1=$(secs)
BASE_RESTORE=$(elapsed "$t0" "$t1")
# The restored data is the same.
A=$("$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U app -XAtc "select sum(abalance), count(*) from pgbench_accounts" app)
kill -TERM "$PID"; wait "$PID" || true; PID=
B=$(rb "$WORK/dst" psql -XAtc "select sum(abalance), count(*) from pgbench_accounts" 2>/dev/null)
[ "$A" = "$B" ] || { echo "restored data differs: $A vs $B" >&2; exit 1; }
diff -r "$SRC/files" "$WORK/dst/files" > /dev/null || { echo "restored files differ" >&2; exit 1; }

# The same archive restored through the running regobox (the restored volume, running): how long
# the command takes, and the downtime: from the first to the last /readyz that is not 200
# (polled every 50 ms).
HPORT=$(( PORT + 1 ))
REGOBOX_SUPERVISION__PORT="$HPORT" REGOBOX_VOLUMES__ROOT="$WORK/dst" "$BIN" --config-dir "$WORK/config" run > "$WORK/live.log" 2>&1 &
PID=$!
until grep -q "regobox is ready" "$WORK/live.log"; do
    kill -0 "$PID" 2>/dev/null || { PID=; echo "regobox run exited before it was ready" >&2; exit 1; }
    sleep 0.2
done
python3 - "$HPORT" "$WORK/polled" <<'PY' &
import os, sys, time, urllib.request
port, out = sys.argv[1], sys.argv[2]
bad = []
while not os.path.exists(out + ".stop"):
    t = time.time()
    try:
        code = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status
    except Exception:
        code = 0
    if code != 200:
        bad.append(t)
    time.sleep(0.05)
open(out, "w").write(f"{bad[-1] - bad[0] + 0.05:.1f}\n" if bad else "0\n")
PY
POLLER=$!
sleep 1
t0=$(secs); rb "$WORK/dst" restore --force "$ARCHIVE" 2> "$WORK/live-restore.log"; t1=$(secs)
RB_LIVE=$(elapsed "$t0" "$t1")
sleep 1
touch "$WORK/polled.stop"; wait "$POLLER"
RB_DOWN=$(cat "$WORK/polled")
kill -TERM "$PID"; wait "$PID" || true; PID=

echo
echo "data: database $(mib "$DB_BYTES") MiB (pgbench scale $SCALE), files $(mib "$FILE_BYTES") MiB; $(nproc) cores"
echo "| | regobox | pg_dump -Fc + tar czf / pg_restore + tar xzf |"
echo "|---|---|---|"
echo "| backup | ${RB_BACKUP} s | ${BASE_BACKUP} s |"
echo "| restore | ${RB_RESTORE} s | ${BASE_RESTORE} s |"
echo "| archive size | $(mib "$RB_SIZE") MiB | $(mib "$BASE_SIZE") MiB |"
echo
echo "restore through the running regobox: ${RB_LIVE} s, of which /readyz not 200 (the downtime): ${RB_DOWN} s"
