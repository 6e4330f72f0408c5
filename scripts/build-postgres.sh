#!/usr/bin/env bash
# Build a PostgreSQL major version that Debian 12 does not package (18) from Debian's own source
# package, into the layout of Debian's PostgreSQL packages:
#   binaries and pg_config   /usr/lib/postgresql/MAJOR/bin
#   libraries (pgflow.so)    /usr/lib/postgresql/MAJOR/lib
#   extension scripts        /usr/share/postgresql/MAJOR/extension
# so that pgflow's tests, packages and scripts treat it like Debian's PostgreSQL 15. Contrib
# (amcheck, auto_explain) and the isolation tester are installed too. The machine's own apt
# sources are left alone: the source package comes through a separate sources list under
# /opt/pgsrc. Skips everything when the build is already installed.
#
#   scripts/build-postgres.sh 18
set -euo pipefail
MAJOR=${1:?usage: build-postgres.sh MAJOR}
PREFIX=/usr/lib/postgresql/$MAJOR
SRC=/opt/pgsrc
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -x "$PREFIX/bin/pg_config" ] && [ -x "$PREFIX/lib/pgxs/src/test/isolation/pg_isolation_regress" ] \
    && [ -f "$PREFIX/lib/amcheck.so" ]; then
    exit 0
fi

echo "building PostgreSQL $MAJOR from Debian's source package (about 6 minutes on 2 cores)"
missing=()
for p in bison flex zlib1g-dev libreadline-dev bzip2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# the clusters run as the postgres OS user, which Debian's packages would have created
if ! id postgres >/dev/null 2>&1; then
    as_root useradd --system --create-home --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

as_root mkdir -p "$SRC/lists/partial"
uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
uri=${uri:-http://deb.debian.org/debian}
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri sid main" \
    | as_root tee "$SRC/sources.list" >/dev/null
apt_src=(-o Dir::Etc::sourcelist="$SRC/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$SRC/lists")
tarball=$(ls "$SRC"/postgresql-"$MAJOR"_*.orig.tar.bz2 2>/dev/null | tail -1 || true)
if [ -z "$tarball" ]; then
    as_root apt-get "${apt_src[@]}" update -qq
    (cd "$SRC" && as_root apt-get "${apt_src[@]}" source --download-only -qq "postgresql-$MAJOR")
    tarball=$(ls "$SRC"/postgresql-"$MAJOR"_*.orig.tar.bz2 | tail -1)
fi

build=$(mktemp -d)
tar -xjf "$tarball" -C "$build"
cd "$build"/postgresql-*
./configure --prefix="$PREFIX" --datadir="/usr/share/postgresql/$MAJOR" \
    --without-icu --with-readline >"$build/configure.log" 2>&1 \
    || { tail -30 "$build/configure.log"; exit 1; }
make -j"$(nproc)" -s >"$build/make.log" 2>&1 || { tail -40 "$build/make.log"; exit 1; }
make -C contrib -j"$(nproc)" -s >>"$build/make.log" 2>&1 || { tail -40 "$build/make.log"; exit 1; }
make -C src/test/isolation -s >>"$build/make.log" 2>&1 || { tail -40 "$build/make.log"; exit 1; }
as_root make -s install >>"$build/make.log" 2>&1
as_root make -C contrib -s install >>"$build/make.log" 2>&1
as_root make -C src/test/isolation -s install >>"$build/make.log" 2>&1
cd /
rm -rf "$build"
"$PREFIX/bin/pg_config" --version
