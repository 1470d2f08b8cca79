#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need, then runs them.
# The tests start their own PostgreSQL servers on free ports; nothing needs to be running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --tests
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
else
    cargo test --no-fail-fast "$@"
fi
