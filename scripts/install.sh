#!/usr/bin/env bash
# Installs wal_listener into PostgreSQL <15|18> from the package that
# scripts/package.sh builds, after removing any earlier install: the tests
# then run what the Docker image ships, not the build tree, plus the fault
# points the tests switch on (feature fault-injection; the image has none).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
version="${1:?usage: scripts/install.sh 15|18}"
pg_config="$(pg_config_for "$version")"
package="target/package/pg$version"
WAL_LISTENER_FEATURES="${WAL_LISTENER_FEATURES-fault-injection}" \
    bash scripts/package.sh "$version" "$pg_config" "$package"
pkglibdir="$("$pg_config" --pkglibdir)"
extension_dir="$("$pg_config" --sharedir)/extension"
echo "== install wal_listener into PostgreSQL $version ($pkglibdir)"
rm -f "$pkglibdir/wal_listener.so" "$extension_dir"/wal_listener.control "$extension_dir"/wal_listener--*.sql
cp -R "$package"/. /
chmod -R o+rX "$pkglibdir" "$extension_dir"
