#!/usr/bin/env bash
# Shared by scripts/demo.sh, scripts/test.sh, scripts/package.sh and bench/: install what a
# fresh Debian 12 machine lacks (skipping what is there), build and install the extension, and
# run throwaway clusters as the postgres OS user.
#
# PGFLOW_PG picks the PostgreSQL major version (default 15). 15 comes from Debian's packages;
# 18 is built from Debian's source package by scripts/build-postgres.sh into the same layout
# (/usr/lib/postgresql/18/bin, /usr/share/postgresql/18), once.
set -euo pipefail

# Every major version pgflow is built and tested for on these machines (see README).
PG_SUPPORTED="15 18"
PG_MAJOR=${PGFLOW_PG:-15}
case " $PG_SUPPORTED " in
    *" $PG_MAJOR "*) ;;
    *) echo "PGFLOW_PG=$PG_MAJOR: supported versions are $PG_SUPPORTED" >&2; exit 2 ;;
esac
export PGFLOW_PG=$PG_MAJOR
PGBIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_CONFIG="$PGBIN/pg_config"
PGRX_VERSION=0.18.1
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
# Cargo features of this version's build (pgrx binds to one major version per build), and a
# target directory per version so that switching versions does not rebuild everything.
PG_FEATURES=(--no-default-features --features "pg$PG_MAJOR")
if [ "$PG_MAJOR" != 15 ]; then export CARGO_TARGET_DIR="$REPO_ROOT/target/pg$PG_MAJOR"; fi

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_packages() {
    local pkgs=(libclang-dev clang pkg-config sudo python3-pip)
    [ "$PG_MAJOR" = 15 ] && pkgs+=(postgresql-15 postgresql-server-dev-15 postgresql-contrib)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "$PG_MAJOR" != 15 ]; then
        bash "$REPO_ROOT/scripts/build-postgres.sh" "$PG_MAJOR"
    fi
}

ensure_cargo_pgrx() {
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        say "installing cargo-pgrx $PGRX_VERSION (takes several minutes once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if ! grep -qs "pg$PG_MAJOR *= *\"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        # init rewrites the whole list: name every supported version installed here
        local args=() v
        for v in $PG_SUPPORTED; do
            [ -x "/usr/lib/postgresql/$v/bin/pg_config" ] && args+=("--pg$v" "/usr/lib/postgresql/$v/bin/pg_config")
        done
        say "pointing cargo-pgrx at PostgreSQL ${args[*]}"
        cargo pgrx init "${args[@]}" >/dev/null
    fi
}

ensure_python_modules() {
    # prometheus_client: the Prometheus project's own parser reads pgflow.metrics() in a test
    if ! python3 -c 'import psycopg, pytest, prometheus_client' 2>/dev/null; then
        say "installing psycopg, pytest and prometheus_client"
        local mods=("psycopg[binary]>=3.1" "pytest>=7" "prometheus_client>=0.17")
        # Debian's own python3 refuses pip installs into it (PEP 668) unless told to.
        python3 -m pip install -q --disable-pip-version-check "${mods[@]}" 2>/dev/null \
            || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${mods[@]}"
        python3 -c 'import psycopg, pytest, prometheus_client' \
            || { echo "could not install psycopg, pytest and prometheus_client" >&2; exit 1; }
    fi
}

ensure_tools() {
    ensure_packages
    ensure_cargo_pgrx
    ensure_python_modules
}

# The Mermaid renderer (mermaid-cli, driving Debian's Chromium) that the diagram test renders
# pgflow.flow_mermaid and run_mermaid with. Installed under target/ (not part of the tree), once.
MERMAID_CLI_VERSION=11.12.0
MERMAID_DIR="$REPO_ROOT/target/tools/mermaid"
ensure_mermaid() {
    if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "install ok installed"; then
        say "installing Debian's chromium (the Mermaid renderer's browser)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    if ! command -v npm >/dev/null; then
        say "installing Debian's nodejs and npm"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    if [ ! -x "$MERMAID_DIR/node_modules/.bin/mmdc" ]; then
        say "installing mermaid-cli $MERMAID_CLI_VERSION from npm"
        mkdir -p "$MERMAID_DIR"
        (cd "$MERMAID_DIR" && PUPPETEER_SKIP_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error \
            "@mermaid-js/mermaid-cli@$MERMAID_CLI_VERSION" >/dev/null)
    fi
    export PGFLOW_MMDC="$MERMAID_DIR/node_modules/.bin/mmdc"
}

# Benchmarks measure the release build of this tree: install it first (the unit tier's
# `cargo pgrx test` leaves a debug build installed). BENCH_NO_INSTALL=1 keeps what is
# installed, to compare builds installed by hand.
bench_install() {
    if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then
        install_extension >&2
    fi
}

# Build the extension (release) and install it into PostgreSQL $PG_MAJOR.
install_extension() {
    say "building and installing the pgflow extension for PostgreSQL $PG_MAJOR"
    local log
    log=$(mktemp)
    if ! (cd "$REPO_ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" "${PG_FEATURES[@]}") >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "building or installing pgflow failed" >&2
        rm -f "$log"
        exit 1
    fi
    grep -E "Installing|Finished" "$log" || true
    rm -f "$log"
}

# start_cluster DIR PORT DBNAME: a fresh cluster owned by the postgres OS user, listening on
# 127.0.0.1:PORT and a socket in DIR, with pgflow preloaded, and database DBNAME created.
start_cluster() {
    local dir=$1 port=$2 db=$3
    stop_cluster "$dir"
    as_root rm -rf "$dir"
    as_root mkdir -p "$dir"
    as_root chown postgres:postgres "$dir"
    as_root runuser -u postgres -- "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    cat <<CONF | as_root tee -a "$dir/data/postgresql.conf" >/dev/null
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
shared_preload_libraries = 'pgflow'
pgflow.maintenance_database = '$db'
max_connections = 200
max_wal_size = '4GB'
checkpoint_timeout = '30min'
log_min_messages = warning
log_line_prefix = '%m [%p] '
CONF
    as_root runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    as_root runuser -u postgres -- "$PGBIN/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt \
        -c "CREATE DATABASE $db" >/dev/null
}

stop_cluster() {
    local dir=$1
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_root runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

# run_pg_regress DIR PORT: the golden files of tests/pg_regress against the cluster of
# start_cluster DIR PORT, in a new database pgflow_regress; shows pg_regress's output and any
# differences, and sets REGRESS_OK and REGRESS_BAD to the counts of passed and failed files.
run_pg_regress() {
    local dir=$1 port=$2 out tests
    tests=$(cd "$REPO_ROOT/tests/pg_regress/sql" && ls ./*.sql | sed 's|^\./||; s/\.sql$//' | sort | tr '\n' ' ')
    out=$(mktemp -d); chmod 777 "$out"
    as_root runuser -u postgres -- "$PGBIN/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt \
        -c "DROP DATABASE IF EXISTS pgflow_regress" -c "CREATE DATABASE pgflow_regress" >/dev/null
    # shellcheck disable=SC2086
    "$PGBIN/../lib/pgxs/src/test/regress/pg_regress" --use-existing --host=127.0.0.1 --port="$port" \
        --user=postgres --dbname=pgflow_regress --inputdir="$REPO_ROOT/tests/pg_regress" \
        --outputdir="$out" $tests | tee "$out/log"
    REGRESS_OK=$(grep -cE '^(ok|test) .* ok|^ok ' "$out/log" || true)
    REGRESS_BAD=$(grep -cE 'FAILED|failed \(ignored\)|^not ok ' "$out/log" || true)
    if [ -f "$out/regression.diffs" ]; then cat "$out/regression.diffs"; fi
    if [ "$((REGRESS_OK + REGRESS_BAD))" -ne "$(echo $tests | wc -w)" ]; then
        REGRESS_BAD=$(( $(echo $tests | wc -w) - REGRESS_OK ))
    fi
    rm -rf "$out"
}
