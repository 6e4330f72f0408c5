"""A flow's queue belongs to the workflow layer: the queue API cannot lose, duplicate or forge
its tasks. 0.1.0 let a producer send a task-shaped message that started a task a second time
(with the forged input, while the real delivery's lease was live) and let archive, delete,
pop and purge_queue remove a task's message, leaving its run started for ever."""

import uuid

from psycopg.types.json import Jsonb

from conftest import error_of, session_as

SEQ = [{"slug": "a"}, {"slug": "b", "deps": ["a"]}]
MAP = [{"slug": "m", "type": "map"}]


def snapshot(conn, flow):
    """Everything a call could have changed for the flow: its messages, tasks, runs and DLQ."""
    q = """SELECT (SELECT coalesce(string_agg(m::text, ';' ORDER BY m.msg_id), '') FROM pgflow.messages m
                    JOIN pgflow.queues q USING (queue_id) WHERE q.queue_name = %(f)s),
                  (SELECT coalesce(string_agg(t::text, ';' ORDER BY t.step_slug, t.task_index), '')
                     FROM pgflow.step_tasks t WHERE t.flow_slug = %(f)s),
                  (SELECT coalesce(string_agg(r::text, ';' ORDER BY r.run_id), '') FROM pgflow.runs r
                    WHERE r.flow_slug = %(f)s),
                  (SELECT count(*) FROM pgflow.dlq d WHERE d.queue_name = %(f)s),
                  (SELECT q::text FROM pgflow.queues q WHERE q.queue_name = %(f)s)"""
    return conn.execute(q, {"f": flow}).fetchone()


def insert_directly(conn, flow, body):
    """A message put in the flow's queue without the queue API (as a superuser could, or as
    0.1.0's send did); returns its msg_id."""
    return conn.execute(
        """INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
           SELECT q.queue_id, nextval(q.msg_seq), clock_timestamp(), 5, %s FROM pgflow.queues q
            WHERE q.queue_name = %s RETURNING msg_id""", (Jsonb(body), flow)).fetchone()[0]


# every function of the queue API that would move a flow's messages, with arguments
REFUSED = [
    ("send", "SELECT pgflow.send(%(f)s, %(body)s)"),
    ("send", "SELECT pgflow.send(%(f)s, %(body)s, now())"),
    ("send_batch", "SELECT pgflow.send_batch(%(f)s, ARRAY[%(body)s])"),
    ("send_batch", "SELECT pgflow.send_batch(%(f)s, ARRAY[%(body)s], now())"),
    ("send_with_notify", "SELECT pgflow.send_with_notify(%(f)s, %(body)s)"),
    ("pop", "SELECT * FROM pgflow.pop(%(f)s)"),
    ("archive", "SELECT pgflow.archive(%(f)s, %(msg)s)"),
    ("archive", "SELECT pgflow.archive(%(f)s, ARRAY[%(msg)s]::bigint[])"),
    ("delete", "SELECT pgflow.delete(%(f)s, %(msg)s)"),
    ("delete", "SELECT pgflow.delete(%(f)s, ARRAY[%(msg)s]::bigint[])"),
    ("ack_and_read", "SELECT * FROM pgflow.ack_and_read(%(f)s, ARRAY[%(msg)s]::bigint[], 30)"),
    ("set_vt", "SELECT * FROM pgflow.set_vt(%(f)s, %(msg)s, 3600)"),
    ("nack", "SELECT * FROM pgflow.nack(%(f)s, %(msg)s, 'x')"),
    ("purge_queue", "SELECT pgflow.purge_queue(%(f)s)"),
    ("alter_queue", "SELECT pgflow.alter_queue(%(f)s, max_retries => 0)"),
    ("drop_queue", "SELECT pgflow.drop_queue(%(f)s)"),
    ("retry_dlq", "SELECT pgflow.retry_dlq(%(f)s)"),
]


def test_the_queue_api_refuses_a_flows_queue_and_changes_nothing(conn, flows):
    flow = flows(SEQ)
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    (msg,) = conn.execute("SELECT msg_id FROM pgflow.poll_for_tasks(%s, 60, 1, 0)", (flow,)).fetchone()
    before = snapshot(conn, flow)
    body = Jsonb({"run_id": str(run_id), "step_slug": "a", "task_index": 0, "input": "ATTACKER"})
    for operation, sql in REFUSED:
        e = error_of(conn, sql, {"f": flow, "body": body, "msg": msg})
        assert e.sqlstate == "55000", (sql, e.sqlstate, e.diag.message_primary)
        assert e.diag.message_primary == f'queue "{flow}" delivers the tasks of flow "{flow}"'
        assert ("drop_flow" in e.diag.message_hint) and (operation == "drop_queue" or operation in e.diag.message_hint)
        assert "Traceback" not in (e.diag.message_detail or "") and "panicked" not in (e.diag.message_detail or "")
        assert snapshot(conn, flow) == before, sql
    # reading stays open: read + start_tasks is a worker's protocol (nothing visible now)
    assert conn.execute("SELECT count(*) FROM pgflow.read(%s, 30, 5)", (flow,)).fetchone()[0] == 0
    assert conn.execute("SELECT depth FROM pgflow.get_queue_stats(%s)", (flow,)).fetchone()[0] == 1
    # and the run goes on through the workflow functions
    assert conn.execute("SELECT pgflow.complete_task(%s, 'a', 0, '1')", (run_id,)).fetchone()[0] == "completed"


def test_roles_get_the_same_refusal(conn, flows):
    flow = flows(SEQ)
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    (msg,) = conn.execute("SELECT msg_id FROM pgflow.poll_for_tasks(%s, 60, 1, 0)", (flow,)).fetchone()
    before = snapshot(conn, flow)
    forged = Jsonb({"run_id": str(run_id), "step_slug": "a", "task_index": 0, "input": "ATTACKER"})
    for role, calls in [("pgflow_producer", ["SELECT pgflow.send(%(f)s, %(body)s)"]),
                        ("pgflow_consumer", ["SELECT pgflow.archive(%(f)s, %(msg)s)",
                                            "SELECT pgflow.delete(%(f)s, %(msg)s)",
                                            "SELECT * FROM pgflow.pop(%(f)s)"]),
                        ("pgflow_admin", ["SELECT pgflow.purge_queue(%(f)s)"])]:
        with session_as(conn, role) as c:
            for sql in calls:
                e = error_of(c, sql, {"f": flow, "body": forged, "msg": msg})
                assert e.sqlstate == "55000", (role, sql, e.sqlstate)
    assert snapshot(conn, flow) == before


def test_a_copy_of_a_task_message_never_starts_the_task(conn, flows, make_conn):
    """Whatever puts a task-shaped message in a flow's queue, only the message the task was
    queued with starts it: a copy is dead-lettered, the real delivery keeps its lease, its
    attempt count and its input."""
    flow = flows(MAP)
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '[10, 20]')", (flow,)).fetchone()[0]
    a = make_conn()
    first = a.execute("SELECT task_index, input FROM pgflow.poll_for_tasks(%s, 600, 1, 0)", (flow,)).fetchone()
    assert first == (0, 10)
    forged = insert_directly(conn, flow, {"run_id": str(run_id), "step_slug": "m", "task_index": 0,
                                          "input": "ATTACKER"})
    b = make_conn()
    got = b.execute("SELECT task_index, input FROM pgflow.poll_for_tasks(%s, 600, 10, 0)", (flow,)).fetchall()
    assert got == [(1, 20)]          # the other task; never task 0 again, never the forged input
    task0 = conn.execute("SELECT status, attempts_count FROM pgflow.step_tasks WHERE run_id = %s "
                         "AND task_index = 0", (run_id,)).fetchone()
    assert task0 == ("started", 1)
    dlq = conn.execute("SELECT msg_id, message ->> 'input', last_error FROM pgflow.list_dlq_messages(%s)",
                       (flow,)).fetchall()
    assert [(m, i) for m, i, _ in dlq] == [(forged, "ATTACKER")]
    assert f'not a task of flow "{flow}"' in dlq[0][2]
    # the real deliveries finish the run
    assert a.execute("SELECT pgflow.complete_task(%s, 'm', 0, '1')", (run_id,)).fetchone()[0] == "completed"
    assert b.execute("SELECT pgflow.complete_task(%s, 'm', 1, '2')", (run_id,)).fetchone()[0] == "completed"
    assert conn.execute("SELECT status, output FROM pgflow.runs WHERE run_id = %s",
                        (run_id,)).fetchone() == ("completed", {"m": [1, 2]})
    # and a dead-lettered stray cannot be put back into the flow's queue
    (dlq_id,) = conn.execute("SELECT dlq_id FROM pgflow.list_dlq_messages(%s)", (flow,)).fetchone()
    assert error_of(conn, "SELECT pgflow.retry_dlq_message(%s)", (dlq_id,)).sqlstate == "55000"
    assert conn.execute("SELECT count(*) FROM pgflow.list_dlq_messages(%s)", (flow,)).fetchone()[0] == 1


def test_a_copy_read_by_start_tasks_is_no_task_either(conn, flows):
    flow = flows(SEQ)
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    forged = insert_directly(conn, flow, {"run_id": str(run_id), "step_slug": "a", "task_index": 0})
    ids = [r[0] for r in conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 10)", (flow,))]
    assert forged in ids and len(ids) == 2
    rows = conn.execute("SELECT msg_id, step_slug FROM pgflow.start_tasks(%s, %s, %s)",
                        (flow, ids, uuid.uuid4())).fetchall()
    assert [r[1] for r in rows] == ["a"] and rows[0][0] != forged
    assert conn.execute("SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = %s",
                        (run_id,)).fetchone()[0] == 1


def test_dropping_the_flow_frees_the_name(conn, flows):
    flow = flows(SEQ)
    assert conn.execute("SELECT managed_by FROM pgflow.queues WHERE queue_name = %s", (flow,)).fetchone() == ("flow",)
    assert conn.execute("SELECT pgflow.drop_flow(%s)", (flow,)).fetchone()[0] is True
    assert conn.execute("SELECT count(*) FROM pgflow.queues WHERE queue_name = %s", (flow,)).fetchone()[0] == 0
    # a plain queue of that name afterwards takes the whole queue API
    conn.execute("SELECT pgflow.create_queue(%s)", (flow,))
    try:
        assert conn.execute("SELECT pgflow.send(%s, '{}')", (flow,)).fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM pgflow.pop(%s)", (flow,)).fetchone()[0] == 1
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (flow,))
