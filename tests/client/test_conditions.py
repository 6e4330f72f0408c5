"""Conditions and skips: if_input / if_not_input tested when a step becomes ready, when_unmet
(skip, skip_cascade, fail), when_exhausted (fail, skip, skip_cascade) after the last attempt,
a permanent error or a timeout; skipped steps leave no key in their dependents' input, runs
complete when every step completed or was skipped; shapes round-trip; bad input."""

import time

import pytest
from psycopg.types.json import Jsonb

from conftest import error_of
from test_workflow import collect, complete, events_of, fail, poll, run_row, start, state, steps_of


def work(conn, flow, outputs):
    """Claim and complete every task there is, output outputs[step] (a function of the input or
    a value); returns {step: input} of what ran."""
    ran = {}
    while True:
        tasks = poll(conn, flow, qty=50)
        if not tasks:
            return ran
        for _, run_id, step, idx, _, inp in tasks:
            ran[step] = inp
            out = outputs[step]
            assert complete(conn, run_id, step, idx, out(inp) if callable(out) else out) == "completed"


def test_an_unmet_condition_skips_the_step_and_its_dependents_run_without_its_key(conn, flows):
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"], "if": {"run": {"go": True}}},
                  {"slug": "c", "deps": ["a", "b"]}])
    skipped = start(conn, flow, {"go": False})
    ran = work(conn, flow, {"a": "A", "b": "B", "c": "C"})
    assert set(ran) == {"a", "c"} and ran["c"] == {"run": {"go": False}, "a": "A"}
    assert steps_of(conn, skipped) == {"a": "completed", "b": "skipped", "c": "completed"}
    assert run_row(conn, skipped) == ("completed", {"c": "C"})
    b = [x for x in state(conn, skipped)["steps"] if x["step_slug"] == "b"][0]
    assert b["skipped_at"] is not None and b["error_message"] == "its condition is not met"
    taken = start(conn, flow, {"go": True, "other": 1})  # contains the condition: runs
    ran = work(conn, flow, {"a": "A", "b": "B", "c": "C"})
    assert ran["c"] == {"run": {"go": True, "other": 1}, "a": "A", "b": "B"}
    assert run_row(conn, taken) == ("completed", {"c": "C"})


def test_if_not_input_and_conditions_on_dependency_outputs(conn, flows):
    flow = flows([{"slug": "check"}, {"slug": "deploy", "deps": ["check"], "if_not": {"check": {"ok": False}}},
                  {"slug": "page", "deps": ["check"], "if": {"check": {"ok": False}}}])
    good = start(conn, flow, {})
    work(conn, flow, {"check": {"ok": True, "n": 1}, "deploy": "D", "page": "P"})
    bad = start(conn, flow, {})
    work(conn, flow, {"check": {"ok": False}, "deploy": "D", "page": "P"})
    assert steps_of(conn, good) == {"check": "completed", "deploy": "completed", "page": "skipped"}
    assert steps_of(conn, bad) == {"check": "completed", "deploy": "skipped", "page": "completed"}
    # leaves that completed make the output
    assert run_row(conn, good) == ("completed", {"deploy": "D"})
    assert run_row(conn, bad) == ("completed", {"page": "P"})


def test_skip_cascade_skips_everything_after_the_step(conn, flows, make_conn):
    flow = flows([{"slug": "a"}, {"slug": "b", "deps": ["a"], "if": {"a": 1}, "when_unmet": "skip_cascade"},
                  {"slug": "c", "deps": ["b"]}, {"slug": "d", "deps": ["c", "a"]}, {"slug": "e", "deps": ["a"]}])
    listener = make_conn()
    listener.execute('LISTEN "pgflow.flows"')
    run_id = start(conn, flow, {})
    ran = work(conn, flow, {"a": 2, "e": "E"})
    assert set(ran) == {"a", "e"}
    assert steps_of(conn, run_id) == {"a": "completed", "b": "skipped", "c": "skipped", "d": "skipped",
                                      "e": "completed"}
    assert run_row(conn, run_id) == ("completed", {"e": "E"})
    skips = sorted((e["step_slug"], e["reason"]) for e in events_of(collect(listener), "pgflow.flows")
                   if e["event"] == "step_skipped")
    assert skips == [("b", "condition"), ("c", "cascade"), ("d", "cascade")]


def test_when_unmet_fail_fails_the_run_naming_the_step(conn, flows):
    flow = flows([{"slug": "gate", "if": {"run": {"approved": True}}, "when_unmet": "fail"}, {"slug": "x"}])
    run_id = start(conn, flow, {"approved": False})
    assert run_row(conn, run_id)[0] == "failed"
    gate = [x for x in state(conn, run_id)["steps"] if x["step_slug"] == "gate"][0]
    assert gate["status"] == "failed" and 'step "gate"' in gate["error_message"]
    assert poll(conn, flow) == []  # nothing of the run is handed out


def test_a_skipped_first_root_does_not_complete_the_run_early(conn, flows):
    flow = flows([{"slug": "maybe", "if": {"run": {"yes": True}}}, {"slug": "other"}])
    run_id = start(conn, flow, {})
    assert run_row(conn, run_id)[0] == "started"
    work(conn, flow, {"other": "O"})
    assert run_row(conn, run_id) == ("completed", {"other": "O"})


def test_a_first_root_map_over_nothing_does_not_complete_the_run_early(conn, flows):
    flow = flows([{"slug": "m", "type": "map"}, {"slug": "other"}])
    run_id = start(conn, flow, [])
    assert run_row(conn, run_id)[0] == "started"
    work(conn, flow, {"other": "O"})
    assert run_row(conn, run_id) == ("completed", {"m": [], "other": "O"})


def test_a_map_over_a_skipped_step_is_skipped_and_an_empty_map_is_still_empty(conn, flows):
    flow = flows([{"slug": "list", "if": {"run": {"n": 1}}}, {"slug": "each", "type": "map", "deps": ["list"]},
                  {"slug": "sum", "deps": ["each"]}])
    skipped = start(conn, flow, {"n": 0})
    ran = work(conn, flow, {"sum": "S"})
    assert ran == {"sum": {"run": {"n": 0}}}
    assert steps_of(conn, skipped) == {"list": "skipped", "each": "skipped", "sum": "completed"}
    empty = start(conn, flow, {"n": 1})
    ran = work(conn, flow, {"list": [], "sum": "S"})
    assert ran["sum"] == {"run": {"n": 1}, "each": []}
    assert steps_of(conn, empty)["each"] == "completed"


def test_when_exhausted_skip_lets_the_run_go_on(conn, flows):
    flow = flows([{"slug": "enrich", "when_exhausted": "skip", "max_attempts": 2}, {"slug": "store", "deps": ["enrich"]}])
    run_id = start(conn, flow, {})
    (t,) = poll(conn, flow)
    assert conn.execute("SELECT pgflow.fail_task(%s, 'enrich', 0, 'flaky')", (run_id,)).fetchone()[0] == "retrying"
    conn.execute("UPDATE pgflow.messages SET vt = now() WHERE queue_id = "
                 "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (flow,))
    (t,) = poll(conn, flow)
    assert conn.execute("SELECT pgflow.fail_task(%s, 'enrich', 0, 'flaky')", (run_id,)).fetchone()[0] == "step_skipped"
    ran = work(conn, flow, {"store": "ok"})
    assert ran == {"store": {"run": {}}}
    assert run_row(conn, run_id) == ("completed", {"store": "ok"})
    s = {x["step_slug"]: x for x in state(conn, run_id)["steps"]}
    assert s["enrich"]["status"] == "skipped" and s["enrich"]["error_message"] == "flaky"
    assert s["enrich"]["tasks"]["failed"] == 1


def test_a_permanent_error_in_a_map_task_skips_the_map_and_cancels_its_siblings(conn, flows):
    flow = flows([{"slug": "m", "type": "map", "when_exhausted": "skip_cascade"}, {"slug": "after", "deps": ["m"]},
                  {"slug": "side"}])
    run_id = start(conn, flow, [1, 2, 3])
    tasks = poll(conn, flow, qty=3)  # side first (later steps first), then two of the map's
    assert sorted((t[2], t[3]) for t in tasks) == [("m", 0), ("m", 1), ("side", 0)]
    assert complete(conn, run_id, "m", 0, "x") == "completed"
    assert fail(conn, run_id, "m", 1, "bad request", retry=False) == "step_skipped"
    # the sibling still queued is cancelled, its message gone; a late report says why
    assert conn.execute("SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'm' "
                        "ORDER BY task_index", (run_id,)).fetchall() == [("completed",), ("failed",), ("cancelled",)]
    assert complete(conn, run_id, "m", 2, "late") == "step_skipped"
    assert poll(conn, flow) == []
    assert complete(conn, run_id, "side", 0, "S") == "completed"
    assert steps_of(conn, run_id) == {"m": "skipped", "after": "skipped", "side": "completed"}
    assert run_row(conn, run_id) == ("completed", {"side": "S"})


def test_a_timed_out_last_attempt_follows_when_exhausted(conn, flows):
    flow = flows([{"slug": "slow", "timeout": 1, "when_exhausted": "skip"}, {"slug": "next", "deps": ["slow"]}],
                 max_attempts=1)
    run_id = start(conn, flow, {})
    poll(conn, flow)
    time.sleep(1.2)
    ran = {}
    deadline = time.monotonic() + 10
    while "next" not in ran and time.monotonic() < deadline:
        ran.update(work(conn, flow, {"next": "N"}))
    assert ran == {"next": {"run": {}}}
    assert steps_of(conn, run_id) == {"slow": "skipped", "next": "completed"}
    assert "timed out" in [x for x in state(conn, run_id)["steps"] if x["step_slug"] == "slow"][0]["error_message"]


def test_retry_run_keeps_skipped_steps_skipped(conn, flows):
    flow = flows([{"slug": "opt", "if": {"run": {"x": 1}}}, {"slug": "must", "max_attempts": 1}])
    run_id = start(conn, flow, {})
    poll(conn, flow)
    assert fail(conn, run_id, "must", 0, "bad request", retry=False) == "failed"
    assert conn.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0] == "retried"
    assert steps_of(conn, run_id) == {"opt": "skipped", "must": "started"}
    work(conn, flow, {"must": 1})
    assert run_row(conn, run_id) == ("completed", {"must": 1})


def test_shapes_round_trip_conditions(conn, flows):
    shape = {"max_attempts": 3, "base_delay": 1, "timeout": 60, "steps": [
        {"slug": "a", "type": "single", "deps": []},
        {"slug": "b", "type": "single", "deps": ["a"], "if": {"a": {"ok": True}}, "if_not": {"run": {"dry": True}},
         "when_unmet": "skip_cascade", "when_exhausted": "skip"},
        {"slug": "c", "type": "map", "deps": ["a"], "when_unmet": "fail", "if": {"run": {}}}]}
    flow = flows(shape["steps"])
    got = conn.execute("SELECT pgflow.get_flow_shape(%s)", (flow,)).fetchone()[0]
    assert got == shape
    # defaults are left out, and the shape is accepted back unchanged
    plain = flows([{"slug": "p", "when_unmet": "skip", "when_exhausted": "fail"}])
    assert conn.execute("SELECT pgflow.get_flow_shape(%s)", (plain,)).fetchone()[0]["steps"] == \
        [{"slug": "p", "type": "single", "deps": []}]
    assert conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (flow, Jsonb(got))).fetchone()[0] is False
    row = conn.execute("SELECT if_input, if_not_input, when_unmet, when_exhausted FROM pgflow.steps "
                       "WHERE flow_slug = %s AND step_slug = 'b'", (flow,)).fetchone()
    assert row == ({"a": {"ok": True}}, {"run": {"dry": True}}, "skip_cascade", "skip")


@pytest.mark.parametrize("sql,state,words", [
    ("SELECT pgflow.add_step(%(f)s, 'x', if_input => '[1]')", "22023", "if_input"),
    ("SELECT pgflow.add_step(%(f)s, 'x', if_not_input => '\"s\"')", "22023", "if_not_input"),
    ("SELECT pgflow.add_step(%(f)s, 'x', when_unmet => NULL)", "22004", "when_unmet"),
    ("SELECT pgflow.add_step(%(f)s, 'x', when_unmet => 'maybe')", "22023", "when_unmet"),
    ("SELECT pgflow.add_step(%(f)s, 'x', when_exhausted => 'retry')", "22023", "when_exhausted"),
    ("SELECT pgflow.add_step(%(f)s, 'x', when_exhausted => NULL)", "22004", "when_exhausted"),
    ("SELECT pgflow.create_flow_from_shape('shape_bad_c', '{\"steps\": [{\"slug\": \"a\", \"if\": 1}]}')",
     "22023", "steps[0].if"),
    ("SELECT pgflow.create_flow_from_shape('shape_bad_c', '{\"steps\": [{\"slug\": \"a\", \"when_unmet\": \"x\"}]}')",
     "22023", "steps[0].when_unmet"),
    ("SELECT pgflow.create_flow_from_shape('shape_bad_c', '{\"steps\": [{\"slug\": \"a\", \"when_exhausted\": 3}]}')",
     "22023", "when_exhausted"),
])
def test_bad_conditions(conn, flows, sql, state, words):
    flow = flows([{"slug": "a"}])
    e = error_of(conn, sql, {"f": flow})
    assert e.sqlstate == state and words in str(e), e
    assert conn.execute("SELECT count(*) FROM pgflow.steps WHERE flow_slug IN (%s, 'shape_bad_c')",
                        (flow,)).fetchone()[0] == 1


def test_a_join_after_a_step_and_its_empty_map_starts(conn, flows):
    # a's completion starts m, a map over [] that completes at once and counts down j's deps,
    # then counts down j's deps itself: j must start (a snapshot of j's deps would leave it
    # waiting forever).
    flow = flows([{"slug": "a"}, {"slug": "m", "type": "map", "deps": ["a"]}, {"slug": "j", "deps": ["a", "m"]}])
    run_id = start(conn, flow, {})
    ran = work(conn, flow, {"a": [], "j": "J"})
    assert ran["j"] == {"run": {}, "a": [], "m": []}
    assert run_row(conn, run_id) == ("completed", {"j": "J"})
