"""Signal steps: a step without a task that waits for pgflow.signal (an approval, a webhook),
signals that come early, twice or late, timeouts with when_exhausted, cancel and retry, the
waiting_signals view, events, roles and bad input."""

import time
import uuid

import psycopg
import pytest

from conftest import error_of, session_as
from test_workflow import collect, complete, events_of, poll, run_row, start, state, steps_of


def signal(conn, run_id, step, payload):
    return conn.execute("SELECT pgflow.signal(%s, %s, %s)", (run_id, step, psycopg.types.json.Jsonb(payload))).fetchone()[0]


def waiting(conn, run_id):
    return conn.execute("SELECT step_slug FROM pgflow.waiting_signals WHERE run_id = %s ORDER BY 1",
                        (run_id,)).fetchall()


APPROVAL = [{"slug": "plan"}, {"slug": "approve", "type": "signal", "deps": ["plan"]},
            {"slug": "deploy", "deps": ["approve", "plan"]}]


def test_a_signal_step_waits_and_its_payload_is_its_output(conn, flows, make_conn):
    flow = flows(APPROVAL)
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {"change": 7})
    (t,) = poll(conn, flow)
    complete(conn, run_id, "plan", 0, {"steps": 3})
    assert steps_of(conn, run_id)["approve"] == "waiting"
    assert waiting(conn, run_id) == [("approve",)]
    assert poll(conn, flow) == []  # nothing for workers while it waits
    s = [x for x in state(conn, run_id)["steps"] if x["step_slug"] == "approve"][0]
    assert s["signal"] == {"received_at": None, "applied_at": None, "deadline": None}
    assert signal(conn, run_id, "approve", {"by": "alice", "ok": True}) == "signalled"
    assert waiting(conn, run_id) == []
    (t,) = poll(conn, flow)
    assert t[5] == {"run": {"change": 7}, "plan": {"steps": 3}, "approve": {"by": "alice", "ok": True}}
    complete(conn, run_id, "deploy", 0, "done")
    assert run_row(conn, run_id) == ("completed", {"deploy": "done"})
    evs = [(e["event"], e.get("step_slug")) for e in events_of(collect(listener), "pgflow.flows")
           if e["event"] in ("step_waiting", "step_signalled")]
    assert evs == [("step_waiting", "approve"), ("step_signalled", "approve")]
    # a second signal changes nothing and says so
    assert signal(conn, run_id, "approve", {"by": "mallory"}) == "run_completed"


def test_a_signal_before_the_step_is_ready_is_kept_and_applied(conn, flows):
    flow = flows(APPROVAL)
    run_id = start(conn, flow, {})
    assert signal(conn, run_id, "approve", "yes") == "stored"
    assert signal(conn, run_id, "approve", "no") == "already_signalled"
    assert steps_of(conn, run_id)["approve"] == "created"
    poll(conn, flow)
    complete(conn, run_id, "plan", 0, 1)
    assert steps_of(conn, run_id)["approve"] == "completed"
    assert waiting(conn, run_id) == []
    (t,) = poll(conn, flow)
    assert t[5]["approve"] == "yes"


def test_a_root_signal_step_waits_from_the_start_and_a_map_maps_over_its_payload(conn, flows):
    flow = flows([{"slug": "files", "type": "signal"}, {"slug": "each", "type": "map", "deps": ["files"]}])
    run_id = start(conn, flow, {})
    assert waiting(conn, run_id) == [("files",)]
    assert signal(conn, run_id, "files", ["a", "b"]) == "signalled"
    got = sorted((t[3], t[5]) for t in poll(conn, flow))
    assert got == [(0, "a"), (1, "b")]


def test_a_timeout_fails_the_run_or_skips_the_step(conn, flows):
    strict = flows([{"slug": "approve", "type": "signal", "timeout": 1}, {"slug": "after", "deps": ["approve"]}])
    lenient = flows([{"slug": "approve", "type": "signal", "timeout": 1, "when_exhausted": "skip"},
                     {"slug": "after", "deps": ["approve"]}])
    a, b = start(conn, strict, {}), start(conn, lenient, {})
    deadline = state(conn, a)["steps"][0]["signal"]["deadline"]
    assert deadline is not None
    time.sleep(1.2)
    conn.execute("SELECT pgflow.run_maintenance()")  # the worker may have done it already
    assert run_row(conn, a)[0] == "failed"
    err = [x for x in state(conn, a)["steps"] if x["step_slug"] == "approve"][0]["error_message"]
    assert err == "no signal within its timeout of 1 s"
    assert signal(conn, a, "approve", True) == "run_failed"
    assert steps_of(conn, b) == {"approve": "skipped", "after": "started"}
    (t,) = poll(conn, lenient)
    assert t[5] == {"run": {}}
    assert waiting(conn, a) == [] and waiting(conn, b) == []


def test_cancel_and_retry_a_run_waiting_for_a_signal(conn, flows):
    flow = flows([{"slug": "approve", "type": "signal"}, {"slug": "go", "deps": ["approve"]}])
    run_id = start(conn, flow, {})
    assert conn.execute("SELECT pgflow.cancel_run(%s)", (run_id,)).fetchone()[0] == "cancelled"
    assert waiting(conn, run_id) == []
    assert signal(conn, run_id, "approve", 1) == "run_cancelled"
    assert conn.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0] == "retried"
    assert waiting(conn, run_id) == [("approve",)]
    assert signal(conn, run_id, "approve", 1) == "signalled"
    (t,) = poll(conn, flow)
    complete(conn, run_id, "go", 0, "ok")
    assert run_row(conn, run_id) == ("completed", {"go": "ok"})
    # retention takes the signals with the run
    assert conn.execute("SELECT pgflow.prune_runs('0 seconds', %s)", (flow,)).fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM pgflow.signals WHERE run_id = %s", (run_id,)).fetchone()[0] == 0


def test_signal_steps_in_shapes(conn, flows):
    flow = flows([{"slug": "approve", "type": "signal", "timeout": 172800, "when_exhausted": "skip"}])
    shape = conn.execute("SELECT pgflow.get_flow_shape(%s)", (flow,)).fetchone()[0]
    assert shape["steps"] == [{"slug": "approve", "type": "signal", "deps": [], "timeout": 172800,
                               "when_exhausted": "skip"}]


@pytest.mark.parametrize("sql,args,state_,words", [
    ("SELECT pgflow.signal(NULL, 'approve', '1')", (), "22004", "run_id"),
    ("SELECT pgflow.signal(%(run)s, NULL, '1')", (), "22004", "step_slug"),
    ("SELECT pgflow.signal(%(run)s, 'approve', NULL)", (), "22004", "payload"),
    ("SELECT pgflow.signal(%(nobody)s, 'approve', '1')", (), "42704", "does not exist"),
    ("SELECT pgflow.signal(%(run)s, 'nope', '1')", (), "42704", "nope"),
    ("SELECT pgflow.signal(%(run)s, 'a b', '1')", (), "22023", "step_slug"),
    ("SELECT pgflow.signal(%(run)s, 'plan', '1')", (), "22023", "not a signal step"),
    ("SELECT pgflow.add_step(%(flow)s, 'x', step_type => 'signal', max_attempts => 2)", (), "22023", "signal step"),
    ("SELECT pgflow.add_step(%(flow)s, 'x', step_type => 'signal', timeout => 31536001)", (), "22023", "timeout"),
    ("SELECT pgflow.add_step(%(flow)s, 'x', timeout => 86401)", (), "22023", "timeout"),
    ("SELECT pgflow.add_step(%(flow)s, 'x', step_type => 'wait')", (), "22023", "step_type"),
])
def test_bad_input(conn, flows, sql, args, state_, words):
    flow = flows(APPROVAL)
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    e = error_of(conn, sql, {"run": run_id, "nobody": uuid.uuid4(), "flow": flow + "_new"}
                 if "add_step" not in sql else {"flow": flows([{"slug": "a"}])})
    assert e.sqlstate == state_ and words in str(e), e
    assert conn.execute("SELECT count(*) FROM pgflow.signals WHERE run_id = %s", (run_id,)).fetchone()[0] == 0


def test_producers_signal_and_both_roles_see_what_runs_wait_for(conn, flows):
    flow = flows([{"slug": "approve", "type": "signal"}])
    run_id = start(conn, flow, {})
    with session_as(conn, "pgflow_consumer") as c:
        assert c.execute("SELECT count(*) FROM pgflow.waiting_signals WHERE run_id = %s", (run_id,)).fetchone()[0] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT pgflow.signal(%s, 'approve', '1')", (run_id,))
    with session_as(conn, "pgflow_producer") as p:
        assert p.execute("SELECT count(*) FROM pgflow.waiting_signals WHERE run_id = %s", (run_id,)).fetchone()[0] == 1
        assert p.execute("SELECT pgflow.signal(%s, 'approve', '1')", (run_id,)).fetchone()[0] == "signalled"
    assert run_row(conn, run_id) == ("completed", {"approve": 1})
