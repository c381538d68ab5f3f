#!/usr/bin/env bash
# Sets up the machine (idempotently), starts nats-server and PostgreSQL 15
# with wal_listener, changes a few rows and prints the events they became.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
bash scripts/install.sh "${WAL_LISTENER_PG:-15}"
cd tests && WAL_LISTENER_PG="${WAL_LISTENER_PG:-15}" exec "$WL_VENV/bin/python" demo.py
