#!/usr/bin/env bash
# Sets up the machine (idempotently) and runs every test: the core's unit
# tests, then the end-to-end suite against real Postgres and nats-server,
# once on PostgreSQL 15 and once on 18.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh

echo "== lint Dockerfile.pg"
"$WL_VENV/bin/hadolint" Dockerfile.pg

echo "== unit tests (core crate)"
cargo test --quiet -p wal_listener_core --features fault-injection
# The image's build has no fault points: it must compile on its own.
cargo check --quiet -p wal_listener --no-default-features --features pg15
# The core on its own, run by tests/test_core_standalone.py.
cargo build --quiet --release -p wal_listener_core --example standalone

for version in ${WAL_LISTENER_PG_VERSIONS:-15 18}; do
    bash scripts/install.sh "$version"
    echo "== end-to-end tests on PostgreSQL $version"
    (cd tests && WAL_LISTENER_PG="$version" "$WL_VENV/bin/pytest" -q -s -p no:cacheprovider)
done
