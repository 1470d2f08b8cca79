#!/usr/bin/env bash
# What reading an archive costs in memory: `regobox backup verify` (the first step of every
# restore, which reads the same way) under GNU time, its maximum RSS and its time, on three
# archives that scripts/make-archive.py writes:
# - files: a million small files with a manifest that matches (a real backup of many files);
# - short-names: 7 million directories of short names and no manifest (crafted: as many names
#   as a reader can be made to hold; refused at the member past what a manifest of 256 MiB can
#   list);
# - long-names: 200 000 directories of 4 000-character names (crafted, 0.5 MB compressed).
# Usage: scripts/bench-verify.sh [FILES (1000000)] [SHORT (7000000)] [LONG (200000)]
# (BENCH_BIN: the binary to measure; else the release build.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_need zstd:zstd /usr/bin/time:time
bench_bin
WORK="$(mktemp -d /tmp/regobox-bench-verify.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/volumes"
echo "| archive | members | compressed | maximum RSS | time | verify says |"
echo "|---|---|---|---|---|---|"
for spec in "files ${1:-1000000}" "short-names ${2:-7000000}" "long-names ${3:-200000}"; do
    set -- $spec
    python3 scripts/make-archive.py "$1" "$2" "$WORK/$1.tar.zst"
    size=$(du -h "$WORK/$1.tar.zst" | cut -f1)
    REGOBOX_VOLUMES__ROOT="$WORK/volumes" /usr/bin/time -o "$WORK/time" -f "%M %e" \
        "$BIN" backup verify "$WORK/$1.tar.zst" > /dev/null 2> "$WORK/err" || true
    read -r rss secs < <(tail -1 "$WORK/time")
    said=$(sed -n 's/.*does not verify: //p; s/.*error: \(the archive has no database dump\)/\1/p' "$WORK/err" | cut -c1-150)
    printf '| %s | %s | %s | %s MiB | %s s | %s |\n' "$1" "$2" "$size" "$((rss / 1024))" "$secs" "${said:-OK}"
    rm -f "$WORK/$1.tar.zst"
done
