#!/usr/bin/env bash
# Queue benchmark: pgflow's queue API against the same row operations written as plain SQL on
# tables of the same shape, in the same cluster. Prints one markdown table on stdout; progress
# and per-run figures go to stderr.
#
#   bash bench/run.sh                      # 5 interleaved runs of 10 s per comparison (~14 min)
#   BENCH_RUNS=9 BENCH_SECONDS=20 bash bench/run.sh
#   BENCH_ONLY="single_c8 notify_c8" bash bench/run.sh   # some rows only
#   BENCH_KEEP=1 bash bench/run.sh         # leave the cluster running afterwards (psql -h DIR -p PORT bench)
#   BENCH_SQL="ALTER FUNCTION ..." bash bench/run.sh   # SQL run after setup, to try a variant
#
# How the two sides of a comparison are measured, and why:
# - **Interleaved runs give the ratio.** In one pgbench run every client picks side A's or side
#   B's script at random for each lifecycle, so both sides run under the same disk and the same
#   load, mixed millisecond by millisecond. On these machines the time an fsync takes drifts by
#   2-3x within seconds; a commit-bound lifecycle drifts with it, and two separate runs, even
#   short ones alternated, differed by more than anything measured (per-pair ratios of 0.6 to
#   1.9 for two identical builds). A side's cost is the client time it took per unit archived
#   (its lifecycles times their mean latency, over the units it archived); the ratio is B's
#   cost over A's, A's throughput relative to B's. The row gives the median over the runs.
# - **Separate runs give WAL per unit and absolute rates**: two runs of each side alone, in the
#   order A B B A after a CHECKPOINT and a warm-up (so neither side is always the first to
#   write pages after the checkpoint), WAL being the insert position's advance during a run.
# Every run starts after a VACUUM of the message tables. Units are messages really archived
# (rows added to the side's archive), not pgbench transactions.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
bench_install

DIR=${BENCH_DIR:-/tmp/pgflow-bench}
PORT=${BENCH_PORT:-5450}
DB=bench
RUNS=${BENCH_RUNS:-5}
SECS=${BENCH_SECONDS:-10}
Q="$REPO_ROOT/bench/queue"
RESULTS=$(mktemp)

psql_() {
    as_root runuser -u postgres -- "$PGBIN/psql" -h "$DIR" -p "$PORT" -U postgres -d "$DB" \
        -qAtX -v ON_ERROR_STOP=1 "$@"
}

say "starting a cluster in $DIR on port $PORT" >&2
start_cluster "$DIR" "$PORT" "$DB"
if [ -n "${BENCH_KEEP:-}" ]; then
    trap 'rm -f "$RESULTS"' EXIT
else
    trap 'stop_cluster "$DIR"; rm -f "$RESULTS"' EXIT
fi
psql_ -f "$Q/setup.sql" >/dev/null
if [ -n "${BENCH_SQL:-}" ]; then psql_ -c "$BENCH_SQL" >/dev/null; fi

# Units archived so far by a side: its archive table, or one queue's rows of pgflow.archive.
units_sql() {
    case $1 in
        plain_*) echo "SELECT count(*) FROM plain.archive" ;;
        pgflow_notify_*) echo "SELECT count(*) FROM pgflow.archive WHERE queue_id = (SELECT queue_id FROM pgflow.queues WHERE queue_name = 'bench_notify')" ;;
        *) echo "SELECT count(*) FROM pgflow.archive WHERE queue_id = (SELECT queue_id FROM pgflow.queues WHERE queue_name = 'bench')" ;;
    esac
}

# pgbench CLIENTS SECONDS SCRIPT...: every session gets the planner settings pgflow pins for
# its statements (no sequential scan) and no sort, so that whatever the statistics say the
# plain claim is an ordered scan of the delivery-order index, as pgflow's is.
pgbench_() {
    local clients=$1 secs=$2 out
    shift 2
    local files=()
    for s in "$@"; do files+=(-f "$Q/$s@1"); done
    out=$(as_root runuser -u postgres -- env PGOPTIONS="-c enable_seqscan=off -c enable_sort=off -c jit=off" \
            "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c "$clients" -j 2 \
            -T "$secs" -D pid=0 -D prc=0 "${files[@]}" "$DB" 2>&1) || {
        echo "$out" >&2; echo "pgbench failed on $*" >&2; exit 1; }
    if grep -qE "aborted|number of failed transactions: [1-9]" <<<"$out"; then
        echo "$out" >&2; echo "clients aborted or transactions failed in $*" >&2; exit 1
    fi
    echo "$out"
}

# separate SCRIPT CLIENTS [SECONDS]: one side alone; prints "units_per_second wal_bytes_per_unit"
separate() {
    local script=$1 clients=$2 secs=${3:-$SECS} before after lsn wal out tps n units
    psql_ -c "VACUUM pgflow.messages, plain.messages" >/dev/null
    before=$(psql_ -c "$(units_sql "$script")")
    lsn=$(psql_ -c "SELECT pg_current_wal_insert_lsn()")
    out=$(pgbench_ "$clients" "$secs" "$script")
    wal=$(psql_ -c "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$lsn')")
    after=$(psql_ -c "$(units_sql "$script")")
    tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)
    n=$(grep -oP 'number of transactions actually processed: \K[0-9]+' <<<"$out")
    units=$((after - before))
    [ "$units" -gt 0 ] || { echo "$out" >&2; echo "no unit archived by $script" >&2; exit 1; }
    python3 -c "import sys; t,n,u,w=map(float,sys.argv[1:]); print(f'{t*u/n:.1f} {w/u:.0f}')" \
        "$tps" "$n" "$units" "$wal"
}

# interleaved A_SCRIPT B_SCRIPT CLIENTS: both sides in one run; prints "ratio a_per_s b_per_s",
# the ratio being B's client time per unit over A's.
interleaved() {
    local a=$1 b=$2 clients=$3 a0 b0 a1 b1 out
    psql_ -c "VACUUM pgflow.messages, plain.messages" >/dev/null
    a0=$(psql_ -c "$(units_sql "$a")"); b0=$(psql_ -c "$(units_sql "$b")")
    out=$(pgbench_ "$clients" "$SECS" "$a" "$b")
    a1=$(psql_ -c "$(units_sql "$a")"); b1=$(psql_ -c "$(units_sql "$b")")
    # Per script: "N transactions" and "latency average = X ms", in script order.
    PGBENCH_OUT="$out" python3 - "$((a1 - a0))" "$((b1 - b0))" "$SECS" <<'PY'
import os, re, sys
out = os.environ["PGBENCH_OUT"]
ua, ub, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
parts = out.split("SQL script ")[1:]
n = [int(re.search(r"- (\d+) transactions", p).group(1)) for p in parts]
lat = [float(re.search(r"latency average = ([0-9.]+) ms", p).group(1)) for p in parts]
if ua <= 0 or ub <= 0:
    sys.exit("a side archived nothing")
cost_a, cost_b = n[0] * lat[0] / ua, n[1] * lat[1] / ub
print(f"{cost_b / cost_a:.3f} {ua / secs:.1f} {ub / secs:.1f}")
PY
}

# compare ID CLIENTS A_SCRIPT B_SCRIPT
compare() {
    local id=$1 clients=$2 a=$3 b=$4 r
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $id "* ]]; then return; fi
    psql_ -c "CHECKPOINT" >/dev/null
    separate "$a" "$clients" 1 >/dev/null
    separate "$b" "$clients" 1 >/dev/null
    for side in A B B A; do
        local script=$a
        [ "$side" = A ] || script=$b
        r=$(separate "$script" "$clients"); echo "$id $side $r" >>"$RESULTS"
        echo "  $id alone  $side $script: $r" >&2
    done
    for run in $(seq 1 "$RUNS"); do
        r=$(interleaved "$a" "$b" "$clients"); echo "$id X $r" >>"$RESULTS"
        echo "  $id interleaved run $run: B/A cost $r (A, B per s)" >&2
    done
}

say "running: $RUNS interleaved runs of ${SECS}s per comparison, and each side alone once" >&2
for c in 1 8; do compare "single_c$c" "$c" pgflow_single.sql plain_single.sql; done
for c in 1 8; do compare "batch_c$c" "$c" pgflow_batch.sql plain_batch.sql; done
for c in 1 8; do compare "ackread_c$c" "$c" pgflow_ack_read.sql plain_single.sql; done
compare notify_c8 8 pgflow_notify_single.sql pgflow_single.sql

python3 - "$RESULTS" "$RUNS" "$SECS" <<'PY'
import statistics, sys
from collections import defaultdict
alone = defaultdict(dict)
mixed = defaultdict(list)
for line in open(sys.argv[1]):
    cid, side, *rest = line.split()
    if side == "X":
        mixed[cid].append(float(rest[0]))
    else:
        alone[cid].setdefault(side, []).append((float(rest[0]), float(rest[1])))
runs, secs = sys.argv[2], sys.argv[3]
rows = [
    # id, workload, clients, unit, pgflow side, baseline side, target ratio, WAL bound
    ("single_c1", "single-message lifecycle: send, read, archive (3 commits)", 1, "lifecycles/s",
     "pgflow", "plain SQL", 0.90, 1.10),
    ("single_c8", "single-message lifecycle: send, read, archive (3 commits)", 8, "lifecycles/s",
     "pgflow", "plain SQL", 0.90, 1.10),
    ("batch_c1", "batched lifecycle, 100 per statement: send_batch, read 100, archive array", 1, "msg/s",
     "pgflow", "plain SQL", 0.85, None),
    ("batch_c8", "batched lifecycle, 100 per statement: send_batch, read 100, archive array", 8, "msg/s",
     "pgflow", "plain SQL", 0.85, None),
    ("ackread_c1", "send + ack_and_read (2 commits) vs plain send, claim, archive (3 commits)", 1,
     "lifecycles/s", "pgflow", "plain SQL", 1.30, None),
    ("ackread_c8", "send + ack_and_read (2 commits) vs plain send, claim, archive (3 commits)", 8,
     "lifecycles/s", "pgflow", "plain SQL", 1.30, None),
    ("notify_c8", "single-message lifecycle, queue notify on vs off", 8, "lifecycles/s",
     "notify on", "notify off", 0.70, None),
]
def fmt(x): return f"{x:,.0f}"
print(f"| workload | clients | A | B | A/B throughput, interleaved (median of {runs} runs; all runs) "
      f"| A alone | B alone | WAL/unit A | WAL/unit B | WAL A/B | target | met |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for cid, work, clients, unit, an, bn, target, walb in rows:
    if not mixed[cid] or len(alone[cid]) < 2:
        continue
    ratios = mixed[cid]
    (ra, wa), (rb, wb) = ([statistics.mean(x) for x in zip(*alone[cid][s])] for s in "AB")
    r, wr = statistics.median(ratios), wa / wb
    ok = r >= target and (walb is None or wr <= walb)
    tgt = f">= {target:.2f}" + (f", WAL <= {walb:.2f}" if walb else "")
    print(f"| {work} | {clients} | {an} | {bn} | {r:.2f} ({', '.join(f'{x:.2f}' for x in sorted(ratios))}) "
          f"| {fmt(ra)} {unit} | {fmt(rb)} {unit} | {fmt(wa)} B | {fmt(wb)} B | {wr:.2f} | {tgt} "
          f"| {'yes' if ok else 'no'} |")
print()
print(f"Ratio: {runs} runs of {secs} s per row in which each pgbench client (-n -M prepared -j 2) "
      "picks A's or B's script at random for every lifecycle; a side's cost is its lifecycles times "
      "their mean latency per unit it archived, and the ratio is B's cost over A's. "
      f"Alone: {secs}-second runs of each side by itself in the order A B B A, after a CHECKPOINT and "
      "a warm-up; means of the two runs per side. WAL/unit is the WAL insert position's advance "
      "during a run divided by the units archived.")
PY
