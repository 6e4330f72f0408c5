#!/usr/bin/env bash
# Crash and soak tier: kill -9 recovery (tests/crash/crash_test.py) then the redelivery soak
# (tests/crash/soak_test.py), each on a cluster of its own.
#   CRASH_CYCLES  kill/restart cycles (default 3; the long tier runs 20)
#   SOAK_SECONDS  length of the soak (default 30; the long tier runs 600)
# Last line: "crash: N passed, M failed" (N, M: checks); non-zero exit status on any failure.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../../scripts/common.sh"
set +e
ensure_python_modules >/dev/null 2>&1 || true

passed=0
failed=0
for t in crash_test soak_test; do
    out=$(mktemp)
    python3 -u "$HERE/$t.py" 2>&1 | tee "$out"
    line=$(grep -E "^$t: [0-9]+ passed, [0-9]+ failed" "$out" | tail -1)
    if [ -z "$line" ]; then
        echo "$t did not finish"
        failed=$((failed + 1))
    else
        p=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')
        f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
        passed=$((passed + p)); failed=$((failed + f))
    fi
    rm -f "$out"
done
echo "crash: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
