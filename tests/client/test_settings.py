"""pgflow's settings: the pgflow. prefix is reserved, so a misspelt setting is an error instead
of a placeholder that silently does nothing."""

from conftest import error_of


def test_a_misspelt_pgflow_setting_is_an_error(conn):
    for sql in ("SET pgflow.workflow_event = 'off'",
                "SELECT set_config('pgflow.max_batchsize', '10', false)"):
        e = error_of(conn, sql)
        assert e.sqlstate == "42602", (sql, e.sqlstate)
        assert "pgflow." in e.diag.message_primary
        assert "reserved prefix" in (e.diag.message_detail or "")
    # ALTER SYSTEM accepts no placeholder under a reserved prefix: PostgreSQL 15 calls the name
    # unknown (42704), 18 invalid (42602)
    e = error_of(conn, "ALTER SYSTEM SET pgflow.maintenance_intervals = 100")
    assert e.sqlstate in ("42704", "42602")
    assert "pgflow.maintenance_intervals" in e.diag.message_primary
    assert "pgflow.maintenance_intervals" not in open_auto_conf(conn)


def open_auto_conf(conn):
    return conn.execute("SELECT coalesce(string_agg(name, ' '), '') FROM pg_file_settings "
                        "WHERE sourcefile LIKE '%postgresql.auto.conf'").fetchone()[0]


def test_defined_settings_can_still_be_set(conn):
    conn.execute("SET pgflow.workflow_events = 'runs'")
    assert conn.execute("SHOW pgflow.workflow_events").fetchone()[0] == "runs"
    conn.execute("RESET pgflow.workflow_events")
    assert conn.execute("SHOW pgflow.maintenance_database").fetchone()[0]
    # other prefixes are untouched
    conn.execute("SET myapp.pgflow_queue = 'jobs'")
    assert conn.execute("SHOW myapp.pgflow_queue").fetchone()[0] == "jobs"
