"""FIFO message groups: a group's messages are delivered in send order, one at a time; other
groups and ungrouped messages are not held up."""
import time

import pytest

from conftest import error_of, sqlstate


def send(conn, q, n, group, priority=0, delay=0):
    return conn.execute("SELECT pgflow.send(%s, jsonb_build_object('n', %s), %s, %s, group_id => %s)",
                        (q, n, delay, priority, group)).fetchone()[0]


def read(conn, q, qty=10, vt=30):
    return [r[0]["n"] for r in conn.execute("SELECT message FROM pgflow.read(%s, %s, %s)", (q, vt, qty)).fetchall()]


def ids_of(conn, q):
    return dict(conn.execute("SELECT message ->> 'n', msg_id FROM pgflow.messages m JOIN pgflow.queues x "
                             "USING (queue_id) WHERE x.queue_name = %s", (q,)).fetchall())


def test_a_group_is_delivered_in_order_one_at_a_time(conn, queue):
    for n in (1, 2, 3):
        send(conn, queue, n, "g")
    assert read(conn, queue) == [1]                 # only the head, however many are asked for
    assert read(conn, queue) == []                  # the head is leased: the group waits
    conn.execute("SELECT pgflow.archive(%s, %s)", (queue, ids_of(conn, queue)["1"]))
    assert read(conn, queue) == [2]
    conn.execute("SELECT pgflow.delete(%s, %s)", (queue, ids_of(conn, queue)["2"]))
    assert read(conn, queue) == [3]


def test_other_groups_and_ungrouped_messages_are_not_held_up(conn, queue):
    send(conn, queue, 1, "a")
    send(conn, queue, 2, "a")
    send(conn, queue, 3, "b")
    send(conn, queue, 4, None)
    send(conn, queue, 5, "b")
    assert read(conn, queue) == [1, 3, 4]           # the head of each group, and the ungrouped one


def test_priority_orders_across_groups_never_within_one(conn, queue):
    send(conn, queue, 1, "a", priority=0)
    send(conn, queue, 2, "a", priority=9)           # later in its group: waits despite its priority
    send(conn, queue, 3, "b", priority=5)
    assert read(conn, queue, qty=1) == [3]
    assert read(conn, queue, qty=1) == [1]
    assert read(conn, queue, qty=1) == []


def test_a_nacked_or_expired_head_keeps_its_group_blocked(conn, make_queue):
    q = make_queue(retry_delay_ms=300, max_retries=3)
    send(conn, q, 1, "g")
    send(conn, q, 2, "g")
    (msg_id, rc) = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    conn.execute("SELECT pgflow.nack(%s, %s, 'boom', %s)", (q, msg_id, rc))
    assert read(conn, q) == []                       # waiting out its retry: still the head
    time.sleep(0.4)
    assert read(conn, q, vt=1) == [1]                # the retry comes first
    time.sleep(1.2)                                  # its lease runs out
    assert read(conn, q) == [1]                      # redelivered, still before 2


def test_a_dead_lettered_head_frees_its_group(conn, make_queue):
    q = make_queue(max_retries=0)
    send(conn, q, 1, "g")
    send(conn, q, 2, "g")
    assert read(conn, q, vt=1) == [1]
    time.sleep(1.1)
    assert read(conn, q) == [2]                      # 1 dead-lettered on the way, 2 is the head
    assert conn.execute("SELECT count(*) FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchone()[0] == 1


def test_a_delayed_earlier_message_holds_its_group_back(conn, queue):
    send(conn, queue, 1, "g", delay=60)
    send(conn, queue, 2, "g")
    assert read(conn, queue) == []


def test_batches_publish_and_pop_keep_group_order(conn, make_queue):
    q = make_queue()
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{\"n\": 1}', '{\"n\": 2}']::jsonb[], group_id => 'g')", (q,))
    send(conn, q, 3, None)
    assert [r[0]["n"] for r in conn.execute("SELECT message FROM pgflow.pop(%s, 10)", (q,)).fetchall()] == [1, 3]
    assert [r[0]["n"] for r in conn.execute("SELECT message FROM pgflow.pop(%s, 10)", (q,)).fetchall()] == [2]


def test_wait_for_messages_does_not_wake_for_a_blocked_group(conn, queue):
    send(conn, queue, 1, "g")
    assert read(conn, queue) == [1]
    send(conn, queue, 2, "g")
    t0 = time.monotonic()
    conn.execute("CALL pgflow.wait_for_messages(%s, 1, 50)", (queue,))
    assert time.monotonic() - t0 >= 0.9              # nothing deliverable: it waits it out


@pytest.mark.parametrize("group, state, needle", [
    ("", "22023", "group_id must not be empty"),
    ("g" * 129, "54000", "group_id is 129 bytes long"),
])
def test_bad_groups_are_refused_and_send_nothing(conn, queue, group, state, needle):
    for sql, params in [("SELECT pgflow.send(%s, '{}', group_id => %s)", (queue, group)),
                        ("SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[], group_id => %s)", (queue, group)),
                        ("SELECT * FROM pgflow.publish('no.such.binding', '{}', group_id => %s)", (group,)),
                        ("SELECT * FROM pgflow.publish_batch('no.such.binding', ARRAY['{}']::jsonb[], group_id => %s)",
                         (group,))]:
        assert sqlstate(conn, sql, params) == state
        assert needle in str(error_of(conn, sql, params))
    assert conn.execute("SELECT depth FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()[0] == 0
