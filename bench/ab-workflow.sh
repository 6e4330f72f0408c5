#!/usr/bin/env bash
# The workflow task path of two builds, interleaved: this tree against an earlier commit.
#
#   bash bench/ab-workflow.sh ee27c4c            # 4 rounds of old, new (then new, old) ...
#   ROUNDS=2 ONLY='^seq-8-all$' DURATION=15 bash bench/ab-workflow.sh HEAD~3
#
# Builds the commit (a worktree under /tmp, its own target directory) and this tree as
# packages, then installs each in turn (the library is moved into place, never copied over a
# loaded one) and runs bench/workflow.sh on it, alternating which goes first, so that a drift
# of the machine hits both alike. Prints each run's rows, then the mean tasks/s of each build
# per scenario and their ratio (new / old).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
OLD_REV=${1:?usage: bench/ab-workflow.sh <commit>}
ROUNDS=${ROUNDS:-4}
export ONLY=${ONLY:-'^(seq-8-all|map-8-off)$'} DURATION=${DURATION:-15}
WORK=/tmp/pgflow-ab
as_root rm -rf "$WORK/old" "$WORK/oldpkg" "$WORK/newpkg"
mkdir -p "$WORK"
git -C "$REPO_ROOT" worktree prune
git -C "$REPO_ROOT" worktree add -q --force "$WORK/old" "$OLD_REV"
say "building $OLD_REV and this tree (release packages)"
(cd "$WORK/old" && CARGO_TARGET_DIR="$REPO_ROOT/target/ab-old" cargo pgrx package --pg-config "$PG_CONFIG" \
    "${PG_FEATURES[@]}" --out-dir "$WORK/oldpkg" >"$WORK/old.log" 2>&1) || { tail -20 "$WORK/old.log"; exit 1; }
(cd "$REPO_ROOT" && cargo pgrx package --pg-config "$PG_CONFIG" "${PG_FEATURES[@]}" --out-dir "$WORK/newpkg" \
    >"$WORK/new.log" 2>&1) || { tail -20 "$WORK/new.log"; exit 1; }
git -C "$REPO_ROOT" worktree remove --force "$WORK/old"

LIB=$("$PG_CONFIG" --pkglibdir) EXT="$("$PG_CONFIG" --sharedir)/extension"
use() {
    as_root cp "$WORK/$1pkg$LIB/pgflow.so" "$LIB/pgflow.so.ab" && as_root mv "$LIB/pgflow.so.ab" "$LIB/pgflow.so"
    as_root cp "$WORK/$1pkg$EXT"/pgflow* "$EXT"/
}
: >"$WORK/rows"
for ((i = 0; i < ROUNDS; i++)); do
    order="old new"; [ $((i % 2)) = 1 ] && order="new old"
    for build in $order; do
        use "$build"
        BENCH_NO_INSTALL=1 bash "$REPO_ROOT/bench/workflow.sh" 2>/dev/null | grep -E '^\| (seq|map) ' \
            | sed "s/^/$build /" | tee -a "$WORK/rows"
    done
done
use new
python3 - "$WORK/rows" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    build, rest = line.split(" ", 1)
    cells = [c.strip() for c in rest.strip().strip("|").split("|")]
    runs.setdefault("-".join(cells[:3]), {}).setdefault(build, []).append(float(cells[4]))
print("| scenario | old tasks/s (mean, sd) | new tasks/s (mean, sd) | new / old |")
print("|---|---|---|---|")
for name, b in runs.items():
    o, n = b.get("old", [0]), b.get("new", [0])
    sd = lambda x: statistics.stdev(x) if len(x) > 1 else 0
    print(f"| {name} | {statistics.mean(o):.0f} ± {sd(o):.0f} | {statistics.mean(n):.0f} ± {sd(n):.0f} "
          f"| {statistics.mean(n) / statistics.mean(o):.2f} |")
PY
