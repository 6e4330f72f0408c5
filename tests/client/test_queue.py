"""The queue API through real sessions: management, sending, reading, acknowledging, leases,
order, commit visibility, payload fidelity and statistics."""

import json
import threading
import time

import psycopg
import pytest

from conftest import error_of, unique_name


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def read(conn, queue, vt=30, qty=1):
    """(msg_id, read_ct, message) of each leased message, in the order returned."""
    return conn.execute("SELECT msg_id, read_ct, message FROM pgflow.read(%s, %s, %s)",
                        (queue, vt, qty)).fetchall()


def send(conn, queue, message=None, delay=0, priority=0, headers=None):
    return one(conn, "SELECT pgflow.send(%s, %s::jsonb, %s::integer, %s, %s::jsonb)",
               (queue, json.dumps(message if message is not None else {}), delay, priority,
                None if headers is None else json.dumps(headers)))


def live_count(conn, queue):
    return one(conn, "SELECT count(*) FROM pgflow.list_pending_messages(%s)", (queue,))


def options(conn, queue):
    return conn.execute("SELECT max_retries, retry_delay_ms, max_retry_delay_ms, retry_jitter, notify"
                        " FROM pgflow.list_queues() WHERE queue_name = %s", (queue,)).fetchone()


# --- managing queues -----------------------------------------------------------------------------

def test_create_queue_twice_is_a_no_op_and_other_options_an_error(conn):
    name = unique_name()
    try:
        assert one(conn, "SELECT pgflow.create_queue(%s, max_retries => 5, retry_delay_ms => 20)", (name,)) is True
        # the same call again: a no-op
        assert one(conn, "SELECT pgflow.create_queue(%s, max_retries => 5, retry_delay_ms => 20)", (name,)) is False
        # other options: 42710 naming each option that differs, and nothing changes
        e = error_of(conn, "SELECT pgflow.create_queue(%s, max_retries => 9, notify => true)", (name,))
        assert e.sqlstate == "42710"
        assert name in e.diag.message_primary and "other options" in e.diag.message_primary
        assert e.diag.message_detail == "It has max_retries 5 (asked: 9), retry_delay_ms 20 (asked: 1000), notify false (asked: true)."
        assert "alter_queue" in e.diag.message_hint
        assert options(conn, name) == (5, 20, 3600000, 0.0, False)
        # alter_queue changes what it is given and keeps the rest
        conn.execute("SELECT pgflow.alter_queue(%s, max_retries => 7, retry_jitter => 0.5)", (name,))
        assert options(conn, name) == (7, 20, 3600000, 0.5, False)
        conn.execute("SELECT pgflow.alter_queue(%s, notify => true)", (name,))
        assert options(conn, name) == (7, 20, 3600000, 0.5, True)
        assert one(conn, "SELECT count(*) FROM pgflow.list_queues() WHERE queue_name = %s", (name,)) == 1
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (name,))


def test_names_are_case_sensitive(conn):
    base = unique_name()
    names = [base.lower(), base.upper()]
    try:
        assert [one(conn, "SELECT pgflow.create_queue(%s)", (n,)) for n in names] == [True, True]
        send(conn, names[0], {"to": "lower"})
        assert read(conn, names[1]) == []
        assert [r[2] for r in read(conn, names[0])] == [{"to": "lower"}]
    finally:
        for n in names:
            conn.execute("SELECT pgflow.drop_queue(%s)", (n,))


def test_drop_queue_reports_and_removes_everything(conn):
    name = unique_name()
    conn.execute("SELECT pgflow.create_queue(%s)", (name,))
    qid = one(conn, "SELECT queue_id FROM pgflow.queues WHERE queue_name = %s", (name,))
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[3]))",
                                      (name,))]
    assert one(conn, "SELECT pgflow.archive(%s, %s::bigint)", (name, ids[0])) is True
    assert one(conn, "SELECT pgflow.drop_queue(%s)", (name,)) is True
    assert one(conn, "SELECT pgflow.drop_queue(%s)", (name,)) is False
    assert one(conn, "SELECT count(*) FROM pgflow.messages WHERE queue_id = %s", (qid,)) == 0
    assert one(conn, "SELECT count(*) FROM pgflow.archive WHERE queue_id = %s", (qid,)) == 0
    assert one(conn, "SELECT count(*) FROM pgflow.list_queues() WHERE queue_name = %s", (name,)) == 0
    assert one(conn, "SELECT to_regclass(%s)", (f"pgflow.queue_{qid}_msg_seq",)) is None
    # the name can be used again, numbering from 1
    assert one(conn, "SELECT pgflow.create_queue(%s)", (name,)) is True
    assert send(conn, name) == 1
    conn.execute("SELECT pgflow.drop_queue(%s)", (name,))


def test_purge_queue_counts_live_messages_and_keeps_the_archive(conn, queue):
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[5]))",
                                      (queue,))]
    send(conn, queue, delay=3600)  # delayed messages are purged too
    read(conn, queue, qty=2)  # and leased ones
    assert one(conn, "SELECT pgflow.archive(%s, %s::bigint)", (queue, ids[4])) is True
    assert one(conn, "SELECT pgflow.purge_queue(%s)", (queue,)) == 5
    assert live_count(conn, queue) == 0
    assert one(conn, "SELECT archived FROM pgflow.get_queue_stats(%s)", (queue,)) == 1
    assert one(conn, "SELECT pgflow.purge_queue(%s)", (queue,)) == 0
    # msg_ids keep ascending after a purge
    assert send(conn, queue) == 7


def test_list_queues_orders_by_name(conn):
    base = unique_name()
    names = [base + "_b", base + "_a", base + "_C"]
    try:
        for n in names:
            conn.execute("SELECT pgflow.create_queue(%s)", (n,))
        listed = [r[0] for r in conn.execute("SELECT queue_name FROM pgflow.list_queues()"
                                             " WHERE queue_name LIKE %s", (base + "%",))]
        assert listed == sorted(names, key=lambda s: s.encode())
    finally:
        for n in names:
            conn.execute("SELECT pgflow.drop_queue(%s)", (n,))


# --- sending and reading -------------------------------------------------------------------------

def test_send_returns_ascending_ids_and_read_returns_the_message(conn, queue):
    a = send(conn, queue, {"n": 1}, headers={"trace": "abc"}, priority=0)
    b = send(conn, queue, {"n": 2})
    assert (a, b) == (1, 2)
    row = conn.execute("SELECT msg_id, read_ct, message, headers, priority, vt > clock_timestamp() + interval '50 s',"
                       " enqueued_at <= clock_timestamp() FROM pgflow.read(%s, 60, 1)", (queue,)).fetchone()
    assert row == (1, 1, {"n": 1}, {"trace": "abc"}, 0, True, True)


def test_send_with_a_time_overload(conn, queue):
    soon = one(conn, "SELECT pgflow.send(%s, '{\"when\": \"soon\"}', clock_timestamp() + interval '1 second')", (queue,))
    past = one(conn, "SELECT pgflow.send(%s, '{\"when\": \"past\"}', now() - interval '1 day', 3, '{\"h\": 1}')", (queue,))
    assert (soon, past) == (1, 2)
    rows = conn.execute("SELECT msg_id, message, priority, headers FROM pgflow.read(%s, 30, 10)", (queue,)).fetchall()
    assert rows == [(2, {"when": "past"}, 3, {"h": 1})]
    time.sleep(1.2)
    assert [r[0] for r in read(conn, queue, qty=10)] == [1]


def test_delayed_messages_are_invisible_until_due(conn, queue):
    send(conn, queue, {"n": "late"}, delay=1)
    send(conn, queue, {"n": "now"})
    assert [r[2] for r in read(conn, queue, qty=10)] == [{"n": "now"}]
    assert one(conn, "SELECT state FROM pgflow.list_pending_messages(%s) WHERE msg_id = 1", (queue,)) == "delayed"
    time.sleep(1.2)
    assert [r[2] for r in read(conn, queue, qty=10)] == [{"n": "late"}]


def test_send_batch_keeps_array_order_in_one_statement(conn, queue):
    msgs = [json.dumps({"i": i}) for i in range(50)]
    headers = [json.dumps({"h": i}) if i % 2 else None for i in range(50)]
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, %s::jsonb[], 0, 2, %s::jsonb[])",
                                      (queue, msgs, headers))]
    assert ids == list(range(1, 51))
    rows = conn.execute("SELECT msg_id, message, headers, priority FROM pgflow.read(%s, 30, 100)", (queue,)).fetchall()
    assert [(r[0], r[1]["i"]) for r in rows] == [(i + 1, i) for i in range(50)]
    assert [r[2] for r in rows] == [({"h": i} if i % 2 else None) for i in range(50)]
    assert {r[3] for r in rows} == {2}


def test_send_batch_with_delay_overloads(conn, queue):
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{\"a\":1}', '{\"a\":2}']::jsonb[], 1)", (queue,))
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{\"b\":1}']::jsonb[], now() + interval '1 hour')", (queue,))
    assert read(conn, queue, qty=10) == []
    assert one(conn, "SELECT delayed FROM pgflow.get_queue_stats(%s)", (queue,)) == 3
    time.sleep(1.2)
    assert [r[2] for r in read(conn, queue, qty=10)] == [{"a": 1}, {"a": 2}]


def test_read_with_poll_waits_for_a_send(conn, make_conn, queue):
    sender = make_conn()

    def later():
        time.sleep(0.4)
        send(sender, queue, {"woke": True})

    t = threading.Thread(target=later)
    start = time.monotonic()
    t.start()
    rows = conn.execute("SELECT msg_id, read_ct, message FROM pgflow.read_with_poll(%s, 30, 5, 10, 100)",
                        (queue,)).fetchall()
    elapsed = time.monotonic() - start
    t.join()
    assert rows == [(1, 1, {"woke": True})]
    assert 0.35 <= elapsed < 5


def test_read_with_poll_returns_nothing_after_max_poll_seconds(conn, queue):
    start = time.monotonic()
    rows = conn.execute("SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 1, 50)", (queue,)).fetchall()
    elapsed = time.monotonic() - start
    assert rows == []
    assert 0.95 <= elapsed < 2.5


def test_read_with_poll_returns_at_once_when_messages_wait(conn, queue):
    send(conn, queue, {"x": 1})
    start = time.monotonic()
    rows = conn.execute("SELECT msg_id FROM pgflow.read_with_poll(%s, 30, 1, 10)", (queue,)).fetchall()
    assert rows == [(1,)] and time.monotonic() - start < 1


def test_pop_reads_and_deletes(conn, queue):
    for i in range(3):
        send(conn, queue, {"i": i})
    rows = conn.execute("SELECT msg_id, read_ct, message FROM pgflow.pop(%s, 2)", (queue,)).fetchall()
    assert rows == [(1, 1, {"i": 0}), (2, 1, {"i": 1})]
    assert [r[0] for r in conn.execute("SELECT msg_id FROM pgflow.list_pending_messages(%s)", (queue,))] == [3]
    assert one(conn, "SELECT count(*) FROM pgflow.pop(%s)", (queue,)) == 1
    assert one(conn, "SELECT count(*) FROM pgflow.pop(%s)", (queue,)) == 0
    assert one(conn, "SELECT archived FROM pgflow.get_queue_stats(%s)", (queue,)) == 0


def test_delete_and_archive_single_and_array(conn, queue):
    ids = [r[0] for r in conn.execute(
        "SELECT pgflow.send_batch(%s, ARRAY['{\"k\":1}','{\"k\":2}','{\"k\":3}','{\"k\":4}','{\"k\":5}']::jsonb[],"
        " 0, 0, ARRAY['{\"h\":1}', NULL, NULL, NULL, NULL]::jsonb[])", (queue,))]
    assert one(conn, "SELECT pgflow.delete(%s, %s::bigint)", (queue, ids[0])) is True
    assert one(conn, "SELECT pgflow.delete(%s, %s::bigint)", (queue, ids[0])) is False
    assert one(conn, "SELECT pgflow.archive(%s, %s::bigint)", (queue, ids[1])) is True
    assert one(conn, "SELECT pgflow.archive(%s, %s::bigint)", (queue, ids[1])) is False
    got = sorted(r[0] for r in conn.execute("SELECT pgflow.delete(%s, %s::bigint[])", (queue, [ids[2], 999])))
    assert got == [ids[2]]
    got = sorted(r[0] for r in conn.execute("SELECT pgflow.archive(%s, %s::bigint[])",
                                            (queue, [ids[3], ids[4], ids[2]])))
    assert got == [ids[3], ids[4]]
    assert live_count(conn, queue) == 0
    archived = conn.execute(
        "SELECT a.msg_id, a.message, a.read_ct, a.archived_at >= a.enqueued_at FROM pgflow.archive a"
        " JOIN pgflow.queues q USING (queue_id) WHERE q.queue_name = %s ORDER BY a.msg_id", (queue,)).fetchall()
    assert archived == [(2, {"k": 2}, 0, True), (4, {"k": 4}, 0, True), (5, {"k": 5}, 0, True)]
    # an empty array acts on nothing
    assert conn.execute("SELECT pgflow.delete(%s, '{}'::bigint[])", (queue,)).fetchall() == []


def test_delete_of_a_message_returns_true_exactly_once(conn, queue):
    send(conn, queue)
    assert one(conn, "SELECT pgflow.delete(%s, 1::bigint)", (queue,)) is True
    assert one(conn, "SELECT pgflow.delete(%s, 1::bigint)", (queue,)) is False


def test_archive_keeps_headers_priority_and_read_ct(conn, queue):
    send(conn, queue, {"body": [1, 2]}, priority=4, headers={"h": "v"})
    (msg_id, read_ct, _), = read(conn, queue)
    assert one(conn, "SELECT pgflow.archive(%s, %s::bigint, %s)", (queue, msg_id, read_ct)) is True
    row = conn.execute("SELECT message, headers, priority, read_ct FROM pgflow.archive a"
                       " JOIN pgflow.queues q USING (queue_id) WHERE q.queue_name = %s", (queue,)).fetchone()
    assert row == ({"body": [1, 2]}, {"h": "v"}, 4, 1)


def test_set_vt_extends_and_ends_a_lease(conn, queue):
    send(conn, queue, {"x": 1})
    (msg_id, read_ct, _), = read(conn, queue, vt=30)
    row = conn.execute("SELECT msg_id, read_ct, vt > clock_timestamp() + interval '3000 s'"
                       " FROM pgflow.set_vt(%s, %s, 3600, %s)", (queue, msg_id, read_ct)).fetchone()
    assert row == (msg_id, 1, True)
    assert read(conn, queue) == []
    # vt 0 hands the message back at once; set_vt does not count as a delivery
    assert one(conn, "SELECT count(*) FROM pgflow.set_vt(%s, %s, 0)", (queue, msg_id)) == 1
    assert read(conn, queue) == [(msg_id, 2, {"x": 1})]
    # unknown message: no row
    assert conn.execute("SELECT * FROM pgflow.set_vt(%s, 999, 10)", (queue,)).fetchall() == []


def test_ack_and_read_acks_and_claims_in_one_call(conn, queue):
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{\"n\":1}','{\"n\":2}','{\"n\":3}','{\"n\":4}']::jsonb[])", (queue,))
    first = read(conn, queue, qty=2)
    assert [r[0] for r in first] == [1, 2]
    rows = conn.execute("SELECT msg_id, read_ct FROM pgflow.ack_and_read(%s, %s::bigint[], 30, 5, true, %s::int[])",
                        (queue, [1, 2], [1, 1])).fetchall()
    assert rows == [(3, 1), (4, 1)]
    stats = conn.execute("SELECT depth, archived FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()
    assert stats == (2, 2)
    # archive => false deletes instead; an empty ack list only reads
    assert conn.execute("SELECT * FROM pgflow.ack_and_read(%s, ARRAY[3, 4]::bigint[], 30, 1, false)",
                        (queue,)).fetchall() == []
    assert conn.execute("SELECT depth, archived FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone() == (0, 2)
    send(conn, queue, {"n": 5})
    assert [r[0] for r in conn.execute("SELECT msg_id FROM pgflow.ack_and_read(%s, '{}'::bigint[], 30)", (queue,))] == [5]


def test_ack_and_read_rolls_back_as_one(conn, queue):
    """The ack and the claim share one statement: an error undoes both."""
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{}','{}']::jsonb[])", (queue,))
    read(conn, queue)  # leases 1
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT m.msg_id / 0 FROM pgflow.ack_and_read(%s, ARRAY[1]::bigint[], 30) m", (queue,))
    assert sorted(r[0] for r in conn.execute("SELECT msg_id FROM pgflow.list_pending_messages(%s)", (queue,))) == [1, 2]
    assert [r[0] for r in read(conn, queue)] == [2]


# --- order ---------------------------------------------------------------------------------------

def test_higher_priority_first_then_fifo(conn, queue):
    plan = [(0, "a"), (5, "b"), (0, "c"), (-3, "d"), (5, "e"), (10, "f"), (0, "g")]
    for prio, tag in plan:
        send(conn, queue, {"t": tag}, priority=prio)
    got = [r[2]["t"] for r in read(conn, queue, qty=3)] + [r[2]["t"] for r in read(conn, queue, qty=10)]
    assert got == ["f", "b", "e", "a", "c", "g", "d"]


def test_list_pending_messages_in_delivery_order_with_states(conn, queue):
    send(conn, queue, {"t": "lo"}, priority=0)
    send(conn, queue, {"t": "hi"}, priority=1)
    send(conn, queue, {"t": "delayed"}, delay=3600, priority=9)
    read(conn, queue)  # leases "hi"
    rows = conn.execute("SELECT msg_id, state, read_ct, priority FROM pgflow.list_pending_messages(%s)",
                        (queue,)).fetchall()
    assert rows == [(3, "delayed", 0, 9), (2, "in_flight", 1, 1), (1, "visible", 0, 0)]
    assert one(conn, "SELECT count(*) FROM pgflow.list_pending_messages(%s, 2)", (queue,)) == 2


# --- leases --------------------------------------------------------------------------------------

def test_expired_lease_redelivers_and_stale_read_ct_changes_nothing(conn, queue):
    send(conn, queue, {"x": 1})
    send(conn, queue, {"x": 2})
    first = read(conn, queue, vt=1, qty=2)
    assert [(r[0], r[1]) for r in first] == [(1, 1), (2, 1)]
    assert read(conn, queue) == []  # leased
    time.sleep(1.2)
    second = read(conn, queue, vt=30, qty=2)
    assert [(r[0], r[1]) for r in second] == [(1, 2), (2, 2)]
    before = conn.execute("SELECT msg_id, read_ct, vt FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id)"
                          " WHERE q.queue_name = %s ORDER BY msg_id", (queue,)).fetchall()
    # the first consumer, late: every act on its stale delivery is refused
    assert one(conn, "SELECT pgflow.delete(%s, 1::bigint, 1)", (queue,)) is False
    assert one(conn, "SELECT pgflow.archive(%s, 1::bigint, 1)", (queue,)) is False
    assert conn.execute("SELECT * FROM pgflow.set_vt(%s, 1, 0, 1)", (queue,)).fetchall() == []
    assert conn.execute("SELECT pgflow.delete(%s, ARRAY[1,2]::bigint[], ARRAY[1,1])", (queue,)).fetchall() == []
    assert conn.execute("SELECT pgflow.archive(%s, ARRAY[1,2]::bigint[], ARRAY[1,1])", (queue,)).fetchall() == []
    assert conn.execute("SELECT * FROM pgflow.ack_and_read(%s, ARRAY[1,2]::bigint[], 30, 1, true, ARRAY[1,1])",
                        (queue,)).fetchall() == []
    after = conn.execute("SELECT msg_id, read_ct, vt FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id)"
                         " WHERE q.queue_name = %s ORDER BY msg_id", (queue,)).fetchall()
    assert after == before
    assert one(conn, "SELECT archived FROM pgflow.get_queue_stats(%s)", (queue,)) == 0
    # the current holder's read_ct works; a mixed array acts on the matching ids only
    assert sorted(r[0] for r in conn.execute("SELECT pgflow.archive(%s, ARRAY[1,2]::bigint[], ARRAY[2,1])",
                                             (queue,))) == [1]
    assert one(conn, "SELECT pgflow.delete(%s, 2::bigint, 2)", (queue,)) is True
    assert live_count(conn, queue) == 0


def test_lease_holds_until_vt(conn, make_conn, queue):
    other = make_conn()
    send(conn, queue)
    assert len(read(conn, queue, vt=1)) == 1
    assert read(other, queue, vt=30) == []
    time.sleep(1.2)
    assert [(r[0], r[1]) for r in read(other, queue, vt=30)] == [(1, 2)]


# --- commit visibility ---------------------------------------------------------------------------

def test_message_invisible_until_the_send_commits(make_conn, queue):
    producer = make_conn(autocommit=False)
    consumer = make_conn()
    msg_id = send(producer, queue, {"tx": 1})
    assert read(consumer, queue) == []
    assert one(consumer, "SELECT depth FROM pgflow.get_queue_stats(%s)", (queue,)) == 0
    producer.commit()
    assert read(consumer, queue) == [(msg_id, 1, {"tx": 1})]


def test_rolled_back_send_leaves_nothing(make_conn, queue):
    producer = make_conn(autocommit=False)
    consumer = make_conn()
    send(producer, queue, {"tx": "gone"})
    producer.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[3]))", (queue,))
    producer.execute("SELECT pgflow.send(%s, '{}', 60)", (queue,))
    producer.rollback()
    assert read(consumer, queue, qty=10) == []
    assert live_count(consumer, queue) == 0
    assert one(consumer, "SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id)"
                         " WHERE q.queue_name = %s", (queue,)) == 0
    st = consumer.execute("SELECT depth, archived, total_sent FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()
    # the rolled-back ids were issued (total_sent counts them, as documented) but nothing remains
    assert st == (0, 0, 5)


def test_read_in_a_rolled_back_transaction_leaves_the_message_readable(make_conn, queue):
    setup = make_conn()
    send(setup, queue, {"x": 1})
    reader = make_conn(autocommit=False)
    other = make_conn()
    assert read(reader, queue, vt=3600) == [(1, 1, {"x": 1})]
    # while the reading transaction is open, its row lock hides the message from others
    assert read(other, queue) == []
    reader.rollback()
    assert read(other, queue) == [(1, 1, {"x": 1})]


def test_ack_in_a_rolled_back_transaction_changes_nothing(make_conn, queue):
    setup = make_conn()
    send(setup, queue)
    (msg_id, read_ct, _), = read(setup, queue, vt=3600)
    tx = make_conn(autocommit=False)
    assert one(tx, "SELECT pgflow.archive(%s, %s::bigint, %s)", (queue, msg_id, read_ct)) is True
    tx.rollback()
    assert one(setup, "SELECT depth || '/' || archived FROM pgflow.get_queue_stats(%s)", (queue,)) == "1/0"
    assert one(setup, "SELECT pgflow.delete(%s, %s::bigint, %s)", (queue, msg_id, read_ct)) is True


# --- payloads ------------------------------------------------------------------------------------

def nested(depth):
    node = {"leaf": "ü"}
    for i in range(depth):
        node = {"level": i, "child": node, "list": [i, None, True, {"k": [node.get("leaf")]}]}
    return node


PAYLOADS = {
    "empty_object": {},
    "empty_array": [],
    "scalar_string": "just a string",
    "scalar_number": 42,
    "null_inside": {"a": None, "b": [None]},
    "unicode": {"latin": "café crème", "cjk": "队列消息", "emoji": "🦀🐘", "rtl": "שלום",
                "escapes": "quote \" backslash \\ newline \n tab \t", "control": "\u0001\u001f",
                "clé ünïcödé": "key too"},
    "numbers": {"int": 9007199254740993, "neg": -1, "frac": 0.1, "exp": 1e21, "small": 2.5e-7, "big": 123456789012345678901234567890},
    "nested_deep": nested(60),
    "one_mb": {"blob": "x" * (1 << 20)},
}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_round_trips(conn, queue, name):
    text = json.dumps(PAYLOADS[name], ensure_ascii=False)
    canonical = one(conn, "SELECT %s::jsonb::text", (text,))
    msg_id = one(conn, "SELECT pgflow.send(%s, %s::jsonb)", (queue, text))
    got = conn.execute("SELECT message::text FROM pgflow.read(%s, 30, 1)", (queue,)).fetchone()[0]
    assert got == canonical
    assert json.loads(got) == PAYLOADS[name]
    # and the headers travel the same way
    conn.execute("SELECT pgflow.send(%s, '{}', 0, 0, %s::jsonb)", (queue, json.dumps({"meta": PAYLOADS["unicode"]})))
    assert json.loads(one(conn, "SELECT headers::text FROM pgflow.read(%s, 30, 1)", (queue,))) == {"meta": PAYLOADS["unicode"]}
    assert msg_id == 1


def test_ten_megabyte_payload_round_trips_byte_for_byte(conn, queue):
    # about 10 MB: a long unicode string and many small nested objects
    chunk = "pgflow ünïcödé 队列 🐘 "
    body = {"text": chunk * (6 * 1024 * 1024 // len(chunk.encode())),
            "items": [{"i": i, "tags": ["a", "b"], "v": {"x": i * 0.5}} for i in range(100000)]}
    text = json.dumps(body, ensure_ascii=False)
    assert len(text.encode()) >= 10 * 1024 * 1024
    canonical = one(conn, "SELECT %s::jsonb::text", (text,))
    conn.execute("SELECT pgflow.send(%s, %s::jsonb)", (queue, text))
    got = one(conn, "SELECT message::text FROM pgflow.read(%s, 30, 1)", (queue,))
    assert got == canonical
    assert json.loads(got) == body
    # and through the archive
    conn.execute("SELECT pgflow.archive(%s, 1::bigint)", (queue,))
    assert one(conn, "SELECT a.message::text = %s FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id)"
                     " WHERE q.queue_name = %s", (canonical, queue)) is True


# --- statistics ----------------------------------------------------------------------------------

STATS_COLUMNS = ("depth", "visible", "in_flight", "delayed", "archived", "dead_lettered", "total_sent")


def stats(conn, queue):
    return dict(zip(STATS_COLUMNS, conn.execute(
        f"SELECT {', '.join(STATS_COLUMNS)} FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()))


def test_stats_of_an_empty_queue(conn, queue):
    row = conn.execute("SELECT queue_name, depth, visible, in_flight, delayed, archived, dead_lettered,"
                       " oldest_msg_age_sec, newest_msg_age_sec, total_sent, scraped_at <= clock_timestamp()"
                       " FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()
    assert row == (queue, 0, 0, 0, 0, 0, 0, None, None, 0, True)


def test_stats_count_each_state(conn):
    name = unique_name()
    conn.execute("SELECT pgflow.create_queue(%s, max_retries => 0)", (name,))
    try:
        conn.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[6]))", (name,))
        send(conn, name, delay=3600)                                   # 7: delayed
        time.sleep(0.05)
        send(conn, name)                                               # 8: visible
        leased = [r[0] for r in read(conn, name, qty=3)]               # 1,2,3: leased
        assert leased == [1, 2, 3]
        conn.execute("SELECT pgflow.archive(%s, 1::bigint)", (name,))  # 1: archived
        conn.execute("SELECT pgflow.delete(%s, 2::bigint)", (name,))   # 2: gone
        outcome = one(conn, "SELECT outcome FROM pgflow.nack(%s, 3, 'boom')", (name,))
        assert outcome == "dead_lettered"                              # 3: dead-lettered
        assert stats(conn, name) == {"depth": 5, "visible": 4, "in_flight": 0, "delayed": 1, "archived": 1,
                                     "dead_lettered": 1, "total_sent": 8}
        read(conn, name)                                               # 4: leased
        s = stats(conn, name)
        assert (s["visible"], s["in_flight"]) == (3, 1)
        assert s["visible"] + s["in_flight"] + s["delayed"] == s["depth"]
        oldest, newest = conn.execute("SELECT oldest_msg_age_sec, newest_msg_age_sec FROM pgflow.get_queue_stats(%s)",
                                      (name,)).fetchone()
        assert oldest > newest >= 0 and oldest - newest >= 0.04 and oldest < 60
        # the all-queues form reports the same for this queue, and one row per queue
        all_rows = conn.execute(f"SELECT queue_name, {', '.join(STATS_COLUMNS)} FROM pgflow.get_queue_stats()").fetchall()
        mine = [r for r in all_rows if r[0] == name]
        assert mine == [(name, *stats(conn, name).values())]
        assert len(all_rows) == one(conn, "SELECT count(*) FROM pgflow.queues")
        assert [r[0] for r in all_rows] == sorted(r[0] for r in all_rows)
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (name,))
        conn.execute("SELECT pgflow.purge_dlq(%s)", (name,))


def test_stats_total_sent_counts_every_id_issued(conn, queue):
    conn.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[10]))", (queue,))
    conn.execute("SELECT pgflow.purge_queue(%s)", (queue,))
    send(conn, queue)
    assert stats(conn, queue)["total_sent"] == 11
    assert stats(conn, queue)["depth"] == 1


# --- dropping a queue while others use it --------------------------------------------------------

@pytest.mark.parametrize("call", [
    "SELECT pgflow.send(%s, '{}')",
    "SELECT pgflow.send(%s, '{}', now())",
    "SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[])",
    "SELECT * FROM pgflow.get_queue_stats(%s)",
    "SELECT * FROM pgflow.nack(%s, 2, 'late')",
    "SELECT pgflow.retry_dlq(%s)",
])
def test_call_racing_drop_queue_gets_unknown_queue(make_conn, call):
    """A call that arrives while drop_queue's transaction is open waits for it, then reports the
    queue as unknown (42704), never an internal error about its vanished sequence."""
    admin = make_conn(autocommit=False)
    other = make_conn()
    name = unique_name()
    other.execute("SELECT pgflow.create_queue(%s, max_retries => 0)", (name,))
    # message 1 dead-lettered, message 2 leased
    other.execute("SELECT pgflow.send_batch(%s, ARRAY['{}', '{}']::jsonb[])", (name,))
    other.execute("SELECT * FROM pgflow.read(%s, 300, 2)", (name,))
    assert one(other, "SELECT outcome FROM pgflow.nack(%s, 1)", (name,)) == "dead_lettered"
    assert one(admin, "SELECT pgflow.drop_queue(%s)", (name,)) is True
    result = {}

    def run():
        try:
            result["rows"] = other.execute(call, (name,)).fetchall()
        except psycopg.Error as e:
            result["error"] = e.sqlstate

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "the call did not wait for drop_queue"
    admin.commit()
    t.join(10)
    assert result == {"error": "42704"}
    assert one(other, "SELECT count(*) FROM pgflow.messages m WHERE NOT EXISTS"
                      " (SELECT 1 FROM pgflow.queues q WHERE q.queue_id = m.queue_id)") == 0
    # the dead letter outlived its queue, untouched
    assert one(other, "SELECT count(*) FROM pgflow.list_dlq_messages(%s)", (name,)) == 1
    other.execute("SELECT pgflow.purge_dlq(%s)", (name,))


def test_drop_queue_waits_for_an_open_send(make_conn):
    producer = make_conn(autocommit=False)
    admin = make_conn()
    name = unique_name()
    admin.execute("SELECT pgflow.create_queue(%s)", (name,))
    send(producer, name, {"in": "flight"})
    result = {}
    t = threading.Thread(target=lambda: result.update(dropped=one(admin, "SELECT pgflow.drop_queue(%s)", (name,))))
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "drop_queue did not wait for the open send"
    producer.commit()
    t.join(10)
    assert result == {"dropped": True}
    assert one(admin, "SELECT count(*) FROM pgflow.list_queues() WHERE queue_name = %s", (name,)) == 0
    # the committed message went with its queue: nothing is left that belongs to no queue
    assert one(admin, "SELECT count(*) FROM pgflow.messages m WHERE NOT EXISTS"
                      " (SELECT 1 FROM pgflow.queues q WHERE q.queue_id = m.queue_id)") == 0


def test_stats_of_all_queues_pass_over_a_queue_being_dropped(make_conn):
    admin = make_conn(autocommit=False)
    other = make_conn()
    name = unique_name()
    other.execute("SELECT pgflow.create_queue(%s)", (name,))
    admin.execute("SELECT pgflow.drop_queue(%s)", (name,))
    start = time.monotonic()
    names = [r[0] for r in other.execute("SELECT queue_name FROM pgflow.get_queue_stats()")]
    assert time.monotonic() - start < 2 and name not in names
    admin.rollback()
    assert name in [r[0] for r in other.execute("SELECT queue_name FROM pgflow.get_queue_stats()")]
    other.execute("SELECT pgflow.drop_queue(%s)", (name,))


def test_create_queue_racing_drop_queue_of_the_same_name(make_conn):
    admin = make_conn(autocommit=False)
    other = make_conn()
    name = unique_name()
    other.execute("SELECT pgflow.create_queue(%s)", (name,))
    admin.execute("SELECT pgflow.drop_queue(%s)", (name,))
    result = {}
    t = threading.Thread(target=lambda: result.update(created=one(other, "SELECT pgflow.create_queue(%s)", (name,))))
    t.start()
    time.sleep(0.3)
    admin.commit()
    t.join(10)
    # the drop went first, so the queue was created anew, and it exists
    assert result == {"created": True}
    assert one(other, "SELECT count(*) FROM pgflow.list_queues() WHERE queue_name = %s", (name,)) == 1
    other.execute("SELECT pgflow.drop_queue(%s)", (name,))


def test_any_finite_delay_time_is_accepted(conn, queue):
    # The docs promise any finite timestamptz; 0.1.0 failed with 22008 from an internal helper
    # in the last 100 ms of the type's range (rounding the due time up left it).
    last = ["294276-12-31 23:59:59.95+00", "294276-12-31 23:59:59.999999+00", "294276-12-31 23:59:59.9+00"]
    for t in last:
        (mid,) = conn.execute("SELECT pgflow.send(%s, '{}', %s::timestamptz)", (queue, t)).fetchone()
        assert mid > 0
    ids = conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{}','{}']::jsonb[], %s::timestamptz)",
                       (queue, last[1])).fetchall()
    assert len(ids) == 2
    # none is visible, all are pending, and a due row stands for them
    assert conn.execute("SELECT count(*) FROM pgflow.read(%s, 30, 10)", (queue,)).fetchone()[0] == 0
    stats = conn.execute("SELECT depth, delayed FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()
    assert stats == (5, 5)
    assert conn.execute("""SELECT count(*) FROM pgflow.due_wakeups w JOIN pgflow.queues q USING (queue_id)
                            WHERE q.queue_name = %s AND w.due_at > '294276-12-31'""", (queue,)).fetchone()[0] >= 1
