#!/usr/bin/env bash
# Sets up the machine (idempotently) and runs every test: the core's unit
# tests, then the end-to-end suite against real Postgres and nats-server:
# whole on PostgreSQL 15 and 18 (the oldest and newest supported), its core
# on 16 and 17, which keeps a CI run under an hour.
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

# What can differ between major versions: the SQL API and its hooks, how
# each type is written, capture start, the pipeline, backfill values, the
# packaged install, capture in several databases, publish() (logical
# messages, two-phase commit); on 17 (the first with failover slots) the
# failover tests.
core_suite=(test_sql_api.py test_pipeline.py test_types.py test_capture_start.py test_backfill_values.py test_multidb.py
    test_packaging.py test_publish.py)
for version in ${WAL_LISTENER_PG_VERSIONS:-15 16 17 18}; do
    bash scripts/install.sh "$version"
    case "$version" in
        15 | 18) suite=() what="end-to-end tests" ;;
        16) suite=("${core_suite[@]}") what="core end-to-end tests" ;;
        *) suite=("${core_suite[@]}" test_high_availability.py::test_failover_to_the_standby_loses_and_duplicates_nothing
            test_high_availability.py::test_a_failover_keeps_every_database_captured)
            what="core end-to-end tests" ;;
    esac
    echo "== $what on PostgreSQL $version"
    (cd tests && WAL_LISTENER_PG="$version" "$WL_VENV/bin/pytest" -q -s -p no:cacheprovider --durations=15 "${suite[@]}")
done
