#!/usr/bin/env bash
# Isolation specs: races between sessions, step by step, with pg_isolation_regress.
#   tests/isolation/run.sh [PORT [DB]]      (defaults: 5444 pgflow_iso)
# Runs against a running PostgreSQL (PGFLOW_PG, default 15) on 127.0.0.1:PORT (user postgres) with pgflow
# installed; creates database DB if it is missing. Workflow specs (flow-*.spec) are skipped,
# with a message, while the workflow layer (pgflow.start_flow) is not in the extension.
# Set ISOLATION_SPECS to run only some specs (names without .spec).
# Last line: "isolation: N passed, M failed"; exit status non-zero on any failure.
set -uo pipefail
PORT=${1:-5444}
DB=${2:-pgflow_iso}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PGBIN=/usr/lib/postgresql/${PGFLOW_PG:-15}/bin
REGRESS=$PGBIN/../lib/pgxs/src/test/isolation/pg_isolation_regress
OUT=${ISOLATION_OUTDIR:-$(mktemp -d /tmp/pgflow-isolation.XXXXXX)}
mkdir -p "$OUT"; chmod 777 "$OUT"

psql_db() { PGOPTIONS="-c client_min_messages=warning" "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -X -qAt -v ON_ERROR_STOP=1 "$@"; }

fail() { echo "$*" >&2; echo "isolation: 0 passed, 1 failed"; exit 1; }

if [ "$(psql_db -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" = 0 ]; then
    psql_db -d postgres -c "CREATE DATABASE \"$DB\"" || fail "could not create database $DB"
fi
psql_db -d "$DB" -c "CREATE EXTENSION IF NOT EXISTS pgflow" || fail "could not create extension pgflow in $DB"

if [ -n "${ISOLATION_SPECS:-}" ]; then
    specs=$ISOLATION_SPECS
else
    specs=$(cd "$HERE/specs" && ls queue-*.spec 2>/dev/null | sed 's/\.spec$//' | sort | tr '\n' ' ')
    has_flows=$(psql_db -d "$DB" -c "SELECT to_regprocedure('pgflow.start_flow(text,jsonb)') IS NOT NULL
                                        OR EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'start_flow'
                                                   AND pronamespace = 'pgflow'::regnamespace)")
    flow_specs=$(cd "$HERE/specs" && ls flow-*.spec 2>/dev/null | sed 's/\.spec$//' | sort | tr '\n' ' ')
    if [ "$has_flows" = t ]; then
        specs="$specs $flow_specs"
    elif [ -n "$flow_specs" ]; then
        echo "isolation: skipping workflow specs (pgflow.start_flow does not exist): $flow_specs"
    fi
fi

# shellcheck disable=SC2086
"$REGRESS" --use-existing --host=127.0.0.1 --port="$PORT" --user=postgres --dbname="$DB" \
    --inputdir="$HERE" --outputdir="$OUT" $specs 2>&1 | tee "$OUT/log"

# PostgreSQL 15 prints "test name ... ok", 18 prints "ok 1 - name" / "not ok 1 - name"
n_ok=$(grep -cE '^(ok|test) .*[^A-Z]ok( |$)|\.\.\. ok|^ok [0-9]' "$OUT/log" || true)
n_bad=$(grep -cE 'FAILED|\.\.\. failed|^not ok [0-9]' "$OUT/log" || true)
if [ -s "$OUT/regression.diffs" ]; then
    echo "differences (also in $OUT/regression.diffs):"
    head -200 "$OUT/regression.diffs"
fi
n_total=$(echo $specs | wc -w)
if [ $((n_ok + n_bad)) -ne "$n_total" ]; then
    n_bad=$((n_total - n_ok))
fi
[ "$n_bad" -eq 0 ] && [ -z "${ISOLATION_OUTDIR:-}" ] && rm -rf "$OUT"
echo "isolation: $n_ok passed, $n_bad failed"
[ "$n_bad" -eq 0 ]
