"""Rules every function of the extension keeps, checked in the catalog: so that a function
added later cannot quietly break them."""


def test_every_public_function_has_a_comment(conn):
    missing = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname NOT LIKE '\\_%'
           AND obj_description(p.oid, 'pg_proc') IS NULL""").fetchall()
    assert missing == []


def test_every_function_pins_its_search_path(conn):
    unpinned = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace
           AND NOT EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c
                            WHERE c LIKE 'search_path=%')""").fetchall()
    assert unpinned == []


def test_security_definer_functions_pin_search_path_and_public_has_no_execute(conn):
    rows = conn.execute("""
        SELECT p.oid::regprocedure::text, has_function_privilege('public', p.oid, 'EXECUTE')
          FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace""").fetchall()
    assert rows, "no functions found"
    assert [name for name, public_can in rows if public_can] == []


def test_roles_can_run_their_functions(conn):
    can = dict(conn.execute("""
        SELECT r, has_function_privilege(r, 'pgflow.send(text, jsonb, integer, integer, jsonb)', 'EXECUTE')
          FROM unnest(ARRAY['pgflow_producer', 'pgflow_consumer', 'pgflow_admin']) r""").fetchall())
    assert can == {"pgflow_producer": True, "pgflow_consumer": False, "pgflow_admin": True}
    can = dict(conn.execute("""
        SELECT r, has_function_privilege(r, 'pgflow.drop_queue(text)', 'EXECUTE')
          FROM unnest(ARRAY['pgflow_producer', 'pgflow_consumer', 'pgflow_admin']) r""").fetchall())
    assert can == {"pgflow_producer": False, "pgflow_consumer": False, "pgflow_admin": True}


def test_a_producer_role_sends_and_cannot_administer(conn, queue):
    import psycopg
    from conftest import DSN, unique_name
    role = unique_name("producer")
    conn.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE pgflow_producer')
    try:
        params = psycopg.conninfo.conninfo_to_dict(DSN)
        params["user"] = role
        with psycopg.connect(**params, autocommit=True) as p:
            (mid,) = p.execute("SELECT pgflow.send(%s, '{\"from\": \"producer\"}')", (queue,)).fetchone()
            assert mid == 1
            for sql in ("SELECT pgflow.drop_queue(%s)", "SELECT * FROM pgflow.read(%s, 30, 1)"):
                try:
                    p.execute(sql, (queue,))
                except psycopg.errors.InsufficientPrivilege:
                    pass
                else:
                    raise AssertionError(f"{sql} ran for a producer")
            try:
                p.execute("SELECT * FROM pgflow.messages")
            except psycopg.errors.InsufficientPrivilege:
                pass
            else:
                raise AssertionError("a producer read the messages table directly")
        assert conn.execute("SELECT count(*) FROM pgflow.list_pending_messages(%s)", (queue,)).fetchone()[0] == 1
    finally:
        conn.execute(f'DROP ROLE "{role}"')
