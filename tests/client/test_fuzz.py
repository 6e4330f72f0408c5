"""Property-style fuzz test: every public function of pgflow, found in the catalog, called again
and again with edge values for each argument (NULLs, extremes of each type, empty, over-long
and unicode names, deep and huge JSON, infinities, malformed arrays), in a database of its own.

For every call it asserts:
- no XX000 (an internal error) and no lost connection;
- an error's SQLSTATE is one of the documented set;
- an argument error (22004, 22023, 42622, 54000) names the argument;
- no Rust backtrace in the error;
- a call that failed changed no table of pgflow.

Seeded and bounded in time: PGFLOW_FUZZ_SEED (default 1) and PGFLOW_FUZZ_SECONDS (default 20;
tests/long.sh runs 300). The seed and the number of calls are printed, and a failure names the
call, so a run can be replayed.
"""

import math
import os
import random
import time
import uuid
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import DSN, connect, unique_name

SEED = int(os.environ.get("PGFLOW_FUZZ_SEED", "1"))
SECONDS = float(os.environ.get("PGFLOW_FUZZ_SECONDS", "20"))

# The documented SQLSTATEs of bad input and state (docs/queues.md, docs/workflows.md), and the
# cancel of a call that waits longer than this test lets it (statement_timeout).
ALLOWED = {"22004", "22023", "42622", "42704", "42710", "54000", "55000", "57014"}
NAMES_ITS_ARGUMENT = {"22004", "22023", "42622", "54000"}

QUEUE, FLOW = "fz_q", "fz_f"
DEEP = "[" * 10000 + "1" + "]" * 10000


def text_values(rng):
    return [None, "", QUEUE, FLOW, "a" * 48, "a" * 49, "a" * 10000, "é" * 25, "队列", "q'--",
            "Robert'); DROP TABLE pgflow.messages;--", " ", "a b", "m", "a", "fz_missing",
            "%s", "\\", "\u202e", "x" * rng.randint(1, 60)]


def values_for(type_name, rng, run_ids):
    if type_name == "text":
        return text_values(rng)
    if type_name == "integer":
        return [None, 0, 1, -1, 2, 5, 100, 3600, 10000, 100001, 31536001, 2**31 - 1, -2**31]
    if type_name == "bigint":
        return [None, 0, 1, -1, 2, 2**63 - 1, -2**63, rng.randint(1, 50)]
    if type_name == "double precision":
        return [None, 0.0, 0.5, 1.0, 1.5, -0.1, math.nan, math.inf, -math.inf]
    if type_name == "boolean":
        return [None, True, False]
    if type_name == "jsonb":
        return [None, Jsonb({}), Jsonb([]), Jsonb("x"), Jsonb(1), Jsonb(None), Jsonb([1, 2, 3]),
                Jsonb({"run_id": str(uuid.uuid4()), "step_slug": "a", "task_index": 0}),
                Jsonb({"k": "v" * 100000}), DEEP]
    if type_name == "jsonb[]":
        return [None, [], [None], [Jsonb({})], [Jsonb({}), None], [Jsonb({})] * 3,
                [[Jsonb({})], [Jsonb({})]], [Jsonb({"n": i}) for i in range(200)],
                [Jsonb([])] * 10001, [DEEP]]
    if type_name == "timestamp with time zone":
        return [None, "infinity", "-infinity", "now", "294276-12-31 23:59:59.95+00",
                "4713-11-24 00:00:00+00 BC", datetime(2000, 1, 1, tzinfo=timezone.utc)]
    if type_name == "interval":
        return [None, "0", "-1 day", "1 second", "1000 years", "178000000 years", "-178000000 years"]
    if type_name == "uuid":
        return [None, uuid.uuid4(), uuid.UUID(int=0)] + run_ids[:3]
    if type_name in ("bigint[]", "integer[]"):
        return [None, [], [None], [1], [1, None], [[1], [2]], [1, 2, 3], [2**31 - 1], [-1]]
    if type_name == "text[]":
        return [None, [], [None], ["a"], ["a", "a"], [""], ["m"], ["a" * 49]]
    raise AssertionError(f"no fuzz values for type {type_name}")


@pytest.fixture(scope="module")
def fuzz_db():
    name = unique_name("fuzz")
    with connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(DSN)
    params["dbname"] = name
    with psycopg.connect(**params, autocommit=True) as c:
        c.execute("CREATE EXTENSION pgflow")
    yield params
    with connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def functions(c):
    return c.execute("""
        SELECT p.proname, p.oid::regprocedure::text,
               ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i) ORDER BY i),
               coalesce(p.proargnames[1:p.pronargs], '{}'), p.prokind = 'p'
          FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname NOT LIKE '\\_%'
           AND p.prorettype <> 'trigger'::regtype
         ORDER BY 2""").fetchall()


def fingerprint(c):
    """What a failed call must not have changed: every pgflow table's rows."""
    return c.execute("""
        SELECT (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.queues t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.messages t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.archive t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.dlq t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.flows t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.steps t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.runs t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM pgflow.step_tasks t)
    """).fetchone()


def ensure_fixtures(c):
    """A queue and a flow with a run under way, recreated when a fuzzed call dropped them."""
    if not c.execute("SELECT 1 FROM pgflow.queues WHERE queue_name = %s", (QUEUE,)).fetchone():
        c.execute("SELECT pgflow.create_queue(%s)", (QUEUE,))
    if not c.execute("SELECT 1 FROM pgflow.flows WHERE flow_slug = %s", (FLOW,)).fetchone():
        c.execute("SELECT pgflow.create_flow(%s, max_attempts => 2)", (FLOW,))
        c.execute("SELECT pgflow.add_step(%s, 'a')", (FLOW,))
        c.execute("SELECT pgflow.add_step(%s, 'm', ARRAY['a'], step_type => 'map')", (FLOW,))
        c.execute("SELECT pgflow.start_flow(%s, '{}')", (FLOW,))
    c.execute("SELECT pgflow.send(%s, '{}')", (QUEUE,))


def test_every_public_function_survives_edge_values(fuzz_db):
    rng = random.Random(SEED)
    c = psycopg.connect(**fuzz_db, autocommit=True)
    c.execute("SET statement_timeout = '2s'")
    fns = functions(c)
    assert len(fns) > 40, "the catalog lists too few functions"
    calls, errors_seen, deadline = 0, {}, time.monotonic() + SECONDS
    run_ids = []
    while time.monotonic() < deadline:
        ensure_fixtures(c)
        run_ids = [r[0] for r in c.execute("SELECT run_id FROM pgflow.runs ORDER BY started_at DESC LIMIT 3")]
        name, signature, types, argnames, is_procedure = rng.choice(fns)
        args = [rng.choice(values_for(t, rng, run_ids)) for t in types]
        placeholders = ", ".join(f"%s::{t}" for t in types)
        # results as text: the client need not parse JSON 10,000 levels deep
        sql = f"SELECT r::text FROM pgflow.{name}({placeholders}) r"
        if is_procedure:
            sql = f"CALL pgflow.{name}({placeholders})"
        shown = f"{signature} with {[a if not isinstance(a, (str, list)) or len(str(a)) < 80 else type(a).__name__ + '...' for a in args]} (seed {SEED}, call {calls})"
        before = fingerprint(c)
        try:
            cur = c.execute(sql, args)
            if not is_procedure:
                cur.fetchall()
        except psycopg.Error as e:
            if c.broken or c.closed:
                pytest.fail(f"lost the connection: {shown}: {e}")
            state = e.sqlstate
            errors_seen[state] = errors_seen.get(state, 0) + 1
            assert state != "XX000", f"internal error {e.diag.message_primary!r}: {shown}"
            assert state in ALLOWED, f"SQLSTATE {state} {e.diag.message_primary!r}: {shown}"
            detail = (e.diag.message_detail or "") + (e.diag.context or "")
            assert "std::" not in detail and "pgrx" not in detail, f"backtrace in error: {shown}"
            if state in NAMES_ITS_ARGUMENT:
                msg = e.diag.message_primary or ""
                assert any(a and a in msg for a in argnames), \
                    f"{state} {msg!r} names no argument of {signature}: {shown}"
            assert fingerprint(c) == before, f"a failed call changed a table: {shown}"
        assert c.execute("SELECT 1").fetchone() == (1,), f"session unusable after {shown}"
        calls += 1
    c.close()
    print(f"\nfuzz: seed {SEED}, {calls} calls over {len(fns)} functions in {SECONDS:.0f} s; "
          f"errors by SQLSTATE: {dict(sorted(errors_seen.items()))}")
    assert calls > 100
