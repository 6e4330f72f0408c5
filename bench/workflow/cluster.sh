# Sourced by bench/workflow.sh and bench/events.sh (after scripts/common.sh, with DIR, PORT and
# DB set): a throwaway cluster of their own, stopped on exit, with pgflow in database DB, and
# psql_ to run SQL there (PSQL_DB=other psql_ ... for another database).
say "starting a cluster in $DIR on port $PORT"
start_cluster "$DIR" "$PORT" "$DB"
trap 'stop_cluster "$DIR"' EXIT

psql_() { as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "${PSQL_DB:-$DB}" -v ON_ERROR_STOP=1 -qAtX "$@"; }
psql_ -c "CREATE EXTENSION pgflow"
# Queue-like tables churn: vacuum them often, as a busy deployment would (docs/workflows.md), so
# claims do not walk long runs of dead index entries left by completed tasks.
psql_ -c "ALTER SYSTEM SET autovacuum_naptime = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
for t in messages step_tasks step_states runs; do
    psql_ -c "ALTER TABLE pgflow.$t SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
                                        autovacuum_vacuum_cost_delay = 0)"
done
