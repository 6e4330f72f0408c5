#!/usr/bin/env bash
# Wake-up latency of pgflow's events: LISTEN notifications and read_with_poll wake-ups, measured
# from the sender's COMMIT returning, against a plain 100 ms poll loop. Starts its own cluster
# (pgflow preloaded), prints a markdown table on stdout, stops the cluster.
#
#   bash bench/latency.sh            # 1000 messages per path
#   LAT_MESSAGES=5000 LAT_WAITERS=200 bash bench/latency.sh   # (d), (e): that many waiting at once
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${LAT_DIR:-/tmp/pgflow-bench-lat}
PORT=${LAT_PORT:-5452}

say "starting a cluster in $DIR on port $PORT" >&2
start_cluster "$DIR" "$PORT" bench
trap 'stop_cluster "$DIR"' EXIT
# room for the many-waiters rows: the waiters, the sender and the workers
echo "max_connections = $(( ${LAT_WAITERS:-200} + 50 ))" | as_root tee -a "$DIR/data/postgresql.conf" >/dev/null
as_root runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data" -w -t 60 restart -l "$DIR/server.log" >/dev/null
python3 "$REPO_ROOT/bench/latency.py" "host=127.0.0.1 port=$PORT user=postgres dbname=bench" "${LAT_MESSAGES:-1000}" "${LAT_WAITERS:-200}"
