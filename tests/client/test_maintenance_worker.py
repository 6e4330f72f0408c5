"""The maintenance worker pointed at a database that does not exist yet (the README's own setup
order: preload first, create the database later) waits quietly: one LOG line saying what it
waits for, no FATAL and no restart loop; once the database and the extension exist it runs
there. 0.1.0 logged FATAL and restarted every 5 s for ever. Starts a cluster of its own (needs
root, as the test runner has)."""

import os
import time

import psycopg
import pytest

from conftest import own_cluster

DIR = "/tmp/pgflow-test-worker"
PORT = int(os.environ.get("PGFLOW_TEST_PORT", "5490")) + 8


def log_text():
    with open(f"{DIR}/server.log", errors="replace") as f:
        return f.read()


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.fixture(scope="module")
def cluster():
    with own_cluster(DIR, PORT, "other", ["s/^pgflow.maintenance_database = .*/pgflow.maintenance_database = 'later'/",
                                          "s/^log_min_messages = .*/log_min_messages = log/"]):
        yield


def workers(c):
    return c.execute("""SELECT backend_type, coalesce(datname, '') FROM pg_stat_activity
                         WHERE backend_type LIKE 'pgflow maintenance%' ORDER BY 1""").fetchall()


def test_the_worker_waits_for_its_database_then_runs_there(cluster):
    with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="other", autocommit=True) as c:
        assert wait_for(lambda: "waiting for database \"later\"" in log_text(), 10)
        time.sleep(12)   # more than two of 0.1.0's restart periods
        log = log_text()
        assert log.count("waiting for database \"later\"") == 1
        ours = [line for line in log.splitlines() if "pgflow" in line]
        assert [line for line in ours if "FATAL" in line or "exited with exit code" in line] == []
        assert "stack backtrace" not in log
        assert workers(c) == [("pgflow maintenance launcher", "")]
        c.execute("CREATE DATABASE later")
        assert wait_for(lambda: ("pgflow maintenance", "later") in workers(c), 15), workers(c)
        with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="later",
                             autocommit=True) as later:
            later.execute("CREATE EXTENSION pgflow")
            later.execute("SELECT pgflow.create_queue('due')")
            later.execute("LISTEN \"pgflow.queue.due\"")
            later.execute("SELECT pgflow.alter_queue('due', notify => true)")
            later.execute("SELECT pgflow.send('due', '{}', 1)")
            # the worker announces the delayed message when it comes due
            got = [n.payload for n in later.notifies(timeout=8, stop_after=2)]
            assert any("message_due" in p for p in got), got
        # the database dropped under it (the drop terminates the worker): the launcher waits
        # for it again, saying so once more
        c.execute("DROP DATABASE later WITH (FORCE)")
        assert wait_for(lambda: log_text().count("waiting for database \"later\"") == 2, 15)
        assert workers(c) == [("pgflow maintenance launcher", "")]
        assert "stack backtrace" not in log_text()
