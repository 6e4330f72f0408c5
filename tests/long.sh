#!/usr/bin/env bash
# The long tier of pgflow's reliability tests, in one command (about 15 minutes):
#   isolation specs on a cluster of their own, 20 kill -9 cycles, and a 10-minute soak.
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
stop_cluster "$ISO_DIR"

"$HERE/crash/run.sh"; crash_rc=$?

echo "long tier: isolation $([ $iso_rc -eq 0 ] && echo passed || echo FAILED)," \
     "crash ($CRASH_CYCLES cycles) and soak ($SOAK_SECONDS s) $([ $crash_rc -eq 0 ] && echo passed || echo FAILED)"
[ $iso_rc -eq 0 ] && [ $crash_rc -eq 0 ]
