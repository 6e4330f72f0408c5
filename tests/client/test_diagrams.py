"""Mermaid diagrams of flows and runs (pgflow.flow_mermaid, pgflow.run_mermaid), rendered by the
real Mermaid renderer (mermaid-cli driving Chromium; scripts/test.sh installs it and sets
PGFLOW_MMDC). The example flow and run drawn in docs/workflows.md are made here: the test
compares the committed Mermaid sources in docs/diagrams/ with what the functions give now, and
PGFLOW_WRITE_DIAGRAMS=1 writes them (and their SVG renderings) again."""

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from conftest import error_of, session_as

ROOT = Path(__file__).resolve().parents[2]
DIAGRAMS = ROOT / "docs" / "diagrams"
MMDC = os.environ.get("PGFLOW_MMDC", str(ROOT / "target/tools/mermaid/node_modules/.bin/mmdc"))
EXAMPLE_FLOW = "example_orders"
EXAMPLE_RUN = uuid.UUID("01900000-0000-7000-8000-000000000001")


def render(source, tmp_path, name="d"):
    """Render Mermaid source to SVG with the real renderer; fails the test on any parse error."""
    if not os.access(MMDC, os.X_OK):
        pytest.fail(f"no Mermaid renderer at {MMDC}: scripts/test.sh installs it (ensure_mermaid)")
    src, out = tmp_path / f"{name}.mmd", tmp_path / f"{name}.svg"
    src.write_text(source)
    config = tmp_path / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": "/usr/bin/chromium",
                                  "args": ["--no-sandbox", "--disable-gpu"]}))
    done = subprocess.run([MMDC, "-q", "-i", str(src), "-o", str(out), "-p", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    svg = out.read_text()
    assert svg.startswith("<svg") and "</svg>" in svg
    return svg


def claim(conn, flow, qty):
    return conn.execute("SELECT run_id, step_slug, task_index FROM pgflow.poll_for_tasks(%s, 30, %s, 0)",
                        (flow, qty)).fetchall()


@pytest.fixture
def example(conn):
    """The documented example: fetch -> items (map) -> summarize, fetch -> notify (after a
    delay), and fetch -> audit (only when the run input asks for it); a run with fetch
    completed, two of three items done, notify waiting for its delay, audit skipped; approve,
    a signal step after summarize, not yet ready."""
    conn.execute("SELECT pgflow.drop_flow(%s)", (EXAMPLE_FLOW,))
    conn.execute("SELECT pgflow.purge_dlq(%s)", (EXAMPLE_FLOW,))
    shape = {"steps": [{"slug": "fetch"},
                       {"slug": "items", "type": "map", "deps": ["fetch"]},
                       {"slug": "summarize", "deps": ["items"]},
                       {"slug": "notify", "deps": ["fetch"], "start_delay": 300},
                       {"slug": "audit", "deps": ["fetch"], "if": {"run": {"audit": True}}},
                       {"slug": "approve", "type": "signal", "deps": ["summarize"]}]}
    conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (EXAMPLE_FLOW, Jsonb(shape)))
    conn.execute("SELECT pgflow.start_flow(%s, '{}', %s)", (EXAMPLE_FLOW, EXAMPLE_RUN))
    assert claim(conn, EXAMPLE_FLOW, 1) == [(EXAMPLE_RUN, "fetch", 0)]
    conn.execute("SELECT pgflow.complete_task(%s, 'fetch', 0, '[1, 2, 3]')", (EXAMPLE_RUN,))
    assert claim(conn, EXAMPLE_FLOW, 2) == [(EXAMPLE_RUN, "items", 0), (EXAMPLE_RUN, "items", 1)]
    for i in (0, 1):
        assert conn.execute("SELECT pgflow.complete_task(%s, 'items', %s, '1')",
                            (EXAMPLE_RUN, i)).fetchone()[0] == "completed"
    yield EXAMPLE_FLOW
    conn.execute("SELECT pgflow.drop_flow(%s)", (EXAMPLE_FLOW,))
    conn.execute("SELECT pgflow.purge_dlq(%s)", (EXAMPLE_FLOW,))


def test_the_documented_example_renders_and_matches_the_docs(conn, example, tmp_path):
    flow = conn.execute("SELECT pgflow.flow_mermaid(%s)", (example,)).fetchone()[0]
    run = conn.execute("SELECT pgflow.run_mermaid(%s)", (EXAMPLE_RUN,)).fetchone()[0]
    assert flow.splitlines()[:4] == ["---", f'title: "flow {example}"', "---", "flowchart TD"]
    assert '    s1[["items<br/>map"]]:::map' in flow
    assert '    s3["notify<br/>starts after 300 s"]:::step' in flow
    assert '    s4{{"audit<br/>if condition"}}:::step' in flow
    assert '    s5>"approve<br/>signal"]:::signal' in flow
    assert {"    s0 --> s1", "    s1 --> s2", "    s0 --> s3", "    s0 --> s4"} <= set(flow.splitlines())
    assert f'title: "run {EXAMPLE_RUN} of {example}: started"' in run
    assert '    s0["fetch<br/>completed"]:::completed' in run
    assert '    s1[["items<br/>map<br/>started: 2/3 tasks done"]]:::started' in run
    assert '    s2["summarize<br/>created"]:::created' in run
    assert '    s4{{"audit<br/>if condition<br/>skipped"}}:::skipped' in run
    assert '    s5>"approve<br/>signal<br/>created"]:::created' in run
    svgs = {name: render(text, tmp_path, name) for name, text in
            (("example-flow", flow), ("example-run", run))}
    assert "items" in svgs["example-flow"] and "2/3 tasks done" in svgs["example-run"]
    if os.environ.get("PGFLOW_WRITE_DIAGRAMS") == "1":
        DIAGRAMS.mkdir(parents=True, exist_ok=True)
        for name, text in (("example-flow", flow), ("example-run", run)):
            (DIAGRAMS / f"{name}.mmd").write_text(text)
            (DIAGRAMS / f"{name}.svg").write_text(svgs[name])
    assert (DIAGRAMS / "example-flow.mmd").read_text() == flow, "docs/diagrams is out of date"
    assert (DIAGRAMS / "example-run.mmd").read_text() == run, "docs/diagrams is out of date"


def test_every_state_and_awkward_slugs_render(conn, flows, tmp_path):
    # Mermaid keywords as slugs; a failed run, a cancelled one, a retried single step
    flow = flows([{"slug": "end"}, {"slug": "subgraph", "deps": ["end"], "type": "map"},
                  {"slug": "style", "deps": ["end"]}, {"slug": "graph", "deps": ["subgraph", "style"]}],
                 max_attempts=3)
    failed = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    claim(conn, flow, 1)
    assert conn.execute("SELECT pgflow.fail_task(%s, 'end', 0, 'x')", (failed,)).fetchone()[0] == "retrying"
    conn.execute("UPDATE pgflow.messages SET vt = now() WHERE queue_id = "
                 "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (flow,))
    claim(conn, flow, 1)
    assert conn.execute("SELECT pgflow.fail_task(%s, 'end', 0, 'x', retry => false)",
                        (failed,)).fetchone()[0] == "failed"
    cancelled = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    conn.execute("SELECT pgflow.cancel_run(%s)", (cancelled,))
    empty = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    claim(conn, flow, 1)
    conn.execute("SELECT pgflow.complete_task(%s, 'end', 0, '[]')", (empty,))  # an empty map
    texts = {rid: conn.execute("SELECT pgflow.run_mermaid(%s)", (rid,)).fetchone()[0]
             for rid in (failed, cancelled, empty)}
    assert '    s0["end<br/>failed, 2 attempts"]:::failed' in texts[failed]
    assert f'title: "run {failed} of {flow}: failed"' in texts[failed]
    assert ":::cancelled" in texts[cancelled]
    # a run waiting for a signal
    gate = flows([{"slug": "approve", "type": "signal"}])
    waiting = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (gate,)).fetchone()[0]
    texts[waiting] = conn.execute("SELECT pgflow.run_mermaid(%s)", (waiting,)).fetchone()[0]
    assert '    s0>"approve<br/>signal<br/>waiting"]:::waiting' in texts[waiting]
    assert '    s1[["subgraph<br/>map<br/>completed: 0/0 tasks done"]]:::completed' in texts[empty]
    render(conn.execute("SELECT pgflow.flow_mermaid(%s)", (flow,)).fetchone()[0], tmp_path, "flow")
    for i, text in enumerate(texts.values()):
        render(text, tmp_path, f"run{i}")


@pytest.mark.parametrize("sql,arg,state,words", [
    ("SELECT pgflow.flow_mermaid(%s)", None, "22004", "flow_slug"),
    ("SELECT pgflow.flow_mermaid(%s)", "a b", "22023", "flow_slug"),
    ("SELECT pgflow.flow_mermaid(%s)", "no_such_flow_d", "42704", "no_such_flow_d"),
    ("SELECT pgflow.run_mermaid(%s)", None, "22004", "run_id"),
    ("SELECT pgflow.run_mermaid(%s)", uuid.UUID(int=7), "42704", "does not exist"),
])
def test_bad_input(conn, sql, arg, state, words):
    e = error_of(conn, sql, (arg,))
    assert e.sqlstate == state and words in str(e), e


def test_producers_and_consumers_may_draw(conn, flows):
    flow = flows([{"slug": "a"}])
    run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, '{}')", (flow,)).fetchone()[0]
    for group in ("pgflow_producer", "pgflow_consumer"):
        with session_as(conn, group) as s:
            assert "flowchart TD" in s.execute("SELECT pgflow.flow_mermaid(%s)", (flow,)).fetchone()[0]
            assert ":::started" in s.execute("SELECT pgflow.run_mermaid(%s)", (run_id,)).fetchone()[0]
