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
    got = wait_for(lis, 5, count=2)
    assert [p for _, p, _ in got] == [
        {"event": "message_sent", "queue": q, "first_msg_id": a, "last_msg_id": a, "count": 1},
        {"event": "message_sent", "queue": q, "first_msg_id": ids[0], "last_msg_id": ids[-1], "count": 5},
    ]
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
    # several events on one channel in one transaction: a retry due at once plus a send
    m, rc = tx.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    tx.commit()
    tx.execute("SELECT pgflow.nack(%s, %s, 'x', %s)", (q, m, rc))
    tx.execute("SELECT pgflow.send(%s, '{}')", (q,))
    tx.commit()
    got = drain(lis, 1.0)
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
