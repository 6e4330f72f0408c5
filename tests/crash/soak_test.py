#!/usr/bin/env python3
"""Soak and redelivery: steady load with consumers that "crash" (never ack) on 10% of their
reads, a 1-second visibility timeout and max_retries 2, so that messages are redelivered and
some exhaust their deliveries and land in the dead-letter queue. One message in a hundred is
"poison": consumers never ack it, so it must reach the DLQ after exactly 3 deliveries.

Checks, against client-side ledgers (a send logged after its commit returned, a delivery and
an ack after theirs did):
1. every sent message ends acked (deleted) or in the DLQ, exactly one of the two, and the
   queue is empty once producers stop and consumers catch up;
2. no (msg_id, read_ct) is delivered or acked twice, and no message is acked twice;
3. read_ct never exceeds max_retries + 1; dead-lettered messages had exactly max_retries + 1
   deliveries; every poison message is in the DLQ;
4. the queue table stays bounded: dead tuples and total size of pgflow.messages (and the DLQ)
   are reported before and after VACUUM at the end, VACUUM leaves no dead tuples, and sizes
   sampled after a VACUUM every tenth of the run are no bigger in its last third than in its
   first (at most 1.5 times + 512 kB): a table that grows with time fails.

Environment: SOAK_SECONDS (default 30), SOAK_DIR (/tmp/pgflow-soak), SOAK_PORT (5454),
SOAK_SEED (random).
"""

import os
import random
import sys
import threading
import time
from collections import Counter

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, os.path.dirname(__file__))
from harness import Cluster, Results, env_int, log  # noqa: E402

QUEUE = "soak"
VT = 1
MAX_RETRIES = 2
SKIP = 0.10
POISON = 0.01
PRODUCERS = 2
CONSUMERS = 3
MAX_BACKLOG = 3000   # producers wait while more messages than this are live
TABLES = ("pgflow.messages", "pgflow.dlq", "pgflow.archive")


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}           # msg_id -> poison?
        self.deliveries = []     # (msg_id, read_ct)
        self.acks = []           # (msg_id, read_ct)
        self.stale = 0


def producer(cluster, ledger, stop, rng):
    batches = 0
    with cluster.connect() as conn:
        while not stop.is_set():
            batches += 1
            # Back-pressure: if consumers fall behind (a slow machine), wait for them, so that
            # the table's size measures bloat rather than an ever-growing backlog.
            while batches % 20 == 0 and not stop.is_set() and conn.execute(
                    "SELECT count(*) > %s FROM pgflow.messages", (MAX_BACKLOG,)).fetchone()[0]:
                time.sleep(0.1)
            k = rng.choice([1, 5, 10])
            poison = [rng.random() < POISON for _ in range(k)]
            ids = [r[0] for r in conn.execute(
                "SELECT * FROM pgflow.send_batch(%s, %s::jsonb[])",
                (QUEUE, [Jsonb({"poison": p}) for p in poison])).fetchall()]
            with ledger.lock:
                ledger.sent.update(zip(ids, poison))
            time.sleep(0.005 + rng.random() * 0.01)


def consumer(cluster, ledger, stop, rng):
    with cluster.connect() as conn:
        while not stop.is_set():
            rows = conn.execute("SELECT msg_id, read_ct, (message->>'poison')::boolean FROM pgflow.read(%s, %s, 10)",
                                (QUEUE, VT)).fetchall()
            with ledger.lock:
                ledger.deliveries.extend((i, rc) for i, rc, _p in rows)
            if not rows:
                time.sleep(0.02)
            for msg_id, read_ct, poison in rows:
                if poison or rng.random() < SKIP:
                    continue  # the consumer "crashes" before acking: the lease runs out
                ok = conn.execute("SELECT pgflow.delete(%s, %s::bigint, %s)", (QUEUE, msg_id, read_ct)).fetchone()[0]
                with ledger.lock:
                    if ok:
                        ledger.acks.append((msg_id, read_ct))
                    else:
                        ledger.stale += 1


def table_stats(conn):
    conn.execute("SELECT pg_stat_clear_snapshot()")
    out = {}
    for t in TABLES:
        schema, name = t.split(".")
        live, dead = conn.execute(
            "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
            (schema, name)).fetchone()
        size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (t,)).fetchone()[0]
        out[t] = (live, dead, size)
    return out


def heap_and_indexes(conn):
    return conn.execute("SELECT pg_relation_size('pgflow.messages'), pg_indexes_size('pgflow.messages')").fetchone()


def show(label, stats):
    for t, (live, dead, size) in stats.items():
        log(f"{label:<28} {t:<16} live {live:>7}  dead {dead:>7}  total size {size / 1024:>9.0f} kB")


def vacuum(conn):
    for t in TABLES:
        conn.execute(f"VACUUM {t}")


def main():
    seconds = env_int("SOAK_SECONDS", 30)
    seed = env_int("SOAK_SEED", random.randrange(1 << 30))
    rng = random.Random(seed)
    res = Results()
    cluster = Cluster(os.environ.get("SOAK_DIR", "/tmp/pgflow-soak"), env_int("SOAK_PORT", 5454), "pgflow_soak")
    log(f"soak test: {seconds} s, vt {VT} s, max_retries {MAX_RETRIES}, {SKIP:.0%} of reads never acked, "
        f"{POISON:.0%} poison messages, seed {seed}")
    cluster.start_fresh()
    try:
        run(cluster, seconds, rng, res)
    except Exception as e:
        res.check("soak harness ran to the end", False, repr(e))
    finally:
        cluster.stop()
        if res.failed and cluster.library_changed():
            log(f"note: {cluster.library_changed()}")
    print(f"soak_test: {res.passed} passed, {res.failed} failed")
    sys.exit(1 if res.failed else 0)


def run(cluster, seconds, rng, res):
    ledger = Ledger()
    admin = cluster.connect()
    admin.execute("SELECT pgflow.create_queue(%s, max_retries => %s, retry_delay_ms => 0)", (QUEUE, MAX_RETRIES))
    stop_prod, stop_cons = threading.Event(), threading.Event()
    threads = [threading.Thread(target=producer, args=(cluster, ledger, stop_prod, random.Random(rng.random())))
               for _ in range(PRODUCERS)]
    threads += [threading.Thread(target=consumer, args=(cluster, ledger, stop_cons, random.Random(rng.random())))
                for _ in range(CONSUMERS)]
    for t in threads:
        t.start()

    # Early in the run: the size the table settles at under this load, after VACUUM.
    t0 = time.time()
    time.sleep(min(10, max(seconds / 3, 1)))
    vacuum(admin)
    early = table_stats(admin)
    show(f"after {time.time() - t0:.0f} s, VACUUM", early)
    # Every tenth of the run (at least 10 s apart): VACUUM and sample the sizes, heap and
    # indexes apart, so that growth over time shows.
    every = max(10.0, seconds / 10)
    samples = [(time.time() - t0, early["pgflow.messages"][2], heap_and_indexes(admin))]
    while time.time() - t0 + every <= seconds:
        time.sleep(every)
        vacuum(admin)
        samples.append((time.time() - t0, table_stats(admin)["pgflow.messages"][2], heap_and_indexes(admin)))
        t, size, (heap, idx) = samples[-1]
        log(f"after {t:.0f} s, VACUUM            pgflow.messages  heap {heap // 1024:>6} kB, "
            f"indexes {idx // 1024:>6} kB, total {size // 1024:>6} kB")
    time.sleep(max(0.0, seconds - (time.time() - t0)))
    stop_prod.set()
    for t in threads[:PRODUCERS]:
        t.join()
    with ledger.lock:
        log(f"producers stopped after {time.time() - t0:.0f} s: {len(ledger.sent)} sent, "
            f"{len(ledger.deliveries)} deliveries, {len(ledger.acks)} acks so far")

    # Consumers catch up: poison and skipped messages need a few lease expiries to settle.
    deadline = time.time() + 60
    while time.time() < deadline:
        left = admin.execute("SELECT count(*) FROM pgflow.messages").fetchone()[0]
        if left == 0:
            break
        time.sleep(0.5)
    stop_cons.set()
    for t in threads[PRODUCERS:]:
        t.join()

    admin.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.2)  # let the other backends' statistics reach shared memory
    before = table_stats(admin)
    show("end of run, before VACUUM", before)
    vacuum(admin)
    after = table_stats(admin)
    show("end of run, after VACUUM", after)

    with ledger.lock:
        sent, deliveries, acks, stale = dict(ledger.sent), list(ledger.deliveries), list(ledger.acks), ledger.stale
    live = admin.execute("SELECT msg_id, read_ct FROM pgflow.messages").fetchall()
    dlq_rows = admin.execute("SELECT msg_id, attempts FROM pgflow.dlq WHERE queue_name = %s", (QUEUE,)).fetchall()
    dlq = Counter(i for i, _a in dlq_rows)
    acked = Counter(i for i, _rc in acks)
    n_poison = sum(sent.values())
    log(f"{len(sent)} sent ({n_poison} poison), {len(deliveries)} deliveries "
        f"({len(deliveries) - len(sent)} redeliveries), {len(acks)} acks, {stale} stale acks refused, "
        f"{len(dlq_rows)} dead-lettered")

    res.check("soak: queue empty once producers stopped and consumers caught up", not live,
              f"{len(live)} left, e.g. {live[:5]}")
    wrong = [i for i in sent if acked[i] + dlq[i] != 1]
    res.check("soak: every sent message ended acked or in the DLQ, exactly one of the two", not wrong,
              f"{len(wrong)} messages, e.g. {[(i, acked[i], dlq[i]) for i in wrong[:10]]}")
    unknown = [i for i in list(acked) + list(dlq) if i not in sent]
    res.check("soak: nothing acked or dead-lettered that was not sent", not unknown, f"{unknown[:10]}")
    dup_del = [d for d, c in Counter(deliveries).items() if c > 1]
    dup_ack = [d for d, c in Counter(acks).items() if c > 1]
    res.check("soak: no (msg_id, read_ct) delivered twice or acked twice", not dup_del and not dup_ack,
              f"deliveries {dup_del[:10]} acks {dup_ack[:10]}")
    over = [(i, rc) for i, rc in deliveries if rc > MAX_RETRIES + 1]
    bad_attempts = [(i, a) for i, a in dlq_rows if a != MAX_RETRIES + 1]
    res.check(f"soak: read_ct never above max_retries + 1 = {MAX_RETRIES + 1}; DLQ entries had exactly that many",
              not over and not bad_attempts, f"over {over[:10]} dlq attempts {bad_attempts[:10]}")
    poison_ok = [i for i, p in sent.items() if p and dlq[i] != 1]
    res.check(f"soak: every poison message ({n_poison}) is in the DLQ", not poison_ok and n_poison > 0,
              f"missing {poison_ok[:10]}" if poison_ok else "no poison message was sent")
    redelivered = len(deliveries) - len(sent)
    res.check("soak: leases expired and messages were redelivered", redelivered > 0, "no redeliveries")

    m_live, m_dead, m_size = after["pgflow.messages"]
    res.check("soak: VACUUM leaves no dead tuples in pgflow.messages", m_dead == 0, f"{m_dead} dead tuples")
    # Bounded: under the same load, the table (after VACUUM) is no bigger late in the run than
    # early in it, give or take; a table that grows with time would fail this.
    third = max(1, len(samples) // 3)
    first_max = max(size for _t, size, _hi in samples[:third])
    last_max = max(size for _t, size, _hi in samples[-third:])
    bound = int(1.5 * first_max) + 512 * 1024
    idx_first, idx_last = samples[0][2][1], samples[-1][2][1]
    res.check(f"soak: pgflow.messages stays bounded under load (after VACUUM: at most {first_max // 1024} kB "
              f"in the first third of the run, {last_max // 1024} kB in the last; indexes {idx_first // 1024} kB "
              f"then {idx_last // 1024} kB; {m_size // 1024} kB once drained)",
              last_max <= bound, f"grew beyond {bound // 1024} kB")
    admin.close()


if __name__ == "__main__":
    main()
