"""Workflow layer through real sessions: flows, runs, tasks, retries, timeouts, shapes,
concurrency, events and bad input."""

import json
import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import connect, error_of, make_flow, sqlstate, unique_name


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def start(conn, flow, inp, run_id=None):
    row = conn.execute("SELECT run_id, status FROM pgflow.start_flow(%s, %s, %s)",
                       (flow, Jsonb(inp), run_id)).fetchone()
    return row[0]


def poll(conn, flow, qty=10, wait=0, worker=None):
    return conn.execute(
        "SELECT flow_slug, run_id, step_slug, task_index, msg_id, input "
        "FROM pgflow.poll_for_tasks(%s, 30, %s, %s, 50, %s)", (flow, qty, wait, worker)).fetchall()


def complete(conn, run_id, step, idx, output, worker=None):
    return conn.execute("SELECT pgflow.complete_task(%s, %s, %s, %s, %s)",
                        (run_id, step, idx, Jsonb(output), worker)).fetchone()[0]


def fail(conn, run_id, step, idx, error, worker=None, retry=True):
    return conn.execute("SELECT pgflow.fail_task(%s, %s, %s, %s, %s, %s)",
                        (run_id, step, idx, error, worker, retry)).fetchone()[0]


def run_row(conn, run_id):
    return conn.execute("SELECT status, output FROM pgflow.runs WHERE run_id = %s", (run_id,)).fetchone()


def state(conn, run_id):
    return conn.execute("SELECT pgflow.get_run_with_states(%s)", (run_id,)).fetchone()[0]


def steps_of(conn, run_id):
    """{step_slug: status} of a run."""
    return {x["step_slug"]: x["status"] for x in state(conn, run_id)["steps"]}


def drain(conn, flow, handler, max_rounds=10000):
    """Claim and complete tasks until none is left; handler(step, input, idx) -> output.
    Returns the list of (step, task_index, input) handled, in order."""
    seen = []
    for _ in range(max_rounds):
        tasks = poll(conn, flow, qty=50)
        if not tasks:
            return seen
        for _, run_id, step, idx, _, inp in tasks:
            seen.append((step, idx, inp))
            assert complete(conn, run_id, step, idx, handler(step, inp, idx)) == "completed"
    pytest.fail("flow did not drain")


def counts(conn, flow):
    """Row counts touching a flow (for 'nothing changed' checks)."""
    return conn.execute(
        """SELECT (SELECT count(*) FROM pgflow.flows), (SELECT count(*) FROM pgflow.steps),
                  (SELECT count(*) FROM pgflow.deps), (SELECT count(*) FROM pgflow.runs),
                  (SELECT count(*) FROM pgflow.step_states), (SELECT count(*) FROM pgflow.step_tasks),
                  (SELECT count(*) FROM pgflow.step_tasks WHERE status = 'completed'),
                  (SELECT count(*) FROM pgflow.messages), (SELECT count(*) FROM pgflow.queues)""").fetchone()


def run_workers(body, n, timeout):
    """Run body() in n threads at once; returns the exceptions they raised."""
    errors = []

    def guarded():
        try:
            body()
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


SEQ = [{"slug": "a"}, {"slug": "b", "deps": ["a"]}, {"slug": "c", "deps": ["b"]}]
DIAMOND = [{"slug": "a"}, {"slug": "b", "deps": ["a"]}, {"slug": "c", "deps": ["a"]},
           {"slug": "d", "deps": ["b", "c"]}]


# ------------------------------------------------------------------------------------------
# flows run to completion
# ------------------------------------------------------------------------------------------

def test_sequential_flow_passes_outputs_along(conn, flows):
    flow = flows(SEQ)
    run_id = start(conn, flow, {"n": 1})
    seen = drain(conn, flow, lambda step, inp, idx: {"from": step})
    assert seen == [("a", 0, {"run": {"n": 1}}),
                    ("b", 0, {"run": {"n": 1}, "a": {"from": "a"}}),
                    ("c", 0, {"run": {"n": 1}, "b": {"from": "b"}})]
    assert run_row(conn, run_id) == ("completed", {"c": {"from": "c"}})
    st = state(conn, run_id)
    assert st["status"] == st["run"]["status"] == "completed" and st["run"]["output"] == {"c": {"from": "c"}}
    assert [s["status"] for s in st["steps"]] == ["completed"] * 3
    assert all(s["tasks"]["completed"] == 1 for s in st["steps"])
    # the flow's queue holds nothing once the run is done
    assert conn.execute("SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id) "
                        "WHERE q.queue_name = %s", (flow,)).fetchone()[0] == 0


def test_diamond_flow_joins_both_branches(conn, flows):
    flow = flows(DIAMOND)
    run_id = start(conn, flow, 5)
    seen = drain(conn, flow, lambda step, inp, idx: step.upper())
    by_step = {s: inp for s, _, inp in seen}
    assert by_step["b"] == {"run": 5, "a": "A"}
    assert by_step["c"] == {"run": 5, "a": "A"}
    assert by_step["d"] == {"run": 5, "b": "B", "c": "C"}
    assert [s for s, _, _ in seen].count("d") == 1
    assert run_row(conn, run_id) == ("completed", {"d": "D"})


def test_two_roots_and_two_leaves(conn, flows):
    flow = flows([{"slug": "r1"}, {"slug": "r2"}, {"slug": "x", "deps": ["r1", "r2"]}, {"slug": "y", "deps": ["r2"]}])
    run_id = start(conn, flow, {"k": "v"})
    first = poll(conn, flow)
    assert sorted(t[2] for t in first) == ["r1", "r2"]
    seen = [(t[2], t[3], t[5]) for t in first]
    for t in first:
        complete(conn, t[1], t[2], t[3], t[2])
    seen += drain(conn, flow, lambda step, inp, idx: step)
    by_step = {s: inp for s, _, inp in seen}
    assert by_step["x"] == {"run": {"k": "v"}, "r1": "r1", "r2": "r2"}
    assert by_step["y"] == {"run": {"k": "v"}, "r2": "r2"}
    assert run_row(conn, run_id) == ("completed", {"x": "x", "y": "y"})


def test_root_map_over_run_input(conn, flows):
    flow = flows([{"slug": "sq", "type": "map"}, {"slug": "sum", "deps": ["sq"]}])
    run_id = start(conn, flow, [1, 2, 3])
    seen = drain(conn, flow, lambda step, inp, idx: inp * inp if step == "sq" else sum(inp["sq"]))
    assert sorted((s, i, v) for s, i, v in seen if s == "sq") == [("sq", 0, 1), ("sq", 1, 2), ("sq", 2, 3)]
    assert [v for s, _, v in seen if s == "sum"] == [{"run": [1, 2, 3], "sq": [1, 4, 9]}]
    assert run_row(conn, run_id) == ("completed", {"sum": 14})


def test_map_over_dependency_output_keeps_element_order(conn, flows):
    flow = flows([{"slug": "list"}, {"slug": "each", "type": "map", "deps": ["list"]}])
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    complete(conn, t[1], "list", 0, ["a", "b", "c", "d"])
    tasks = poll(conn, flow)
    assert sorted((x[3], x[5]) for x in tasks) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    for x in reversed(tasks):  # completion order does not matter
        complete(conn, x[1], "each", x[3], x[5] + "!")
    assert run_row(conn, run_id) == ("completed", {"each": ["a!", "b!", "c!", "d!"]})


def test_runs_under_way_are_served_before_new_ones(conn, flows):
    flow = flows(SEQ)
    r1 = start(conn, flow, 1)
    r2 = start(conn, flow, 2)
    (t,) = poll(conn, flow, qty=1)
    assert (t[1], t[2]) == (r1, "a")
    complete(conn, r1, "a", 0, "x")
    (t,) = poll(conn, flow, qty=1)
    assert (t[1], t[2]) == (r1, "b")          # not the root task of the second run
    complete(conn, r1, "b", 0, "y")
    assert sorted((x[2], x[1]) for x in poll(conn, flow)) == [("a", r2), ("c", r1)]


def test_map_with_zero_elements_completes_at_once(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}, {"slug": "after", "deps": ["m"]}])
    run_id = start(conn, flow, [])
    st = state(conn, run_id)
    assert st["steps"][0]["status"] == "completed" and st["steps"][0]["initial_tasks"] == 0
    seen = drain(conn, flow, lambda step, inp, idx: "done")
    assert seen == [("after", 0, {"run": [], "m": []})]
    assert run_row(conn, run_id) == ("completed", {"after": "done"})


def test_map_only_flow_over_empty_array_completes_in_start_flow(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}])
    status = conn.execute("SELECT status FROM pgflow.start_flow(%s, '[]')", (flow,)).fetchone()[0]
    assert status == "completed"
    assert conn.execute("SELECT output FROM pgflow.runs WHERE flow_slug = %s", (flow,)).fetchone()[0] == {"m": []}


def test_map_with_one_element(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}])
    run_id = start(conn, flow, [{"x": 1}])
    seen = drain(conn, flow, lambda step, inp, idx: inp["x"] + 1)
    assert seen == [("m", 0, {"x": 1})]
    assert run_row(conn, run_id) == ("completed", {"m": [2]})


def test_map_with_ten_thousand_elements(conn, flows):
    flow = flows([{"slug": "gen"}, {"slug": "m", "type": "map", "deps": ["gen"]}, {"slug": "total", "deps": ["m"]}])
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    complete(conn, run_id, "gen", 0, list(range(10000)))
    assert conn.execute("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'm'",
                        (run_id,)).fetchone()[0] == 10000
    done = 0
    total = []
    with conn.cursor() as cur:
        while True:
            # claim and complete batches set-wise, as a busy worker pool would
            rows = cur.execute("SELECT step_slug, task_index, input FROM pgflow.poll_for_tasks(%s, 30, 2000, 0)",
                               (flow,)).fetchall()
            if not rows:
                break
            total += [r for r in rows if r[0] == "total"]
            rows = [r for r in rows if r[0] == "m"]
            cur.execute("SELECT count(pgflow.complete_task(%s, 'm', i, to_jsonb(i * 2))) FROM unnest(%s::int[]) i",
                        (run_id, [r[1] for r in rows]))
            assert all(r[2] == r[1] for r in rows)
            done += len(rows)
    assert done == 10000
    (t,) = total
    assert t[2]["m"] == [i * 2 for i in range(10000)]
    complete(conn, run_id, "total", 0, len(t[2]["m"]))
    assert run_row(conn, run_id) == ("completed", {"total": 10000})


def test_map_over_non_array_fails_the_run(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}])
    row = conn.execute("SELECT run_id, status FROM pgflow.start_flow(%s, '{\"not\": \"an array\"}')",
                       (flow,)).fetchone()
    assert row[1] == "failed"
    st = state(conn, row[0])
    assert st["steps"][0]["status"] == "failed"
    assert "array" in st["steps"][0]["error_message"] and "object" in st["steps"][0]["error_message"]
    assert poll(conn, flow) == []

    flow2 = flows([{"slug": "gen"}, {"slug": "m", "type": "map", "deps": ["gen"]}, {"slug": "z", "deps": ["m"]}])
    run_id = start(conn, flow2, {})
    (t,) = poll(conn, flow2)
    assert complete(conn, run_id, "gen", 0, "a string") == "completed"
    assert run_row(conn, run_id)[0] == "failed"
    st = {s["step_slug"]: s for s in state(conn, run_id)["steps"]}
    assert st["gen"]["status"] == "completed"
    assert st["m"]["status"] == "failed" and 'output of step "gen"' in st["m"]["error_message"]
    assert st["z"]["status"] == "created"
    assert poll(conn, flow2) == []


# ------------------------------------------------------------------------------------------
# retries, exhaustion, timeouts
# ------------------------------------------------------------------------------------------

def msg_vt_in(conn, run_id, step, idx=0):
    """Seconds until the task's message becomes visible."""
    return conn.execute(
        "SELECT extract(epoch FROM m.vt - clock_timestamp()) FROM pgflow.step_tasks t "
        "JOIN pgflow.runs r USING (run_id) JOIN pgflow.queues q ON q.queue_name = r.flow_slug "
        "JOIN pgflow.messages m ON m.queue_id = q.queue_id AND m.msg_id = t.message_id "
        "WHERE t.run_id = %s AND t.step_slug = %s AND t.task_index = %s", (run_id, step, idx)).fetchone()[0]


def test_retry_delays_double_and_task_runs_again(conn, flows):
    flow = flows([{"slug": "a", "base_delay": 2}], max_attempts=4, base_delay=1)
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    assert fail(conn, run_id, "a", 0, "boom 1") == "retrying"
    assert 1.5 < float(msg_vt_in(conn, run_id, "a")) <= 2.01       # 2 * 2^0
    row = conn.execute("SELECT status, attempts_count, error_message FROM pgflow.step_tasks WHERE run_id = %s",
                       (run_id,)).fetchone()
    assert row == ("queued", 1, "boom 1")
    assert poll(conn, flow) == []                                  # not visible before its delay
    assert fail(conn, run_id, "a", 0, "late duplicate") == "not_started"
    # pretend the delay passed, then the second failure waits 4 s
    conn.execute("UPDATE pgflow.messages SET vt = clock_timestamp() WHERE msg_id = %s", (t[4],))
    (t2,) = poll(conn, flow)
    assert t2[1:4] == (run_id, "a", 0)
    assert fail(conn, run_id, "a", 0, "boom 2") == "retrying"
    assert 3.5 < float(msg_vt_in(conn, run_id, "a")) <= 4.01       # 2 * 2^1
    assert conn.execute("SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = %s",
                        (run_id,)).fetchone()[0] == 2


def test_retry_becomes_claimable_after_its_delay(conn, flows):
    flow = flows([{"slug": "a"}], max_attempts=2, base_delay=1)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    assert fail(conn, run_id, "a", 0, "transient") == "retrying"
    t0 = time.monotonic()
    tasks = poll(conn, flow, wait=3)           # blocks until the retry is due
    waited = time.monotonic() - t0
    assert [t[2] for t in tasks] == ["a"]
    assert 0.8 < waited < 2.5
    assert complete(conn, run_id, "a", 0, "ok") == "completed"
    assert run_row(conn, run_id) == ("completed", {"a": "ok"})


def test_exhausted_attempts_fail_step_and_run(conn, flows):
    flow = flows([{"slug": "a"}, {"slug": "b", "type": "map"}, {"slug": "c", "deps": ["a"]}],
                 max_attempts=2, base_delay=0)
    run_id = start(conn, flow, [1, 2, 3])
    tasks = poll(conn, flow)
    assert len(tasks) == 4
    assert complete(conn, run_id, "b", 0, "ok") == "completed"
    assert fail(conn, run_id, "a", 0, "first") == "retrying"
    (t,) = poll(conn, flow)                     # base_delay 0: at once
    assert t[2] == "a"
    assert fail(conn, run_id, "a", 0, "second" * 1000) == "failed"
    assert run_row(conn, run_id)[0] == "failed"
    st = {s["step_slug"]: s for s in state(conn, run_id)["steps"]}
    assert st["a"]["status"] == "failed" and st["a"]["error_message"].startswith("secondsecond")
    assert st["c"]["status"] == "created"
    task = conn.execute("SELECT status, attempts_count, length(error_message) FROM pgflow.step_tasks "
                        "WHERE run_id = %s AND step_slug = 'a'", (run_id,)).fetchone()
    assert task[0] == "failed" and task[1] == 2 and task[2] < 2100
    # the run's remaining tasks are not handed out, and late reports change nothing
    assert poll(conn, flow) == []
    assert complete(conn, run_id, "b", 1, "late") == "run_failed"
    assert fail(conn, run_id, "a", 0, "again") == "run_failed"
    assert conn.execute("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %s AND status = 'completed'",
                        (run_id,)).fetchone()[0] == 1


def test_fail_task_without_retry_fails_for_good_at_once(conn, flows, make_conn):
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"]}], max_attempts=5, base_delay=0)
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    # NULL is refused and changes nothing
    assert sqlstate(conn, "SELECT pgflow.fail_task(%s, 'a', 0, 'x', NULL, NULL)", (run_id,)) == "22004"
    assert "retry" in str(error_of(conn, "SELECT pgflow.fail_task(%s, 'a', 0, 'x', retry => NULL)", (run_id,)))
    assert conn.execute("SELECT status FROM pgflow.step_tasks WHERE run_id = %s", (run_id,)).fetchone()[0] == "started"
    # a permanent error: attempt 1 of 5, failed all the same
    assert conn.execute("SELECT pgflow.fail_task(%s, 'a', 0, 'bad input', retry => false)",
                        (run_id,)).fetchone()[0] == "failed"
    assert run_row(conn, run_id)[0] == "failed"
    assert conn.execute("SELECT status, attempts_count FROM pgflow.step_tasks WHERE run_id = %s",
                        (run_id,)).fetchone() == ("failed", 1)
    assert poll(conn, flow) == []
    failed = [e for e in events_of(collect(listener), "pgflow.flows") if e["event"] == "task_failed"]
    assert [(e["will_retry"], e["reason"], e["attempt"]) for e in failed] == [(False, "permanent", 1)]
    # retry => true (the default) is today's behaviour
    run2 = start(conn, flow, {"n": 2})
    poll(conn, flow)
    assert conn.execute("SELECT pgflow.fail_task(%s, 'a', 0, 'flaky', retry => true)", (run2,)).fetchone()[0] == "retrying"


def cancel(conn, run_id, reason=None):
    return conn.execute("SELECT pgflow.cancel_run(%s, %s)", (run_id, reason)).fetchone()[0]


def test_cancel_run_stops_its_tasks_and_late_reports_change_nothing(conn, flows, make_conn):
    flow = flows([{"slug": "a"}, {"slug": "m", "type": "map", "deps": ["a"]}, {"slug": "z", "deps": ["m"]}])
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    assert complete(conn, run_id, "a", 0, [1, 2, 3]) == "completed"
    started = poll(conn, flow, qty=1)                 # one map task started, two queued
    assert len(started) == 1
    assert cancel(conn, run_id, "operator: bad deploy " + "x" * 3000) == "cancelled"
    status, = conn.execute("SELECT status FROM pgflow.runs WHERE run_id = %s", (run_id,)).fetchone()
    assert status == "cancelled"
    assert conn.execute("SELECT cancelled_at IS NOT NULL FROM pgflow.runs WHERE run_id = %s", (run_id,)).fetchone()[0]
    steps = dict(conn.execute("SELECT step_slug, status FROM pgflow.step_states WHERE run_id = %s",
                              (run_id,)).fetchall())
    assert steps == {"a": "completed", "m": "cancelled", "z": "cancelled"}
    reason = conn.execute("SELECT error_message FROM pgflow.step_states WHERE run_id = %s AND step_slug = 'm'",
                          (run_id,)).fetchone()[0]
    assert reason.startswith("operator: bad deploy") and reason.endswith("... (truncated)")
    tasks = conn.execute("SELECT status, count(*) FROM pgflow.step_tasks WHERE run_id = %s GROUP BY 1 ORDER BY 1",
                         (run_id,)).fetchall()
    assert tasks == [("cancelled", 3), ("completed", 1)]
    assert conn.execute("SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id) "
                        "WHERE q.queue_name = %s", (flow,)).fetchone()[0] == 0
    assert poll(conn, flow) == []
    idx = started[0][3]
    assert complete(conn, run_id, "m", idx, "late") == "run_cancelled"
    assert fail(conn, run_id, "m", idx, "late") == "run_cancelled"
    assert conn.execute("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %s AND status = 'cancelled'",
                        (run_id,)).fetchone()[0] == 3
    state = conn.execute("SELECT pgflow.get_run_with_states(%s)", (run_id,)).fetchone()[0]
    assert state["status"] == "cancelled"
    assert [x["tasks"]["cancelled"] for x in state["steps"]] == [0, 3, 0]
    evs = [e for e in events_of(collect(listener), "pgflow.flows") if e["event"] == "workflow_cancelled"]
    assert evs == [{"event": "workflow_cancelled", "run_id": str(run_id), "flow_slug": flow}]   # no reason text


def test_cancelling_a_finished_run_changes_nothing_and_says_so(conn, flows):
    flow = flows([{"slug": "a"}], max_attempts=1)
    done, failed, cancelled = start(conn, flow, {"n": 1}), start(conn, flow, {"n": 2}), start(conn, flow, {"n": 3})
    for run_id, step, idx, *_ in [(t[1], t[2], t[3]) for t in poll(conn, flow)]:
        if run_id == done:
            complete(conn, run_id, step, idx, 1)
        elif run_id == failed:
            fail(conn, run_id, step, idx, "no")
    assert cancel(conn, cancelled) == "cancelled"
    before = conn.execute("SELECT run_id, status, completed_at, failed_at, cancelled_at FROM pgflow.runs "
                          "WHERE flow_slug = %s ORDER BY run_id", (flow,)).fetchall()
    assert cancel(conn, done) == "already_completed"
    assert cancel(conn, failed) == "already_failed"
    assert cancel(conn, cancelled) == "already_cancelled"
    assert conn.execute("SELECT run_id, status, completed_at, failed_at, cancelled_at FROM pgflow.runs "
                        "WHERE flow_slug = %s ORDER BY run_id", (flow,)).fetchall() == before
    # cancelled runs are finished runs for retention
    assert conn.execute("SELECT pgflow.prune_runs('0 seconds', %s)", (flow,)).fetchone()[0] == 3


def test_cancel_run_bad_input_and_roles(conn, flows):
    from conftest import session_as
    flow = flows([{"slug": "a"}])
    assert sqlstate(conn, "SELECT pgflow.cancel_run(NULL)") == "22004"
    assert sqlstate(conn, "SELECT pgflow.cancel_run(%s)", (uuid.uuid4(),)) == "42704"
    run_id = start(conn, flow, {})
    with session_as(conn, "pgflow_consumer") as c:
        assert sqlstate(c, "SELECT pgflow.cancel_run(%s)", (run_id,)) == "42501"
    assert run_row(conn, run_id)[0] == "started"
    with session_as(conn, "pgflow_producer") as p:
        assert p.execute("SELECT pgflow.cancel_run(%s)", (run_id,)).fetchone()[0] == "cancelled"


def test_timeout_reclaims_task_and_counts_attempt(conn, flows):
    flow = flows([{"slug": "a", "timeout": 1}], max_attempts=3)
    run_id = start(conn, flow, {})
    w1, w2 = uuid.uuid4(), uuid.uuid4()
    (t,) = poll(conn, flow, worker=w1)
    assert poll(conn, flow) == []               # leased for the step's timeout
    tasks = poll(conn, flow, wait=3, worker=w2)  # comes back after about a second
    assert [(x[1], x[2], x[3]) for x in tasks] == [(run_id, "a", 0)]
    row = conn.execute("SELECT status, attempts_count, last_worker_id FROM pgflow.step_tasks WHERE run_id = %s",
                       (run_id,)).fetchone()
    assert row == ("started", 2, w2)
    # the first worker's late report is refused when it names itself; the holder's counts
    assert complete(conn, run_id, "a", 0, "from w1", worker=w1) == "stale"
    assert fail(conn, run_id, "a", 0, "from w1", worker=w1) == "stale"
    assert complete(conn, run_id, "a", 0, "from w2", worker=w2) == "completed"
    assert run_row(conn, run_id) == ("completed", {"a": "from w2"})
    assert complete(conn, run_id, "a", 0, "again", worker=w2) == "already_completed"


def test_late_report_waiting_for_a_new_claim_is_stale(conn, flows, make_conn):
    flow = flows([{"slug": "a"}])
    run_id = start(conn, flow, {})
    w_old, w_new = uuid.uuid4(), uuid.uuid4()
    (t,) = poll(conn, flow, worker=w_old)
    conn.execute("UPDATE pgflow.messages SET vt = clock_timestamp() WHERE msg_id = %s AND queue_id = "
                 "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (t[4], flow))  # the old lease runs out
    new = make_conn(autocommit=False)
    assert [x[2] for x in poll(new, flow, worker=w_new)] == ["a"]   # claimed, not yet committed
    result = []
    old = make_conn()
    th = threading.Thread(target=lambda: result.append(complete(old, run_id, "a", 0, "old", worker=w_old)))
    th.start()
    time.sleep(0.3)
    assert th.is_alive()              # waits for the new claim's message lock
    new.commit()
    th.join(10)
    assert result == ["stale"]
    assert complete(new, run_id, "a", 0, "new", worker=w_new) == "completed"
    new.commit()
    assert run_row(conn, run_id) == ("completed", {"a": "new"})


def test_poll_wakes_when_tasks_are_queued(conn, flows, make_conn):
    flow = flows([{"slug": "a"}])
    got = []
    waiter = make_conn()
    th = threading.Thread(target=lambda: got.append((time.monotonic(), poll(waiter, flow, wait=10))))
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    start(conn, flow, {"x": 1})
    th.join(15)
    (when, tasks), = got
    assert [x[5] for x in tasks] == [{"run": {"x": 1}}]
    assert when - t0 < 2


def test_timeout_on_last_attempt_fails_the_run(conn, flows):
    flow = flows([{"slug": "a", "timeout": 1}, {"slug": "b", "deps": ["a"]}], max_attempts=1)
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    time.sleep(1.2)
    assert poll(conn, flow) == []
    assert run_row(conn, run_id)[0] == "failed"
    row = conn.execute("SELECT status, attempts_count, error_message FROM pgflow.step_tasks WHERE run_id = %s",
                       (run_id,)).fetchone()
    assert row[0] == "failed" and row[1] == 1 and "timed out" in row[2]
    assert complete(conn, run_id, "a", 0, "too late") == "run_failed"


def test_late_and_duplicate_reports_change_nothing(conn, flows):
    flow = flows(SEQ)
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    assert complete(conn, run_id, "a", 0, "first") == "completed"
    before = counts(conn, flow)
    assert complete(conn, run_id, "a", 0, "second") == "already_completed"
    assert fail(conn, run_id, "a", 0, "oops") == "already_completed"
    assert complete(conn, run_id, "b", 0, "not claimed yet") == "not_started"
    assert counts(conn, flow) == before
    assert conn.execute("SELECT output FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'a'",
                        (run_id,)).fetchone()[0] == "first"


def test_start_tasks_after_read(conn, flows):
    flow = flows(SEQ)
    run_id = start(conn, flow, {"v": 1})
    msgs = conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 5)", (flow,)).fetchall()
    assert len(msgs) == 1
    worker = uuid.uuid4()
    rows = conn.execute("SELECT * FROM pgflow.start_tasks(%s, %s, %s)",
                        (flow, [m[0] for m in msgs], worker)).fetchall()
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [(flow, run_id, "a", 0, {"run": {"v": 1}})]
    assert conn.execute("SELECT status, last_worker_id FROM pgflow.step_tasks WHERE run_id = %s",
                        (run_id,)).fetchone() == ("started", worker)
    assert complete(conn, run_id, "a", 0, 1, worker=worker) == "completed"


# ------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------

def test_shape_round_trip(conn, flows):
    shape = {"max_attempts": 5, "base_delay": 2, "timeout": 30, "steps": [
        {"slug": "fetch", "type": "single", "deps": [], "timeout": 10},
        {"slug": "split", "type": "map", "deps": ["fetch"], "max_attempts": 1, "start_delay": 3},
        {"slug": "other", "type": "single", "deps": ["fetch"], "base_delay": 0},
        {"slug": "join", "type": "single", "deps": ["split", "other"]}]}
    slug = unique_name("f")
    assert conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb(shape))).fetchone()[0] is True
    try:
        assert conn.execute("SELECT pgflow.get_flow_shape(%s)", (slug,)).fetchone()[0] == shape
        # the same shape again is a no-op
        assert conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb(shape))).fetchone()[0] is False
        # and so is create_flow / add_step with the same definition
        conn.execute("SELECT pgflow.create_flow(%s, 5, 2, 30)", (slug,))
        conn.execute("SELECT pgflow.add_step(%s, 'join', '{split,other}')", (slug,))
        # a different shape is refused
        other = json.loads(json.dumps(shape))
        other["steps"][3]["timeout"] = 99
        e = error_of(conn, "SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb(other)))
        assert e.sqlstate == "42710" and e.diag.message_hint
        assert sqlstate(conn, "SELECT pgflow.create_flow(%s, 6)", (slug,)) == "42710"
        assert sqlstate(conn, "SELECT pgflow.add_step(%s, 'join', '{split}')", (slug,)) == "42710"
        assert conn.execute("SELECT pgflow.get_flow_shape(%s)", (slug,)).fetchone()[0] == shape
    finally:
        conn.execute("SELECT pgflow.drop_flow(%s)", (slug,))


def test_shape_defaults_and_order(conn, flows):
    slug = flows([{"slug": "b", "deps": ["a"]}, {"slug": "a"}])
    got = conn.execute("SELECT pgflow.get_flow_shape(%s)", (slug,)).fetchone()[0]
    assert got == {"max_attempts": 3, "base_delay": 1, "timeout": 60, "steps": [
        {"slug": "a", "type": "single", "deps": []}, {"slug": "b", "type": "single", "deps": ["a"]}]}


@pytest.mark.parametrize("shape,needle", [
    ({"steps": [{"slug": "a", "deps": ["zz"]}]}, "zz"),
    ({"steps": [{"slug": "a", "deps": ["b"]}, {"slug": "b", "deps": ["a"]}]}, "cycle"),
    ({"steps": [{"slug": "a"}, {"slug": "a"}]}, "twice"),
    ({"steps": [{"slug": "a b"}]}, "not allowed"),
    ({"steps": [{"slug": "a", "timeout": 0}]}, "timeout"),
    ({"steps": [{"slug": "a", "max_attempts": -1}]}, "max_attempts"),
    ({"steps": [{"slug": "a", "base_delay": 1.5}]}, "integer"),
    ({"steps": [{"slug": "a"}], "retries": 3}, "retries"),
    ({"steps": [{"slug": "a", "dependencies": []}]}, "dependencies"),
    ({"steps": [{"slug": "a"}, {"slug": "m", "type": "map", "deps": ["a", "a2"]}, {"slug": "a2"}]}, "map"),
    ({"steps": [{"slug": "a", "type": "loop"}]}, "type"),
    ({"steps": "a"}, "steps"),
    ({"steps": [{"slug": "a", "deps": ["a"]}]}, "itself"),
    ({"steps": [{"slug": "run"}]}, "reserved"),
    ([1, 2], "object"),
])
def test_invalid_shapes_create_nothing(conn, shape, needle):
    slug = unique_name("f")
    before = counts(conn, slug)
    e = error_of(conn, "SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb(shape)))
    assert e.sqlstate in ("22023", "42704"), (e.sqlstate, str(e))
    assert needle in str(e)
    assert counts(conn, slug) == before


# ------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------

def test_eight_workers_finish_a_thousand_diamond_runs(conn, flows):
    flow = flows(DIAMOND, max_attempts=1)
    n_runs = 1000
    conn.execute("SELECT count(pgflow.start_flow(%s, to_jsonb(i))) FROM generate_series(1, %s) i", (flow, n_runs))
    handled = []
    lock = threading.Lock()

    def worker():
        with connect() as c:
            c.execute("SET pgflow.workflow_events = 'runs'")
            idle = 0
            while idle < 3:
                tasks = poll(c, flow, qty=2, wait=1)
                if not tasks:
                    idle += 1
                    continue
                idle = 0
                for _, run_id, step, idx, _, inp in tasks:
                    out = complete(c, run_id, step, idx, {"s": step, "in": inp if step == "a" else None})
                    with lock:
                        handled.append((run_id, step, out))

    errors = run_workers(worker, 8, 120)
    assert not errors, errors
    assert all(h[2] == "completed" for h in handled)
    assert len(handled) == 4 * n_runs
    assert len({(h[0], h[1]) for h in handled}) == 4 * n_runs       # each task handed out once
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FROM pgflow.runs WHERE flow_slug = %s""",
        (flow,)).fetchone()
    assert row == (n_runs, n_runs)
    row = conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE t.status = 'completed'), max(t.attempts_count),
                  count(DISTINCT (t.run_id, t.step_slug, t.task_index))
             FROM pgflow.step_tasks t JOIN pgflow.runs r USING (run_id) WHERE r.flow_slug = %s""", (flow,)).fetchone()
    assert row == (4 * n_runs, 4 * n_runs, 1, 4 * n_runs)             # d queued once per run
    bad = conn.execute("SELECT count(*) FROM pgflow.runs WHERE flow_slug = %s AND output <> "
                       "jsonb_build_object('d', jsonb_build_object('s', 'd', 'in', null))", (flow,)).fetchone()[0]
    assert bad == 0


def test_siblings_completing_at_once_start_the_join_once(conn, flows, make_conn):
    flow = flows([{"slug": "r"}, {"slug": "m", "type": "map", "deps": ["r"]}, {"slug": "j", "deps": ["m"]}])
    run_id = start(conn, flow, {})
    poll(conn, flow)
    complete(conn, run_id, "r", 0, list(range(8)))
    tasks = poll(conn, flow)
    assert len(tasks) == 8
    conns = [make_conn(autocommit=False) for _ in range(8)]
    for c, t in zip(conns, tasks):
        c.execute("SET lock_timeout = '10s'")
    barrier = threading.Barrier(8)
    results = []

    def go(c, t):
        barrier.wait()
        results.append(complete(c, run_id, "m", t[3], t[3]))
        c.commit()

    threads = [threading.Thread(target=go, args=(c, t)) for c, t in zip(conns, tasks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert results == ["completed"] * 8
    joins = poll(conn, flow)
    assert [(t[2], t[5]["m"]) for t in joins] == [("j", list(range(8)))]
    assert conn.execute("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'j'",
                        (run_id,)).fetchone()[0] == 1


# ------------------------------------------------------------------------------------------
# events
# ------------------------------------------------------------------------------------------

def collect(listener, timeout=1.0):
    out = []
    for n in listener.notifies(timeout=timeout):
        out.append((n.channel, json.loads(n.payload), len(n.payload.encode())))
    return out


def events_of(notes, channel):
    evs = []
    for ch, p, _ in notes:
        if ch == channel:
            evs.extend(p["events"] if p["event"] == "batch" else [p])
    return evs


def test_workflow_events_reach_listeners(conn, flows, make_conn):
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"]}], max_attempts=2, base_delay=0)
    channel = conn.execute("SELECT pgflow.flow_channel(%s)", (flow,)).fetchone()[0]
    assert channel == f"pgflow.flow.{flow}"
    listener = make_conn()
    listener.execute(f'LISTEN "{channel}"')
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {"big": "x" * 20000})
    (t,) = poll(conn, flow)
    fail(conn, run_id, "a", 0, "E" * 5000)
    poll(conn, flow)
    complete(conn, run_id, "a", 0, 1)
    poll(conn, flow)
    fail(conn, run_id, "b", 0, "first")
    poll(conn, flow)
    fail(conn, run_id, "b", 0, "final")
    notes = collect(listener)
    assert all(size < 8000 for _, _, size in notes)
    evs = events_of(notes, channel)
    assert evs == events_of(notes, "pgflow.flows")
    kinds = [e["event"] for e in evs]
    assert kinds == ["workflow_started", "task_started", "task_failed", "task_started", "task_completed",
                     "task_started", "task_failed", "task_started", "task_failed", "workflow_failed"]
    # identifiers, statuses, counts and times only: any role that can connect can LISTEN, so
    # no run input, output or error text is ever in a payload
    assert evs[0] == {"event": "workflow_started", "run_id": str(run_id), "flow_slug": flow}
    assert evs[1] == {"event": "task_started", "run_id": str(run_id), "flow_slug": flow, "step_slug": "a",
                      "task_index": 0, "attempt": 1}
    assert evs[2] == {"event": "task_failed", "run_id": str(run_id), "flow_slug": flow, "step_slug": "a",
                      "task_index": 0, "attempt": 1, "will_retry": True, "reason": "error"}
    assert evs[4]["event"] == "task_completed" and evs[4]["duration_ms"] >= 0
    assert set(evs[4]) == {"event", "run_id", "flow_slug", "step_slug", "task_index", "duration_ms"}
    assert evs[8]["will_retry"] is False and evs[8]["attempt"] == 2 and evs[8]["reason"] == "error"
    assert evs[9] == {"event": "workflow_failed", "run_id": str(run_id), "flow_slug": flow, "failed_step": "b"}
    for _, payload, _ in notes:
        text = json.dumps(payload)
        assert "xxxx" not in text and "EEEE" not in text and "first" not in text and "final" not in text


def test_timeouts_announce_task_failed_in_the_shape_fail_task_does(conn, flows, make_conn):
    # A timed-out attempt retried by the next claim (announced from the claim) and the last
    # attempt timing out (announced by the run failing) give the one task_failed shape.
    flow = flows([{"slug": "a", "timeout": 1}], max_attempts=2)
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {})
    poll(conn, flow)
    assert len(poll(conn, flow, wait=3)) == 1       # attempt 2, after attempt 1 timed out
    time.sleep(1.2)
    assert poll(conn, flow) == []                   # attempt 2 timed out: the run fails
    failed = [e for e in events_of(collect(listener), "pgflow.flows") if e["event"] == "task_failed"]
    base = {"event": "task_failed", "run_id": str(run_id), "flow_slug": flow, "step_slug": "a",
            "task_index": 0, "reason": "timeout"}
    assert failed == [{**base, "attempt": 1, "will_retry": True}, {**base, "attempt": 2, "will_retry": False}]


def test_events_are_one_notification_per_channel_per_transaction(conn, flows, make_conn):
    flow = flows([{"slug": "m", "type": "map"}])
    channel = f"pgflow.flow.{flow}"
    listener = make_conn()
    listener.execute(f'LISTEN "{channel}"')
    tx = make_conn(autocommit=False)
    run_id = tx.execute("SELECT run_id FROM pgflow.start_flow(%s, '[1,2,3]')", (flow,)).fetchone()[0]
    tasks = poll(tx, flow)
    for t in tasks:
        complete(tx, run_id, "m", t[3], t[5])
    tx.commit()
    notes = collect(listener)
    assert len(notes) == 1
    ch, payload, size = notes[0]
    assert payload["event"] == "batch" and size < 8000
    kinds = [e["event"] for e in payload["events"]]
    assert kinds == ["workflow_started"] + ["task_started"] * 3 + ["task_completed"] * 3 + ["workflow_completed"]
    # nothing is announced by a transaction that rolls back
    tx.execute("SELECT pgflow.start_flow(%s, '[1]')", (flow,))
    tx.rollback()
    assert collect(listener, 0.5) == []


def test_many_events_stay_under_the_payload_limit(conn, flows, make_conn):
    flow = flows([{"slug": "m", "type": "map"}])
    listener = make_conn()
    listener.execute(f'LISTEN "pgflow.flow.{flow}"')
    with conn.transaction():
        conn.execute("SELECT pgflow.start_flow(%s, (SELECT jsonb_agg(i) FROM generate_series(1, 500) i))", (flow,))
        conn.execute("SELECT count(*) FROM pgflow.poll_for_tasks(%s, 30, 500, 0)", (flow,))
    notes = collect(listener)
    assert len(notes) == 1
    assert notes[0][2] < 8000 and notes[0][1]["omitted"] > 0


def test_workflow_events_setting(conn, flows, make_conn):
    flow = flows([{"slug": "a"}])
    listener = make_conn()
    listener.execute(f'LISTEN "pgflow.flow.{flow}"')
    conn.execute("SET pgflow.workflow_events = 'runs'")
    run_id = start(conn, flow, {})
    poll(conn, flow)
    complete(conn, run_id, "a", 0, 1)
    assert [e["event"] for e in events_of(collect(listener), f"pgflow.flow.{flow}")] == \
        ["workflow_started", "workflow_completed"]
    conn.execute("SET pgflow.workflow_events = 'off'")
    start(conn, flow, {})
    assert collect(listener, 0.3) == []


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

def test_definition_bad_input(conn, flows):
    flow = flows(SEQ)
    before = counts(conn, flow)
    cases = [
        ("SELECT pgflow.create_flow(NULL)", None, "22004"),
        ("SELECT pgflow.create_flow('')", None, "22023"),
        ("SELECT pgflow.create_flow(%s)", ("x" * 49,), "42622"),
        ("SELECT pgflow.create_flow('bad-slug')", None, "22023"),
        ("SELECT pgflow.create_flow(%s, max_attempts => 0)", (unique_name("f"),), "22023"),
        ("SELECT pgflow.create_flow(%s, base_delay => -1)", (unique_name("f"),), "22023"),
        ("SELECT pgflow.create_flow(%s, timeout => -5)", (unique_name("f"),), "22023"),
        ("SELECT pgflow.create_flow(%s, max_attempts => NULL)", (unique_name("f"),), "22004"),
        ("SELECT pgflow.add_step(%s, 'x')", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.add_step(%s, 'bad slug')", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', '{missing}')", (flow,), "42704"),
        ("SELECT pgflow.add_step(%s, 'x', '{x}')", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', '{a,a}')", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', NULL)", (flow,), "22004"),
        ("SELECT pgflow.add_step(%s, 'x', ARRAY[NULL]::text[])", (flow,), "22004"),
        ("SELECT pgflow.add_step(%s, 'x', max_attempts => -1)", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', base_delay => -1)", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', timeout => 0)", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', start_delay => -1)", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', step_type => 'loop')", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'x', '{a,b}', step_type => 'map')", (flow,), "22023"),
        ("SELECT pgflow.add_step(%s, 'run')", (flow,), "22023"),
        ("SELECT pgflow.create_flow_from_shape(%s, NULL)", (unique_name("f"),), "22004"),
        ("SELECT pgflow.get_flow_shape(%s)", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.get_flow_shape('bad slug')", None, "22023"),
    ]
    for sql, params, code in cases:
        assert sqlstate(conn, sql, params) == code, (sql, params)
    assert counts(conn, flow) == before
    e = error_of(conn, "SELECT pgflow.add_step(%s, 'x', '{missing}')", (flow,))
    assert "missing" in e.diag.message_primary and e.diag.message_hint


def test_flow_queue_rules(conn, flows):
    flow = flows(SEQ)
    e = error_of(conn, "SELECT pgflow.drop_queue(%s)", (flow,))
    assert e.sqlstate == "55000"
    q = unique_name("q")
    conn.execute("SELECT pgflow.create_queue(%s)", (q,))
    try:
        assert sqlstate(conn, "SELECT pgflow.create_flow(%s)", (q,)) == "42710"
        assert conn.execute("SELECT count(*) FROM pgflow.flows WHERE flow_slug = %s", (q,)).fetchone()[0] == 0
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (q,))
    # a flow with runs takes no new steps
    start(conn, flow, {})
    assert sqlstate(conn, "SELECT pgflow.add_step(%s, 'late', '{c}')", (flow,)) == "55000"


def test_runtime_bad_input_changes_nothing(conn, flows):
    flow = flows(SEQ)
    other = flows([{"slug": "z"}])
    run_id = start(conn, flow, {})
    other_run = start(conn, other, {})
    (t,) = poll(conn, flow)
    before = counts(conn, flow)
    nobody = uuid.uuid4()
    cases = [
        ("SELECT pgflow.start_flow(%s, '{}')", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.start_flow('bad slug', '{}')", None, "22023"),
        ("SELECT pgflow.start_flow(%s, NULL)", (flow,), "22004"),
        ("SELECT pgflow.start_flow(%s, '{\"other\": 1}', %s)", (flow, run_id), "42710"),
        ("SELECT pgflow.complete_task(%s, 'a', 0, '1')", (nobody,), "42704"),
        ("SELECT pgflow.complete_task(%s, 'nope', 0, '1')", (run_id,), "42704"),
        ("SELECT pgflow.complete_task(%s, 'a', 7, '1')", (run_id,), "42704"),
        ("SELECT pgflow.complete_task(%s, 'z', 0, '1')", (run_id,), "42704"),     # a task of another run
        ("SELECT pgflow.complete_task(%s, 'a', 0, '1')", (other_run,), "42704"),  # ... and the reverse
        ("SELECT pgflow.complete_task(%s, 'bad slug', 0, '1')", (run_id,), "22023"),
        ("SELECT pgflow.complete_task(%s, 'a', 0, NULL)", (run_id,), "22004"),
        ("SELECT pgflow.complete_task(NULL, 'a', 0, '1')", None, "22004"),
        ("SELECT pgflow.complete_task(%s, NULL, 0, '1')", (run_id,), "22004"),
        ("SELECT pgflow.complete_task(%s, 'a', NULL, '1')", (run_id,), "22004"),
        ("SELECT pgflow.fail_task(%s, 'a', 0, 'x')", (nobody,), "42704"),
        ("SELECT pgflow.fail_task(%s, 'nope', 0, 'x')", (run_id,), "42704"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 1)", (unique_name("nope"),), "42704"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 0)", (flow,), "22023"),
        ("SELECT pgflow.poll_for_tasks(%s, -1, 1)", (flow,), "22023"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 1, -1)", (flow,), "22023"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 1, 0, 0)", (flow,), "22023"),
        ("SELECT pgflow.start_tasks(%s, NULL, %s)", (flow, nobody), "22004"),
        ("SELECT pgflow.start_tasks(%s, '{1}', NULL)", (flow,), "22004"),
        ("SELECT pgflow.start_tasks(%s, '{1}', %s)", (unique_name("nope"), nobody), "42704"),
        ("SELECT pgflow.get_run_with_states(%s)", (nobody,), "42704"),
        ("SELECT pgflow.get_run_with_states(NULL)", None, "22004"),
    ]
    for sql, params, code in cases:
        assert sqlstate(conn, sql, params) == code, (sql, params)
    assert counts(conn, flow) == before
    assert complete(conn, run_id, "a", 0, "ok") == "completed"


def test_task_path_errors_reach_the_client_as_raised(conn, flows):
    """Errors raised under the Rust task path (some by PL/pgSQL helpers it calls) keep their
    SQLSTATE, message and hint, and carry no DETAIL: pgrx would put a Rust backtrace there
    when the server runs with RUST_BACKTRACE set."""
    flow = flows(SEQ)
    run_id = start(conn, flow, {})
    cases = [
        ("SELECT pgflow.complete_task(%s, 'nope', 0, '1')", (run_id,), "42704", "has no step"),
        ("SELECT pgflow.complete_task(%s, 'a', 3, '1')", (run_id,), "42704", "has no task 3"),
        ("SELECT pgflow.complete_task(NULL, 'a', 0, '1')", None, "22004", "run_id must not be null"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 1)", ("nope_" + flow,), "42704", "does not exist"),
        ("SELECT pgflow.poll_for_tasks(%s, 30, 1, 0, 0)", (flow,), "22023", "poll_interval_ms"),
        ("SELECT pgflow.start_tasks(NULL, '{1}', %s)", (uuid.uuid4(),), "22004", "flow_slug"),
    ]
    for sql, params, code, needle in cases:
        e = error_of(conn, sql, params)
        assert e.sqlstate == code, (sql, e)
        assert needle in e.diag.message_primary, (sql, e)
        assert e.diag.message_detail is None, (sql, e.diag.message_detail)


def test_stray_and_finished_messages_in_a_flow_queue(conn, flows):
    """Messages in a flow's queue that are not its tasks' own (the queue API refuses to send
    them, but a direct insert, or 0.1.0's send, could put them there) are dead-lettered when a
    worker claims them, a copy of a finished task's message too, and none stops the real tasks
    from being handed out."""
    flow = flows(SEQ)
    run_id = start(conn, flow, {"n": 1})
    (t,) = poll(conn, flow)
    assert complete(conn, run_id, "a", 0, "A") == "completed"
    some_run = str(uuid.uuid4())
    strays = [
        {"hello": "world"},
        {"run_id": "not-a-uuid", "step_slug": "a", "task_index": 0},
        {"run_id": some_run, "step_slug": "nope", "task_index": 0},
        {"run_id": some_run, "step_slug": "a", "task_index": 1.5},
        {"run_id": some_run, "step_slug": "a", "task_index": 10000000000},
        {"run_id": some_run, "step_slug": 7, "task_index": 0},
    ]
    finished = {"run_id": str(run_id), "step_slug": "a", "task_index": 0}
    for body in strays + [finished]:
        conn.execute("""INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
                        SELECT q.queue_id, nextval(q.msg_seq), clock_timestamp(), 5, %s
                          FROM pgflow.queues q WHERE q.queue_name = %s""", (Jsonb(body), flow))
    tasks = poll(conn, flow, qty=20)
    assert [(r, s, i) for _, r, s, i, _, _ in tasks] == [(run_id, "b", 0)]
    dlq = conn.execute("SELECT message, last_error FROM pgflow.list_dlq_messages(%s)", (flow,)).fetchall()
    assert sorted(json.dumps(m, sort_keys=True) for m, _ in dlq) == \
        sorted(json.dumps(m, sort_keys=True) for m in strays + [finished])
    assert all(f'not a task of flow "{flow}"' in err for _, err in dlq)
    left = conn.execute("SELECT count(*) FROM pgflow.messages m JOIN pgflow.queues q USING (queue_id) "
                        "WHERE q.queue_name = %s", (flow,)).fetchone()[0]
    assert left == 1   # only b's task, leased
    conn.execute("SELECT pgflow.purge_dlq(%s)", (flow,))


def test_start_flow_with_run_id_is_idempotent(conn, flows):
    flow = flows(SEQ)
    rid = uuid.uuid4()
    assert start(conn, flow, {"a": 1}, rid) == rid
    before = counts(conn, flow)
    assert start(conn, flow, {"a": 1}, rid) == rid
    assert counts(conn, flow) == before


def test_start_delay_holds_back_tasks(conn, flows):
    flow = flows([{"slug": "a", "start_delay": 1}])
    start(conn, flow, {})
    assert poll(conn, flow) == []
    tasks = poll(conn, flow, wait=3)
    assert [t[2] for t in tasks] == ["a"]


def test_start_delay_of_a_dependent_step_holds_back_its_task(conn, flows):
    # A dependent single step is started by the completing task (the Rust path); its delay
    # holds the task back, and the due-time entry wakes a waiting poll when it comes due.
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"], "start_delay": 1}])
    run_id = start(conn, flow, {})
    [task] = poll(conn, flow)
    assert complete(conn, run_id, "a", task[3], {"x": 1}) == "completed"
    assert poll(conn, flow) == []
    due = conn.execute("""SELECT count(*) FROM pgflow.due_wakeups d JOIN pgflow.queues q USING (queue_id)
                           WHERE q.queue_name = %s""", (flow,)).fetchone()[0]
    assert due == 1
    tasks = poll(conn, flow, wait=3)
    assert [(t[2], t[5]) for t in tasks] == [("b", {"run": {}, "a": {"x": 1}})]
    assert conn.execute("SELECT status, initial_tasks FROM pgflow.step_states WHERE run_id = %s AND step_slug = 'b'",
                        (run_id,)).fetchone() == ("started", 1)


def test_drop_flow_removes_everything(conn):
    slug = make_flow(conn, DIAMOND)
    run_id = start(conn, slug, {})
    poll(conn, slug)
    assert conn.execute("SELECT pgflow.drop_flow(%s)", (slug,)).fetchone()[0] is True
    assert conn.execute("SELECT pgflow.drop_flow(%s)", (slug,)).fetchone()[0] is False
    left = conn.execute(
        """SELECT (SELECT count(*) FROM pgflow.runs WHERE run_id = %(r)s)
                + (SELECT count(*) FROM pgflow.step_states WHERE run_id = %(r)s)
                + (SELECT count(*) FROM pgflow.step_tasks WHERE run_id = %(r)s)
                + (SELECT count(*) FROM pgflow.steps WHERE flow_slug = %(f)s)
                + (SELECT count(*) FROM pgflow.queues WHERE queue_name = %(f)s)""",
        {"r": run_id, "f": slug}).fetchone()[0]
    assert left == 0


# ------------------------------------------------------------------------------------------
# complete_and_poll: a worker's cycle in one transaction
# ------------------------------------------------------------------------------------------

def complete_and_poll(conn, run_id, step, idx, output, qty=1, worker=None, vt=30):
    return conn.execute(
        "SELECT flow_slug, run_id, step_slug, task_index, msg_id, input "
        "FROM pgflow.complete_and_poll(%s, %s, %s, %s, %s, %s, %s)",
        (run_id, step, idx, Jsonb(output), vt, qty, worker)).fetchall()


def test_complete_and_poll_completes_and_claims_the_next_step(conn, flows):
    flow = flows(SEQ)
    run_id = start(conn, flow, {"n": 1})
    (t,) = poll(conn, flow)
    (nxt,) = complete_and_poll(conn, run_id, "a", 0, "A")
    # the step its own completion started, with the output in its input
    assert nxt[:4] == (flow, run_id, "b", 0) and nxt[5] == {"run": {"n": 1}, "a": "A"}
    (nxt,) = complete_and_poll(conn, run_id, "b", 0, "B")
    assert nxt[2] == "c"
    assert complete_and_poll(conn, run_id, "c", 0, "C") == []          # nothing left: no rows
    assert run_row(conn, run_id) == ("completed", {"c": "C"})
    assert complete(conn, run_id, "c", 0, "again") == "already_completed"


def test_complete_and_poll_claims_up_to_qty_and_records_the_worker(conn, flows):
    flow = flows([{"slug": "r"}, {"slug": "m", "type": "map", "deps": ["r"]}])
    run_id = start(conn, flow, {})
    w = uuid.uuid4()
    poll(conn, flow, worker=w)
    tasks = complete_and_poll(conn, run_id, "r", 0, [1, 2, 3, 4, 5], qty=3, worker=w)
    assert [(x[2], x[3], x[5]) for x in tasks] == [("m", 0, 1), ("m", 1, 2), ("m", 2, 3)]
    assert {r[0] for r in conn.execute("SELECT last_worker_id FROM pgflow.step_tasks WHERE run_id = %s "
                                       "AND step_slug = 'm' AND status = 'started'", (run_id,))} == {w}
    # a completion whose worker is not the task's changes nothing but still claims
    rest = complete_and_poll(conn, run_id, "m", 0, "x", qty=5, worker=uuid.uuid4())
    assert [x[3] for x in rest] == [3, 4]
    assert conn.execute("SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'm' "
                        "AND task_index = 0", (run_id,)).fetchone()[0] == "started"


def test_complete_and_poll_is_one_transaction(conn, flows, make_conn):
    flow = flows(SEQ)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    other = make_conn()
    with conn.transaction(force_rollback=True):
        assert len(complete_and_poll(conn, run_id, "a", 0, "A")) == 1
        # not committed: another session sees neither the completion nor b
        assert poll(other, flow) == []
        assert other.execute("SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'a'",
                             (run_id,)).fetchone()[0] == "started"
    # rolled back: a is still started, b was never queued
    assert steps_of(conn, run_id) == {"a": "started", "b": "created", "c": "created"}
    assert poll(other, flow) == []
    (b,) = complete_and_poll(conn, run_id, "a", 0, "A")
    assert b[2] == "b"


@pytest.mark.parametrize("args, state, needle", [
    ((30, 0), "22023", "qty"),
    ((-1, 1), "22023", "vt"),
    ((None, 1), "22004", "vt"),
    ((30, None), "22004", "qty"),
])
def test_complete_and_poll_bad_lease_changes_nothing(conn, flows, args, state, needle):
    flow = flows(SEQ)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    before = counts(conn, flow)
    e = error_of(conn, "SELECT * FROM pgflow.complete_and_poll(%s, 'a', 0, '1', %s, %s)", (run_id, *args))
    assert e.sqlstate == state and needle in str(e)
    assert counts(conn, flow) == before


def test_complete_and_poll_bad_task_changes_nothing(conn, flows):
    flow = flows(SEQ)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    before = counts(conn, flow)
    for call, params, state, needle in [
        ("%s, 'a', 0, NULL", (run_id,), "22004", "output"),
        ("NULL, 'a', 0, '1'", (), "22004", "run_id"),
        ("%s, NULL, 0, '1'", (run_id,), "22004", "step_slug"),
        ("%s, 'a', NULL, '1'", (run_id,), "22004", "task_index"),
        ("%s, 'a', 0, '1'", (uuid.uuid4(),), "42704", "does not exist"),
        ("%s, 'zz', 0, '1'", (run_id,), "42704", "zz"),
        ("%s, 'a', 7, '1'", (run_id,), "42704", "7"),
    ]:
        e = error_of(conn, f"SELECT * FROM pgflow.complete_and_poll({call})", params)
        assert e.sqlstate == state and needle in str(e), (call, str(e))
        assert counts(conn, flow) == before


def test_eight_workers_complete_maps_at_once(conn, flows):
    """Map tasks complete without waiting for each other: every step completes exactly once,
    with its outputs in index order, and every run completes."""
    flow = flows([{"slug": "r"}, {"slug": "m", "type": "map", "deps": ["r"]},
                  {"slug": "n", "type": "map", "deps": ["r"]}, {"slug": "j", "deps": ["m", "n"]}],
                 max_attempts=1)
    n_runs, width = 30, 40
    conn.execute("SELECT count(pgflow.start_flow(%s, to_jsonb(i))) FROM generate_series(1, %s) i", (flow, n_runs))
    handled, lock = [], threading.Lock()

    def output(step, inp):
        return list(range(width)) if step == "r" else ({"j": True} if step == "j" else inp * 10)

    def worker():
        with connect() as c:
            held, idle = [], 0
            while idle < 3:
                if not held:
                    held = poll(c, flow, qty=1, wait=1)
                    if not held:
                        idle += 1
                        continue
                idle = 0
                _, run_id, step, idx, _, inp = held[0]
                with lock:
                    handled.append((run_id, step, idx))
                held = complete_and_poll(c, run_id, step, idx, output(step, inp))

    errors = run_workers(worker, 8, 180)
    assert not errors, errors
    per_run = 2 + 2 * width
    unfinished = conn.execute("""SELECT s.step_slug, s.status, s.remaining_deps,
                                        (SELECT count(*) FROM pgflow.step_tasks t WHERE t.run_id = s.run_id
                                            AND t.step_slug = s.step_slug AND t.status = 'completed'),
                                        (SELECT string_agg(t.status || t.task_index, ',') FROM pgflow.step_tasks t
                                          WHERE t.run_id = s.run_id AND t.step_slug = s.step_slug AND t.status <> 'completed')
                                   FROM pgflow.step_states s JOIN pgflow.runs r USING (run_id)
                                  WHERE r.flow_slug = %s AND s.status <> 'completed'""", (flow,)).fetchall()
    assert unfinished == []
    assert len(handled) == len(set(handled)) == n_runs * per_run      # each task handed out once
    assert conn.execute("SELECT count(*) FROM pgflow.runs WHERE flow_slug = %s AND status = 'completed'",
                        (flow,)).fetchone()[0] == n_runs
    expected = [i * 10 for i in range(width)]
    rows = conn.execute("""SELECT s.step_slug, s.status, s.remaining_tasks, s.output FROM pgflow.step_states s
                             JOIN pgflow.runs r USING (run_id)
                            WHERE r.flow_slug = %s AND s.step_slug IN ('m', 'n')""", (flow,)).fetchall()
    assert len(rows) == 2 * n_runs
    assert all(r[1:] == ("completed", 0, expected) for r in rows), rows[:3]
    # j started once per run, after both maps
    assert conn.execute("""SELECT count(*) FROM pgflow.step_tasks t JOIN pgflow.runs r USING (run_id)
                            WHERE r.flow_slug = %s AND t.step_slug = 'j'""", (flow,)).fetchone()[0] == n_runs


def test_map_remaining_tasks_is_counted_live_for_a_started_step(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}])
    run_id = start(conn, flow, [1, 2, 3])
    poll(conn, flow)
    complete(conn, run_id, "m", 1, "b")
    (step,) = state(conn, run_id)["steps"]
    assert (step["status"], step["remaining_tasks"], step["initial_tasks"]) == ("started", 2, 3)
    complete(conn, run_id, "m", 0, "a")
    complete(conn, run_id, "m", 2, "c")
    (step,) = state(conn, run_id)["steps"]
    assert (step["status"], step["remaining_tasks"]) == ("completed", 0)
    assert run_row(conn, run_id) == ("completed", {"m": ["a", "b", "c"]})


def test_workers_completing_batches_of_map_tasks_in_one_transaction(conn, flows):
    """Four workers each claim ten tasks of the same map steps and complete them in one statement
    (one transaction): no deadlock, no error, every step completed once."""
    flow = flows([{"slug": "m", "type": "map"}, {"slug": "after", "deps": ["m"]}], max_attempts=1)
    n_runs, width = 4, 200
    conn.execute("SELECT count(pgflow.start_flow(%s, (SELECT jsonb_agg(x) FROM generate_series(1, %s) x))) "
                 "FROM generate_series(1, %s)", (flow, width, n_runs))

    def worker():
        with connect() as c:
            idle = 0
            while idle < 3:
                rows = c.execute("SELECT run_id, step_slug, task_index, input "
                                 "FROM pgflow.poll_for_tasks(%s, 30, 10, 1)", (flow,)).fetchall()
                if not rows:
                    idle += 1
                    continue
                idle = 0
                maps = [r for r in rows if r[1] == "m"]
                for r in rows:
                    if r[1] == "after":
                        assert complete(c, r[0], "after", 0, len(r[3]["m"])) == "completed"
                if maps:
                    out = c.execute(
                        "SELECT array_agg(pgflow.complete_task(x.run_id, 'm', x.idx, to_jsonb(x.v * 2))) "
                        "FROM unnest(%s::uuid[], %s::int[], %s::int[]) x(run_id, idx, v)",
                        ([r[0] for r in maps], [r[2] for r in maps], [r[3] for r in maps])).fetchone()[0]
                    assert out == ["completed"] * len(maps)

    errors = run_workers(worker, 4, 180)
    assert not errors, errors
    rows = conn.execute("SELECT r.status, r.output FROM pgflow.runs r WHERE r.flow_slug = %s", (flow,)).fetchall()
    assert rows == [("completed", {"after": width})] * n_runs
    outputs = conn.execute("""SELECT s.output FROM pgflow.step_states s JOIN pgflow.runs r USING (run_id)
                               WHERE r.flow_slug = %s AND s.step_slug = 'm'""", (flow,)).fetchall()
    assert outputs == [([x * 2 for x in range(1, width + 1)],)] * n_runs
