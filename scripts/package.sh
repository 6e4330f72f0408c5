#!/usr/bin/env bash
# Build pgflow's Debian package for one PostgreSQL version (PGFLOW_PG, default 15):
#
#   scripts/package.sh           target/debian/postgresql-15-pgflow_<version>_amd64.deb
#   PGFLOW_PG=18 scripts/package.sh
#   scripts/package.sh --test    and test it: remove the files the build installed, install the
#                                package with dpkg (no cargo involved), start a clean cluster of
#                                that version and run the pg_regress tier against it; then
#                                remove the package and put the build's files back.
#
# The package holds what `cargo pgrx package` lays out: the library in PostgreSQL's pkglibdir
# and, in its extension directory, the control file, the install script of this version and
# every upgrade script (sql/pgflow--A--B.sql), so `ALTER EXTENSION pgflow UPDATE` works after
# an upgrade of the package. Paths are those of Debian's (and the PostgreSQL project's apt
# repository's) packages: /usr/lib/postgresql/MAJOR/lib, /usr/share/postgresql/MAJOR/extension.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TEST=false
[ "${1:-}" = --test ] && TEST=true

ensure_tools
version=$(sed -nE 's/^version = "(.*)"/\1/p' "$REPO_ROOT/Cargo.toml" | head -1)
name="postgresql-$PG_MAJOR-pgflow"
deb="$REPO_ROOT/target/debian/${name}_${version}_amd64.deb"
work=$(mktemp -d)
tree="$work/root"
trap 'rm -rf "$work"' EXIT

say "building $name $version"
(cd "$REPO_ROOT" && cargo pgrx package --pg-config "$PG_CONFIG" "${PG_FEATURES[@]}" --out-dir "$tree") \
    >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
mkdir -p "$tree/DEBIAN" "$tree/usr/share/doc/$name"
cp "$REPO_ROOT/README.md" "$REPO_ROOT/CHANGELOG.md" "$tree/usr/share/doc/$name/"
cat >"$tree/usr/share/doc/$name/copyright" <<EOF
pgflow $version: durable queues, DAG workflows and their events inside PostgreSQL.
License: PostgreSQL (see the project's Cargo.toml).
EOF
cat >"$tree/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: amd64
Maintainer: pgflow maintainers <maintainers@pgflow.invalid>
Depends: postgresql-$PG_MAJOR, libc6 (>= 2.34)
Section: database
Priority: optional
Installed-Size: $(du -sk "$tree/usr" | cut -f1)
Description: pgflow: durable queues, DAG workflows and their events inside PostgreSQL
 CREATE EXTENSION pgflow gives a database durable queues (leases, priorities, delays,
 retries with backoff, a dead-letter queue), DAG workflows and NOTIFY-based events, run
 by SQL functions and a background worker. Built for PostgreSQL $PG_MAJOR.
EOF
mkdir -p "$(dirname "$deb")"
dpkg-deb --root-owner-group --build "$tree" "$deb" >/dev/null
echo "$deb"
dpkg-deb --contents "$deb" | awk '{print $NF}' | grep -E 'pgflow[^/]*$'

$TEST || exit 0

# --- the package test ----------------------------------------------------------------------
passed=0; failed=0
check() { # check NAME COMMAND...: one counted check
    if "${@:2}"; then passed=$((passed + 1)); echo "ok $1"; else failed=$((failed + 1)); echo "not ok $1"; fi
}
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension
dir=/tmp/pgflow-package-pg$PG_MAJOR
port=$((${PGFLOW_TEST_PORT:-5490} + 3))

restore() {
    stop_cluster "$dir"
    as_root dpkg -r "$name" >/dev/null 2>&1 || true
    # the build's own files, as they were before the test (the package held the same ones)
    as_root cp -a "$tree/usr/." /usr/
    rm -rf "$work"
}
trap restore EXIT

say "installing $name with dpkg on a machine without the build's files"
as_root rm -f "$libdir/pgflow.so" "$extdir"/pgflow.control "$extdir"/pgflow--*.sql
# PostgreSQL 15 is Debian's package; 18 is built from source here (scripts/build-postgres.sh),
# so no dpkg package provides postgresql-18 and its dependency cannot be met by dpkg.
force=()
dpkg-query -W -f='${Status}' "postgresql-$PG_MAJOR" 2>/dev/null | grep -q "install ok installed" \
    || force=(--force-depends)
check "dpkg installs $(basename "$deb")" as_root dpkg -i "${force[@]}" "$deb"
check "the package holds the library" test -f "$libdir/pgflow.so"
check "the package holds the install script of $version" test -f "$extdir/pgflow--$version.sql"
upgrades=$(cd "$REPO_ROOT/sql" && ls pgflow--*--*.sql)
for u in $upgrades; do
    check "the package holds the upgrade script $u" test -f "$extdir/$u"
done
check "dpkg lists the package's files" bash -c "dpkg -L '$name' | grep -q 'pgflow.so$'"

say "a clean PostgreSQL $PG_MAJOR cluster with the packaged pgflow, and the SQL tier against it"
start_cluster "$dir" "$port" pgflow_package
check "CREATE EXTENSION pgflow from the package" as_root runuser -u postgres -- "$PGBIN/psql" -h "$dir" \
    -p "$port" -U postgres -d pgflow_package -qAt -v ON_ERROR_STOP=1 -c "CREATE EXTENSION pgflow" \
    -c "SELECT pgflow.create_queue('packaged')" -c "SELECT pgflow.send('packaged', '{}')"
run_pg_regress "$dir" "$port"
passed=$((passed + REGRESS_OK)); failed=$((failed + REGRESS_BAD))
echo "package: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
