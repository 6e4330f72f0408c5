#!/usr/bin/env bash
# All of pgflow's tests, from inside out, on a fresh or prepared Debian 12 machine, for every
# supported PostgreSQL version (15 and 18; PGFLOW_PG=18 runs one version only):
#   style     cargo fmt --check, cargo clippy -D warnings (library and tests)
#   unit      #[pg_test] functions in src/ (cargo pgrx test, its own cluster)
#   sql       pg_regress golden files in tests/pg_regress/
#   client    pytest over real connections, tests/client/
#   isolation pg_isolation_regress specs, tests/isolation/
#   upgrade   every released version updated to this one, tests/upgrade/
#   package   the Debian package built, installed without cargo and tested, scripts/package.sh
#   crash     kill -9 mid-load and soak, tests/crash/ (short tier; tests/long.sh is the long one)
# Installs what is missing first. Prints one line per tier and a closing "N passed, N failed".
# PGFLOW_TEST_ONLY="client upgrade" runs only those tiers; PGFLOW_CLIENT_TESTS="tests/client/test_notify.py"
# runs only those files (or pytest node ids) in the client tier.
set -uo pipefail
asked_version=${PGFLOW_PG:-}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
set +e

if [ -z "$asked_version" ]; then
    # No version asked for: run the whole suite once per supported version, one after the
    # other (each builds, installs and tests against its own server), and add them up.
    total_ok=0; total_bad=0; lines=()
    for v in ${PGFLOW_TEST_VERSIONS:-$PG_SUPPORTED}; do
        log="/tmp/pgflow-test-pg$v.log"
        PGFLOW_PG=$v bash "${BASH_SOURCE[0]}" 2>&1 | tee "$log"
        last=$(grep -E '^pgflow \(PostgreSQL [0-9]+\): [0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
        if [ -z "$last" ]; then
            lines+=("PostgreSQL $v: did not finish (see $log)"); total_bad=$((total_bad + 1))
        else
            lines+=("$(grep -E '^pg[0-9]+ [a-z]+: +[0-9]+ passed, [0-9]+ failed' "$log")")
            n_ok=$(echo "$last" | sed -E 's/.*: ([0-9]+) passed.*/\1/')
            n_bad=$(echo "$last" | sed -E 's/.* ([0-9]+) failed.*/\1/')
            total_ok=$((total_ok + n_ok)); total_bad=$((total_bad + n_bad))
        fi
    done
    say "summary of every version"
    printf '%s\n' "${lines[@]}"
    echo "pgflow: $total_ok passed, $total_bad failed"
    [ "$total_bad" -eq 0 ]
    exit
fi

TEST_DIR=${PGFLOW_TEST_DIR:-/tmp/pgflow-test-pg$PG_MAJOR}
TEST_PORT=${PGFLOW_TEST_PORT:-5490}
TEST_DB=pgflow_test
ONLY=${PGFLOW_TEST_ONLY:-style unit sql client isolation upgrade package crash}

passed=0
failed=0
failed_tiers=()
record() { # record TIER N_PASSED N_FAILED
    passed=$((passed + $2)); failed=$((failed + $3))
    [ "$3" -eq 0 ] || failed_tiers+=("$1")
    printf 'pg%s %-10s %s passed, %s failed\n' "$PG_MAJOR" "$1:" "$2" "$3" >> "$TEST_DIR.summary"
}
wants() { [[ " $ONLY " == *" $1 "* ]]; }
# pytest_tier TIER DIR [pytest args]: run a pytest folder, record its counts from the JUnit XML.
pytest_tier() {
    local tier=$1 dir=$2 n_ok n_bad
    shift 2
    python3 -m pytest "$dir" -q -p no:cacheprovider --junitxml="$TEST_DIR.$tier.xml" "$@" 2>&1 | tail -60
    read -r n_ok n_bad < <(python3 - "$TEST_DIR.$tier.xml" <<'PY'
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
    record "$tier" "$n_ok" "$n_bad"
}

set -e
ensure_tools
install_extension
set +e
rm -f "$TEST_DIR.summary"
cd "$REPO_ROOT"

if wants style; then
    say "style: cargo fmt --check and cargo clippy -D warnings"
    cargo fmt --check; fmt_rc=$?
    cargo clippy --release --all-targets "${PG_FEATURES[@]}" -- -D warnings > "$TEST_DIR.clippy.log" 2>&1; clippy_rc=$?
    grep -E "^(warning|error)" -A5 "$TEST_DIR.clippy.log" | head -40
    if [ $fmt_rc -eq 0 ] && [ $clippy_rc -eq 0 ]; then record style 1 0; else record style 0 1; fi
fi

say "starting a PostgreSQL $PG_MAJOR test cluster in $TEST_DIR on port $TEST_PORT"
# With Rust backtraces on, an error raised through pgflow's Rust code would carry one in its
# DETAIL unless pgflow strips it; the tests check that none does, so the server runs with them on.
RUST_BACKTRACE=1 start_cluster "$TEST_DIR" "$TEST_PORT" "$TEST_DB" || { echo "could not start the test cluster" >&2; exit 1; }
export PGFLOW_TEST_DSN="host=127.0.0.1 port=$TEST_PORT user=postgres dbname=$TEST_DB"
psql_test() { runuser -u postgres -- "$PGBIN/psql" -h "$TEST_DIR" -p "$TEST_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_test -d "$TEST_DB" -c "CREATE EXTENSION pgflow" >/dev/null

if wants sql; then
    say "sql: pg_regress golden files"
    run_pg_regress "$TEST_DIR" "$TEST_PORT"
    record sql "$REGRESS_OK" "$REGRESS_BAD"
fi

if wants client; then
    say "client: pytest over real connections"
    ensure_mermaid
    # shellcheck disable=SC2086 # word splitting wanted: several pytest arguments
    pytest_tier client ${PGFLOW_CLIENT_TESTS:-tests/client}
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

if wants upgrade; then
    say "upgrade: released versions updated to this one (catalog, data, dump, failed update)"
    # -s: the catalog comparison prints what it compared and any difference
    PGFLOW_PG_CONFIG="$PG_CONFIG" \
    PGFLOW_TEST_DSN="host=127.0.0.1 port=$TEST_PORT user=postgres dbname=postgres" \
        pytest_tier upgrade tests/upgrade -s
fi

stop_cluster "$TEST_DIR"

if wants package; then
    say "package: build the Debian package, install it without cargo, run the SQL tier against it"
    bash scripts/package.sh --test 2>&1 | tee "$TEST_DIR.package.log"
    line=$(grep -E '^package: [0-9]+ passed, [0-9]+ failed' "$TEST_DIR.package.log" | tail -1)
    read -r n_ok n_bad < <(echo "$line" | sed -E 's/^package: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/;t;s/.*/0 1/')
    record package "${n_ok:-0}" "${n_bad:-1}"
    # the package replaced the build's files with its own (the same build): nothing to restore
fi

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
    pgrx_dir=/tmp/pgflow-pgrx-test-pg$PG_MAJOR
    as_root mkdir -p "$pgrx_dir"; as_root chown postgres:postgres "$pgrx_dir"
    cargo pgrx test "pg$PG_MAJOR" "${PG_FEATURES[@]}" --runas postgres --pgdata "$pgrx_dir/data" 2>&1 | tee "$TEST_DIR.unit.log" | grep -E "^test |test result:|error" | tail -40
    n_ok=$(grep -E '^test result:' "$TEST_DIR.unit.log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
    n_bad=$(grep -E '^test result:' "$TEST_DIR.unit.log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
    if ! grep -q '^test result: ok' "$TEST_DIR.unit.log"; then n_bad=$((n_bad > 0 ? n_bad : 1)); fi
    record unit "$n_ok" "$n_bad"
    # cargo pgrx test installed its debug build: put the release build back, so that the demo
    # and the benchmarks that follow run what was tested above
    install_extension >/dev/null
fi

say "summary"
cat "$TEST_DIR.summary"
[ ${#failed_tiers[@]} -eq 0 ] || echo "failing tiers: ${failed_tiers[*]}"
echo "pgflow (PostgreSQL $PG_MAJOR): $passed passed, $failed failed"
[ "$failed" -eq 0 ]
