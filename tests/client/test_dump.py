"""pg_dump keeps what users put in pgflow: queues with their options, live, archived and
dead-lettered messages, and each queue's message numbering (a restored queue must not hand out
msg_ids it already used)."""

import os
import subprocess

import psycopg
import pytest

from conftest import DSN, unique_name

PGBIN = f"/usr/lib/postgresql/{os.environ.get('PGFLOW_PG', '15')}/bin"


def _params():
    return psycopg.conninfo.conninfo_to_dict(DSN)


def _run(*args):
    p = _params()
    env = dict(os.environ, PGHOST=p.get("host", "127.0.0.1"), PGPORT=str(p.get("port", 5432)),
               PGUSER=p.get("user", "postgres"))
    return subprocess.run(args, env=env, check=True, capture_output=True)


@pytest.fixture
def restored_db(conn):
    name = unique_name("restore")
    yield name
    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_dump_and_restore_keeps_queues_messages_and_numbering(conn, queue, restored_db, tmp_path):
    conn.execute("SELECT pgflow.alter_queue(%s, max_retries => 0, notify => true)", (queue,))
    ids = [r[0] for r in conn.execute(
        "SELECT pgflow.send_batch(%s, ARRAY['{\"n\":1}','{\"n\":2}','{\"n\":3}','{\"n\":4}']::jsonb[])",
        (queue,))]
    assert ids == [1, 2, 3, 4]
    conn.execute("SELECT pgflow.archive(%s, 1)", (queue,))
    (m,) = conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 1)", (queue,)).fetchone()
    assert m == 2
    conn.execute("SELECT pgflow.nack(%s, 2, 'boom')", (queue,))  # max_retries 0: dead-lettered
    conn.execute("SELECT pgflow.bind_topic('dump.#', %s)", (queue,))
    sched = f"s_{queue}"
    conn.execute("SELECT pgflow.create_schedule(%s, '0 3 * * *', %s, '{\"nightly\": 1}', "
                 "time_zone => 'Europe/Berlin')", (sched, queue))

    dump = tmp_path / "db.dump"
    _run(f"{PGBIN}/pg_dump", "-Fc", "-f", str(dump), _params()["dbname"])
    conn.execute(f'CREATE DATABASE "{restored_db}"')
    _run(f"{PGBIN}/pg_restore", "-d", restored_db, str(dump))

    p = _params()
    p["dbname"] = restored_db
    with psycopg.connect(**p, autocommit=True) as r:
        opts = r.execute("SELECT max_retries, notify FROM pgflow.list_queues() WHERE queue_name = %s",
                         (queue,)).fetchone()
        assert opts == (0, True)
        live = [row[0] for row in r.execute(
            "SELECT msg_id FROM pgflow.list_pending_messages(%s) ORDER BY msg_id", (queue,))]
        assert live == [3, 4]
        assert r.execute("SELECT count(*) FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id) "
                         "WHERE q.queue_name = %s", (queue,)).fetchone()[0] == 1
        dlq = r.execute("SELECT msg_id, last_error FROM pgflow.list_dlq_messages(%s)", (queue,)).fetchall()
        assert dlq == [(2, "boom")]
        # numbering continues after the restore: no msg_id is issued twice
        (new_id,) = r.execute("SELECT pgflow.send(%s, '{\"n\":5}')", (queue,)).fetchone()
        assert new_id == 5
        # topic bindings too
        assert r.execute("SELECT queue_name, msg_id FROM pgflow.publish('dump.x', '{}')").fetchall() == [(queue, 6)]
        got = [row[0] for row in r.execute("SELECT msg_id FROM pgflow.read(%s, 30, 10)", (queue,))]
        assert got == [3, 4, 5, 6]
        # and schedules
        row = r.execute("SELECT cron, time_zone, queue_name, payload FROM pgflow.list_schedules() "
                        "WHERE schedule_name = %s", (sched,)).fetchone()
        assert row == ("0 3 * * *", "Europe/Berlin", queue, {"nightly": 1})
        # a queue created after the restore gets a fresh id and sequence
        other = unique_name()
        assert r.execute("SELECT pgflow.create_queue(%s)", (other,)).fetchone()[0] is True
        assert r.execute("SELECT pgflow.send(%s, '{}')", (other,)).fetchone()[0] == 1
