"""Waiting for work without holding back VACUUM: CALL pgflow.wait_for_messages commits between
its looks, so a session blocked in it holds no snapshot (no backend_xmin), while one blocked in
read_with_poll or poll_for_tasks holds its statement's snapshot for the whole wait.

The test cluster preloads pgflow, so waits end at the commit of a send.
"""

import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import connect, error_of, session_as, sqlstate, unique_name


def waiting_xmins(c, app, n):
    """Whether each of the n sessions named app holds an xmin, once all n wait on their latch
    (up to 15 s for them to get there)."""
    deadline = time.monotonic() + 15
    while True:
        rows = c.execute("""SELECT backend_xmin IS NOT NULL FROM pg_stat_activity
                             WHERE application_name = %s AND state = 'active'
                               AND wait_event_type = 'Extension'""", (app,)).fetchall()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def call_wait(target, seconds, app, out=None):
    with connect(application_name=app) as c:
        t = time.monotonic()
        c.execute("CALL pgflow.wait_for_messages(%s, %s)", (target, seconds))
        if out is not None:
            out.append(time.monotonic() - t)


def test_wait_returns_when_a_send_commits(conn, make_queue):
    q = make_queue()
    took = []
    t = threading.Thread(target=call_wait, args=(q, 30, unique_name("w"), took))
    t.start()
    time.sleep(0.5)
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    t.join(10)
    assert not t.is_alive() and 0.4 < took[0] < 10
    # the message is still there, for read to lease
    assert len(conn.execute("SELECT * FROM pgflow.read(%s, 30, 1)", (q,)).fetchall()) == 1


def test_wait_returns_at_once_when_a_message_is_ready_and_times_out_when_none(conn, make_queue):
    q = make_queue()
    took = []
    call_wait(q, 1, unique_name("w"), took)
    assert 0.9 <= took[0] < 5
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    call_wait(q, 30, unique_name("w"), took)
    assert took[1] < 1


def test_wait_for_a_flows_tasks_then_poll(conn, flows):
    flow = flows([{"slug": "a"}])
    conn.execute("SELECT pgflow.start_flow(%s, '{}')", (flow,))
    c = connect()
    c.execute("CALL pgflow.wait_for_messages(%s, 5)", (flow,))
    tasks = c.execute("SELECT step_slug FROM pgflow.poll_for_tasks(%s, 30, 1, 0)", (flow,)).fetchall()
    assert tasks == [("a",)]
    c.close()


def test_waiting_holds_no_snapshot_unlike_read_with_poll(conn, make_queue):
    q = make_queue()
    calls, reads = unique_name("call"), unique_name("rwp")
    threads = [threading.Thread(target=call_wait, args=(q, 4, calls)) for _ in range(3)]

    def rwp():
        with connect(application_name=reads) as c:
            c.execute("SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 4)", (q,)).fetchall()
    threads += [threading.Thread(target=rwp) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert waiting_xmins(conn, calls, 3) == [(False,)] * 3
        assert waiting_xmins(conn, reads, 3) == [(True,)] * 3
    finally:
        for t in threads:
            t.join()


def dead_after_vacuum(c, table):
    c.execute(f"VACUUM {table}")
    return c.execute("SELECT n_dead_tup FROM pg_stat_all_tables WHERE relid = %s::regclass",
                     (table,)).fetchone()[0]


def test_vacuum_removes_dead_rows_while_consumers_wait(conn, make_queue, flows):
    # 20 sessions wait on a queue and 20 on a flow's queue, in CALL, while another session
    # churns messages (send then delete: each leaves a dead row). A VACUUM during the wait
    # removes them all. The same churn under sessions waiting in read_with_poll leaves them.
    idle, churned = make_queue(), make_queue()
    flow = flows([{"slug": "a"}])
    app = unique_name("vac")
    waiters = [threading.Thread(target=call_wait, args=(target, 8, app)) for target in [idle] * 20 + [flow] * 20]
    for t in waiters:
        t.start()

    def churn(n):
        for _ in range(n):
            mid = conn.execute("SELECT pgflow.send(%s, '{}')", (churned,)).fetchone()[0]
            conn.execute("SELECT pgflow.delete(%s, %s)", (churned, mid))

    try:
        assert waiting_xmins(conn, app, 40) == [(False,)] * 40
        churn(300)
        assert dead_after_vacuum(conn, "pgflow.messages") < 50
    finally:
        for t in waiters:
            t.join()

    # the contrast, which shows the check can fail: waiting in read_with_poll pins the horizon
    readers_app = unique_name("rwp")

    def rwp():
        with connect(application_name=readers_app) as c:
            c.execute("SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 6)", (idle,)).fetchall()
    readers = [threading.Thread(target=rwp) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        assert waiting_xmins(conn, readers_app, 2) == [(True,)] * 2
        churn(300)
        assert dead_after_vacuum(conn, "pgflow.messages") >= 300
    finally:
        for t in readers:
            t.join()


def test_wait_refuses_a_transaction_block_and_bad_input(conn, make_queue):
    q = make_queue()
    tx = connect(autocommit=False)
    err = error_of(tx, "CALL pgflow.wait_for_messages(%s, 1)", (q,))
    assert err.sqlstate == "2D000"
    assert "outside a transaction block" in err.diag.message_primary
    assert "read_with_poll" in err.diag.message_hint
    tx.close()
    # from a DO block or a function: atomic too
    assert sqlstate(conn, "DO $$ BEGIN CALL pgflow.wait_for_messages('x', 1); END $$") in ("2D000", "42704")
    for args, state, named in [((None, 1, 100), "22004", "queue_name"),
                               (("no_such_queue_x", 1, 100), "42704", "no_such_queue_x"),
                               ((q, -1, 100), "22023", "max_poll_seconds"),
                               ((q, 3601, 100), "22023", "max_poll_seconds"),
                               ((q, 1, 0), "22023", "poll_interval_ms"),
                               ((q, None, 100), "22004", "max_poll_seconds")]:
        try:
            conn.execute("CALL pgflow.wait_for_messages(%s, %s, %s)", args)
        except psycopg.Error as err:
            assert (err.sqlstate, named in err.diag.message_primary) == (state, True), (args, err)
        else:
            raise AssertionError(f"{args} accepted")


def test_a_queue_dropped_during_the_wait_is_a_42704(conn):
    q = unique_name("q")
    conn.execute("SELECT pgflow.create_queue(%s)", (q,))
    errors = []

    def wait():
        try:
            call_wait(q, 10, unique_name("w"))
        except psycopg.Error as e:
            errors.append(e.sqlstate)
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    conn.execute("SELECT pgflow.drop_queue(%s)", (q,))
    t.join(15)
    assert errors == ["42704"]


@pytest.mark.parametrize("group,allowed", [("pgflow_consumer", True), ("pgflow_producer", False),
                                           ("pgflow_admin", True)])
def test_who_may_wait(conn, make_queue, group, allowed):
    q = make_queue()
    conn.execute("SELECT pgflow.send(%s, %s)", (q, Jsonb({})))
    with session_as(conn, group) as c:
        try:
            c.execute("CALL pgflow.wait_for_messages(%s, 1)", (q,))
        except psycopg.errors.InsufficientPrivilege:
            assert not allowed
        else:
            assert allowed
            # the statements ran as the extension's owner, and the caller is itself again
            assert c.execute("SELECT current_user = session_user").fetchone()[0] is True
