"""Retries, exponential backoff and the dead-letter queue, through real sessions.

A delivery is an attempt. nack reports a failed one; a lease that expires unanswered is a failed
one too. After max_retries + 1 deliveries without an ack the message moves to the DLQ, from
which it can be listed, retried as a new message, or purged.
"""

import random
import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import connect, unique_name, sqlstate, error_of


def read1(conn, q, vt=30):
    row = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, %s, 1)", (q, vt)).fetchone()
    return row


def nack(conn, q, msg_id, error=None, read_ct=None):
    """(outcome, attempt, seconds until visible (server clock), dlq_id)."""
    return conn.execute(
        """SELECT n.outcome, n.attempt, extract(epoch FROM n.visible_at - clock_timestamp())::float8, n.dlq_id
             FROM pgflow.nack(%s, %s, %s, %s) n""",
        (q, msg_id, error, read_ct),
    ).fetchone()


def make_visible(conn, q, msg_id):
    conn.execute("SELECT pgflow.set_vt(%s, %s, 0)", (q, msg_id))


def state(conn, q):
    """Everything a failed call must leave unchanged for queue q."""
    return (
        conn.execute(
            """SELECT m.msg_id, m.read_ct, m.vt, m.errors FROM pgflow.messages m
                 JOIN pgflow.queues qq USING (queue_id) WHERE qq.queue_name = %s ORDER BY 1""",
            (q,),
        ).fetchall(),
        conn.execute("SELECT dlq_id, attempts, errors FROM pgflow.dlq WHERE queue_name = %s ORDER BY 1", (q,)).fetchall(),
        conn.execute("SELECT * FROM pgflow.queues WHERE queue_name = %s", (q,)).fetchall(),
    )


# --- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_per_attempt_and_is_capped(conn, make_queue):
    q = make_queue(max_retries=5, retry_delay_ms=1000, max_retry_delay_ms=3000)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    expected = [1.0, 2.0, 3.0, 3.0]  # 1 s, 2 s, 4 s capped to 3 s, 8 s capped to 3 s
    for attempt, want in enumerate(expected, start=1):
        got_id, rc = read1(conn, q)
        assert (got_id, rc) == (msg, attempt)
        outcome, att, secs, dlq_id = nack(conn, q, msg, f"boom {attempt}", rc)
        assert (outcome, att, dlq_id) == ("retrying", attempt, None)
        assert want - 0.25 < secs <= want + 0.01, (attempt, secs)
        # not visible during the backoff
        assert read1(conn, q) is None
        make_visible(conn, q, msg)
    errors = conn.execute(
        "SELECT errors FROM pgflow.list_pending_messages(%s) WHERE msg_id = %s", (q, msg)
    ).fetchone()[0]
    assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
    assert [e["error"] for e in errors] == ["boom 1", "boom 2", "boom 3", "boom 4"]


def test_default_cap_is_one_hour(conn, make_queue):
    q = make_queue(retry_delay_ms=86_400_000)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    msg, rc = read1(conn, q)
    outcome, _, secs, _ = nack(conn, q, msg, "x", rc)
    assert outcome == "retrying"
    assert 3599 < secs <= 3600.01


def test_jitter_takes_off_up_to_its_fraction(conn, make_queue):
    q = make_queue(max_retries=100, retry_delay_ms=2000, retry_jitter=0.5)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    seen = []
    for _ in range(20):
        msg, rc = read1(conn, q)
        _, attempt, secs, _ = nack(conn, q, msg, None, rc)
        # first attempt: 2 s less up to half of it; later ones are capped by max (1 h), fine
        seen.append(secs / (2.0 * 2 ** (attempt - 1)))
        make_visible(conn, q, msg)
        if attempt >= 3:
            break
    for f in seen:
        assert 0.45 < f <= 1.0
    # three draws being identical would mean no jitter at all
    assert len({round(f, 4) for f in seen}) > 1


def test_zero_delay_retry_is_visible_at_once(conn, make_queue):
    q = make_queue(retry_delay_ms=0)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    msg, rc = read1(conn, q)
    assert nack(conn, q, msg, "again", rc)[0] == "retrying"
    assert read1(conn, q) == (msg, 2)


# --- stale nacks ---------------------------------------------------------------------------


def test_stale_read_ct_changes_nothing(conn, make_queue):
    q = make_queue(retry_delay_ms=0)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (msg, 1)  # lease expires at once
    assert read1(conn, q, vt=30) == (msg, 2)  # another consumer holds it now
    before = state(conn, q)
    outcome, attempt, secs, dlq_id = nack(conn, q, msg, "late", 1)
    assert (outcome, attempt, secs, dlq_id) == ("stale", 2, None, None)
    assert state(conn, q) == before
    # the current holder can still nack
    assert nack(conn, q, msg, "now", 2)[0] == "retrying"


def test_nack_after_ack_is_stale(conn, make_queue):
    q = make_queue()
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    _, rc = read1(conn, q)
    assert conn.execute("SELECT pgflow.archive(%s, %s, %s)", (q, msg, rc)).fetchone()[0] is True
    assert nack(conn, q, msg, "late", rc)[0] == "stale"
    msg2 = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    _, rc = read1(conn, q)
    assert conn.execute("SELECT pgflow.delete(%s, %s, %s)", (q, msg2, rc)).fetchone()[0] is True
    assert nack(conn, q, msg2, "late", rc)[0] == "stale"
    assert conn.execute("SELECT count(*) FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchone()[0] == 0


# --- dead-lettering ------------------------------------------------------------------------


def test_last_nack_dead_letters_with_every_error(conn, make_queue):
    q = make_queue(max_retries=3, retry_delay_ms=0)
    msg = conn.execute(
        "SELECT pgflow.send(%s, %s, 0, 7, %s)", (q, Jsonb({"job": 1}), Jsonb({"trace": "t1"}))
    ).fetchone()[0]
    for attempt in range(1, 5):
        assert read1(conn, q) == (msg, attempt)
        outcome, att, _, dlq_id = nack(conn, q, msg, f"failure {attempt}", attempt)
        assert att == attempt
        if attempt < 4:
            assert outcome == "retrying" and dlq_id is None
        else:
            assert outcome == "dead_lettered" and dlq_id is not None
    assert read1(conn, q) is None
    row = conn.execute(
        """SELECT dlq_id, queue_name, msg_id, message, headers, priority, attempts, last_error, errors
             FROM pgflow.list_dlq_messages(%s)""",
        (q,),
    ).fetchall()
    assert len(row) == 1
    d = row[0]
    assert d[:8] == (dlq_id, q, msg, {"job": 1}, {"trace": "t1"}, 7, 4, "failure 4")
    assert [e["error"] for e in d[8]] == [f"failure {i}" for i in range(1, 5)]
    assert [e["attempt"] for e in d[8]] == [1, 2, 3, 4]
    stats = conn.execute("SELECT depth, dead_lettered FROM pgflow.get_queue_stats(%s)", (q,)).fetchone()
    assert stats == (0, 1)


def test_max_retries_zero_dead_letters_at_first_failure(conn, make_queue):
    q = make_queue(max_retries=0)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    _, rc = read1(conn, q)
    outcome, attempt, secs, dlq_id = nack(conn, q, msg, "once", rc)
    assert (outcome, attempt, secs) == ("dead_lettered", 1, None)
    assert conn.execute("SELECT attempts FROM pgflow.dlq WHERE dlq_id = %s", (dlq_id,)).fetchone()[0] == 1


def test_expired_leases_count_as_failed_attempts(conn, make_queue):
    q = make_queue(max_retries=2)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    for attempt in (1, 2, 3):
        assert read1(conn, q, vt=0) == (msg, attempt)  # the consumer "dies": lease ends at once
    # the fourth read finds a message delivered max_retries + 1 times: to the DLQ, not delivered
    assert read1(conn, q) is None
    d = conn.execute(
        "SELECT msg_id, attempts, last_error, errors FROM pgflow.list_dlq_messages(%s)", (q,)
    ).fetchone()
    assert d[0] == msg and d[1] == 3
    assert "expired" in d[2]
    assert d[3][-1]["attempt"] == 3


def test_pop_dead_letters_an_exhausted_message_too(conn, make_queue):
    q = make_queue(max_retries=0)
    first = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (first, 1)
    second = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert conn.execute("SELECT msg_id FROM pgflow.pop(%s, 5)", (q,)).fetchall() == [(second,)]
    assert conn.execute("SELECT msg_id, attempts FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchall() == [(first, 1)]


def test_a_zero_lease_read_past_a_dead_letter_delivers_each_message_once(conn, make_queue):
    # With vt = 0 what a read delivered is visible again at once; the look that replaces a
    # dead-lettered message must not take it a second time (and dead-letter it).
    q = make_queue(max_retries=0)
    first = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (first, 1)
    second = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    third = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    rows = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 0, 5)", (q,)).fetchall()
    assert rows == [(second, 1), (third, 1)]
    assert conn.execute("SELECT msg_id FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchall() == [(first,)]
    assert conn.execute("SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues x USING (queue_id) "
                        "WHERE x.queue_name = %s", (q,)).fetchone()[0] == 2


def test_dead_lettered_message_skipped_in_favour_of_the_next(conn, make_queue):
    q = make_queue(max_retries=0)
    first = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (first, 1)
    second = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    # one read dead-letters the first and still returns the second
    assert read1(conn, q) == (second, 1)
    assert conn.execute("SELECT msg_id FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchall() == [(first,)]


def test_error_text_is_bounded(conn, make_queue):
    q = make_queue(max_retries=0)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    msg, rc = read1(conn, q)
    nack(conn, q, msg, "e" * 100_000, rc)
    last, errors = conn.execute(
        "SELECT last_error, errors FROM pgflow.list_dlq_messages(%s)", (q,)
    ).fetchone()
    assert len(last) < 2100 and last.endswith("(truncated)")
    assert len(errors[0]["error"]) < 2100


# --- DLQ management ------------------------------------------------------------------------


def _dead_letter_n(conn, q, n):
    ids = [r[0] for r in conn.execute(
        "SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({"i": i}) for i in range(n)])
    ).fetchall()]
    for row in conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, %s)", (q, n)).fetchall():
        assert nack(conn, q, row[0], "bad", row[1])[0] == "dead_lettered"
    return ids


def test_retry_dlq_message_gives_fresh_attempts(conn, make_queue):
    q = make_queue(max_retries=0)
    (old,) = _dead_letter_n(conn, q, 1)
    dlq_id = conn.execute("SELECT dlq_id FROM pgflow.list_dlq_messages(%s)", (q,)).fetchone()[0]
    new = conn.execute("SELECT pgflow.retry_dlq_message(%s)", (dlq_id,)).fetchone()[0]
    assert new != old
    assert conn.execute("SELECT count(*) FROM pgflow.dlq WHERE dlq_id = %s", (dlq_id,)).fetchone()[0] == 0
    row = conn.execute("SELECT msg_id, read_ct, message FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    assert row == (new, 1, {"i": 0})
    assert conn.execute("SELECT errors FROM pgflow.messages WHERE msg_id = %s AND queue_id = "
                        "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (new, q)).fetchone()[0] is None
    assert conn.execute("SELECT pgflow.delete(%s, %s, 1)", (q, new)).fetchone()[0] is True


def test_list_retry_all_and_purge(conn, make_queue):
    q1 = make_queue(max_retries=0)
    q2 = make_queue(max_retries=0)
    _dead_letter_n(conn, q1, 5)
    _dead_letter_n(conn, q2, 3)
    assert len(conn.execute("SELECT * FROM pgflow.list_dlq_messages(%s)", (q1,)).fetchall()) == 5
    assert len(conn.execute("SELECT * FROM pgflow.list_dlq_messages(%s, 2)", (q1,)).fetchall()) == 2
    everyone = conn.execute("SELECT queue_name FROM pgflow.list_dlq_messages(NULL, 100000)").fetchall()
    assert sum(1 for (n,) in everyone if n in (q1, q2)) == 8
    ids = [r[0] for r in conn.execute("SELECT dlq_id FROM pgflow.list_dlq_messages(%s)", (q1,)).fetchall()]
    assert ids == sorted(ids)  # oldest first
    assert conn.execute("SELECT dead_lettered FROM pgflow.get_queue_stats(%s)", (q1,)).fetchone()[0] == 5
    assert conn.execute("SELECT pgflow.retry_dlq(%s)", (q1,)).fetchone()[0] == 5
    assert conn.execute("SELECT dead_lettered, depth FROM pgflow.get_queue_stats(%s)", (q1,)).fetchone() == (0, 5)
    # FIFO kept: oldest dead-lettered first
    bodies = [r[0]["i"] for r in conn.execute("SELECT message FROM pgflow.read(%s, 30, 10)", (q1,)).fetchall()]
    assert bodies == [0, 1, 2, 3, 4]
    assert conn.execute("SELECT pgflow.retry_dlq(%s)", (q1,)).fetchone()[0] == 0
    assert conn.execute("SELECT pgflow.purge_dlq(%s)", (q2,)).fetchone()[0] == 3
    assert conn.execute("SELECT pgflow.purge_dlq(%s)", (q2,)).fetchone()[0] == 0


def test_purge_all_dlqs(make_conn):
    # purge_dlq(NULL) empties every queue's DLQ: use a private transaction and roll it back so
    # other tests' DLQ rows are untouched.
    c = make_conn(autocommit=False)
    q = unique_name("r")
    c.execute("SELECT pgflow.create_queue(%s, max_retries => 0)", (q,))
    _dead_letter_n(c, q, 2)
    total = c.execute("SELECT count(*) FROM pgflow.dlq").fetchone()[0]
    assert c.execute("SELECT pgflow.purge_dlq()").fetchone()[0] == total >= 2
    assert c.execute("SELECT count(*) FROM pgflow.dlq").fetchone()[0] == 0
    c.rollback()


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_has_specific_errors_and_changes_nothing(conn, make_queue):
    q = make_queue(max_retries=0)
    _dead_letter_n(conn, q, 1)
    waiting = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    before = state(conn, q)
    cases = [
        ("SELECT pgflow.retry_dlq_message(-1)", None, "42704"),
        ("SELECT pgflow.retry_dlq_message(9223372036854775807)", None, "42704"),
        ("SELECT pgflow.retry_dlq_message(NULL)", None, "22004"),
        ("SELECT pgflow.retry_dlq(%s)", (unique_name("none"),), "42704"),
        ("SELECT pgflow.retry_dlq(NULL)", None, "22004"),
        ("SELECT pgflow.purge_dlq('bad name;')", None, "22023"),
        ("SELECT pgflow.purge_dlq(%s)", ("x" * 49,), "42622"),
        ("SELECT * FROM pgflow.list_dlq_messages(%s, 0)", (q,), "22023"),
        ("SELECT * FROM pgflow.list_dlq_messages(%s, NULL)", (q,), "22004"),
        ("SELECT * FROM pgflow.nack(%s, 999999999, 'x')", (q,), "42704"),
        ("SELECT * FROM pgflow.nack(%s, 0, 'x')", (q,), "42704"),
        ("SELECT * FROM pgflow.nack(%s, -5, 'x')", (q,), "42704"),
        ("SELECT * FROM pgflow.nack(%s, NULL, 'x')", (q,), "22004"),
        ("SELECT * FROM pgflow.nack(%s, %s, 'x')", (q, waiting), "55000"),  # never delivered
        ("SELECT * FROM pgflow.nack(%s, 1, 'x')", (unique_name("none"),), "42704"),
        ("SELECT pgflow.alter_queue(%s, max_retries => -1)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, max_retries => 1000000)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_delay_ms => -5)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_delay_ms => 2000000000)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, max_retry_delay_ms => -1)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, max_retry_delay_ms => 2147483647)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_jitter => -0.1)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_jitter => 1.5)", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_jitter => 'NaN')", (q,), "22023"),
        ("SELECT pgflow.alter_queue(%s, retry_jitter => 'Infinity')", (q,), "22023"),
        ("SELECT pgflow.create_queue(%s, max_retries => -1)", (unique_name("r"),), "22023"),
        ("SELECT pgflow.create_queue(%s, retry_delay_ms => -1)", (unique_name("r"),), "22023"),
        ("SELECT pgflow.create_queue(%s, max_retries => NULL)", (unique_name("r"),), "22004"),
    ]
    for sql, params, code in cases:
        assert sqlstate(conn, sql, params) == code, sql
    assert state(conn, q) == before
    # nothing was created by the refused create_queue calls either
    e = error_of(conn, "SELECT pgflow.retry_dlq_message(-1)")
    assert "-1" in e.diag.message_primary


def test_retry_into_a_dropped_queue_fails_and_keeps_the_message(conn):
    q = unique_name("r")
    conn.execute("SELECT pgflow.create_queue(%s, max_retries => 0)", (q,))
    try:
        _dead_letter_n(conn, q, 1)
        dlq_id = conn.execute("SELECT dlq_id FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchone()[0]
        conn.execute("SELECT pgflow.drop_queue(%s)", (q,))
        # the DLQ row survives drop_queue
        assert len(conn.execute("SELECT * FROM pgflow.list_dlq_messages(%s)", (q,)).fetchall()) == 1
        e = error_of(conn, "SELECT pgflow.retry_dlq_message(%s)", (dlq_id,))
        assert e.sqlstate == "42704"
        assert q in e.diag.message_primary
        assert e.diag.message_hint
        assert sqlstate(conn, "SELECT pgflow.retry_dlq(%s)", (q,)) == "42704"
        assert conn.execute("SELECT count(*) FROM pgflow.dlq WHERE dlq_id = %s", (dlq_id,)).fetchone()[0] == 1
        # once a queue of that name exists again, the retry works
        conn.execute("SELECT pgflow.create_queue(%s)", (q,))
        new = conn.execute("SELECT pgflow.retry_dlq_message(%s)", (dlq_id,)).fetchone()[0]
        assert conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()[0] == new
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (q,))
        conn.execute("SELECT pgflow.purge_dlq(%s)", (q,))


# --- the invariant under concurrency -------------------------------------------------------


def test_every_message_ends_in_exactly_one_place(make_queue, conn):
    """Producers send; consumers read and randomly archive, delete, nack or abandon (let the
    lease expire). At the end each sent msg_id is in exactly one of: the queue, the archive, the
    DLQ, or the set of messages a consumer deleted (a client-side ledger)."""
    q = make_queue(max_retries=2, retry_delay_ms=0)
    n_producers, per_producer, n_consumers = 3, 300, 4
    sent, deleted = set(), set()
    lock = threading.Lock()
    producers_done = threading.Event()
    errors = []

    def producer(seed):
        try:
            with connect() as c:
                for i in range(per_producer // 10):
                    if i % 2:
                        ids = [r[0] for r in c.execute(
                            "SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({"s": seed, "i": i})] * 10)).fetchall()]
                    else:
                        ids = [c.execute("SELECT pgflow.send(%s, %s)", (q, Jsonb({"s": seed}))).fetchone()[0]
                               for _ in range(10)]
                    with lock:
                        sent.update(ids)
        except Exception as e:  # surfaced below
            errors.append(e)

    def consumer(seed):
        rnd = random.Random(seed)
        try:
            with connect() as c:
                idle_since = None
                while True:
                    rows = c.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 1, 5)", (q,)).fetchall()
                    if not rows:
                        if producers_done.is_set():
                            left = c.execute("SELECT depth FROM pgflow.get_queue_stats(%s)", (q,)).fetchone()[0]
                            if left == 0:
                                return
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > 20:
                            raise AssertionError("queue did not drain")
                        time.sleep(0.02)
                        continue
                    idle_since = None
                    for msg_id, rc in rows:
                        r = rnd.random()
                        if r < 0.35:
                            c.execute("SELECT pgflow.archive(%s, %s, %s)", (q, msg_id, rc))
                        elif r < 0.65:
                            if c.execute("SELECT pgflow.delete(%s, %s, %s)", (q, msg_id, rc)).fetchone()[0]:
                                with lock:
                                    deleted.add(msg_id)
                        elif r < 0.95:
                            c.execute("SELECT pgflow.nack(%s, %s, 'failed', %s)", (q, msg_id, rc))
                        elif r < 0.97:  # release this one, take another at once (at-most-once)
                            c.execute("SELECT pgflow.set_vt(%s, %s, 0, %s)", (q, msg_id, rc))
                            popped = c.execute("SELECT msg_id FROM pgflow.pop(%s, 1)", (q,)).fetchall()
                            with lock:
                                deleted.update(p[0] for p in popped)
                        # else: abandon, the lease expires in 1 s
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(n_producers)]
    consumers = [threading.Thread(target=consumer, args=(i,)) for i in range(n_consumers)]
    for t in threads + consumers:
        t.start()
    for t in threads:
        t.join()
    producers_done.set()
    for t in consumers:
        t.join(60)
    assert not errors, errors
    assert len(sent) == n_producers * per_producer

    qid = conn.execute("SELECT queue_id FROM pgflow.queues WHERE queue_name = %s", (q,)).fetchone()[0]
    live = {r[0] for r in conn.execute("SELECT msg_id FROM pgflow.messages WHERE queue_id = %s", (qid,))}
    archived = [r[0] for r in conn.execute("SELECT msg_id FROM pgflow.archive WHERE queue_id = %s", (qid,))]
    dead = [r[0] for r in conn.execute("SELECT msg_id FROM pgflow.dlq WHERE queue_name = %s", (q,))]
    assert len(archived) == len(set(archived)) and len(dead) == len(set(dead))
    places = [live, set(archived), set(dead), deleted]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not (places[i] & places[j]), (i, j, sorted(places[i] & places[j])[:5])
    assert set().union(*places) == sent
    assert dead, "with 30% nacks and max_retries 2, some messages must have been dead-lettered"
    stats = conn.execute("SELECT depth, archived, dead_lettered, total_sent FROM pgflow.get_queue_stats(%s)",
                         (q,)).fetchone()
    assert stats == (len(live), len(archived), len(dead), len(sent))


def test_every_attempt_leaves_its_entry_nacked_or_expired(conn, make_queue):
    """The error history of a message, and of its dead letter, has one entry per attempt: the
    nack's error, or "visibility timeout expired" with the time its lease ended when the
    consumer neither acked nor nacked (crashed). 0.1.0 recorded nacks and the last expiry
    only."""
    q = make_queue(max_retries=3, retry_delay_ms=0)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (msg, 1)               # 1: the consumer dies
    assert read1(conn, q) == (msg, 2)                     # 2: nacked
    assert nack(conn, q, msg, "boom 2", 2)[0] == "retrying"
    assert read1(conn, q, vt=0) == (msg, 3)               # 3: dies again
    assert read1(conn, q, vt=0) == (msg, 4)               # 4: and again, the last delivery
    # while it waits for its next read, attempts 1-3 are on the message
    errors = conn.execute("SELECT errors FROM pgflow.list_pending_messages(%s) WHERE msg_id = %s",
                          (q, msg)).fetchone()[0]
    assert [(e["attempt"], e["error"]) for e in errors] == [
        (1, "visibility timeout expired without ack or nack"), (2, "boom 2"),
        (3, "visibility timeout expired without ack or nack")]
    assert all(e["at"] for e in errors)
    # the next read finds it exhausted: dead-lettered with all four attempts, each once
    assert conn.execute("SELECT count(*) FROM pgflow.read_with_poll(%s, 30, 1, 0)", (q,)).fetchone()[0] == 0
    d = conn.execute("SELECT attempts, errors FROM pgflow.list_dlq_messages(%s)", (q,)).fetchone()
    assert d[0] == 4
    assert [e["attempt"] for e in d[1]] == [1, 2, 3, 4]
    assert [e["error"] for e in d[1]] == ["visibility timeout expired without ack or nack", "boom 2",
                                          "visibility timeout expired without ack or nack",
                                          "visibility timeout expired without ack or nack"]


def test_pop_dead_letters_with_the_last_expiry_entered_once(conn, make_queue):
    q = make_queue(max_retries=1)
    msg = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    assert read1(conn, q, vt=0) == (msg, 1)
    assert read1(conn, q, vt=0) == (msg, 2)
    assert conn.execute("SELECT count(*) FROM pgflow.pop(%s)", (q,)).fetchone()[0] == 0
    d = conn.execute("SELECT attempts, errors FROM pgflow.list_dlq_messages(%s)", (q,)).fetchone()
    assert d[0] == 2 and [e["attempt"] for e in d[1]] == [1, 2]
