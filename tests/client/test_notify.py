"""Real-time events through real sessions: NOTIFY at commit, one per channel per transaction,
LISTEN-driven consumers, message_due from the maintenance worker, and read_with_poll wake-ups.

The test cluster preloads pgflow and runs the maintenance worker in the test database
(scripts/common.sh start_cluster).
"""

import json
import threading
import time

import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from conftest import connect, unique_name


def listen(c, queue):
    """LISTEN on the queue's channel (a quoted identifier: the name keeps its case)."""
    channel = c.execute("SELECT pgflow.queue_channel(%s)", (queue,)).fetchone()[0]
    assert channel == f"pgflow.queue.{queue}"
    c.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return channel


def drain(c, timeout):
    """Notifications (channel, payload dict) arriving within timeout seconds."""
    out = []
    for n in c.notifies(timeout=timeout):
        out.append((n.channel, json.loads(n.payload), n.payload))
    return out


def wait_for(c, timeout, count=1):
    out = []
    for n in c.notifies(timeout=timeout, stop_after=count):
        out.append((n.channel, json.loads(n.payload), n.payload))
    return out


def sent_until(c, total, timeout=5):
    """The message_sent events arriving until their counts add up to total, batch envelopes
    opened, with the notifications that carried them. Several transactions' sends to a queue may
    arrive merged in one event (the announcer merges what it finds at once)."""
    events, notes = [], []
    deadline = time.monotonic() + timeout
    while sum(e["count"] for e in events) < total:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for n in c.notifies(timeout=left, stop_after=1):
            notes.append(n)
            p = json.loads(n.payload)
            events += [e for e in (p["events"] if p["event"] == "batch" else [p]) if e["event"] == "message_sent"]
    return events, notes


# --- who notifies ---------------------------------------------------------------------------


def test_send_with_notify_announces_whatever_the_queue_setting(conn, make_conn, make_queue):
    q = make_queue()  # notify off
    lis = make_conn()
    ch = listen(lis, q)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    assert drain(lis, 0.3) == []
    mid = conn.execute("SELECT pgflow.send_with_notify(%s, %s)", (q, Jsonb({"a": 1}))).fetchone()[0]
    got = wait_for(lis, 5)
    assert len(got) == 1
    channel, payload, _ = got[0]
    assert channel == ch
    assert payload == {"event": "message_sent", "queue": q, "first_msg_id": mid, "last_msg_id": mid, "count": 1}


def test_notify_queue_announces_every_send(conn, make_conn, make_queue):
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    a = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({})] * 5)).fetchall()]
    events, _ = sent_until(lis, 6)
    # two transactions: two events, or one if the announcer found both at once
    assert sum(e["count"] for e in events) == 6
    assert min(e["first_msg_id"] for e in events) == a
    assert max(e["last_msg_id"] for e in events) == ids[-1]
    assert all(e["queue"] == q for e in events) and len(events) in (1, 2)
    conn.execute("SELECT pgflow.alter_queue(%s, notify => false)", (q,))
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    assert drain(lis, 0.3) == []
    conn.execute("SELECT pgflow.alter_queue(%s, notify => true)", (q,))
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    assert len(wait_for(lis, 5)) == 1


# --- commit, rollback, one per transaction --------------------------------------------------


def test_notification_only_after_commit_and_never_after_rollback(make_conn, make_queue):
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    tx = make_conn(autocommit=False)
    tx.execute("SELECT pgflow.send(%s, '{}')", (q,))
    assert drain(lis, 0.3) == []  # not before commit
    tx.commit()
    assert len(wait_for(lis, 5)) == 1
    tx.execute("SELECT pgflow.send(%s, '{}')", (q,))
    tx.execute("SELECT pgflow.send_with_notify(%s, '{}')", (q,))
    tx.rollback()
    assert drain(lis, 0.5) == []


def test_rolled_back_savepoint_is_not_announced(make_conn, make_queue):
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    tx = make_conn(autocommit=False)
    tx.execute("SAVEPOINT s")
    tx.execute("SELECT pgflow.send(%s, '{}')", (q,))
    tx.execute("ROLLBACK TO SAVEPOINT s")
    kept = tx.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    tx.commit()
    got = wait_for(lis, 5)
    assert len(got) == 1
    assert got[0][1] == {"event": "message_sent", "queue": q, "first_msg_id": kept, "last_msg_id": kept,
                         "count": 1}


def test_ten_thousand_sends_in_one_transaction_notify_once(make_conn, make_queue):
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    tx = make_conn(autocommit=False)
    with tx.cursor() as cur:
        cur.executemany("SELECT pgflow.send(%s, %s)", [(q, Jsonb({"i": i})) for i in range(10_000)])
    first, last = tx.execute(
        "SELECT min(msg_id), max(msg_id) FROM pgflow.messages WHERE queue_id = "
        "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (q,)).fetchone()
    tx.commit()
    got = drain(lis, 1.0)
    assert len(got) == 1
    assert got[0][1] == {"event": "message_sent", "queue": q, "first_msg_id": first, "last_msg_id": last,
                         "count": 10_000}
    # and as one send_batch
    ids = [r[0] for r in tx.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({"i": i}) for i in range(10_000)]))]
    tx.commit()
    got = drain(lis, 1.0)
    assert len(got) == 1
    assert got[0][1]["count"] == 10_000
    assert (got[0][1]["first_msg_id"], got[0][1]["last_msg_id"]) == (ids[0], ids[-1])


def test_one_notification_per_channel(make_conn, make_queue):
    q1, q2 = make_queue(notify=True), make_queue(notify=True)
    lis = make_conn()
    listen(lis, q1)
    listen(lis, q2)
    tx = make_conn(autocommit=False)
    for _ in range(3):
        tx.execute("SELECT pgflow.send(%s, '{}')", (q1,))
        tx.execute("SELECT pgflow.send_with_notify(%s, '{}')", (q2,))
    tx.commit()
    got = drain(lis, 0.8)
    assert sorted(ch for ch, _, _ in got) == sorted([f"pgflow.queue.{q1}", f"pgflow.queue.{q2}"])
    assert all(p["count"] == 3 for _, p, _ in got)


def test_payload_bounded_for_longest_name(make_conn, make_queue):
    name = ("L" + unique_name("x") * 10)[:48]
    assert len(name.encode()) == 48
    q = make_queue(name=name, notify=True, retry_delay_ms=0)
    lis = make_conn()
    listen(lis, q)
    tx = make_conn(autocommit=False)
    tx.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({"pad": "p" * 100})] * 10_000))
    tx.commit()
    got = wait_for(lis, 5)
    # several events on one channel in one transaction: a retry due at once plus a send
    m, rc = tx.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    tx.commit()
    tx.execute("SELECT pgflow.nack(%s, %s, 'x', %s)", (q, m, rc))
    tx.execute("SELECT pgflow.send(%s, '{}')", (q,))
    tx.commit()
    got += drain(lis, 1.0)
    assert len(got) == 2
    for _, payload, raw in got:
        assert len(raw.encode()) < 8000
        assert payload.get("queue") == q or all(e["queue"] == q for e in payload["events"])
    batch = got[1][1]
    assert batch["event"] == "batch"
    assert sorted(e["event"] for e in batch["events"]) == ["message_due", "message_sent"]


# --- delayed messages and retries: message_due from the maintenance worker ------------------


def test_delayed_message_and_retry_announced_when_due(conn, make_conn, make_queue):
    q = make_queue(notify=True, retry_delay_ms=800)
    lis = make_conn()
    listen(lis, q)
    t0 = time.monotonic()
    conn.execute("SELECT pgflow.send(%s, '{}', 1)", (q,))
    got = wait_for(lis, 5, count=2)
    elapsed = time.monotonic() - t0
    assert [p["event"] for _, p, _ in got] == ["message_sent", "message_due"]
    assert got[1][1] == {"event": "message_due", "queue": q}
    assert 0.9 < elapsed < 3.0
    m, rc = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    t0 = time.monotonic()
    conn.execute("SELECT pgflow.nack(%s, %s, 'retry me', %s)", (q, m, rc))
    got = wait_for(lis, 5)
    assert got[0][1]["event"] == "message_due"
    assert 0.7 < time.monotonic() - t0 < 3.0
    assert conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 1)", (q,)).fetchone() == (m,)


def test_run_maintenance_by_hand_announces_due_messages(conn, make_conn, make_queue):
    """Without the worker (as without preloading), a periodic pgflow.run_maintenance() call
    announces what came due."""
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    conn.execute("ALTER SYSTEM SET pgflow.maintenance_enabled = off")
    conn.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)  # the worker has reloaded its settings
        conn.execute("SELECT pgflow.send(%s, '{}', 1)", (q,))
        assert [p["event"] for _, p, _ in wait_for(lis, 5)] == ["message_sent"]
        time.sleep(1.3)
        assert drain(lis, 0.2) == []  # due, but nobody announced it
        out = conn.execute("SELECT pgflow.run_maintenance()").fetchone()[0]
        assert out["due_queues"] >= 1
        assert wait_for(lis, 5)[0][1] == {"event": "message_due", "queue": q}
    finally:
        conn.execute("ALTER SYSTEM RESET pgflow.maintenance_enabled")
        conn.execute("SELECT pg_reload_conf()")


# --- a consumer driven by LISTEN only -------------------------------------------------------


def test_listen_driven_consumer_loses_nothing(conn, make_queue):
    """10,000 messages, some delayed, sent over many transactions; the consumer reads only when
    notified, and after each notification reads until the queue is empty."""
    q = make_queue(notify=True)
    total = 10_000
    expected = set()
    errors = []

    def producer():
        try:
            with connect() as c:
                for r in range(total // 100):  # 100 rounds of 100 messages
                    if r % 10 == 5:  # a delayed batch: announced as message_due when due
                        ids = c.execute("SELECT pgflow.send_batch(%s, %s, 1)", (q, [Jsonb({"d": 1})] * 100)).fetchall()
                    elif r % 4 == 0:  # single sends, each its own transaction, then a batch
                        ids = [c.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone() for _ in range(20)]
                        ids += c.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({})] * 80)).fetchall()
                    else:
                        ids = c.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({})] * 100)).fetchall()
                    expected.update(r[0] for r in ids)
        except Exception as e:
            errors.append(e)

    got = []
    lis = connect()
    reader = connect()
    try:
        listen(lis, q)
        t = threading.Thread(target=producer)
        t.start()
        deadline = time.monotonic() + 40
        notifications = 0
        while len(got) < total and time.monotonic() < deadline:
            for _ in lis.notifies(timeout=1.0, stop_after=1):
                notifications += 1
                while True:  # read until empty
                    rows = reader.execute("SELECT msg_id FROM pgflow.read(%s, 60, 500)", (q,)).fetchall()
                    if not rows:
                        break
                    ids = [r[0] for r in rows]
                    reader.execute("SELECT pgflow.delete(%s, %s::bigint[])", (q, ids))
                    got.extend(ids)
        t.join()
    finally:
        lis.close()
        reader.close()
    assert not errors, errors
    assert len(got) == len(set(got)) == total
    assert set(got) == expected
    assert notifications < total  # merged: far fewer notifications than messages


# --- read_with_poll wake-ups ----------------------------------------------------------------


def _blocked_read(queue, result, **kw):
    args = dict(vt=30, qty=1, max_poll_seconds=10, poll_interval_ms=5000) | kw
    with connect() as c:
        t0 = time.monotonic()
        rows = c.execute(
            "SELECT msg_id FROM pgflow.read_with_poll(%s, %s, %s, %s, %s)",
            (queue, args["vt"], args["qty"], args["max_poll_seconds"], args["poll_interval_ms"]),
        ).fetchall()
        result.append((time.monotonic(), time.monotonic() - t0, rows))


def test_read_with_poll_wakes_at_commit(conn, make_conn, make_queue):
    if not conn.execute("SELECT pgflow.wakeups_enabled()").fetchone()[0]:
        pytest.skip("pgflow is not preloaded: read_with_poll polls")
    q = make_queue()
    result = []
    t = threading.Thread(target=_blocked_read, args=(q, result))
    t.start()
    time.sleep(0.5)  # the reader is waiting now
    tx = make_conn(autocommit=False)
    mid = tx.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    time.sleep(0.3)
    assert not result  # an uncommitted send does not wake it into returning
    tx.commit()
    committed = time.monotonic()
    t.join(15)
    returned, elapsed, rows = result[0]
    assert rows == [(mid,)]
    assert returned - committed < 1.0, returned - committed


def test_read_with_poll_wakes_when_a_delayed_message_is_due(conn, make_queue):
    if not conn.execute("SELECT pgflow.wakeups_enabled()").fetchone()[0]:
        pytest.skip("pgflow is not preloaded")
    q = make_queue()
    mid = conn.execute("SELECT pgflow.send(%s, '{}', 1)", (q,)).fetchone()[0]
    result = []
    _blocked_read(q, result)
    _, elapsed, rows = result[0]
    assert rows == [(mid,)]
    assert elapsed < 3.0  # woken by the maintenance worker, not after the 5 s poll interval


def test_read_with_poll_times_out_empty(make_queue):
    q = make_queue()
    result = []
    _blocked_read(q, result, max_poll_seconds=1, poll_interval_ms=5000)
    _, elapsed, rows = result[0]
    assert rows == []
    assert 0.9 < elapsed < 3.0


def test_read_with_poll_finds_expired_leases_by_polling(conn, make_queue):
    """An expired lease wakes nobody: read_with_poll notices it at its next look."""
    q = make_queue()
    mid = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    conn.execute("SELECT pgflow.read(%s, 1, 1)", (q,))  # lease for 1 s, never acked
    result = []
    _blocked_read(q, result, max_poll_seconds=5, poll_interval_ms=100)
    _, elapsed, rows = result[0]
    assert rows == [(mid,)]
    assert 0.5 < elapsed < 3.0


def test_many_waiting_readers_each_get_one(conn, make_queue):
    q = make_queue()
    result = []
    threads = [threading.Thread(target=_blocked_read, args=(q, result)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({})] * 4)).fetchall()]
    for t in threads:
        t.join(15)
    assert sorted(r[2][0][0] for r in result) == ids
    assert max(r[1] for r in result) < 3.0


# --- off the commit path: the announcer -----------------------------------------------------


def announcers(c, dbname=None):
    return c.execute("""SELECT pid FROM pg_stat_activity WHERE backend_type = 'pgflow announcer'
                         AND datname = coalesce(%s, current_database())""", (dbname,)).fetchall()


def test_notifications_are_sent_by_the_announcer_not_the_committing_session(conn, make_conn, make_queue):
    # The committing session takes no notify lock: its events go to the database's announcer,
    # which notifies after the commit. The first commit of an idle database starts the
    # announcer and notifies by itself meanwhile.
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    sender = make_conn()
    deadline = time.monotonic() + 10
    while True:
        mid = sender.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
        (n,) = list(lis.notifies(timeout=5, stop_after=1))
        if n.pid != sender.info.backend_pid or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert n.pid != sender.info.backend_pid
    assert (n.pid,) in announcers(conn)
    assert json.loads(n.payload)["last_msg_id"] == mid
    assert conn.execute("SELECT backend_type FROM pg_stat_activity WHERE pid = %s",
                        (n.pid,)).fetchone() == ("pgflow announcer",)


def test_announcements_cover_exactly_the_committed_sends_of_many_transactions(conn, make_conn, make_queue):
    # 4 sessions x 100 transactions, every third rolled back and a savepoint rolled back in
    # each: the notifications (merged across transactions as the announcer finds them) count
    # exactly the committed messages, and their ranges bound them.
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    committed, errors = [], []

    def producer(k):
        try:
            c = connect(autocommit=False)
            for i in range(100):
                c.execute("SAVEPOINT s")
                c.execute("SELECT pgflow.send(%s, '{}')", (q,))
                c.execute("ROLLBACK TO SAVEPOINT s")
                ids = [r[0] for r in c.execute("SELECT pgflow.send_batch(%s, %s)", (q, [Jsonb({})] * (1 + i % 3)))]
                if i % 3 == k % 3:
                    c.rollback()
                else:
                    c.commit()
                    committed.extend(ids)
            c.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events, notes = sent_until(lis, len(committed), timeout=10)
    assert sum(e["count"] for e in events) == len(committed)
    assert drain(lis, 0.5) == []  # nothing more: no rolled-back send was announced
    assert min(e["first_msg_id"] for e in events) <= min(committed)
    assert max(e["last_msg_id"] for e in events) >= max(committed)
    assert all(len(n.payload.encode()) < 8000 for n in notes)


def test_a_transaction_too_large_for_the_outbox_notifies_by_itself(conn, make_conn, make_queue):
    # Events of one transaction beyond a quarter of the outbox (16 kB): notified at its own
    # commit, as without an announcer, and nothing is lost.
    queues = [make_queue(name=("big" + unique_name("q") * 8)[:48], notify=True) for _ in range(110)]
    lis = make_conn()
    for q in queues:
        listen(lis, q)
    sender = make_conn(autocommit=False)
    # start the announcer first, so that only the size decides
    sender.execute("SELECT pgflow.send(%s, '{}')", (queues[0],))
    sender.commit()
    drain(lis, 0.5)
    for q in queues:
        sender.execute("SELECT pgflow.send(%s, '{}')", (q,))
    sender.commit()
    got = list(lis.notifies(timeout=5, stop_after=len(queues)))
    assert sorted(n.channel for n in got) == sorted(f"pgflow.queue.{q}" for q in queues)
    assert {n.pid for n in got} == {sender.info.backend_pid}


def test_an_idle_announcer_stops_and_its_database_can_be_dropped(conn, make_conn):
    db = unique_name("annc")
    conn.execute(f"CREATE DATABASE {db}")
    try:
        c = connect(dbname=db)
        c.execute("CREATE EXTENSION pgflow")
        c.execute("SELECT pgflow.create_queue('q', notify => true)")
        deadline = time.monotonic() + 10
        while not announcers(conn, db) and time.monotonic() < deadline:
            c.execute("SELECT pgflow.send('q', '{}')")
            time.sleep(0.1)
        assert announcers(conn, db) != []
        c.close()
    finally:
        # the announcer leaves within 2 s of its last work; DROP DATABASE waits up to 5 s
        conn.execute(f"DROP DATABASE {db}")
    assert announcers(conn, db) == []


def test_notify_via_announcer_off_notifies_at_the_sessions_own_commit(conn, make_conn, make_queue):
    q = make_queue(notify=True)
    lis = make_conn()
    listen(lis, q)
    sender = make_conn()
    sender.execute("SET pgflow.notify_via_announcer = off")
    for _ in range(3):
        sender.execute("SELECT pgflow.send(%s, '{}')", (q,))
        (n,) = list(lis.notifies(timeout=5, stop_after=1))
        assert n.pid == sender.info.backend_pid
