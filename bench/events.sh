#!/usr/bin/env bash
# Workflow throughput with events on against events off, alone and beside a foreign WAL writer,
# on a throwaway cluster of its own (pgflow preloaded, every setting at its default).
#
#   bash bench/events.sh                     # prints one markdown table of ratios
#   ROUNDS=5 DURATION=15 bash bench/events.sh
#
# Each measurement: runs of the 3-step sequential flow are started, then pgbench runs 8 workers
# for DURATION seconds (poll_for_tasks then complete_task, bench/workflow/seq_worker.sql), with
# pgflow.workflow_events at `all` (the default) or `off`. "foreign writer": meanwhile a pgbench
# of 2 clients inserts rows into a plain table of another database of the same cluster, as any
# other application of the cluster would. The four cases are interleaved in every round (the
# order rotating), and the table reports the median of the per-round ratios, all ÷ off.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${BENCH_DIR:-/tmp/pgflow-bench-events}
PORT=${BENCH_PORT:-5453}
DB=bench
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-8}
RUNS=${RUNS:-20000}
HERE="$REPO_ROOT/bench/workflow"

source "$HERE/cluster.sh"
PSQL_DB=postgres psql_ -c "CREATE DATABASE foreign_app"
PSQL_DB=foreign_app psql_ -c "CREATE TABLE t (id bigserial PRIMARY KEY, v double precision, at timestamptz DEFAULT now())"
cp "$HERE"/seq_worker.sql "$DIR"/
echo "INSERT INTO t (v) VALUES (random());" > "$DIR/foreign.sql"
as_root chown postgres "$DIR"/*.sql

completed() { psql_ -c "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'completed'"; }

# measure EVENTS FOREIGN: prints tasks/s
measure() {
    local events=$1 foreign=$2 before after t0 t1 fpid=
    psql_ >/dev/null <<'SQL'
SELECT pgflow.drop_flow('bench_seq');
SELECT pgflow.create_flow_from_shape('bench_seq',
    '{"steps": [{"slug": "a"}, {"slug": "b", "deps": ["a"]}, {"slug": "c", "deps": ["b"]}]}');
SQL
    psql_ -c "SET pgflow.workflow_events = 'off'" \
          -c "SELECT count(pgflow.start_flow('bench_seq', jsonb_build_object('i', i))) FROM generate_series(1, $RUNS) i" >/dev/null
    psql_ -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
    if [ "$foreign" = yes ]; then
        as_root runuser -u postgres -- "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -c 2 -j 1 \
            -T "$((DURATION + 2))" -f "$DIR/foreign.sql" foreign_app > "$DIR/foreign.log" 2>&1 &
        fpid=$!
        sleep 1
    fi
    before=$(completed)
    t0=$(date +%s.%N)
    as_root env PGOPTIONS="-c pgflow.workflow_events=$events" runuser -u postgres -- "$PGBIN/pgbench" \
        -h "$DIR" -p "$PORT" -U postgres -n -c "$WORKERS" -j 2 -T "$DURATION" \
        -f "$DIR/seq_worker.sql" "$DB" > "$DIR/pgbench-$events-$foreign.log" 2>&1 \
        || { cat "$DIR/pgbench-$events-$foreign.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    after=$(completed)
    [ -z "$fpid" ] || wait "$fpid"
    python3 -c "print(round(($after - $before) / ($t1 - $t0)))"
}

declare -A RATE
cases=("all no" "off no" "all yes" "off yes")
for round in $(seq 1 "$ROUNDS"); do
    for i in 0 1 2 3; do
        c=${cases[$(((i + round) % 4))]}
        rate=$(measure $c)
        say "round $round: events ${c% *}, foreign writer ${c#* }: $rate tasks/s"
        RATE[$round,${c// /,}]=$rate
    done
done

ratio() { # ratio FOREIGN: median over rounds of all/off, and the medians of each
    local foreign=$1
    local kv=() k
    for k in "${!RATE[@]}"; do kv+=("$k" "${RATE[$k]}"); done
    python3 - "$foreign" "$ROUNDS" "${kv[@]}" <<'PY'
import statistics, sys
foreign, rounds = sys.argv[1], int(sys.argv[2])
kv = sys.argv[3:]
rate = {kv[i]: float(kv[i + 1]) for i in range(0, len(kv), 2)}
on = [rate[f"{r},all,{foreign}"] for r in range(1, rounds + 1)]
off = [rate[f"{r},off,{foreign}"] for r in range(1, rounds + 1)]
print(f"{statistics.median(on):.0f} | {statistics.median(off):.0f} | "
      f"{statistics.median(a / b for a, b in zip(on, off)):.2f}")
PY
}

echo
echo "pgflow events benchmark: $(nproc) cores, PostgreSQL $PG_MAJOR, defaults (synchronous_commit on), $WORKERS workers, ${DURATION} s x $ROUNDS rounds, wakeups $(psql_ -c 'SELECT pgflow.wakeups_enabled()')"
echo
echo "| foreign WAL writer | events all, tasks/s | events off, tasks/s | all ÷ off (median of rounds) |"
echo "|---|---|---|---|"
echo "| no | $(ratio no) |"
echo "| yes | $(ratio yes) |"
