#!/usr/bin/env bash
# pgflow's workflow path against pgflow-TS (the TypeScript project's SQL core on pgmq), in one
# cluster, every setting at its default on both sides: tasks per second with 8 workers each,
# both running at the same time and each running alone.
#
#   bash bench/peers-workflow.sh                  # seq and map, 2 rounds of 15 s
#   ROUNDS=3 DURATION=20 bash bench/peers-workflow.sh
#
# The peers come from their registries at run time, nothing vendored: pgflow-TS's SQL is the
# `@pgflow/core` npm package (PEER_TS_VERSION, `dist/supabase/migrations/`), applied in order to
# a database of its own (it also uses schema `pgflow`) after pgmq, whose SQL ships inside the
# `pgmq` crate (PEER_PGMQ_CRATE, `src/install/embedded/sql/pgmq.sql`), installed here as an
# extension (it is CREATE EXTENSION'ed by pgflow-TS's first migration), with a no-op
# `realtime.send` (pgflow-TS broadcasts its events through Supabase Realtime there).
#
# Flows, the same on both sides: "seq", three single steps in a row; "map", a root step whose
# output is a 100-element array fanned out by a map step. Worker cycles: pgflow's
# (bench/workflow/, OURS_CYCLE) `loop` (the default), one statement and one commit per task,
# `complete_and_poll` (falling back to `poll_for_tasks` when it claimed nothing), or `poll`,
# `poll_for_tasks` then `complete_task` (2 statements); pgflow-TS's (bench/peers/)
# `read_with_poll`, `start_tasks`, `complete_task` (3 statements, its worker's cycle; the read
# is pgmq.read_with_poll with its client's 200 ms poll). Runs are started before each
# measurement; the rate is tasks completed in the window.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${BENCH_DIR:-/tmp/pgflow-bench-peers}
PORT=${BENCH_PORT:-5454}
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
WORKERS=${WORKERS:-8}
PEER_TS_VERSION=${PEER_TS_VERSION:-0.8.1}
PEER_PGMQ_CRATE=${PEER_PGMQ_CRATE:-0.33.7}
OURS_CYCLE=${OURS_CYCLE:-loop}
HERE="$REPO_ROOT/bench/peers"  # pgflow-TS's worker cycles
FETCH="$DIR.fetch"

say "fetching @pgflow/core $PEER_TS_VERSION (npm) and the pgmq crate $PEER_PGMQ_CRATE (crates.io)"
rm -rf "$FETCH" && mkdir -p "$FETCH"
(cd "$FETCH" && npm pack --silent "@pgflow/core@$PEER_TS_VERSION" >/dev/null && tar xzf ./*.tgz)
curl -fsSL -o "$FETCH/pgmq.crate" "https://static.crates.io/crates/pgmq/pgmq-$PEER_PGMQ_CRATE.crate"
tar xzf "$FETCH/pgmq.crate" -C "$FETCH"
PGMQ_SQL_DIR=$(echo "$FETCH"/pgmq-*/src/install/embedded/sql)
PGMQ_VERSION=$(ls "$PGMQ_SQL_DIR" | sed -n 's/^pgmq--.*--\(.*\)\.sql$/\1/p' | sort -V | tail -1)
EXT_DIR=$("$PGBIN/pg_config" --sharedir)/extension
if [ ! -f "$EXT_DIR/pgmq.control" ] || ! grep -q "'$PGMQ_VERSION'" "$EXT_DIR/pgmq.control"; then
    say "installing pgmq $PGMQ_VERSION (SQL only) into $EXT_DIR"
    as_root cp "$PGMQ_SQL_DIR/pgmq.sql" "$EXT_DIR/pgmq--$PGMQ_VERSION.sql"
    printf "comment = 'pgmq (SQL from the pgmq crate, for pgflow benchmarks)'\ndefault_version = '%s'\nrelocatable = false\nschema = pgmq\n" \
        "$PGMQ_VERSION" | as_root tee "$EXT_DIR/pgmq.control" >/dev/null
fi

say "starting a cluster in $DIR on port $PORT"
start_cluster "$DIR" "$PORT" ours
trap 'stop_cluster "$DIR"' EXIT
psql_() { local db=$1; shift; as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "$db" -v ON_ERROR_STOP=1 -qAtX "$@"; }
psql_ postgres -c "CREATE DATABASE ts"
psql_ ours -c "CREATE EXTENSION pgflow"
psql_ ts >/dev/null <<'SQL'
CREATE SCHEMA realtime;
CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE sql AS '';
SQL
for m in "$FETCH"/package/dist/supabase/migrations/*.sql; do
    psql_ ts -f "$m" >/dev/null
done
psql_ ts -c "INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
             VALUES ('00000000-0000-4000-8000-000000000001', 'bench', 'bench')"
# the same vacuum settings for both sides' churning tables, as a busy deployment would have
psql_ ours -c "ALTER SYSTEM SET autovacuum_naptime = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
# pgflow's worker cycles are those of bench/workflow.sh
cp "$HERE"/*.sql "$DIR"/
case $OURS_CYCLE in
    loop) cp "$REPO_ROOT/bench/workflow/seq_loop.sql" "$DIR/ours_seq.sql"
          cp "$REPO_ROOT/bench/workflow/map_loop.sql" "$DIR/ours_map.sql" ;;
    poll) cp "$REPO_ROOT/bench/workflow/seq_worker.sql" "$DIR/ours_seq.sql"
          cp "$REPO_ROOT/bench/workflow/map_worker.sql" "$DIR/ours_map.sql" ;;
    *) echo "OURS_CYCLE is loop or poll" >&2; exit 2 ;;
esac
as_root chown postgres "$DIR"/*.sql

define() { # define FLOW: (re)create the flow on both sides
    local flow=$1
    psql_ ours -c "SELECT pgflow.drop_flow('bench_$flow')" >/dev/null
    psql_ ts -c "SELECT pgflow.create_flow('bench_$flow', max_attempts => 3, base_delay => 1, timeout => 60)" >/dev/null 2>&1 || true
    if [ "$flow" = seq ]; then
        psql_ ours -c "SELECT pgflow.create_flow_from_shape('bench_seq',
            '{\"steps\": [{\"slug\": \"a\"}, {\"slug\": \"b\", \"deps\": [\"a\"]}, {\"slug\": \"c\", \"deps\": [\"b\"]}]}')" >/dev/null
        psql_ ts -c "SELECT pgflow.add_step('bench_seq', 'a')" -c "SELECT pgflow.add_step('bench_seq', 'b', ARRAY['a'])" \
                 -c "SELECT pgflow.add_step('bench_seq', 'c', ARRAY['b'])" >/dev/null 2>&1 || true
    else
        psql_ ours -c "SELECT pgflow.create_flow_from_shape('bench_map',
            '{\"steps\": [{\"slug\": \"root\"}, {\"slug\": \"each\", \"type\": \"map\", \"deps\": [\"root\"]}]}')" >/dev/null
        psql_ ts -c "SELECT pgflow.add_step('bench_map', 'root')" \
                 -c "SELECT pgflow.add_step('bench_map', 'each', ARRAY['root'], step_type => 'map')" >/dev/null 2>&1 || true
    fi
}

completed() { psql_ "$1" -c "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'completed'"; }

start_runs() { # start_runs FLOW N on both sides
    local flow=$1 n=$2
    psql_ ours -c "SELECT count(pgflow.start_flow('bench_$flow', jsonb_build_object('i', i))) FROM generate_series(1, $n) i" >/dev/null
    psql_ ts -c "SELECT count(*) FROM generate_series(1, $n) i, pgflow.start_flow('bench_$flow', jsonb_build_object('i', i))" >/dev/null
    psql_ ours -c "VACUUM ANALYZE" && psql_ ts -c "VACUUM ANALYZE" && psql_ ours -c "CHECKPOINT"
}

# pgbench_side SIDE FLOW: pgbench of WORKERS clients for DURATION seconds, in the background
pgbench_side() {
    local side=$1 flow=$2 db=$1
    as_root runuser -u postgres -- "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -c "$WORKERS" -j 1 \
        -T "$DURATION" -D held=0 -f "$DIR/${side}_${flow}.sql" "$db" > "$DIR/pgbench-$side-$flow.log" 2>&1 &
}

# measure FLOW MODE (together | ours | ts): prints "ours_rate ts_rate" (0 for a side not run)
measure() {
    local flow=$1 mode=$2 runs b_ours b_ts a_ours a_ts t0 t1
    runs=$([ "$flow" = seq ] && echo 20000 || echo 700)
    define "$flow"
    start_runs "$flow" "$runs"
    b_ours=$(completed ours); b_ts=$(completed ts)
    t0=$(date +%s.%N)
    [ "$mode" = ts ] || pgbench_side ours "$flow"
    [ "$mode" = ours ] || pgbench_side ts "$flow"
    wait
    t1=$(date +%s.%N)
    a_ours=$(completed ours); a_ts=$(completed ts)
    grep -h -E "aborted|error" "$DIR"/pgbench-*-"$flow".log >&2 || true
    python3 -c "d = $t1 - $t0; print(round(($a_ours - $b_ours) / d), round(($a_ts - $b_ts) / d))"
}

declare -A R
for round in $(seq 1 "$ROUNDS"); do
    for flow in seq map; do
        for mode in together ours ts; do
            read -r o t < <(measure "$flow" "$mode")
            say "round $round, $flow, $mode: pgflow $o tasks/s, pgflow-TS $t tasks/s"
            R[$round,$flow,$mode]="$o $t"
        done
    done
done

summary() { # summary FLOW
    local flow=$1 args=() r
    for r in $(seq 1 "$ROUNDS"); do args+=("${R[$r,$flow,together]}" "${R[$r,$flow,ours]}" "${R[$r,$flow,ts]}"); done
    python3 - "$flow" "${args[@]}" <<'PY'
import statistics, sys
flow, vals = sys.argv[1], sys.argv[2:]
rounds = [vals[i:i + 3] for i in range(0, len(vals), 3)]
tog = [tuple(map(float, r[0].split())) for r in rounds]
ours = [float(r[1].split()[0]) for r in rounds]
ts = [float(r[2].split()[1]) for r in rounds]
m = statistics.median
print(f"| {flow} | {m(o for o, _ in tog):.0f} | {m(t for _, t in tog):.0f} | "
      f"**{m(o / t for o, t in tog):.2f}** | {m(ours):.0f} | {m(ts):.0f} | {m(ours) / m(ts):.2f} |")
PY
}

echo
echo "pgflow against pgflow-TS $PEER_TS_VERSION (pgmq $PGMQ_VERSION): $(nproc) cores, PostgreSQL $PG_MAJOR, defaults on both sides (pgflow: workflow_events all, preloaded), pgflow's worker cycle $OURS_CYCLE, $WORKERS workers per side, ${DURATION} s x $ROUNDS rounds, medians"
echo
echo "| flow | together: pgflow tasks/s | together: pgflow-TS tasks/s | together: ratio | alone: pgflow | alone: pgflow-TS | alone: ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|"
summary seq
summary map
