#!/usr/bin/env bash
# Builds the release package of the extension for one PostgreSQL major
# version: the files `make install` would add to that server, as a tree to
# copy onto / (cargo pgrx package). scripts/install.sh and Dockerfile.pg
# both install from it, so every test run proves what the image ships.
# WAL_LISTENER_FEATURES adds cargo features: the tests' build adds
# fault-injection (the hidden wal_listener.inject_fault), the image none.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
version="${1:?usage: scripts/package.sh 15|18 [pg_config] [out_dir]}"
pg_config="${2:-$(pg_config_for "$version")}"
out="$(realpath -m "${3:-target/package/pg$version}")"
echo "== package wal_listener for PostgreSQL $version into $out"
# Independent of `cargo pgrx init`, which the Docker build never runs: pgrx
# takes the server from PGRX_PG_CONFIG_PATH, and an empty PGRX_HOME shows
# that nothing else comes from an init'ed one.
export PGRX_PG_CONFIG_PATH="$pg_config"
PGRX_HOME="$(mktemp -d)"
export PGRX_HOME
trap 'rm -rf "$PGRX_HOME"' EXIT
rm -rf "$out"
(cd extension && cargo pgrx package --pg-config "$pg_config" --out-dir "$out" \
    --no-default-features --features "pg$version ${WAL_LISTENER_FEATURES:-}" 2>&1 | grep -E "error|warning: unused|Finished" || true)
for file in "$("$pg_config" --pkglibdir)/wal_listener.so" \
    "$("$pg_config" --sharedir)/extension/wal_listener.control"; do
    test -f "$out$file" || { echo "package is missing $file" >&2; exit 1; }
done
