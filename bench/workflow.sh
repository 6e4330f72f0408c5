#!/usr/bin/env bash
# Workflow throughput and WAL per task, on a throwaway cluster of its own.
#
#   bash bench/workflow.sh                  # prints one markdown table
#   ONLY='seq-8-off' bash bench/workflow.sh  # only the rows whose flow-workers-events match
#
# Flows: "seq", three single steps in a row (a -> b -> c); "map", a root step whose output is
# a 100-element array fanned out by a map step (101 tasks per run). Runs are started before
# each measurement (their start is measured apart, "start_flow WAL/run"); then pgbench runs N
# workers for DURATION seconds, each worker cycle being two statements, each its own
# transaction: poll_for_tasks (claim one task) then complete_task (bench/workflow/*.sql).
# tasks/s counts tasks completed in the window; WAL/task is pg_stat_wal.wal_bytes over the
# window (after CHECKPOINT and pg_stat_reset_shared('wal')) divided by those tasks. Workflow
# events are switched with pgflow.workflow_events (all | runs | off).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${BENCH_DIR:-/tmp/pgflow-bench-wf}
PORT=${BENCH_PORT:-5451}
DB=bench
DURATION=${DURATION:-20}
HERE="$REPO_ROOT/bench/workflow"

source "$HERE/cluster.sh"
# pgbench reads the worker scripts as the postgres user
cp "$HERE"/*.sql "$DIR"/ && as_root chown postgres "$DIR"/*.sql

define_flows() {
    psql_ >/dev/null <<'SQL'
SELECT pgflow.drop_flow('bench_seq');
SELECT pgflow.drop_flow('bench_map');
SELECT pgflow.create_flow_from_shape('bench_seq',
    '{"steps": [{"slug": "a"}, {"slug": "b", "deps": ["a"]}, {"slug": "c", "deps": ["b"]}]}');
SELECT pgflow.create_flow_from_shape('bench_map',
    '{"steps": [{"slug": "root"}, {"slug": "each", "type": "map", "deps": ["root"]}]}');
VACUUM ANALYZE;
SQL
}

completed() { psql_ -c "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'completed'"; }

ROWS=()
# scenario FLOW WORKERS EVENTS RUNS
scenario() {
    local flow=$1 workers=$2 events=$3 runs=$4
    [[ "$flow-$workers-$events" =~ ${ONLY:-.} ]] || return 0
    say "$flow: $workers worker(s), events $events, $runs runs started beforehand"
    define_flows
    psql_ -c "CHECKPOINT" -c "SELECT pg_stat_reset_shared('wal')" >/dev/null
    psql_ -c "SET pgflow.workflow_events = 'off'" \
          -c "SELECT count(pgflow.start_flow('bench_$flow', jsonb_build_object('i', i))) FROM generate_series(1, $runs) i" >/dev/null
    local start_wal
    start_wal=$(psql_ -c "SELECT round(wal_bytes / $runs) FROM pg_stat_wal")
    psql_ -c "CHECKPOINT" >/dev/null
    local before after wal t0 t1
    before=$(completed)
    psql_ -c "SELECT pg_stat_reset_shared('wal')" >/dev/null
    t0=$(date +%s.%N)
    as_root env PGOPTIONS="-c pgflow.workflow_events=$events" runuser -u postgres -- "$PGBIN/pgbench" \
        -h "$DIR" -p "$PORT" -U postgres -n -c "$workers" -j 2 -T "$DURATION" \
        -f "$DIR/${flow}_worker.sql" "$DB" > "$DIR/pgbench-$flow-$workers-$events.log" 2>&1 \
        || { cat "$DIR/pgbench-$flow-$workers-$events.log"; exit 1; }
    t1=$(date +%s.%N)
    wal=$(psql_ -c "SELECT wal_bytes FROM pg_stat_wal")
    after=$(completed)
    local done=$((after - before))
    local rate per_task
    rate=$(python3 -c "print(round($done / ($t1 - $t0)))")
    per_task=$(python3 -c "print(round($wal / max($done, 1)))")
    ROWS+=("| $flow | $workers | $events | $(psql_ -c "SHOW wal_compression") | $rate | $per_task | $start_wal |")
    grep -E "aborted|error" "$DIR/pgbench-$flow-$workers-$events.log" || true
}

scenario seq 1 off 8000
scenario seq 8 off 20000
scenario seq 8 runs 20000
scenario seq 8 all 20000
scenario map 1 off 150
scenario map 8 off 400
# The same sequential run with full-page images compressed (a server setting).
psql_ -c "ALTER SYSTEM SET wal_compression = 'lz4'" -c "SELECT pg_reload_conf()" >/dev/null
scenario seq 8 off 20000

echo
echo "pgflow workflow benchmark: $(nproc) cores, PostgreSQL 15, synchronous_commit on, autovacuum_naptime 1s, ${DURATION} s per row"
echo
echo "| flow | workers | events | wal_compression | tasks/s | WAL bytes/task | start_flow WAL bytes/run |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
