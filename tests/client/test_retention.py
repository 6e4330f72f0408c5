"""Retention: prune_archive, prune_runs and apply_retention delete what is older than asked,
of the queue or flow asked, never a run under way, and refuse bad input changing nothing."""

import pytest
from psycopg.types.json import Jsonb

from conftest import sqlstate, unique_name
from test_workflow import SEQ, complete, poll, start


def archived(conn, q):
    return conn.execute(
        "SELECT a.msg_id FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id) "
        "WHERE q.queue_name = %s ORDER BY a.msg_id", (q,)).fetchall()


def backdate_archive(conn, q, msg_ids, age="2 hours"):
    conn.execute(
        "UPDATE pgflow.archive a SET archived_at = clock_timestamp() - %s::interval "
        "FROM pgflow.queues q WHERE q.queue_id = a.queue_id AND q.queue_name = %s AND a.msg_id = ANY (%s)",
        (age, q, msg_ids))


def test_prune_archive_by_age_queue_and_batch(conn, make_queue):
    q, other = make_queue(), make_queue()
    ids = [conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0] for _ in range(5)]
    oid = conn.execute("SELECT pgflow.send(%s, '{}')", (other,)).fetchone()[0]
    conn.execute("SELECT pgflow.archive(%s, %s::bigint[])", (q, ids))
    conn.execute("SELECT pgflow.archive(%s, %s)", (other, oid))
    backdate_archive(conn, q, ids[:3])
    backdate_archive(conn, other, [oid])
    # one queue only, at most 2 rows per call
    assert conn.execute("SELECT pgflow.prune_archive('1 hour', %s, 2)", (q,)).fetchone()[0] == 2
    assert len(archived(conn, q)) == 3
    assert conn.execute("SELECT pgflow.prune_archive('1 hour', %s)", (q,)).fetchone()[0] == 1
    assert [r[0] for r in archived(conn, q)] == ids[3:]          # the recent ones stay
    assert [r[0] for r in archived(conn, other)] == [oid]        # another queue is untouched
    # all queues
    assert conn.execute("SELECT pgflow.prune_archive('1 hour')").fetchone()[0] >= 1
    assert archived(conn, other) == []
    assert conn.execute("SELECT pgflow.prune_archive('0 seconds', %s)", (q,)).fetchone()[0] == 2


@pytest.fixture
def seq_flow(conn):
    slug = unique_name("f")
    conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb({"steps": SEQ})))
    yield slug
    conn.execute("SELECT pgflow.drop_flow(%s)", (slug,))


def finish_run(conn, flow, run_id):
    for _ in range(3):
        (t,) = [t for t in poll(conn, flow, qty=1)]
        assert t[1] == run_id
        assert complete(conn, run_id, t[2], t[3], "ok") == "completed"


def rows_of(conn, run_id):
    return conn.execute(
        """SELECT (SELECT count(*) FROM pgflow.runs WHERE run_id = %(r)s),
                  (SELECT count(*) FROM pgflow.step_states WHERE run_id = %(r)s),
                  (SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %(r)s)""", {"r": run_id}).fetchone()


def test_prune_runs_deletes_old_finished_runs_only(conn, seq_flow):
    flow = seq_flow
    old_done = start(conn, flow, {"n": 1})
    finish_run(conn, flow, old_done)
    old_failed = start(conn, flow, {"n": 2})
    conn.execute("UPDATE pgflow.runs SET status = 'failed', failed_at = clock_timestamp() WHERE run_id = %s",
                 (old_failed,))
    conn.execute("DELETE FROM pgflow.messages m USING pgflow.step_tasks t "
                 "WHERE t.run_id = %s AND m.msg_id = t.message_id", (old_failed,))
    recent_done = start(conn, flow, {"n": 3})
    finish_run(conn, flow, recent_done)
    running = start(conn, flow, {"n": 4})
    conn.execute("""UPDATE pgflow.runs SET completed_at = clock_timestamp() - interval '2 hours'
                     WHERE run_id = %s""", (old_done,))
    conn.execute("""UPDATE pgflow.runs SET failed_at = clock_timestamp() - interval '2 hours',
                           started_at = clock_timestamp() - interval '3 hours' WHERE run_id IN (%s, %s)""",
                 (old_failed, running))
    assert rows_of(conn, old_done) == (1, 3, 3)
    assert conn.execute("SELECT pgflow.prune_runs('1 hour', %s)", (flow,)).fetchone()[0] == 2
    assert rows_of(conn, old_done) == (0, 0, 0)
    assert rows_of(conn, old_failed) == (0, 0, 0)
    assert rows_of(conn, recent_done) == (1, 3, 3)
    assert rows_of(conn, running)[0] == 1
    # the run under way goes on; a late report for a pruned run is an unknown run
    finish_run(conn, flow, running)
    assert conn.execute("SELECT status FROM pgflow.runs WHERE run_id = %s", (running,)).fetchone()[0] == "completed"
    assert sqlstate(conn, "SELECT pgflow.complete_task(%s, 'a', 0, '1')", (old_done,)) == "42704"
    # batches
    assert conn.execute("SELECT pgflow.prune_runs('0 seconds', %s, 1)", (flow,)).fetchone()[0] == 1
    assert conn.execute("SELECT pgflow.prune_runs('0 seconds', %s)", (flow,)).fetchone()[0] == 1


def test_apply_retention_follows_the_settings(conn, make_queue, seq_flow):
    q = make_queue()
    mid = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    conn.execute("SELECT pgflow.archive(%s, %s)", (q, mid))
    backdate_archive(conn, q, [mid], "3 days")
    run_id = start(conn, seq_flow, {})
    finish_run(conn, seq_flow, run_id)
    conn.execute("UPDATE pgflow.runs SET completed_at = clock_timestamp() - interval '3 days' WHERE run_id = %s",
                 (run_id,))
    # 0, the default, keeps everything
    conn.execute("RESET pgflow.archive_retention")
    conn.execute("RESET pgflow.run_retention")
    got = conn.execute("SELECT pgflow.apply_retention()").fetchone()[0]
    assert got == {"archived_messages_deleted": 0, "runs_deleted": 0}
    assert archived(conn, q) != [] and rows_of(conn, run_id)[0] == 1
    conn.execute("SET pgflow.archive_retention = '2d'")
    conn.execute("SET pgflow.run_retention = '2d'")
    got = conn.execute("SELECT pgflow.apply_retention()").fetchone()[0]
    assert got["archived_messages_deleted"] >= 1 and got["runs_deleted"] >= 1
    assert archived(conn, q) == [] and rows_of(conn, run_id) == (0, 0, 0)
    assert conn.execute("SHOW pgflow.run_retention").fetchone()[0] == "2d"


def test_retention_bad_input_changes_nothing(conn, make_queue, seq_flow):
    q = make_queue()
    mid = conn.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
    conn.execute("SELECT pgflow.archive(%s, %s)", (q, mid))
    backdate_archive(conn, q, [mid])
    before = conn.execute("SELECT (SELECT count(*) FROM pgflow.archive), (SELECT count(*) FROM pgflow.runs)").fetchone()
    cases = [
        ("SELECT pgflow.prune_archive(NULL)", None, "22004"),
        ("SELECT pgflow.prune_archive('-1 hour')", None, "22023"),
        ("SELECT pgflow.prune_archive('1 hour', NULL, 0)", None, "22023"),
        ("SELECT pgflow.prune_archive('1 hour', %s)", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.prune_archive('1 hour', 'bad name; drop table x')", None, "22023"),
        ("SELECT pgflow.prune_runs(NULL)", None, "22004"),
        ("SELECT pgflow.prune_runs('-1 day')", None, "22023"),
        ("SELECT pgflow.prune_runs('178000000 years')", None, "22023"),
        ("SELECT pgflow.prune_archive('1001 years')", None, "22023"),
        ("SELECT pgflow.prune_runs('1 hour', NULL, -5)", None, "22023"),
        ("SELECT pgflow.prune_runs('1 hour', %s)", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.prune_runs('1 hour', '')", None, "22023"),
        ("SET pgflow.run_retention = -1", None, "22023"),
        ("SET pgflow.archive_retention = 'soon'", None, "22023"),
    ]
    for sql, params, code in cases:
        assert sqlstate(conn, sql, params) == code, sql
    after = conn.execute("SELECT (SELECT count(*) FROM pgflow.archive), (SELECT count(*) FROM pgflow.runs)").fetchone()
    assert after == before
