# Shared paths for the scripts; sourced, not run.
# Tools live outside the checkout so that every clone (and CI) reuses them.
WL_TOOLS="${WL_TOOLS:-/opt/wal_listener}"
WL_VENV="$WL_TOOLS/venv"
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
# Unpacked by setup.sh: 16 from the pgserver wheel, 17 from Debian trixie's
# headers plus the npm embedded-postgres server binaries.
PG16_CONFIG="$WL_TOOLS/pg16/bin/pg_config"
PG17_CONFIG="$WL_TOOLS/pg17/bin/pg_config"
CARGO_PGRX_VERSION=0.18.1
export PATH="$HOME/.cargo/bin:$PATH"

# pg_config of PostgreSQL 18 from the embedded-postgres wheel (empty until set-up ran).
pg18_config() {
    "$WL_VENV/bin/python" -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall/bin/pg_config"))' 2>/dev/null
}

pg_config_for() {
    case "$1" in
        15) echo "$PG15_CONFIG" ;;
        16) echo "$PG16_CONFIG" ;;
        17) echo "$PG17_CONFIG" ;;
        18) pg18_config ;;
        *) echo "unsupported PostgreSQL major version: $1 (use 15, 16, 17 or 18)" >&2; return 1 ;;
    esac
}
