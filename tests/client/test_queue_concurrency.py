"""Many consumers, each its own session, draining one queue while producers fill it: every
message is delivered exactly once while leases are live, none is lost, nobody deadlocks."""

import json
import random
import threading
import time

from conftest import connect

MESSAGES = 20_000
PRODUCERS = 2
CONSUMERS = 8
BATCH = 1_000
VT = 300  # far longer than the test: no lease may expire, so no message may be seen twice


def test_eight_consumers_twenty_thousand_messages(conn, queue):
    deliveries = []          # (consumer, msg_id, read_ct, producer, seq), appended under lock
    lock = threading.Lock()
    errors = []
    producers_done = threading.Event()
    stop = threading.Event()

    def produce(p):
        c = connect()
        try:
            per = MESSAGES // PRODUCERS
            for start in range(0, per, BATCH):
                body = [json.dumps({"p": p, "seq": s}) for s in range(start, min(start + BATCH, per))]
                ids = [r[0] for r in c.execute("SELECT pgflow.send_batch(%s, %s::jsonb[])", (queue, body))]
                assert ids == sorted(ids) and len(ids) == len(body)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(("producer", p, repr(e)))
        finally:
            c.close()

    def consume(n):
        c = connect()
        rnd = random.Random(n)
        held = []  # (msg_id, read_ct) of the last batch, for ack_and_read consumers
        try:
            while not stop.is_set():
                qty = rnd.randint(10, 50)
                if n % 2 == 0:
                    rows = c.execute("SELECT msg_id, read_ct, message FROM pgflow.read(%s, %s, %s)",
                                     (queue, VT, qty)).fetchall()
                    if rows:
                        acked = c.execute("SELECT pgflow.archive(%s, %s::bigint[], %s::int[])",
                                          (queue, [r[0] for r in rows], [r[1] for r in rows])).fetchall()
                        assert sorted(a[0] for a in acked) == sorted(r[0] for r in rows)
                else:
                    # ack the previous batch and lease the next one in one call
                    rows = c.execute(
                        "SELECT msg_id, read_ct, message FROM pgflow.ack_and_read(%s, %s::bigint[], %s, %s, true, %s::int[])",
                        (queue, [h[0] for h in held], VT, qty, [h[1] for h in held])).fetchall()
                    held = [(r[0], r[1]) for r in rows]
                with lock:
                    deliveries.extend((n, r[0], r[1], r[2]["p"], r[2]["seq"]) for r in rows)
                if not rows:
                    if producers_done.is_set() and not held:
                        # nothing visible: done once nothing is left to deliver
                        if c.execute("SELECT visible FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()[0] == 0:
                            break
                    time.sleep(0.01)
            if held:
                c.execute("SELECT pgflow.archive(%s, %s::bigint[], %s::int[])",
                          (queue, [h[0] for h in held], [h[1] for h in held]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(("consumer", n, repr(e)))
        finally:
            c.close()

    consumers = [threading.Thread(target=consume, args=(n,)) for n in range(CONSUMERS)]
    producers = [threading.Thread(target=produce, args=(p,)) for p in range(PRODUCERS)]
    start = time.monotonic()
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(60)
    producers_done.set()
    for t in consumers:
        t.join(max(1, 90 - (time.monotonic() - start)))
    stop.set()
    for t in consumers:
        t.join(5)
    assert not any(t.is_alive() for t in consumers + producers), "a session hung"
    assert errors == []

    # exactly once: each message delivered one time, on its first delivery
    ids = [d[1] for d in deliveries]
    assert len(ids) == MESSAGES
    assert len(set(ids)) == MESSAGES
    assert {d[2] for d in deliveries} == {1}
    # none lost: every (producer, seq) sent came out
    assert {(d[3], d[4]) for d in deliveries} == {(p, s) for p in range(PRODUCERS) for s in range(MESSAGES // PRODUCERS)}
    # everyone took part
    assert len({d[0] for d in deliveries}) == CONSUMERS
    # FIFO per producer within each consumer's view: a producer's messages are leased in send order
    for n in range(CONSUMERS):
        for p in range(PRODUCERS):
            seqs = [d[4] for d in deliveries if d[0] == n and d[3] == p]
            assert seqs == sorted(seqs)
    st = conn.execute("SELECT depth, archived, total_sent FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()
    assert st == (0, MESSAGES, MESSAGES)
