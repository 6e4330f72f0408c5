#!/usr/bin/env python3
"""Crash recovery: kill -9 the server mid-load, restart it, reconcile against client ledgers.

Each cycle runs producers and consumers (threads, one connection each) on a fresh queue.
Clients write down only what the server confirmed:

* a send is logged after its COMMIT returned (msg_id and a unique key in the body); a send
  whose COMMIT got no answer is "uncertain": it may or may not exist, but never twice;
* a delivery (msg_id, read_ct) is logged after the reading transaction committed;
* an ack (delete or archive with the delivery's read_ct) is logged after it returned true.

At a random moment the postmaster and all its children get SIGKILL. The server is restarted
(crash recovery replays the WAL) and the ledgers are reconciled:

1. every logged send is in exactly one of: the queue, the archive, the dead-letter queue,
   or it was acked by delete (then it is nowhere); no message exists that nobody sent;
2. a logged archive ack is in the archive with the read_ct that was acked;
3. no delivery was logged twice, and no message was delivered again after a logged ack;
4. msg_ids are never reused: the queue's sequence is past every id ever handed out;
5. read_ct never exceeds max_retries + 1;
6. once the leases that were open at the crash expire, the messages are readable again:
   consumers drain the queue to empty (everything acked or dead-lettered);
7. workflow runs (when the workflow layer exists): each run's counters equal what its task
   rows say, and runs interrupted by the crash finish once workers come back;
8. pg_amcheck finds nothing wrong in the pgflow schema.

Environment: CRASH_CYCLES (default 3), CRASH_DIR (/tmp/pgflow-crash), CRASH_PORT (5453),
CRASH_SEED (random). CRASH_SELFTEST=1 deletes one message behind the harness's back after each
restart, to show that the reconciliation notices (the run must then fail).
"""

import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, os.path.dirname(__file__))
from harness import Cluster, Results, env_int, log  # noqa: E402
import workflow_load  # noqa: E402

VT = 2               # visibility timeout of consumer leases, seconds
MAX_RETRIES = 3      # deliveries after the first before dead-lettering
PRODUCERS = 2
CONSUMERS = 3


class Ledger:
    """What the clients know the server committed. Guarded by one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}             # key -> msg_id (COMMIT returned)
        self.uncertain_sends = set()   # keys whose COMMIT got no answer
        self.deliveries = []       # (msg_id, read_ct, key), reading COMMIT returned
        self.acked = {}            # msg_id -> (read_ct, 'delete' | 'archive')
        self.uncertain_acks = {}   # msg_id -> read_ct, ack sent but no answer
        self.stale_acks = 0        # acks refused because the lease had moved on
        self.nacks = Counter()     # outcome -> count
        self.killed = threading.Event()  # set just before the SIGKILL
        self.errors = []           # client errors before the kill: a bug, not the crash

    def error(self, who, e):
        if not self.killed.is_set():
            with self.lock:
                self.errors.append(f"{who}: {type(e).__name__}: {e}")


def producer(cluster, queue, ledger, stop, pid, rng):
    n = 0
    try:
        conn = cluster.connect()
    except psycopg.Error:
        return
    with conn:
        while not stop.is_set():
            k = rng.choice([1, 1, 1, 3, 10])
            keys = [f"{queue}-p{pid}-{n + i}" for i in range(k)]
            n += k
            try:
                with conn.transaction():
                    if k == 1:
                        ids = [conn.execute("SELECT pgflow.send(%s, %s, priority => %s)",
                                            (queue, Jsonb({"k": keys[0]}), rng.choice([0, 0, 1]))).fetchone()[0]]
                    else:
                        ids = [r[0] for r in conn.execute(
                            "SELECT * FROM pgflow.send_batch(%s, %s::jsonb[])",
                            (queue, [Jsonb({"k": key}) for key in keys])).fetchall()]
            except psycopg.Error as e:
                ledger.error("producer", e)
                with ledger.lock:
                    ledger.uncertain_sends.update(keys)
                return
            with ledger.lock:
                for key, i in zip(keys, ids):
                    ledger.sent[key] = i
            time.sleep(rng.random() * 0.004)


def consume_once(conn, queue, ledger, rng, vt, qty, p_skip, p_nack):
    """One read and the handling of what it returned. Returns the number of messages read."""
    with conn.transaction():
        rows = conn.execute("SELECT msg_id, read_ct, message->>'k' FROM pgflow.read(%s, %s, %s)",
                            (queue, vt, qty)).fetchall()
    with ledger.lock:
        ledger.deliveries.extend(rows)
    for msg_id, read_ct, _key in rows:
        r = rng.random()
        if r < p_skip:
            continue  # the consumer "dies": its lease expires
        if r < p_skip + p_nack:
            outcome = conn.execute("SELECT outcome FROM pgflow.nack(%s, %s, 'simulated failure', %s)",
                                   (queue, msg_id, read_ct)).fetchone()[0]
            with ledger.lock:
                ledger.nacks[outcome] += 1
            continue
        kind = "archive" if rng.random() < 0.3 else "delete"
        with ledger.lock:
            ledger.uncertain_acks[msg_id] = read_ct
        ok = conn.execute(f"SELECT pgflow.{kind}(%s, %s::bigint, %s)", (queue, msg_id, read_ct)).fetchone()[0]
        with ledger.lock:
            del ledger.uncertain_acks[msg_id]
            if ok:
                ledger.acked[msg_id] = (read_ct, kind)
            else:
                ledger.stale_acks += 1
    return len(rows)


def consumer(cluster, queue, ledger, stop, rng):
    try:
        conn = cluster.connect()
    except psycopg.Error:
        return
    with conn:
        while not stop.is_set():
            try:
                if consume_once(conn, queue, ledger, rng, VT, rng.choice([1, 5]), 0.1, 0.1) == 0:
                    time.sleep(0.01)
            except psycopg.Error as e:
                ledger.error("consumer", e)
                return


def reconcile(cluster, queue, ledger, res, label, final):
    with cluster.connect() as conn:
        qid, seq_last = conn.execute(
            "SELECT queue_id, pg_sequence_last_value(msg_seq) FROM pgflow.queues WHERE queue_name = %s",
            (queue,)).fetchone()
        live = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT msg_id, read_ct, message->>'k' FROM pgflow.messages WHERE queue_id = %s", (qid,))}
        archived = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT msg_id, read_ct, message->>'k' FROM pgflow.archive WHERE queue_id = %s", (qid,))}
        dlq_rows = conn.execute(
            "SELECT msg_id, attempts, message->>'k' FROM pgflow.dlq WHERE queue_name = %s", (queue,)).fetchall()
    dlq = Counter(r[0] for r in dlq_rows)
    dlq_attempts = {r[0]: r[1] for r in dlq_rows}
    keys_of = {}
    for rows in (live.items(), archived.items()):
        for i, (_rc, k) in rows:
            keys_of[i] = k
    for i, _a, k in dlq_rows:
        keys_of[i] = k

    with ledger.lock:
        sent = dict(ledger.sent)
        uncertain = set(ledger.uncertain_sends)
        deliveries = list(ledger.deliveries)
        acked = dict(ledger.acked)
        uncertain_acks = dict(ledger.uncertain_acks)
    delivered_keys = {i: k for i, _rc, k in deliveries}

    lost, dup, wrong_archive = [], [], []
    for key, i in sent.items():
        places = (i in live) + (i in archived) + dlq[i]
        if i in acked and acked[i][1] == "delete":
            if places != 0:
                dup.append((i, "acked by delete but still present"))
        elif i in acked:
            if not (i in archived and archived[i][0] == acked[i][0] and places == 1):
                wrong_archive.append(i)
        elif places == 0 and i not in uncertain_acks:
            lost.append(i)
        elif places > 1:
            dup.append((i, f"in {places} places"))
    res.check(f"{label}: every committed send is in exactly one place (queue, archive, DLQ) or was acked",
              not lost and not dup and not wrong_archive,
              f"lost={lost[:10]} duplicated={dup[:10]} archive mismatches={wrong_archive[:10]}")

    known_keys = set(sent) | uncertain
    phantoms = [i for i, k in keys_of.items() if k not in known_keys]
    per_key = Counter(keys_of.values())
    twice = [k for k in uncertain if per_key[k] > 1]
    res.check(f"{label}: no message exists that was not sent; uncertain sends exist at most once",
              not phantoms and not twice, f"phantoms={phantoms[:10]} twice={twice[:10]}")

    seen = Counter((i, rc) for i, rc, _k in deliveries)
    repeated = [d for d, c in seen.items() if c > 1]
    after_ack = [(i, rc) for i, rc, _k in deliveries if i in acked and rc > acked[i][0]]
    res.check(f"{label}: no delivery (msg_id, read_ct) handed out twice; nothing delivered after its ack",
              not repeated and not after_ack, f"repeated={repeated[:10]} after_ack={after_ack[:10]}")

    max_id = max(list(sent.values()) + [i for i, _rc, _k in deliveries] + [0])
    res.check(f"{label}: msg_ids never reused (sequence at {seq_last} >= highest id handed out {max_id})",
              (seq_last or 0) >= max_id, f"sequence went back to {seq_last}")

    over = [i for i, rc, _k in deliveries if rc > MAX_RETRIES + 1]
    over += [i for i, (rc, _k) in live.items() if rc > MAX_RETRIES + 1]
    over += [i for i, a in dlq_attempts.items() if a > MAX_RETRIES + 1]
    res.check(f"{label}: read_ct never above max_retries + 1 = {MAX_RETRIES + 1}", not over, f"{over[:10]}")

    if final:
        res.check(f"{label}: queue drained to empty after the crash (expired leases readable again)",
                  not live, f"{len(live)} messages left, e.g. {sorted(live.items())[:5]}")
        unkeyed = [i for i in delivered_keys if i not in keys_of and i not in acked and i not in uncertain_acks]
        res.check(f"{label}: every delivered message ended acked, archived or dead-lettered",
                  not unkeyed, f"{unkeyed[:10]}")
    return live


def drain(cluster, queue, ledger, rng, deadline_s=60):
    """Workers come back: read everything with ack, until the queue is empty."""
    t_end = time.time() + deadline_s
    with cluster.connect() as conn:
        qid = conn.execute("SELECT queue_id FROM pgflow.queues WHERE queue_name = %s", (queue,)).fetchone()[0]
        while time.time() < t_end:
            n = consume_once(conn, queue, ledger, rng, 30, 50, 0.0, 0.0)
            if n == 0:
                left, next_vt = conn.execute(
                    "SELECT count(*), extract(epoch FROM min(vt) - clock_timestamp()) FROM pgflow.messages "
                    "WHERE queue_id = %s", (qid,)).fetchone()
                if left == 0:
                    return True
                time.sleep(min(max(float(next_vt or 0.1), 0.05), 1.0))
    return False


def run_cycle(cluster, cycle, rng, res, flows):
    queue = f"crash_c{cycle}"
    with cluster.connect() as conn:
        conn.execute("SELECT pgflow.create_queue(%s, max_retries => %s, retry_delay_ms => 0)", (queue, MAX_RETRIES))
    ledger = Ledger()
    stop = threading.Event()
    threads = [threading.Thread(target=producer, args=(cluster, queue, ledger, stop, p, random.Random(rng.random())))
               for p in range(PRODUCERS)]
    threads += [threading.Thread(target=consumer, args=(cluster, queue, ledger, stop, random.Random(rng.random())))
                for _ in range(CONSUMERS)]
    wf = workflow_load.Load(cluster, cycle, rng) if flows else None
    if wf:
        threads += wf.threads(stop)
    for t in threads:
        t.start()
    load_s = rng.uniform(2.0, 6.0)
    time.sleep(load_s)
    ledger.killed.set()
    if wf:
        wf.killed.set()
    pid, kids = cluster.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    log(f"cycle {cycle}: SIGKILL to postmaster {pid} and {kids} children after {load_s:.1f} s of load: "
        f"{len(ledger.sent)} sends committed, {len(ledger.uncertain_sends)} uncertain, "
        f"{len(ledger.deliveries)} deliveries, {len(ledger.acked)} acks, {ledger.stale_acks} stale acks refused, "
        f"nacks {dict(ledger.nacks)}" + (f"; workflow: {wf.summary()}" if wf else ""))
    recovery_s = cluster.start_after_crash()
    log(f"cycle {cycle}: restarted, crash recovery took {recovery_s:.1f} s")

    errors = ledger.errors + (wf.errors if wf else [])
    res.check(f"cycle {cycle}: no client got an error before the kill", not errors, "; ".join(errors[:5]))
    label = f"cycle {cycle} after restart"
    if os.environ.get("CRASH_SELFTEST") == "1":
        # Prove the reconciliation has teeth: lose one committed, unacked message on purpose.
        with cluster.connect() as conn:
            gone = conn.execute(
                "DELETE FROM pgflow.messages WHERE (queue_id, msg_id) = (SELECT queue_id, min(msg_id) "
                "FROM pgflow.messages WHERE queue_id = (SELECT queue_id FROM pgflow.queues WHERE queue_name = %s) "
                "GROUP BY queue_id) RETURNING msg_id", (queue,)).fetchone()
        log(f"cycle {cycle}: CRASH_SELFTEST deleted message {gone}; the checks below must fail")
    reconcile(cluster, queue, ledger, res, label, final=False)
    if wf:
        wf.check_counters(res, label)
    ok = drain(cluster, queue, ledger, rng)
    res.check(f"cycle {cycle}: consumers drained the queue within 60 s", ok, "messages still present")
    reconcile(cluster, queue, ledger, res, f"cycle {cycle} after drain", final=True)
    if wf:
        wf.finish_and_check(res, f"cycle {cycle}")
    ok, out = cluster.amcheck()
    res.check(f"cycle {cycle}: pg_amcheck reports nothing on schema pgflow", ok, out[:2000])


def main():
    cycles = env_int("CRASH_CYCLES", 3)
    seed = env_int("CRASH_SEED", random.randrange(1 << 30))
    rng = random.Random(seed)
    cluster = Cluster(os.environ.get("CRASH_DIR", "/tmp/pgflow-crash"), env_int("CRASH_PORT", 5453), "pgflow_crash")
    res = Results()
    log(f"crash test: {cycles} cycles, seed {seed} (CRASH_SEED={seed} repeats the random choices)")
    t0 = time.time()
    cluster.start_fresh()
    flows = workflow_load.available(cluster)
    if not flows:
        res.skip("workflow runs across crashes", "pgflow.start_flow does not exist (workflow layer not installed)")
    else:
        workflow_load.define(cluster)
    try:
        for cycle in range(1, cycles + 1):
            run_cycle(cluster, cycle, rng, res, flows)
    except Exception as e:  # a harness failure is a failure, not a crash of the harness
        res.check("crash harness ran to the end", False, repr(e))
    finally:
        cluster.stop()
        if res.failed and cluster.library_changed():
            log(f"note: {cluster.library_changed()}")
    log(f"crash test: {res.passed} checks passed, {res.failed} failed in {time.time() - t0:.0f} s")
    print(f"crash_test: {res.passed} passed, {res.failed} failed")
    sys.exit(1 if res.failed else 0)


if __name__ == "__main__":
    main()
