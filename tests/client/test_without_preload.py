"""pgflow installed without shared_preload_libraries: no shared memory and no maintenance
worker, yet CREATE EXTENSION works and read_with_poll still finds messages (by polling).
Starts a cluster of its own (needs root, as the test runner has)."""

import os
import time

import psycopg
import pytest

from conftest import own_cluster

DIR = "/tmp/pgflow-test-nopreload"
PORT = int(os.environ.get("PGFLOW_TEST_PORT", "5490")) + 7


@pytest.fixture(scope="module")
def plain_conn():
    with own_cluster(DIR, PORT, "plain", ["s/^shared_preload_libraries = .*/shared_preload_libraries = ''/"]):
        c = psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="plain", autocommit=True)
        yield c
        c.close()


def test_extension_installs_and_polls_without_preload(plain_conn):
    c = plain_conn
    c.execute("CREATE EXTENSION pgflow")
    assert c.execute("SELECT pgflow.wakeups_enabled()").fetchone()[0] is False
    c.execute("SELECT pgflow.create_queue('plain_q', notify => true)")
    t = time.monotonic()
    assert c.execute("SELECT * FROM pgflow.read_with_poll('plain_q', 10, 1, 1, 100)").fetchall() == []
    assert time.monotonic() - t >= 0.9
    (mid,) = c.execute("SELECT pgflow.send('plain_q', '{\"k\": 1}')").fetchone()
    rows = c.execute("SELECT msg_id, message FROM pgflow.read_with_poll('plain_q', 10, 1, 1, 100)").fetchall()
    assert rows == [(mid, {"k": 1})]
    # notifications do not need shared memory
    c.execute('LISTEN "pgflow.queue.plain_q"')
    with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="plain", autocommit=True) as s:
        sender = s.info.backend_pid
        s.execute("SELECT pgflow.send('plain_q', '{}')")
    got = list(c.notifies(timeout=5, stop_after=1))
    assert len(got) == 1 and '"message_sent"' in got[0].payload
    # without shared memory there is no announcer: the committing session notified by itself
    assert got[0].pid == sender
    # run_maintenance by hand stands in for the worker
    assert c.execute("SELECT pgflow.run_maintenance() ? 'due_queues'").fetchone()[0] is True


def test_run_maintenance_fires_schedules_without_preload(plain_conn):
    c = plain_conn
    c.execute("CREATE EXTENSION IF NOT EXISTS pgflow")
    c.execute("SELECT pgflow.create_queue('plain_sched')")
    c.execute("SELECT pgflow.create_schedule('plain_nightly', '0 3 * * *', 'plain_sched', '{\"n\": 1}')")
    c.execute("UPDATE pgflow.schedules SET next_fire_at = now() - interval '1 minute' "
              "WHERE schedule_name = 'plain_nightly'")
    assert c.execute("SELECT pgflow.run_maintenance() -> 'schedules_fired'").fetchone()[0] == 1
    assert c.execute("SELECT message FROM pgflow.read('plain_sched', 30, 5)").fetchall() == [({"n": 1},)]
    assert c.execute("SELECT pgflow.run_maintenance() -> 'schedules_fired'").fetchone()[0] == 0
