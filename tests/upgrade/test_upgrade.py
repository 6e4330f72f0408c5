"""Upgrade tier: a database created at an earlier release of pgflow, filled, then upgraded with
ALTER EXTENSION pgflow UPDATE beside the current library, as a package upgrade leaves it.

- The released install scripts are kept here as fixtures (pgflow--<version>.sql, generated from
  the release's commit by tests/upgrade/regenerate-fixture.sh, never edited). The tier copies
  them into the server's extension directory for its run and removes them afterwards.
- Before the update, the database runs the old SQL on the new library: every C symbol an older
  release refers to must still be there.
- After the update, the catalog equals a fresh install's (tests/upgrade/catalog.sql lists what
  is compared; a difference is printed row by row), the data carries on (leases acked with
  their read_ct, DLQ rows redriven, runs in progress finish) and pg_dump of the upgraded
  database restores.
- An error inside the update leaves the database at the old version, whole.

Run by scripts/test.sh against its test cluster; by hand:

    PGFLOW_TEST_DSN="host=127.0.0.1 port=5490 user=postgres dbname=postgres" \\
    PGFLOW_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config \\
        python3 -m pytest tests/upgrade -q
"""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

HERE = Path(__file__).parent
DSN = os.environ.get("PGFLOW_TEST_DSN", "host=127.0.0.1 port=5490 user=postgres dbname=postgres")
PG_CONFIG = os.environ.get("PGFLOW_PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")
PGBIN = subprocess.run([PG_CONFIG, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
CATALOG_SQL = (HERE / "catalog.sql").read_text()
# Every released version, oldest first; each has its install script as a fixture here.
RELEASED = ["0.1.0"]


def params(dbname):
    p = psycopg.conninfo.conninfo_to_dict(DSN)
    p["dbname"] = dbname
    return p


@pytest.fixture(scope="session")
def admin():
    with psycopg.connect(**params("postgres"), autocommit=True) as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def released_scripts():
    """Put the released install scripts beside the current ones, for this tier only."""
    sharedir = subprocess.run([PG_CONFIG, "--sharedir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    placed = []
    for version in RELEASED:
        dest = Path(sharedir) / "extension" / f"pgflow--{version}.sql"
        if not dest.exists():
            shutil.copyfile(HERE / f"pgflow--{version}.sql", dest)
            placed.append(dest)
    yield
    for dest in placed:
        dest.unlink()


@pytest.fixture(scope="session")
def current(admin):
    (v,) = admin.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pgflow'").fetchone()
    assert v not in RELEASED, "the current version must be a new one: bump Cargo.toml's version"
    return v


@pytest.fixture
def make_db(admin):
    """make(version or None) -> a connection to a new database holding pgflow at that version."""
    made = []

    def make(version=None):
        name = f"upgrade_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        c = psycopg.connect(**params(name), autocommit=True)
        if version:
            c.execute(f"CREATE EXTENSION pgflow VERSION '{version}'")
        else:
            c.execute("CREATE EXTENSION pgflow")
        return c

    yield make
    for name in made:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def catalog(c):
    c.execute("SET search_path = pg_catalog")
    try:
        return c.execute(CATALOG_SQL).fetchall()
    finally:
        c.execute("RESET search_path")


def catalog_difference(upgraded, fresh):
    """The rows of one catalog that the other lacks, as printable lines ('-' upgraded only,
    '+' fresh install only)."""
    a, b = set(catalog(upgraded)), set(catalog(fresh))

    def shown(v):  # one line per row: function bodies and view texts span many
        v = v.replace("\n", "\\n")
        return v if len(v) <= 400 else v[:400] + "..."

    lines = [f"- {o} | {p} | {shown(v)}" for o, p, v in sorted(a - b)]
    lines += [f"+ {o} | {p} | {shown(v)}" for o, p, v in sorted(b - a)]
    return lines


def version_of(c):
    return c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgflow'").fetchone()[0]


def fill(c):
    """Queues with messages in every state and flows with runs in progress, made through the
    API of the version installed. Returns what the checks after the update need."""
    s = {}
    c.execute("SELECT pgflow.create_queue('jobs', max_retries => 1, retry_delay_ms => 0)")
    c.execute("SELECT pgflow.create_queue('events', notify => true)")
    ids = [r[0] for r in c.execute(
        "SELECT pgflow.send_batch('jobs', ARRAY['{\"n\":1}','{\"n\":2}','{\"n\":3}','{\"n\":4}']::jsonb[])")]
    s["delayed"] = c.execute("SELECT pgflow.send('jobs', '{\"n\":5}', delay => 3600)").fetchone()[0]
    c.execute("SELECT pgflow.send('events', '{\"e\":1}', priority => 5)")
    # archived
    c.execute("SELECT pgflow.read('jobs', 30, 1)")
    assert c.execute("SELECT pgflow.archive('jobs', %s, 1)", (ids[0],)).fetchone()[0] is True
    # dead-lettered after two failed attempts, each with its error
    for attempt in (1, 2):
        (mid, rc) = c.execute("SELECT msg_id, read_ct FROM pgflow.read('jobs', 30, 1)").fetchone()
        assert (mid, rc) == (ids[1], attempt)
        c.execute("SELECT pgflow.nack('jobs', %s, %s, %s)", (mid, f"boom {attempt}", rc))
    # leased: a delivery in progress across the upgrade
    s["leased"] = c.execute("SELECT msg_id, read_ct FROM pgflow.read('jobs', 3600, 1)").fetchone()
    assert s["leased"] == (ids[2], 1)
    s["visible"] = ids[3]

    # flows: a sequential one with its first task leased, a map one started
    c.execute("SELECT pgflow.create_flow('etl', max_attempts => 2, timeout => 600)")
    c.execute("SELECT pgflow.add_step('etl', 'extract')")
    c.execute("SELECT pgflow.add_step('etl', 'load', ARRAY['extract'])")
    c.execute("SELECT pgflow.create_flow('fan')")
    c.execute("SELECT pgflow.add_step('fan', 'items', step_type => 'map')")
    c.execute("SELECT pgflow.add_step('fan', 'sum', ARRAY['items'])")
    s["etl_run"] = c.execute("SELECT run_id FROM pgflow.start_flow('etl', '{\"src\": 1}')").fetchone()[0]
    s["fan_run"] = c.execute("SELECT run_id FROM pgflow.start_flow('fan', '[1, 2, 3]')").fetchone()[0]
    s["etl_task"] = c.execute(
        "SELECT run_id, step_slug, task_index FROM pgflow.poll_for_tasks('etl', 600, 1, 0)").fetchone()
    assert s["etl_task"][:2] == (s["etl_run"], "extract")
    fan = c.execute("SELECT run_id, step_slug, task_index, input "
                    "FROM pgflow.poll_for_tasks('fan', 600, 2, 0)").fetchall()
    assert len(fan) == 2
    c.execute("SELECT pgflow.complete_task(%s, %s, %s, %s)", fan[0][:3] + (Jsonb(fan[0][3] * 10),))
    s["fan_started"] = fan[1][:3] + (Jsonb(fan[1][3] * 10),)
    return s


def finish_runs(c, s):
    """Drive every run in progress to its end through the API; returns the runs' statuses."""
    assert c.execute("SELECT pgflow.complete_task(%s, %s, %s, '{\"rows\": 7}')",
                     s["etl_task"]).fetchone()[0] == "completed"
    assert c.execute("SELECT pgflow.complete_task(%s, %s, %s, %s)",
                     s["fan_started"]).fetchone()[0] == "completed"
    for _ in range(10):
        tasks = c.execute("SELECT flow_slug, run_id, step_slug, task_index, input "
                          "FROM pgflow.poll_for_tasks('etl', 60, 10, 0)").fetchall()
        tasks += c.execute("SELECT flow_slug, run_id, step_slug, task_index, input "
                           "FROM pgflow.poll_for_tasks('fan', 60, 10, 0)").fetchall()
        if not tasks:
            break
        for flow, run, step, index, task_input in tasks:
            # a map task doubles its element tenfold; the others pass their dependency on
            out = task_input * 10 if step == "items" else task_input["items" if flow == "fan" else "extract"]
            assert c.execute("SELECT pgflow.complete_task(%s, %s, %s, %s)",
                             (run, step, index, Jsonb(out))).fetchone()[0] == "completed"
    return [c.execute("SELECT status FROM pgflow.runs WHERE run_id = %s", (r,)).fetchone()[0]
            for r in (s["etl_run"], s["fan_run"])]


def check_data_carries_on(c, s):
    # the leased delivery is acked with its read_ct; a stale read_ct changes nothing
    mid, rc = s["leased"]
    assert c.execute("SELECT pgflow.archive('jobs', %s, %s)", (mid, rc + 1)).fetchone()[0] is False
    assert c.execute("SELECT pgflow.archive('jobs', %s, %s)", (mid, rc)).fetchone()[0] is True
    # the visible message is delivered, the delayed one is not
    got = c.execute("SELECT msg_id, read_ct FROM pgflow.read('jobs', 30, 10)").fetchall()
    assert got == [(s["visible"], 1)]
    pending = [r[0] for r in c.execute("SELECT msg_id FROM pgflow.list_pending_messages('jobs')")]
    assert s["delayed"] in pending
    # the DLQ row keeps both attempts' errors and can be redriven
    dlq = c.execute("SELECT dlq_id, msg_id, attempts, errors FROM pgflow.list_dlq_messages('jobs')").fetchall()
    assert len(dlq) == 1 and dlq[0][2] == 2
    assert [e["error"] for e in dlq[0][3]] == ["boom 1", "boom 2"]
    new_id = c.execute("SELECT pgflow.retry_dlq_message(%s)", (dlq[0][0],)).fetchone()[0]
    assert c.execute("SELECT msg_id, message FROM pgflow.read('jobs', 30, 10)").fetchall() == [(new_id, {"n": 2})]
    # archive and stats carry the history
    stats = c.execute("SELECT archived, total_sent FROM pgflow.get_queue_stats('jobs')").fetchone()
    assert stats == (2, 6)
    assert c.execute("SELECT msg_id FROM pgflow.read('events', 30, 1)").fetchone() is not None
    # runs in progress finish
    assert finish_runs(c, s) == ["completed", "completed"]
    outputs = [c.execute("SELECT output FROM pgflow.runs WHERE run_id = %s", (s[r],)).fetchone()[0]
               for r in ("etl_run", "fan_run")]
    assert outputs == [{"load": {"rows": 7}}, {"sum": [10, 20, 30]}]
    # and new work goes through the upgraded functions
    assert c.execute("SELECT pgflow.send('jobs', '{\"after\": true}')").fetchone()[0] == new_id + 1


@pytest.mark.parametrize("old", RELEASED)
def test_old_release_runs_on_the_current_library(make_db, old):
    """Between installing the new package and ALTER EXTENSION UPDATE, a database at an old
    release keeps working: every C symbol its SQL names is still in the library."""
    c = make_db(old)
    assert version_of(c) == old
    missing = c.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'pgflow'::regnamespace AND l.lanname = 'c'""").fetchall()
    assert missing  # the old release has C functions, and creating them found their symbols
    s = fill(c)
    check_data_carries_on(c, s)


@pytest.mark.parametrize("old", RELEASED)
def test_upgraded_catalog_equals_a_fresh_install(make_db, current, old):
    upgraded = make_db(old)
    upgraded.execute("ALTER EXTENSION pgflow UPDATE")
    assert version_of(upgraded) == current
    fresh = make_db()
    diff = catalog_difference(upgraded, fresh)
    print(f"\ncatalog of pgflow {old} updated to {current} against a fresh install: "
          f"{len(catalog(fresh))} rows compared, {len(diff)} differ")
    for line in diff:
        print(line)
    assert diff == [], "\n".join(diff)


@pytest.mark.parametrize("old", RELEASED)
def test_data_carries_on_through_the_upgrade(make_db, current, old):
    c = make_db(old)
    s = fill(c)
    c.execute("ALTER EXTENSION pgflow UPDATE")
    assert version_of(c) == current
    # the catalog is a fresh install's with data in it too
    assert catalog_difference(c, make_db()) == []
    check_data_carries_on(c, s)


def dump_restore(admin, source):
    """pg_dump the database, restore it into a new one; returns the new database's name."""
    p = params(source)
    env = dict(os.environ, PGHOST=str(p.get("host", "127.0.0.1")), PGPORT=str(p.get("port", 5432)),
               PGUSER=p.get("user", "postgres"))
    target = f"restored_{uuid.uuid4().hex[:10]}"
    dump = subprocess.run([f"{PGBIN}/pg_dump", "-Fc", source], env=env, check=True,
                          capture_output=True).stdout
    admin.execute(f'CREATE DATABASE "{target}"')
    subprocess.run([f"{PGBIN}/pg_restore", "--exit-on-error", "-d", target], input=dump, env=env,
                   check=True, capture_output=True)
    return target


@pytest.mark.parametrize("old", RELEASED)
def test_dump_of_an_upgraded_database_restores(admin, make_db, current, old):
    c = make_db(old)
    s = fill(c)
    c.execute("ALTER EXTENSION pgflow UPDATE")
    source = c.info.dbname
    target = dump_restore(admin, source)
    try:
        with psycopg.connect(**params(target), autocommit=True) as r:
            assert version_of(r) == current
            for table in ("queues", "messages", "archive", "dlq", "flows", "steps", "deps", "runs",
                          "step_states", "step_tasks"):
                q = f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM pgflow.{table} t"
                assert r.execute(q).fetchone() == c.execute(q).fetchone(), table
            check_data_carries_on(r, s)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


@pytest.mark.parametrize("old", RELEASED)
def test_a_failed_upgrade_leaves_the_old_version_whole(make_db, current, old):
    c = make_db(old)
    s = fill(c)
    # An event trigger that raises at the end of any command run by an extension script: the
    # update fails inside its script, after some of it ran.
    c.execute("""
        CREATE FUNCTION public.refuse_extension_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE in_extension) THEN
                RAISE EXCEPTION 'refusing a command of the upgrade script' USING ERRCODE = 'P0001';
            END IF;
        END $$""")
    c.execute("CREATE EVENT TRIGGER refuse_extension_ddl ON ddl_command_end "
              "EXECUTE FUNCTION public.refuse_extension_ddl()")
    before = catalog(c)
    tables = "SELECT (SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM pgflow.%s t)"
    data_before = [c.execute(tables % t).fetchone() for t in ("messages", "archive", "dlq", "runs", "step_tasks")]
    with pytest.raises(psycopg.errors.RaiseException, match="refusing a command of the upgrade script"):
        c.execute("ALTER EXTENSION pgflow UPDATE")
    assert version_of(c) == old
    assert catalog(c) == before
    assert [c.execute(tables % t).fetchone() for t in ("messages", "archive", "dlq", "runs", "step_tasks")] \
        == data_before
    # the old version still works, and the update goes through once nothing stops it
    c.execute("DROP EVENT TRIGGER refuse_extension_ddl")
    c.execute("ALTER EXTENSION pgflow UPDATE")
    assert version_of(c) == current
    check_data_carries_on(c, s)


@pytest.mark.parametrize("old", RELEASED)
def test_an_upgraded_database_steers_its_old_runs_and_takes_the_new_features(make_db, current, old):
    """A run started under the old release is cancelled and retried after the upgrade and
    finishes; a new flow with a condition and a signal step runs; a schedule fires."""
    c = make_db(old)
    s = fill(c)
    c.execute("ALTER EXTENSION pgflow UPDATE")
    assert version_of(c) == current
    assert c.execute("SELECT pgflow.cancel_run(%s)", (s["etl_run"],)).fetchone()[0] == "cancelled"
    assert c.execute("SELECT pgflow.retry_run(%s)", (s["etl_run"],)).fetchone()[0] == "retried"
    (run, step, idx) = c.execute("SELECT run_id, step_slug, task_index FROM pgflow.poll_for_tasks('etl', 60, 1, 0)").fetchone()
    assert (run, step) == (s["etl_run"], "extract")
    c.execute("SELECT pgflow.complete_task(%s, 'extract', 0, '{\"rows\": 1}')", (run,))
    c.execute("SELECT pgflow.poll_for_tasks('etl', 60, 1, 0)")
    c.execute("SELECT pgflow.complete_task(%s, 'load', 0, '\"done\"')", (run,))
    assert c.execute("SELECT status FROM pgflow.runs WHERE run_id = %s", (run,)).fetchone()[0] == "completed"
    # a flow of the new release
    c.execute("""SELECT pgflow.create_flow_from_shape('gate', '{"steps": [
                   {"slug": "approve", "type": "signal"},
                   {"slug": "maybe", "deps": ["approve"], "if": {"approve": {"ok": true}}}]}')""")
    g = c.execute("SELECT run_id FROM pgflow.start_flow('gate', '{}')").fetchone()[0]
    assert c.execute("SELECT pgflow.signal(%s, 'approve', '{\"ok\": false}')", (g,)).fetchone()[0] == "signalled"
    assert c.execute("SELECT status, output FROM pgflow.runs WHERE run_id = %s", (g,)).fetchone() == ("completed", {})
    # and a schedule
    c.execute("SELECT pgflow.create_schedule('nightly', '0 3 * * *', 'jobs', '{\"nightly\": true}')")
    c.execute("UPDATE pgflow.schedules SET next_fire_at = now() - interval '1 minute'")
    assert c.execute("SELECT pgflow.run_maintenance() -> 'schedules_fired'").fetchone()[0] == 1
