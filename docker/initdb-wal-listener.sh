#!/usr/bin/env bash
# Run once by the postgres image's entrypoint when it initialises the data
# directory: points the worker at POSTGRES_DB (and NATS at
# WAL_LISTENER_NATS_URL) and creates the extension there. The entrypoint
# restarts the server afterwards, which starts the worker with these settings.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set db="${POSTGRES_DB:-postgres}" --set nats_url="${WAL_LISTENER_NATS_URL:-nats://nats:4222}" <<'SQL'
ALTER SYSTEM SET wal_listener.database = :'db';
ALTER SYSTEM SET wal_listener.nats_url = :'nats_url';
CREATE EXTENSION IF NOT EXISTS wal_listener;
SQL
