#!/usr/bin/env bash
# Server time per send-read-archive lifecycle, pgflow against plain SQL on same-shaped tables,
# in one session (no client, network or fsync in the figure): the CPU cost that bounds
# throughput when many clients share few cores. Starts its own cluster; prints a table.
#   bash bench/cpu.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
DIR=${BENCH_DIR:-/tmp/pgflow-bench-cpu}
PORT=${BENCH_PORT:-5457}
DB=bench
ensure_tools
[ -n "${BENCH_NO_INSTALL:-}" ] || install_extension >&2
start_cluster "$DIR" "$PORT" "$DB"
trap 'stop_cluster "$DIR"' EXIT
psql_() { as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "$DB" -qAtX -v ON_ERROR_STOP=1 "$@"; }
psql_ -f "$REPO_ROOT/bench/queue/setup.sql" >/dev/null
psql_ -f "$REPO_ROOT/bench/queue/cpu_lifecycle.sql" 2>&1 | awk '
    /^(pgflow|plain)$/ { side = $1; next }
    /^Time:/ { us = $2 * 1000 / 2000; t[side] = t[side] sprintf("%s%.0f", (t[side] == "" ? "" : ", "), us); a[side, ++n[side]] = us }
    END {
        print "| side | us per lifecycle (3 runs of 2,000) |"
        print "|---|---|"
        print "| pgflow | " t["pgflow"] " |"
        print "| plain SQL | " t["plain"] " |"
    }'
