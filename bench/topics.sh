#!/usr/bin/env bash
# publish to 10 bound queues against 10 sends to them, in one transaction each, on a throwaway
# cluster. Same-time measurement: every pgbench client picks either script at random for each
# transaction (-f publish.sql@1 -f sends.sql@1), so both run under the same load; the ratio is
# the sends' mean latency over publish's (above 1: publish is faster). Median of ROUNDS runs.
#
#   bash bench/topics.sh
#   ROUNDS=5 DURATION=20 CLIENTS=8 bash bench/topics.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${BENCH_DIR:-/tmp/pgflow-bench-topics}
PORT=${BENCH_PORT:-5455}
DB=bench
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-4}

say "starting a cluster in $DIR on port $PORT"
start_cluster "$DIR" "$PORT" "$DB"
trap 'stop_cluster "$DIR"' EXIT
psql_() { as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "$DB" -v ON_ERROR_STOP=1 -qAtX "$@"; }
psql_ -c "CREATE EXTENSION pgflow"
for i in $(seq 0 9); do
    psql_ -c "SELECT pgflow.create_queue('bench_topic_$i')" -c "SELECT pgflow.bind_topic('bench.#', 'bench_topic_$i')" >/dev/null
done
cp "$REPO_ROOT"/bench/topics/*.sql "$DIR"/ && as_root chown postgres "$DIR"/*.sql

ratios=()
for round in $(seq 1 "$ROUNDS"); do
    psql_ -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
    as_root runuser -u postgres -- "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -c "$CLIENTS" -j 2 \
        -T "$DURATION" -f "$DIR/publish.sql@1" -f "$DIR/sends.sql@1" "$DB" > "$DIR/pgbench-$round.log" 2>&1
    read -r pub sends < <(python3 - "$DIR/pgbench-$round.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
lat = {m.group(1): float(m.group(2)) for m in re.finditer(
    r"SQL script \d+: \S+/(\w+)\.sql.*?latency average = ([\d.]+) ms", text, re.S)}
print(lat["publish"], lat["sends"])
PY
)
    ratio=$(python3 -c "print(round($sends / $pub, 2))")
    say "round $round: publish $pub ms, 10 sends $sends ms per transaction: ratio $ratio"
    ratios+=("$ratio")
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo
echo "pgflow topics benchmark: $(nproc) cores, PostgreSQL $PG_MAJOR, $CLIENTS clients, ${DURATION} s x $ROUNDS rounds"
echo
echo "| workload | 10 sends ÷ publish, same-time (median; rounds) | target |"
echo "|---|---|---|"
echo "| one message to 10 bound queues, one transaction | $median (${ratios[*]}) | >= 1.0 |"
