"""Fixtures for client-level tests: real connections to a running cluster with pgflow.

The cluster is started by scripts/test.sh, which exports PGFLOW_TEST_DSN. To run one test by
hand against any database holding the extension:

    PGFLOW_TEST_DSN="host=127.0.0.1 port=5433 user=postgres dbname=dev" \
        python3 -m pytest tests/client/test_queue.py -k fifo
"""

import os
import uuid

import psycopg
import pytest

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
