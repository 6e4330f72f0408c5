#!/usr/bin/env bash
# All of pgflow's tests, from inside out, on a fresh or prepared Debian 12 machine:
#   style     cargo fmt --check, cargo clippy -D warnings
#   unit      #[pg_test] functions in src/ (cargo pgrx test, its own cluster)
#   sql       pg_regress golden files in tests/pg_regress/
#   client    pytest over real connections, tests/client/
#   isolation pg_isolation_regress specs, tests/isolation/
#   crash     kill -9 mid-load and soak, tests/crash/ (short tier; tests/long.sh is the long one)
# Installs what is missing first. Prints one line per tier and a closing "N passed, N failed".
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
set +e

TEST_DIR=${PGFLOW_TEST_DIR:-/tmp/pgflow-test}
TEST_PORT=${PGFLOW_TEST_PORT:-5490}
TEST_DB=pgflow_test
ONLY=${PGFLOW_TEST_ONLY:-style unit sql client isolation crash}

passed=0
failed=0
failed_tiers=()
record() { # record TIER N_PASSED N_FAILED
    passed=$((passed + $2)); failed=$((failed + $3))
    [ "$3" -eq 0 ] || failed_tiers+=("$1")
    printf '%-10s %s passed, %s failed\n' "$1:" "$2" "$3" >> "$TEST_DIR.summary"
}
wants() { [[ " $ONLY " == *" $1 "* ]]; }

set -e
ensure_tools
install_extension
set +e
rm -f "$TEST_DIR.summary"
cd "$REPO_ROOT"

if wants style; then
    say "style: cargo fmt --check and cargo clippy -D warnings"
    cargo fmt --check; fmt_rc=$?
    cargo clippy --release --features pg15 -- -D warnings > "$TEST_DIR.clippy.log" 2>&1; clippy_rc=$?
    grep -E "^(warning|error)" -A5 "$TEST_DIR.clippy.log" | head -40
    if [ $fmt_rc -eq 0 ] && [ $clippy_rc -eq 0 ]; then record style 1 0; else record style 0 1; fi
fi

say "starting a PostgreSQL 15 test cluster in $TEST_DIR on port $TEST_PORT"
# With Rust backtraces on, an error raised through pgflow's Rust code would carry one in its
# DETAIL unless pgflow strips it; the tests check that none does, so the server runs with them on.
RUST_BACKTRACE=1 start_cluster "$TEST_DIR" "$TEST_PORT" "$TEST_DB" || { echo "could not start the test cluster" >&2; exit 1; }
export PGFLOW_TEST_DSN="host=127.0.0.1 port=$TEST_PORT user=postgres dbname=$TEST_DB"
psql_test() { runuser -u postgres -- "$PGBIN/psql" -h "$TEST_DIR" -p "$TEST_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_test -d "$TEST_DB" -c "CREATE EXTENSION pgflow" >/dev/null

if wants sql; then
    say "sql: pg_regress golden files"
    tests=$(cd tests/pg_regress/sql && ls *.sql 2>/dev/null | sed 's/\.sql$//' | sort | tr '\n' ' ')
    if [ -n "$tests" ]; then
        out=$(mktemp -d); chmod 777 "$out"
        psql_test -d postgres -c "DROP DATABASE IF EXISTS pgflow_regress" -c "CREATE DATABASE pgflow_regress"
        # shellcheck disable=SC2086
        "$PGBIN/../lib/pgxs/src/test/regress/pg_regress" --use-existing --host=127.0.0.1 --port="$TEST_PORT" \
            --user=postgres --dbname=pgflow_regress --inputdir=tests/pg_regress --outputdir="$out" $tests \
            | tee "$out/log"
        n_ok=$(grep -cE '^(ok|test) .* ok|^ok ' "$out/log" || true)
        n_bad=$(grep -cE 'FAILED|failed \(ignored\)' "$out/log" || true)
        [ -f "$out/regression.diffs" ] && cat "$out/regression.diffs"
        record sql "$n_ok" "$n_bad"
    fi
fi

if wants client; then
    say "client: pytest over real connections"
    python3 -m pytest tests/client -q -p no:cacheprovider --junitxml="$TEST_DIR.client.xml" 2>&1 | tail -40
    read -r n_ok n_bad < <(python3 - "$TEST_DIR.client.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    r = ET.parse(sys.argv[1]).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    t, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    print(t - f - e - sk, f + e)
except Exception:
    print(0, 1)
PY
)
    record client "$n_ok" "$n_bad"
fi

if wants isolation; then
    if [ -x tests/isolation/run.sh ]; then
        say "isolation: pg_isolation_regress specs"
        tests/isolation/run.sh "$TEST_PORT" pgflow_iso 2>&1 | tee "$TEST_DIR.isolation.log"
        line=$(grep -E '^isolation: [0-9]+ passed, [0-9]+ failed' "$TEST_DIR.isolation.log" | tail -1)
        read -r n_ok n_bad < <(echo "$line" | sed -E 's/^isolation: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/;t;s/.*/0 1/')
        record isolation "${n_ok:-0}" "${n_bad:-1}"
    fi
fi

stop_cluster "$TEST_DIR"

if wants crash; then
    if [ -x tests/crash/run.sh ]; then
        say "crash: kill -9 recovery and soak (short tier)"
        tests/crash/run.sh 2>&1 | tee "$TEST_DIR.crash.log"
        line=$(grep -E '^crash: [0-9]+ passed, [0-9]+ failed' "$TEST_DIR.crash.log" | tail -1)
        read -r n_ok n_bad < <(echo "$line" | sed -E 's/^crash: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/;t;s/.*/0 1/')
        record crash "${n_ok:-0}" "${n_bad:-1}"
    fi
fi

if wants unit; then
    say "unit: #[pg_test] functions (cargo pgrx test)"
    pgrx_dir=/tmp/pgflow-pgrx-test
    as_root mkdir -p "$pgrx_dir"; as_root chown postgres:postgres "$pgrx_dir"
    cargo pgrx test pg15 --runas postgres --pgdata "$pgrx_dir/data" 2>&1 | tee "$TEST_DIR.unit.log" | grep -E "^test |test result:|error" | tail -40
    n_ok=$(grep -E '^test result:' "$TEST_DIR.unit.log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
    n_bad=$(grep -E '^test result:' "$TEST_DIR.unit.log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
    if ! grep -q '^test result: ok' "$TEST_DIR.unit.log"; then n_bad=$((n_bad > 0 ? n_bad : 1)); fi
    record unit "$n_ok" "$n_bad"
fi

say "summary"
cat "$TEST_DIR.summary"
[ ${#failed_tiers[@]} -eq 0 ] || echo "failing tiers: ${failed_tiers[*]}"
echo "pgflow: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
