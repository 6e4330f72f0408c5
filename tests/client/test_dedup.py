"""Deduplication: a send's dedup_key holds while its message is live in the queue."""
import threading
import time

import pytest

from conftest import error_of, sqlstate, unique_name


def send(conn, q, key, body='{"n": 1}', delay=0):
    return conn.execute("SELECT pgflow.send(%s, %s::jsonb, %s, dedup_key => %s)", (q, body, delay, key)).fetchone()[0]


def live(conn, q):
    return conn.execute("SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues x USING (queue_id) "
                        "WHERE x.queue_name = %s", (q,)).fetchone()[0]


def test_a_live_key_sends_nothing_and_returns_the_live_message(conn, queue):
    first = send(conn, queue, "order-42")
    assert send(conn, queue, "order-42", body='{"n": 2}') == first
    assert live(conn, queue) == 1
    assert conn.execute("SELECT total_sent FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()[0] == 1
    # another key, or none, sends
    other = send(conn, queue, "order-43")
    assert other != first and send(conn, queue, None) not in (first, other)
    assert live(conn, queue) == 3


def test_the_key_holds_while_leased_or_delayed_and_frees_when_acked(conn, queue):
    delayed = send(conn, queue, "later", delay=60)
    assert send(conn, queue, "later") == delayed                       # delayed is live
    first = send(conn, queue, "k")
    (msg_id, read_ct) = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (queue,)).fetchone()
    assert msg_id == first
    assert send(conn, queue, "k") == first                             # leased is live
    assert conn.execute("SELECT pgflow.archive(%s, %s)", (queue, first)).fetchone()[0] is True
    again = send(conn, queue, "k")                                     # acked: the key is free
    assert again > first
    assert conn.execute("SELECT pgflow.delete(%s, %s)", (queue, again)).fetchone()[0] is True
    assert send(conn, queue, "k") > again


def test_the_timestamptz_form_and_publish_deduplicate_per_queue(conn, make_queue):
    a, b = make_queue(), make_queue()
    key = unique_name("rk")
    for q in (a, b):
        conn.execute("SELECT pgflow.bind_topic(%s, %s)", (f"{key}.#", q))
    try:
        at = conn.execute("SELECT pgflow.send(%s, '{}', now() + interval '1 minute', dedup_key => 'x')",
                          (a,)).fetchone()[0]
        rows = dict(conn.execute("SELECT queue_name, msg_id FROM pgflow.publish(%s, '{}', dedup_key => 'x')",
                                 (f"{key}.created",)).fetchall())
        assert rows[a] == at                                           # a held the key already
        assert live(conn, b) == 1                                      # b had no such key
        assert live(conn, a) == 1
    finally:
        for q in (a, b):
            conn.execute("SELECT pgflow.unbind_topic(%s, %s)", (f"{key}.#", q))


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_concurrent_sends_of_one_key_send_one_message(conn, make_conn, queue, outcome):
    s1, s2 = make_conn(autocommit=False), make_conn()
    first = send(s1, queue, "race")
    got = {}

    def second():
        got["id"] = send(s2, queue, "race")

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()                      # waits for the first send's transaction
    getattr(s1, outcome)()
    t.join(5)
    assert not t.is_alive()
    if outcome == "commit":
        assert got["id"] == first and live(conn, queue) == 1
    else:
        assert got["id"] != first and live(conn, queue) == 1


@pytest.mark.parametrize("key, state, needle", [
    ("", "22023", "dedup_key must not be empty"),
    ("k" * 129, "54000", "dedup_key is 129 bytes long"),
])
def test_bad_keys_are_refused_and_send_nothing(conn, queue, key, state, needle):
    for sql, params in [("SELECT pgflow.send(%s, '{}', dedup_key => %s)", (queue, key)),
                        ("SELECT pgflow.send(%s, '{}', now(), dedup_key => %s)", (queue, key)),
                        ("SELECT * FROM pgflow.publish('no.such.binding', '{}', dedup_key => %s)", (key,))]:
        assert sqlstate(conn, sql, params) == state
        assert needle in str(error_of(conn, sql, params))
    assert live(conn, queue) == 0
    assert send(conn, queue, "k" * 128) > 0                            # the limit itself is fine
