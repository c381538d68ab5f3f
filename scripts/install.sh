#!/usr/bin/env bash
# Builds the extension (release) and installs it into PostgreSQL <15|18>.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
version="${1:?usage: scripts/install.sh 15|18}"
pg_config="$(pg_config_for "$version")"
echo "== build and install wal_listener for PostgreSQL $version"
(cd extension && cargo pgrx install --release --pg-config "$pg_config" \
    --no-default-features --features "pg$version" 2>&1 | grep -E "error|warning: unused|Finished|Installing" || true)
test -f "$("$pg_config" --pkglibdir)/wal_listener.so"
chmod -R o+rX "$("$pg_config" --pkglibdir)" "$("$pg_config" --sharedir)/extension"
