"""retry_run: a failed or cancelled run carries on from where it stopped, under the same run_id,
with fresh attempts for what did not complete, its history kept; late reports change nothing;
retention never takes a run a retry is bringing back."""

import threading
import time
import uuid

from conftest import connect, session_as, sqlstate
from test_workflow import collect, complete, events_of, fail, poll, run_row, start, state


def retry(conn, run_id):
    return conn.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0]


def tasks_of(conn, run_id):
    return conn.execute("SELECT step_slug, task_index, status, attempts_count FROM pgflow.step_tasks "
                        "WHERE run_id = %s ORDER BY step_slug, task_index", (run_id,)).fetchall()


def test_a_failed_run_carries_on_and_completed_steps_are_not_run_again(conn, flows, make_conn):
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"]}, {"slug": "c", "deps": ["b"]}], max_attempts=2)
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {"n": 1})
    poll(conn, flow)
    assert complete(conn, run_id, "a", 0, "A") == "completed"
    poll(conn, flow)
    assert fail(conn, run_id, "b", 0, "upstream 503", retry=False) == "failed"
    assert run_row(conn, run_id)[0] == "failed"

    assert retry(conn, run_id) == "retried"
    assert conn.execute("SELECT status, failed_at FROM pgflow.runs WHERE run_id = %s", (run_id,)).fetchone() \
        == ("started", None)
    assert tasks_of(conn, run_id) == [("a", 0, "completed", 1), ("b", 0, "queued", 0)]
    tasks = poll(conn, flow)
    # only b comes back, with a's output as it was, and as a first attempt
    assert [(t[2], t[5]) for t in tasks] == [("b", {"run": {"n": 1}, "a": "A"})]
    assert conn.execute("SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'b'",
                        (run_id,)).fetchone()[0] == 1
    assert complete(conn, run_id, "b", 0, "B") == "completed"
    poll(conn, flow)
    assert complete(conn, run_id, "c", 0, "C") == "completed"
    assert run_row(conn, run_id) == ("completed", {"c": "C"})
    # its history: what was started again, with its attempts and last error
    s = state(conn, run_id)
    assert [(r["retry"], r["previous_status"]) for r in s["retries"]] == [(1, "failed")]
    assert s["retries"][0]["tasks"] == [{"step_slug": "b", "task_index": 0, "status": "failed",
                                         "attempts": 1, "error_message": "upstream 503"}]
    evs = [e for e in events_of(collect(listener), "pgflow.flows") if e["event"] == "workflow_retried"]
    assert evs == [{"event": "workflow_retried", "run_id": str(run_id), "flow_slug": flow, "retry": 1}]


def test_a_map_step_runs_again_only_its_unfinished_tasks(conn, flows):
    flow = flows([{"slug": "a"}, {"slug": "m", "type": "map", "deps": ["a"]}], max_attempts=1)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    complete(conn, run_id, "a", 0, [10, 20, 30, 40])
    tasks = {t[3]: t for t in poll(conn, flow)}
    assert complete(conn, run_id, "m", 0, "x0") == "completed"
    assert complete(conn, run_id, "m", 2, "x2") == "completed"
    assert conn.execute("SELECT pgflow.fail_task(%s, 'm', 1, 'boom')", (run_id,)).fetchone()[0] == "failed"
    assert len(tasks) == 4
    assert retry(conn, run_id) == "retried"
    again = sorted((t[3], t[5]) for t in poll(conn, flow))
    assert again == [(1, 20), (3, 40)]  # the failed task and the one whose run failed under it
    assert complete(conn, run_id, "m", 3, "x3") == "completed"
    assert complete(conn, run_id, "m", 1, "x1") == "completed"
    assert run_row(conn, run_id) == ("completed", {"m": ["x0", "x1", "x2", "x3"]})
    assert state(conn, run_id)["retries"][0]["tasks"] == [
        {"step_slug": "m", "task_index": 1, "status": "failed", "attempts": 1, "error_message": "boom"},
        {"step_slug": "m", "task_index": 3, "status": "started", "attempts": 1, "error_message": None}]


def test_a_cancelled_run_resumes_and_unstarted_steps_wait_for_their_deps(conn, flows):
    flow = flows([{"slug": "a"}, {"slug": "m", "type": "map", "deps": ["a"]}, {"slug": "z", "deps": ["m"]}])
    run_id = start(conn, flow, {})
    poll(conn, flow)
    complete(conn, run_id, "a", 0, [1, 2])
    (started,) = poll(conn, flow, qty=1)
    assert conn.execute("SELECT pgflow.cancel_run(%s)", (run_id,)).fetchone()[0] == "cancelled"
    assert retry(conn, run_id) == "retried"
    steps = {x["step_slug"]: x["status"] for x in state(conn, run_id)["steps"]}
    assert steps == {"a": "completed", "m": "started", "z": "created"}
    # the worker that held a task before the cancel reports late: its delivery is gone
    assert complete(conn, run_id, "m", started[3], "late") == "not_started"
    for t in poll(conn, flow):
        assert complete(conn, run_id, "m", t[3], t[5] * 2) == "completed"
    (z,) = poll(conn, flow)
    assert z[5]["m"] == [2, 4]
    complete(conn, run_id, "z", 0, "done")
    assert run_row(conn, run_id) == ("completed", {"z": "done"})
    assert state(conn, run_id)["retries"][0]["previous_status"] == "cancelled"


def test_a_late_report_of_the_old_attempt_is_stale(conn, flows):
    flow = flows([{"slug": "a"}], max_attempts=1)
    run_id = start(conn, flow, {})
    old, new = uuid.uuid4(), uuid.uuid4()
    poll(conn, flow, worker=old)
    assert conn.execute("SELECT pgflow.cancel_run(%s)", (run_id,)).fetchone()[0] == "cancelled"
    retry(conn, run_id)
    assert complete(conn, run_id, "a", 0, "late", worker=old) == "not_started"
    poll(conn, flow, worker=new)
    assert complete(conn, run_id, "a", 0, "late", worker=old) == "stale"
    assert complete(conn, run_id, "a", 0, "fresh", worker=new) == "completed"
    assert run_row(conn, run_id) == ("completed", {"a": "fresh"})


def test_a_map_over_a_non_array_fails_again_and_says_so(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}])
    run_id = start(conn, flow, {"not": "an array"})
    assert run_row(conn, run_id)[0] == "failed"
    assert retry(conn, run_id) == "failed"
    assert run_row(conn, run_id)[0] == "failed"
    assert retry(conn, run_id) == "failed"
    assert [(r["retry"], r["tasks"]) for r in state(conn, run_id)["retries"]] == [(1, []), (2, [])]


def test_runs_under_way_or_completed_are_left_alone(conn, flows):
    flow = flows([{"slug": "a"}])
    run_id = start(conn, flow, {})
    assert retry(conn, run_id) == "already_started"
    poll(conn, flow)
    complete(conn, run_id, "a", 0, 1)
    assert retry(conn, run_id) == "already_completed"
    assert state(conn, run_id)["retries"] == []


def test_retention_never_takes_a_run_being_retried(conn, flows):
    flow = flows([{"slug": "a"}], max_attempts=1)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    fail(conn, run_id, "a", 0, "x", retry=False)
    retrier = connect(autocommit=False)
    pruned = []
    try:
        assert retrier.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0] == "retried"

        def prune():
            with connect() as c:
                pruned.append(c.execute("SELECT pgflow.prune_runs('0 seconds', %s)", (flow,)).fetchone()[0])
        t = threading.Thread(target=prune)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "prune_runs did not wait for the retry"
        retrier.commit()
        t.join(10)
    finally:
        retrier.close()
    assert pruned == [0]
    assert run_row(conn, run_id)[0] == "started"
    assert [x[:2] for x in poll(conn, flow)] == [(flow, run_id)]


def test_bad_input_and_roles(conn, flows):
    flow = flows([{"slug": "a"}])
    assert sqlstate(conn, "SELECT pgflow.retry_run(NULL)") == "22004"
    assert sqlstate(conn, "SELECT pgflow.retry_run(%s)", (uuid.uuid4(),)) == "42704"
    run_id = start(conn, flow, {})
    conn.execute("SELECT pgflow.cancel_run(%s)", (run_id,))
    with session_as(conn, "pgflow_consumer") as c:
        assert sqlstate(c, "SELECT pgflow.retry_run(%s)", (run_id,)) == "42501"
    assert run_row(conn, run_id)[0] == "cancelled"
    with session_as(conn, "pgflow_producer") as p:
        assert p.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0] == "retried"
