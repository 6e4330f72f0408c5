#!/usr/bin/env bash
# Shared by scripts/demo.sh, scripts/test.sh and bench/run.sh: install what a fresh Debian 12
# machine lacks (skipping what is there), build and install the extension, and run throwaway
# PostgreSQL 15 clusters as the postgres OS user.
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
PG_CONFIG="$PGBIN/pg_config"
PGRX_VERSION=0.18.1
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_packages() {
    local pkgs=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang pkg-config sudo python3-pip)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_cargo_pgrx() {
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        say "installing cargo-pgrx $PGRX_VERSION (takes several minutes once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        say "pointing cargo-pgrx at Debian's PostgreSQL 15"
        cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
    fi
}

ensure_python_modules() {
    if ! python3 -c 'import psycopg, pytest' 2>/dev/null; then
        say "installing psycopg and pytest"
        # Debian's own python3 refuses pip installs into it (PEP 668) unless told to.
        python3 -m pip install -q --disable-pip-version-check "psycopg[binary]>=3.1" "pytest>=7" 2>/dev/null \
            || python3 -m pip install -q --disable-pip-version-check --break-system-packages \
                   "psycopg[binary]>=3.1" "pytest>=7"
        python3 -c 'import psycopg, pytest' || { echo "could not install psycopg and pytest" >&2; exit 1; }
    fi
}

ensure_tools() {
    ensure_packages
    ensure_cargo_pgrx
    ensure_python_modules
}

# Build the extension (release) and install it into Debian's PostgreSQL 15.
install_extension() {
    say "building and installing the pgflow extension"
    local log
    log=$(mktemp)
    if ! (cd "$REPO_ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG") >"$log" 2>&1; then
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
