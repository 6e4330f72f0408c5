#!/usr/bin/env bash
# Queue benchmark: pgflow's queue API against the same row operations written as plain SQL on
# tables of the same shape, in the same cluster. Prints one markdown table on stdout; progress
# and per-run figures go to stderr.
#
#   bash bench/run.sh                      # 2 pairs of 10-second runs per comparison (~7 min)
#   BENCH_PAIRS=3 BENCH_SECONDS=20 bash bench/run.sh
#   BENCH_ONLY="single_c8 notify_c8" bash bench/run.sh   # some rows only
#   BENCH_KEEP=1 bash bench/run.sh         # leave the cluster running afterwards (psql -h DIR -p PORT bench)
#   BENCH_SQL="ALTER FUNCTION ..." bash bench/run.sh   # SQL run after setup, to try a variant
#
# Each comparison alternates its two sides (A, B, A, B, ...); every run starts after a VACUUM of
# the message tables and a CHECKPOINT, with the WAL statistics reset. Throughput counts units
# really archived (rows added to the archive table), not pgbench transactions.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"

DIR=${BENCH_DIR:-/tmp/pgflow-bench}
PORT=${BENCH_PORT:-5450}
DB=bench
PAIRS=${BENCH_PAIRS:-2}
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

# run_one SCRIPT CLIENTS ARCHIVE_TABLE: prints "units_per_second wal_bytes_per_unit"
run_one() {
    local script=$1 clients=$2 table=$3 before after wal out tps n units
    psql_ -c "VACUUM pgflow.messages, plain.messages" -c "CHECKPOINT" >/dev/null
    before=$(psql_ -c "SELECT count(*) FROM $table")
    psql_ -c "SELECT pg_stat_reset_shared('wal')" >/dev/null
    # The plain side gets the planner settings pgflow pins in its functions (no sequential scan)
    # and no sort, so that whatever the statistics say its claim is an ordered scan of the
    # delivery-order index, as pgflow's is.
    local opts=""
    case $script in plain_*) opts="-c enable_seqscan=off -c enable_sort=off -c jit=off" ;; esac
    out=$(as_root runuser -u postgres -- env PGOPTIONS="$opts" "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n \
            -M prepared -c "$clients" -j 2 -T "$SECS" -D pid=0 -D prc=0 -f "$Q/$script" "$DB" 2>&1) || {
        echo "$out" >&2; echo "pgbench failed on $script" >&2; exit 1; }
    if grep -qE "aborted|number of failed transactions: [1-9]" <<<"$out"; then
        echo "$out" >&2; echo "clients aborted or transactions failed in $script" >&2; exit 1
    fi
    sleep 1   # let the exiting backends flush their WAL statistics
    wal=$(psql_ -c "SELECT wal_bytes FROM pg_stat_wal")
    after=$(psql_ -c "SELECT count(*) FROM $table")
    tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)
    n=$(grep -oP 'number of transactions actually processed: \K[0-9]+' <<<"$out")
    units=$((after - before))
    [ "$units" -gt 0 ] || { echo "$out" >&2; echo "no unit archived by $script" >&2; exit 1; }
    python3 -c "import sys; t,n,u,w=map(float,sys.argv[1:]); print(f'{t*u/n:.1f} {w/u:.0f}')" \
        "$tps" "$n" "$units" "$wal"
}

set_notify() { psql_ -c "SELECT pgflow.alter_queue('bench', notify => $1)" >/dev/null; }

# compare ID CLIENTS A_SCRIPT A_TABLE A_PREP B_SCRIPT B_TABLE B_PREP
compare() {
    local id=$1 clients=$2 a=$3 at=$4 ap=$5 b=$6 bt=$7 bp=$8 r
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $id "* ]]; then return; fi
    for pair in $(seq 1 "$PAIRS"); do
        eval "$ap"; r=$(run_one "$a" "$clients" "$at"); echo "$id A $r" >>"$RESULTS"
        echo "  $id pair $pair  A $a: $r" >&2
        eval "$bp"; r=$(run_one "$b" "$clients" "$bt"); echo "$id B $r" >>"$RESULTS"
        echo "  $id pair $pair  B $b: $r" >&2
    done
}

PGF=pgflow.archive
PLN=plain.archive
say "running: $PAIRS pairs of ${SECS}s per comparison" >&2
for c in 1 8; do
    compare "single_c$c" "$c" pgflow_single.sql $PGF : plain_single.sql $PLN :
done
for c in 1 8; do
    compare "batch_c$c" "$c" pgflow_batch.sql $PGF : plain_batch.sql $PLN :
done
for c in 1 8; do
    compare "ackread_c$c" "$c" pgflow_ack_read.sql $PGF : plain_single.sql $PLN :
done
compare notify_c8 8 pgflow_single.sql $PGF "set_notify true" pgflow_single.sql $PGF "set_notify false"
set_notify false

python3 - "$RESULTS" "$PAIRS" "$SECS" <<'PY'
import statistics, sys
from collections import defaultdict
runs = defaultdict(lambda: {"A": [], "B": []})
for line in open(sys.argv[1]):
    cid, side, rate, wal = line.split()
    runs[cid][side].append((float(rate), float(wal)))
pairs, secs = sys.argv[2], sys.argv[3]
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
print(f"| workload | clients | A | A per s | B | B per s | A/B throughput (median of {pairs} pairs) "
      f"| WAL/unit A | WAL/unit B | WAL A/B | target | met |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for cid, work, clients, unit, an, bn, target, walb in rows:
    A, B = runs[cid]["A"], runs[cid]["B"]
    if not A or not B:
        continue
    ratios = [a[0] / b[0] for a, b in zip(A, B)]
    walr = [a[1] / b[1] for a, b in zip(A, B)]
    r, wr = statistics.median(ratios), statistics.median(walr)
    ok = r >= target and (walb is None or wr <= walb)
    tgt = f">= {target:.2f}" + (f", WAL <= {walb:.2f}" if walb else "")
    print(f"| {work} | {clients} | {an} | {fmt(statistics.median(x[0] for x in A))} {unit} | {bn} "
          f"| {fmt(statistics.median(x[0] for x in B))} {unit} | {r:.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)}) | {fmt(statistics.median(x[1] for x in A))} B "
          f"| {fmt(statistics.median(x[1] for x in B))} B | {wr:.2f} | {tgt} | {'yes' if ok else 'no'} |")
print()
print(f"{pairs} alternated pairs of {secs}-second pgbench runs (-n -M prepared -j 2) per row; "
      "throughput and WAL figures are medians per side, the ratio is the median of the per-pair ratios. "
      "WAL/unit: pg_stat_wal.wal_bytes after a reset, divided by messages archived.")
PY
