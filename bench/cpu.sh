#!/usr/bin/env bash
# Server time per send-read-archive lifecycle, pgflow against plain SQL on same-shaped tables,
# in one session (no client, network or fsync in the figure), the two sides interleaved
# in blocks of 50 lifecycles: the CPU cost that bounds throughput when many clients share few
# cores. Starts its own cluster; prints a table.
#   bash bench/cpu.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
DIR=${BENCH_DIR:-/tmp/pgflow-bench-cpu}
PORT=${BENCH_PORT:-5457}
DB=bench
ensure_tools
bench_install
start_cluster "$DIR" "$PORT" "$DB"
trap 'stop_cluster "$DIR"' EXIT
psql_() { as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "$DB" -qAtX -v ON_ERROR_STOP=1 "$@"; }
psql_ -f "$REPO_ROOT/bench/queue/setup.sql" >/dev/null
psql_ -f "$REPO_ROOT/bench/queue/cpu_lifecycle.sql" 2>&1 | awk '
    match($0, /NOTICE:  round 3000 [0-9.]+ [0-9.]+/) {
        split(substr($0, RSTART, RLENGTH), w, " ")   # NOTICE: round 3000 <pgflow us> <plain us>
        f = f sprintf("%s%s", (f == "" ? "" : ", "), w[4]); p = p sprintf("%s%s", (p == "" ? "" : ", "), w[5])
        r = r sprintf("%s%.2f", (r == "" ? "" : ", "), w[5] / w[4])
    }
    END {
        print "| side | CPU us per lifecycle (3 rounds of 3,000, interleaved in blocks of 50) |"
        print "|---|---|"
        print "| pgflow | " f " |"
        print "| plain SQL | " p " |"
        print "| plain / pgflow | " r " |"
    }'
