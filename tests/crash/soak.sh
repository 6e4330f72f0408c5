#!/usr/bin/env bash
# The soak alone: tests/crash/soak.sh  (SOAK_SECONDS, default 30).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 -u "$HERE/soak_test.py"
