"""Rules every function of the extension keeps, checked in the catalog: so that a function
added later cannot quietly break them."""


def test_every_public_function_has_a_comment(conn):
    missing = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname NOT LIKE '\\_%'
           AND obj_description(p.oid, 'pg_proc') IS NULL""").fetchall()
    assert missing == []


# C functions whose statements all run through src/pg/spi.rs, which parses and plans them under a
# fixed search path and planner settings: they carry no SET clause (it would cost a SET scope
# at every call). The tests below show the pinning holds for them.
PINNED_IN_RUST = {
    "pgflow_send", "pgflow_read", "pgflow_archive_one", "pgflow_delete_one",
    "pgflow_ack_and_read", "pgflow_messages_inserted", "pgflow_queues_changed",
    "pgflow_poll_for_tasks", "pgflow_start_tasks", "pgflow_complete_task", "pgflow_step_completed",
    "pgflow_complete_and_poll",
    "pgflow_wait_for_messages", "pgflow_delete_many", "pgflow_archive_many",
    "pgflow_lock_queue_name", "pgflow_try_lock_queue_name", "pgflow_lock_flow", "pgflow_lock_run",
    "pgflow_start_single_step", "pgflow_pop", "pgflow_send_internal",
}


def test_every_function_pins_its_search_path(conn):
    unpinned = conn.execute("""
        SELECT p.oid::regprocedure::text, p.prosrc, l.lanname FROM pg_proc p
          JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'pgflow'::regnamespace
           AND NOT EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c
                            WHERE c LIKE 'search_path=%')""").fetchall()
    assert [name for name, src, lang in unpinned if not (lang == "c" and src in PINNED_IN_RUST)] == []
    # and the list names only functions that exist without a SET clause
    assert {src for _, src, _ in unpinned} == PINNED_IN_RUST


def hot_path_calls(c, queue):
    """send, read, archive, delete and ack_and_read once each; returns what they returned."""
    out = [c.execute("SELECT pgflow.send(%s, '{\"n\": 1}')", (queue,)).fetchone()[0]]
    out.append(c.execute("SELECT pgflow.send(%s, '{\"n\": 2}')", (queue,)).fetchone()[0])
    out.append(c.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 30, 1)", (queue,)).fetchone())
    out.append(c.execute("SELECT pgflow.archive(%s, %s, 1)", (queue, out[0])).fetchone()[0])
    out.append(c.execute("SELECT msg_id FROM pgflow.ack_and_read(%s, '{}', 30, 1)", (queue,)).fetchone())
    out.append(c.execute("SELECT pgflow.delete(%s, %s, 1)", (queue, out[1])).fetchone()[0])
    return out


def test_hot_path_ignores_a_hostile_search_path(conn, make_conn, queue):
    # A schema ahead of pg_catalog whose bigint = raises: any statement parsed under the
    # caller's search_path would call it. The hot path's statements are parsed in this new
    # session, under the caller's setting, and must not.
    from conftest import unique_name
    schema = unique_name("hostile")
    conn.execute(f"CREATE SCHEMA {schema}")
    try:
        conn.execute(f"""CREATE FUNCTION {schema}.eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql
                         AS $$ BEGIN RAISE EXCEPTION 'hostile operator called'; END $$""")
        conn.execute(f"CREATE OPERATOR {schema}.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = {schema}.eq)")
        c = make_conn()
        c.execute(f"SET search_path = {schema}, pg_catalog")
        import psycopg
        try:
            c.execute("SELECT 1::bigint = 2::bigint")
        except psycopg.errors.RaiseException:
            pass
        else:
            raise AssertionError("the hostile operator is not in effect")
        assert hot_path_calls(c, queue) == [1, 2, (1, 1), True, (2,), True]
        assert c.execute("SHOW search_path").fetchone()[0] == f"{schema}, pg_catalog"
    finally:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_hot_path_plans_are_index_plans_whatever_the_session_costs(make_conn, queue):
    # Costs that make a sequential or bitmap scan look free: a plan made under them would read
    # the whole table. The statements are planned in this new session, on first use.
    c = make_conn()
    plans = []
    c.add_notice_handler(lambda d: plans.append(d.message_primary))
    c.execute("LOAD 'auto_explain'")
    for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on",
                    "seq_page_cost = 0", "cpu_tuple_cost = 0", "random_page_cost = 100",
                    "jit_above_cost = 0", "client_min_messages = log"):
        c.execute(f"SET {setting}")
    hot_path_calls(c, queue)
    c.execute("SET client_min_messages = notice")
    ours = [p for p in plans if "pgflow.messages" in p or " on messages" in p or " on archive" in p]
    assert len(ours) >= 5, plans
    for p in ours:
        assert "Seq Scan" not in p and "Bitmap" not in p and "JIT" not in p, p
    # The caller's settings are the caller's again.
    shown = [c.execute(f"SHOW {g}").fetchone()[0]
             for g in ("enable_seqscan", "enable_bitmapscan", "enable_hashjoin", "jit", "search_path")]
    assert shown == ["on", "on", "on", "on", '"$user", public']


def test_an_error_inside_a_hot_path_statement_leaves_the_session_settings_alone(conn, make_conn, queue):
    import psycopg
    c = make_conn()
    c.execute("SET lock_timeout = '100ms'")
    c.execute("SET random_page_cost = 100")
    locker = make_conn(autocommit=False)
    locker.execute("LOCK TABLE pgflow.messages IN ACCESS EXCLUSIVE MODE")
    try:
        c.execute("SELECT pgflow.send(%s, '{}')", (queue,))
    except psycopg.errors.LockNotAvailable:
        pass
    else:
        raise AssertionError("send did not wait for the lock")
    finally:
        locker.rollback()
    shown = [c.execute(f"SHOW {g}").fetchone()[0]
             for g in ("enable_seqscan", "enable_bitmapscan", "jit", "search_path", "random_page_cost")]
    assert shown == ["on", "on", "on", '"$user", public', "100"]
    # and the statement planned after the error is still pinned
    assert c.execute("SELECT pgflow.send(%s, '{}')", (queue,)).fetchone()[0] == 1
    assert c.execute("SELECT count(*) FROM pgflow.messages WHERE queue_id = "
                     "(SELECT queue_id FROM pgflow.queues WHERE queue_name = %s)", (queue,)).fetchone()[0] == 1


def test_security_definer_functions_pin_search_path_and_public_has_no_execute(conn):
    rows = conn.execute("""
        SELECT p.oid::regprocedure::text, has_function_privilege('public', p.oid, 'EXECUTE')
          FROM pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace""").fetchall()
    assert rows, "no functions found"
    assert [name for name, public_can in rows if public_can] == []


def test_roles_can_run_their_functions(conn):
    can = dict(conn.execute("""
        SELECT r, has_function_privilege(r, 'pgflow.send(text, jsonb, integer, integer, jsonb, text, text)', 'EXECUTE')
          FROM unnest(ARRAY['pgflow_producer', 'pgflow_consumer', 'pgflow_admin']) r""").fetchall())
    assert can == {"pgflow_producer": True, "pgflow_consumer": False, "pgflow_admin": True}
    can = dict(conn.execute("""
        SELECT r, has_function_privilege(r, 'pgflow.drop_queue(text)', 'EXECUTE')
          FROM unnest(ARRAY['pgflow_producer', 'pgflow_consumer', 'pgflow_admin']) r""").fetchall())
    assert can == {"pgflow_producer": False, "pgflow_consumer": False, "pgflow_admin": True}


def test_a_producer_role_sends_and_cannot_administer(conn, queue):
    import psycopg
    from conftest import session_as
    with session_as(conn, "pgflow_producer") as p:
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


def test_no_role_can_call_an_internal_helper(conn):
    # Internal helpers (underscore names) run only inside the public functions, as the
    # extension's owner; 0.1.0 let pgflow_admin call them, and so announce arbitrary payloads
    # on any channel through pgflow._emit.
    callable_by = conn.execute(r"""
        SELECT p.oid::regprocedure::text, r.rolname FROM pg_proc p CROSS JOIN pg_roles r
         WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname LIKE '\_%'
           AND NOT r.rolsuper AND has_function_privilege(r.oid, p.oid, 'EXECUTE')""").fetchall()
    assert callable_by == []
    assert conn.execute(r"""SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgflow'::regnamespace
                             AND proname LIKE '\_%'""").fetchone()[0] > 20


def test_an_admin_cannot_announce_through_emit(conn, queue):
    import psycopg
    from conftest import session_as
    with session_as(conn, "pgflow_admin") as a:
        for sql in ("SELECT pgflow._emit('f', '{\"event\": \"forged\"}')",
                    "SELECT pgflow._on_commit_notify('pgflow.flows', '{\"forged\": true}')",
                    "SELECT pgflow._check_name('x', 'q')"):
            try:
                a.execute(sql)
            except psycopg.errors.InsufficientPrivilege:
                pass
            else:
                raise AssertionError(f"{sql} ran for pgflow_admin")
        # the public API stays theirs
        assert a.execute("SELECT pgflow.send(%s, '{}')", (queue,)).fetchone()[0] == 1
        assert a.execute("SELECT count(*) FROM pgflow.list_queues()").fetchone()[0] >= 1
