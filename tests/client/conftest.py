"""Fixtures for client-level tests: real connections to a running cluster with pgflow.

The cluster is started by scripts/test.sh, which exports PGFLOW_TEST_DSN. To run one test by
hand against any database holding the extension:

    PGFLOW_TEST_DSN="host=127.0.0.1 port=5433 user=postgres dbname=dev" \
        python3 -m pytest tests/client/test_queue.py -k fifo
"""

import contextlib
import os
import subprocess
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DSN = os.environ.get("PGFLOW_TEST_DSN", "host=127.0.0.1 port=5433 user=postgres dbname=dev")


def connect(autocommit=True, **kw):
    """A new session (its own backend), autocommit unless asked otherwise."""
    return psycopg.connect(DSN, autocommit=autocommit, **kw)


@pytest.fixture
def conn():
    c = connect()
    yield c
    c.close()


@pytest.fixture
def make_conn():
    """Factory for extra sessions, all closed at the end of the test."""
    opened = []

    def make(autocommit=True, **kw):
        c = connect(autocommit=autocommit, **kw)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def unique_name(prefix="q"):
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queue(conn):
    """A fresh queue with default options, dropped afterwards."""
    name = unique_name()
    conn.execute("SELECT pgflow.create_queue(%s)", (name,))
    yield name
    conn.execute("SELECT pgflow.drop_queue(%s)", (name,))


@pytest.fixture
def make_queue(conn):
    """create(name=None, **options) -> name of a fresh queue with those create_queue options; all
    dropped afterwards, with their dead-lettered messages."""
    made = []

    def create(name=None, **options):
        name = name or unique_name()
        cols = "".join(f", {k} => %({k})s" for k in options)
        conn.execute(f"SELECT pgflow.create_queue(%(name)s{cols})", {"name": name, **options})
        made.append(name)
        return name

    yield create
    for name in made:
        conn.execute("SELECT pgflow.drop_queue(%s)", (name,))
        conn.execute("SELECT pgflow.purge_dlq(%s)", (name,))


def sqlstate(conn, sql, params=None):
    """Run sql expecting an error; return its SQLSTATE (None if it succeeded). The session stays
    usable: in autocommit mode the failed statement is its own transaction."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def error_of(conn, sql, params=None):
    """Run sql expecting an error; return the psycopg error (fails the test if none)."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e
    pytest.fail(f"expected an error from: {sql} {params!r}")


@contextlib.contextmanager
def session_as(conn, *groups):
    """A session of a new login role that is a member of `groups` (pgflow_producer, ...); the
    role is dropped afterwards."""
    role = unique_name("r")
    conn.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE {", ".join(groups)}')
    try:
        params = psycopg.conninfo.conninfo_to_dict(DSN)
        params["user"] = role
        with psycopg.connect(**params, autocommit=True) as c:
            yield c
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def make_flow(conn, steps, **opts):
    """Create a flow from a list of step dicts (shape steps); returns its slug."""
    slug = unique_name("f")
    shape = dict(opts, steps=steps)
    conn.execute("SELECT pgflow.create_flow_from_shape(%s, %s)", (slug, Jsonb(shape)))
    return slug


@pytest.fixture
def flows(conn):
    """Factory of flows, dropped at the end of the test with their dead-lettered messages."""
    made = []

    def make(steps, **opts):
        slug = make_flow(conn, steps, **opts)
        made.append(slug)
        return slug

    yield make
    with connect() as c:
        for slug in made:
            c.execute("SELECT pgflow.drop_flow(%s)", (slug,))
            c.execute("SELECT pgflow.purge_dlq(%s)", (slug,))


@contextlib.contextmanager
def own_cluster(directory, port, dbname, conf_edits):
    """A cluster of the test's own (scripts/common.sh start_cluster) on `port`, with database
    `dbname`, its postgresql.conf edited by the sed expressions `conf_edits` and the server
    restarted; stopped afterwards. Starting a cluster as the postgres user needs root."""
    if os.geteuid() != 0:
        pytest.skip("starting a cluster as the postgres user needs root")

    def common_sh(script):
        subprocess.run(["bash", "-c", f"source {REPO}/scripts/common.sh; {script}"], check=True,
                       capture_output=True)

    edits = "; ".join(conf_edits)
    common_sh(f"start_cluster {directory} {port} {dbname} && "
              f"sed -i \"{edits}\" {directory}/data/postgresql.conf && "
              f"runuser -u postgres -- $PGBIN/pg_ctl -D {directory}/data -l {directory}/server.log -w restart")
    try:
        yield
    finally:
        common_sh(f"stop_cluster {directory}")
