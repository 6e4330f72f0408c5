"""Topics: bind queues to patterns, publish with a routing key, one copy per matching queue, in
the publishing transaction (AMQP topic exchange rules, src/queue/topics.rs)."""

import json

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import connect, error_of, session_as


def bind(conn, pattern, queue):
    return conn.execute("SELECT pgflow.bind_topic(%s, %s)", (pattern, queue)).fetchone()[0]


def publish(conn, key, message=None, **kw):
    extra = "".join(f", {k} => %({k})s" for k in kw)
    return conn.execute(f"SELECT queue_name, msg_id FROM pgflow.publish(%(key)s, %(m)s{extra})",
                        {"key": key, "m": Jsonb(message if message is not None else {"k": key}), **kw}).fetchall()


def bodies(conn, queue):
    return [r[0] for r in conn.execute("SELECT message FROM pgflow.list_pending_messages(%s)", (queue,))]


def test_publish_reaches_every_matching_queue_once(conn, make_queue):
    eu, all_orders, created, other = make_queue(), make_queue(), make_queue(), make_queue()
    assert bind(conn, "orders.eu.*", eu) is True
    assert bind(conn, "orders.#", all_orders) is True
    assert bind(conn, "#.created", created) is True
    assert bind(conn, "orders.*.created", created) is True  # two patterns, still one copy
    assert bind(conn, "orders.#", all_orders) is False  # already bound
    assert bind(conn, "invoices.#", other) is True
    rows = publish(conn, "orders.eu.created", {"id": 7})
    assert sorted(q for q, _ in rows) == sorted([eu, all_orders, created])
    assert len(rows) == 3 and all(m >= 1 for _, m in rows)
    for q in (eu, all_orders, created):
        assert bodies(conn, q) == [{"id": 7}]
    assert bodies(conn, other) == []
    assert publish(conn, "orders.us.updated") == [(all_orders, 2)]
    assert publish(conn, "nothing.matches") == []


def test_publish_is_all_or_none_and_keeps_send_options(conn, make_queue):
    a, b = make_queue(), make_queue()
    bind(conn, "t.#", a)
    bind(conn, "t.#", b)
    tx = connect(autocommit=False)
    rows = tx.execute("SELECT * FROM pgflow.publish('t.x', '{\"n\": 1}', delay => 30, priority => 5, "
                      "headers => '{\"h\": 1}')").fetchall()
    assert len(rows) == 2
    tx.rollback()
    assert bodies(conn, a) == [] and bodies(conn, b) == []
    publish(conn, "t.x", {"n": 2}, delay=30, priority=5, headers=Jsonb({"h": 1}))
    got = conn.execute("SELECT state, priority, headers FROM pgflow.list_pending_messages(%s)", (a,)).fetchall()
    assert got == [("delayed", 5, {"h": 1})]
    tx.close()


def test_publish_batch_sends_the_batch_to_each_queue(conn, make_queue):
    a, b = make_queue(), make_queue()
    bind(conn, "jobs.*", a)
    bind(conn, "#", b)
    rows = conn.execute("SELECT queue_name, msg_id FROM pgflow.publish_batch('jobs.x', %s)",
                        ([Jsonb({"i": i}) for i in range(3)],)).fetchall()
    assert rows == sorted([(a, 1), (a, 2), (a, 3), (b, 1), (b, 2), (b, 3)])
    assert bodies(conn, b) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_bindings_are_listed_and_go_with_their_queue(conn, make_queue):
    a = make_queue()
    bind(conn, "x.#", a)
    bind(conn, "y.*", a)
    assert [(p, q) for p, q, _ in conn.execute("SELECT * FROM pgflow.list_topic_bindings(%s)", (a,))] == \
        [("x.#", a), ("y.*", a)]
    assert conn.execute("SELECT pgflow.unbind_topic('y.*', %s)", (a,)).fetchone()[0] is True
    assert conn.execute("SELECT pgflow.unbind_topic('y.*', %s)", (a,)).fetchone()[0] is False
    conn.execute("SELECT pgflow.drop_queue(%s)", (a,))
    assert conn.execute("SELECT count(*) FROM pgflow.topic_bindings b JOIN pgflow.queues q USING (queue_id) "
                        "WHERE q.queue_name = %s", (a,)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pgflow.list_topic_bindings() WHERE queue_name = %s",
                        (a,)).fetchone()[0] == 0


def test_notify_queues_announce_published_copies(conn, make_conn, make_queue):
    q = make_queue(notify=True)
    bind(conn, "n.#", q)
    lis = make_conn()
    lis.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgflow.queue.{q}")))
    (_, mid), = publish(conn, "n.one")
    (note,) = list(lis.notifies(timeout=5, stop_after=1))
    assert json.loads(note.payload)["last_msg_id"] == mid


@pytest.mark.parametrize("sql,args,state,named", [
    ("SELECT pgflow.bind_topic(%s, %s)", ("a..b", "Q"), "22023", "pattern"),
    ("SELECT pgflow.bind_topic(%s, %s)", ("a*.b", "Q"), "22023", "pattern"),
    ("SELECT pgflow.bind_topic(%s, %s)", (None, "Q"), "22004", "pattern"),
    ("SELECT pgflow.bind_topic(%s, %s)", ("a.#", "no_such_queue_t"), "42704", "no_such_queue_t"),
    ("SELECT pgflow.unbind_topic(%s, %s)", ("", "Q"), "22023", "pattern"),
    ("SELECT * FROM pgflow.publish(%s, '{}')", ("a.*",), "22023", "routing_key"),
    ("SELECT * FROM pgflow.publish(%s, '{}')", ("x" * 256,), "22023", "routing_key"),
    ("SELECT * FROM pgflow.publish(%s, NULL)", ("a.b",), "22004", "message"),
    ("SELECT * FROM pgflow.publish(%s, '{}', delay => -1)", ("a.b",), "22023", "delay"),
    ("SELECT * FROM pgflow.publish(%s, '{}', headers => '[]')", ("a.b",), "22023", "headers"),
    ("SELECT * FROM pgflow.publish_batch(%s, NULL)", (None,), "22004", "routing_key"),
])
def test_bad_input_is_refused_and_changes_nothing(conn, make_queue, sql, args, state, named):
    q = make_queue()
    bind(conn, "a.#", q)
    e = error_of(conn, sql, tuple(q if a == "Q" else a for a in args))
    assert e.sqlstate == state
    assert named in e.diag.message_primary
    assert bodies(conn, q) == []
    assert [p for p, _, _ in conn.execute("SELECT * FROM pgflow.list_topic_bindings(%s)", (q,))] == ["a.#"]


def test_a_flows_queue_cannot_be_bound(conn, flows):
    flow = flows([{"slug": "a"}])
    e = error_of(conn, "SELECT pgflow.bind_topic('x.#', %s)", (flow,))
    assert e.sqlstate == "55000"


def test_who_may_bind_and_publish(conn, make_queue):
    q = make_queue()
    bind(conn, "r.#", q)
    with session_as(conn, "pgflow_producer") as p:
        assert len(p.execute("SELECT * FROM pgflow.publish('r.x', '{}')").fetchall()) == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute("SELECT pgflow.bind_topic('s.#', %s)", (q,))
    with session_as(conn, "pgflow_consumer") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM pgflow.publish('r.x', '{}')")
