#!/usr/bin/env bash
# The long tier of pgflow's reliability tests, in one command (about 20 minutes):
#   isolation specs on a cluster of their own, a 5-minute fuzz of every public function,
#   20 kill -9 cycles, and a 10-minute soak.
# Override with CRASH_CYCLES / SOAK_SECONDS. Exit status non-zero on any failure.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../scripts/common.sh"
set +e
export CRASH_CYCLES=${CRASH_CYCLES:-20}
export SOAK_SECONDS=${SOAK_SECONDS:-600}
ISO_DIR=${LONG_ISO_DIR:-/tmp/pgflow-long-iso}
ISO_PORT=${LONG_ISO_PORT:-5455}

start_cluster "$ISO_DIR" "$ISO_PORT" pgflow_iso
"$HERE/isolation/run.sh" "$ISO_PORT" pgflow_iso; iso_rc=$?
# the fuzz test, longer and with a seed of its own (PGFLOW_FUZZ_SEED to replay one)
PGFLOW_FUZZ_SECONDS=${PGFLOW_FUZZ_SECONDS:-300} PGFLOW_FUZZ_SEED=${PGFLOW_FUZZ_SEED:-$RANDOM} \
PGFLOW_TEST_DSN="host=127.0.0.1 port=$ISO_PORT user=postgres dbname=pgflow_iso" \
    python3 -m pytest "$HERE/client/test_fuzz.py" -q -s -p no:cacheprovider; fuzz_rc=$?
stop_cluster "$ISO_DIR"

"$HERE/crash/run.sh"; crash_rc=$?

echo "long tier: isolation $([ $iso_rc -eq 0 ] && echo passed || echo FAILED)," \
     "fuzz $([ $fuzz_rc -eq 0 ] && echo passed || echo FAILED)," \
     "crash ($CRASH_CYCLES cycles) and soak ($SOAK_SECONDS s) $([ $crash_rc -eq 0 ] && echo passed || echo FAILED)"
[ $iso_rc -eq 0 ] && [ $fuzz_rc -eq 0 ] && [ $crash_rc -eq 0 ]
