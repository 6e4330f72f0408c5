"""Bad input to the queue API: every case raises its specific SQLSTATE, with a message naming
the argument, and changes nothing.

Each case runs against a queue holding two messages, one of them leased (msg_id 1, read_ct 1),
so that a case which wrongly went ahead would leave a visible trace in the row counts of
pgflow.queues, pgflow.messages, pgflow.archive and pgflow.dlq, or in the leased message.
"""

import psycopg
import pytest

from conftest import error_of, unique_name

LONG = "a" * 49  # one byte over the limit
INJECTION = ["q; drop table x", "q'--", "Robert'); DROP TABLE pgflow.messages;--"]
NON_ASCII = ["café", "队列"]

# (id, sql, params, sqlstate, words the message must contain)
# `{q}` in sql or params stands for the test's queue. Nulls are typed so that the call resolves
# to one function: a bare NULL where an overload differs only by that argument is ambiguous.
CASES = [
    # --- names, through create_queue -------------------------------------------------------
    ("create_null_name", "SELECT pgflow.create_queue(%s)", [None], "22004", ["queue_name", "null"]),
    ("create_empty_name", "SELECT pgflow.create_queue(%s)", [""], "22023", ["queue_name", "empty"]),
    ("create_overlong_name", "SELECT pgflow.create_queue(%s)", [LONG], "42622", ["queue_name", "49", "48"]),
    ("create_injection_semicolon", "SELECT pgflow.create_queue(%s)", [INJECTION[0]], "22023", ["queue_name"]),
    ("create_injection_quote", "SELECT pgflow.create_queue(%s)", [INJECTION[1]], "22023", ["queue_name"]),
    ("create_injection_bobby", "SELECT pgflow.create_queue(%s)", [INJECTION[2]], "22023", ["queue_name"]),
    ("create_non_ascii_latin", "SELECT pgflow.create_queue(%s)", [NON_ASCII[0]], "22023", ["queue_name"]),
    ("create_non_ascii_cjk", "SELECT pgflow.create_queue(%s)", [NON_ASCII[1]], "22023", ["queue_name"]),
    ("create_space_in_name", "SELECT pgflow.create_queue(%s)", ["a b"], "22023", ["queue_name"]),
    ("create_dash_in_name", "SELECT pgflow.create_queue(%s)", ["a-b"], "22023", ["queue_name"]),
    ("create_multibyte_overlong", "SELECT pgflow.create_queue(%s)", ["é" * 25], "42622", ["queue_name", "50"]),
    # --- retry options ---------------------------------------------------------------------
    ("create_max_retries_negative", "SELECT pgflow.create_queue(%s, max_retries => -1)", ["{new}"], "22023", ["max_retries"]),
    ("create_max_retries_too_big", "SELECT pgflow.create_queue(%s, max_retries => 101)", ["{new}"], "22023", ["max_retries"]),
    ("create_max_retries_null", "SELECT pgflow.create_queue(%s, max_retries => NULL)", ["{new}"], "22004", ["max_retries"]),
    ("create_retry_delay_negative", "SELECT pgflow.create_queue(%s, retry_delay_ms => -1)", ["{new}"], "22023", ["retry_delay_ms"]),
    ("create_retry_delay_null", "SELECT pgflow.create_queue(%s, retry_delay_ms => NULL)", ["{new}"], "22004", ["retry_delay_ms"]),
    ("create_max_retry_delay_too_big", "SELECT pgflow.create_queue(%s, max_retry_delay_ms => 604800001)", ["{new}"], "22023", ["max_retry_delay_ms"]),
    ("create_jitter_above_one", "SELECT pgflow.create_queue(%s, retry_jitter => 1.5)", ["{new}"], "22023", ["retry_jitter"]),
    ("create_jitter_nan", "SELECT pgflow.create_queue(%s, retry_jitter => 'NaN')", ["{new}"], "22023", ["retry_jitter"]),
    ("create_notify_null", "SELECT pgflow.create_queue(%s, notify => NULL)", ["{new}"], "22004", ["notify"]),
    ("create_existing_bad_options", "SELECT pgflow.create_queue(%s, max_retries => -1)", ["{q}"], "22023", ["max_retries"]),
    ("alter_max_retries_too_big", "SELECT pgflow.alter_queue(%s, max_retries => 101)", ["{q}"], "22023", ["max_retries"]),
    ("alter_jitter_negative", "SELECT pgflow.alter_queue(%s, retry_jitter => -0.1)", ["{q}"], "22023", ["retry_jitter"]),
    ("alter_unknown_queue", "SELECT pgflow.alter_queue(%s, max_retries => 1)", ["{new}"], "42704", ["{new}", "does not exist"]),
    ("alter_null_name", "SELECT pgflow.alter_queue(%s, max_retries => 1)", [None], "22004", ["queue_name"]),
    # --- drop, purge, stats, listing -------------------------------------------------------
    ("drop_null_name", "SELECT pgflow.drop_queue(%s)", [None], "22004", ["queue_name"]),
    ("drop_overlong_name", "SELECT pgflow.drop_queue(%s)", [LONG], "42622", ["queue_name"]),
    ("drop_injection_name", "SELECT pgflow.drop_queue(%s)", [INJECTION[2]], "22023", ["queue_name"]),
    ("purge_unknown_queue", "SELECT pgflow.purge_queue(%s)", ["{new}"], "42704", ["{new}"]),
    ("purge_non_ascii_name", "SELECT pgflow.purge_queue(%s)", [NON_ASCII[1]], "22023", ["queue_name"]),
    ("stats_null_name", "SELECT * FROM pgflow.get_queue_stats(%s)", [None], "22004", ["queue_name"]),
    ("stats_unknown_queue", "SELECT * FROM pgflow.get_queue_stats(%s)", ["{new}"], "42704", ["{new}"]),
    ("pending_lim_zero", "SELECT * FROM pgflow.list_pending_messages(%s, 0)", ["{q}"], "22023", ["lim"]),
    ("pending_lim_null", "SELECT * FROM pgflow.list_pending_messages(%s, NULL)", ["{q}"], "22004", ["lim"]),
    # --- send --------------------------------------------------------------------------------
    ("send_unknown_queue", "SELECT pgflow.send(%s, '{}')", ["{new}"], "42704", ["{new}", "does not exist"]),
    ("send_null_queue", "SELECT pgflow.send(%s, '{}')", [None], "22004", ["queue_name"]),
    ("send_overlong_queue", "SELECT pgflow.send(%s, '{}')", [LONG], "42622", ["queue_name"]),
    ("send_injection_queue", "SELECT pgflow.send(%s, '{}')", [INJECTION[1]], "22023", ["queue_name"]),
    ("send_null_message", "SELECT pgflow.send(%s, NULL::jsonb)", ["{q}"], "22004", ["message"]),
    ("send_null_message_at_time", "SELECT pgflow.send(%s, NULL::jsonb, now())", ["{q}"], "22004", ["message"]),
    ("send_negative_delay", "SELECT pgflow.send(%s, '{}', -1)", ["{q}"], "22023", ["delay"]),
    ("send_delay_over_a_year", "SELECT pgflow.send(%s, '{}', 31536001)", ["{q}"], "22023", ["delay"]),
    ("send_null_int_delay", "SELECT pgflow.send(%s, '{}', NULL::integer)", ["{q}"], "22004", ["delay"]),
    ("send_null_time_delay", "SELECT pgflow.send(%s, '{}', NULL::timestamptz)", ["{q}"], "22004", ["delay"]),
    ("send_infinite_time_delay", "SELECT pgflow.send(%s, '{}', 'infinity'::timestamptz)", ["{q}"], "22023", ["delay", "finite"]),
    ("send_null_priority", "SELECT pgflow.send(%s, '{}', 0, NULL)", ["{q}"], "22004", ["priority"]),
    ("send_headers_array", "SELECT pgflow.send(%s, '{}', 0, 0, '[1]')", ["{q}"], "22023", ["headers", "array"]),
    ("send_headers_string", "SELECT pgflow.send(%s, '{}', 0, 0, '\"x\"')", ["{q}"], "22023", ["headers", "string"]),
    ("send_headers_json_null", "SELECT pgflow.send(%s, '{}', 0, 0, 'null'::jsonb)", ["{q}"], "22023", ["headers"]),
    # --- send_batch --------------------------------------------------------------------------
    ("batch_null_messages", "SELECT pgflow.send_batch(%s, NULL::jsonb[])", ["{q}"], "22004", ["messages"]),
    ("batch_empty_messages", "SELECT pgflow.send_batch(%s, '{}'::jsonb[])", ["{q}"], "22023", ["messages", "empty"]),
    ("batch_over_limit", "SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[6]))", ["{q}"], "54000", ["messages", "6", "5"]),
    ("batch_null_element", "SELECT pgflow.send_batch(%s, ARRAY['{}', NULL, '{}']::jsonb[])", ["{q}"], "22004", ["messages[2]"]),
    ("batch_two_dimensional", "SELECT pgflow.send_batch(%s, '{{\"{}\"},{\"{}\"}}'::jsonb[])", ["{q}"], "22023", ["messages", "one-dimensional"]),
    ("batch_headers_length", "SELECT pgflow.send_batch(%s, ARRAY['{}', '{}']::jsonb[], 0, 0, ARRAY['{}']::jsonb[])", ["{q}"], "22023", ["headers", "messages"]),
    ("batch_headers_not_object", "SELECT pgflow.send_batch(%s, ARRAY['{}', '{}']::jsonb[], 0, 0, ARRAY['{}', '[]']::jsonb[])", ["{q}"], "22023", ["headers[2]"]),
    ("batch_negative_delay", "SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[], -5)", ["{q}"], "22023", ["delay"]),
    ("batch_null_time_delay", "SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[], NULL::timestamptz)", ["{q}"], "22004", ["delay"]),
    ("batch_null_priority", "SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[], 0, NULL)", ["{q}"], "22004", ["priority"]),
    ("batch_unknown_queue", "SELECT pgflow.send_batch(%s, ARRAY['{}']::jsonb[])", ["{new}"], "42704", ["{new}"]),
    # --- read, read_with_poll, pop -------------------------------------------------------------
    ("read_null_vt", "SELECT * FROM pgflow.read(%s, NULL, 1)", ["{q}"], "22004", ["vt"]),
    ("read_negative_vt", "SELECT * FROM pgflow.read(%s, -1, 1)", ["{q}"], "22023", ["vt"]),
    ("read_vt_over_a_year", "SELECT * FROM pgflow.read(%s, 31536001, 1)", ["{q}"], "22023", ["vt"]),
    ("read_qty_zero", "SELECT * FROM pgflow.read(%s, 30, 0)", ["{q}"], "22023", ["qty"]),
    ("read_qty_negative", "SELECT * FROM pgflow.read(%s, 30, -1)", ["{q}"], "22023", ["qty"]),
    ("read_qty_null", "SELECT * FROM pgflow.read(%s, 30, NULL)", ["{q}"], "22004", ["qty"]),
    ("read_unknown_queue", "SELECT * FROM pgflow.read(%s, 30, 1)", ["{new}"], "42704", ["{new}"]),
    ("read_null_queue", "SELECT * FROM pgflow.read(%s, 30, 1)", [None], "22004", ["queue_name"]),
    ("read_cjk_queue", "SELECT * FROM pgflow.read(%s, 30, 1)", [NON_ASCII[1]], "22023", ["queue_name"]),
    ("poll_negative_wait", "SELECT * FROM pgflow.read_with_poll(%s, 30, 1, -1)", ["{q}"], "22023", ["max_poll_seconds"]),
    ("poll_null_wait", "SELECT * FROM pgflow.read_with_poll(%s, 30, 1, NULL)", ["{q}"], "22004", ["max_poll_seconds"]),
    ("poll_zero_interval", "SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 1, 0)", ["{q}"], "22023", ["poll_interval_ms"]),
    ("poll_qty_zero", "SELECT * FROM pgflow.read_with_poll(%s, 30, 0)", ["{q}"], "22023", ["qty"]),
    ("pop_qty_zero", "SELECT * FROM pgflow.pop(%s, 0)", ["{q}"], "22023", ["qty"]),
    ("pop_qty_null", "SELECT * FROM pgflow.pop(%s, NULL)", ["{q}"], "22004", ["qty"]),
    ("pop_unknown_queue", "SELECT * FROM pgflow.pop(%s)", ["{new}"], "42704", ["{new}"]),
    # --- delete, archive, set_vt, ack_and_read ---------------------------------------------------
    ("delete_null_msg_id", "SELECT pgflow.delete(%s, NULL::bigint)", ["{q}"], "22004", ["msg_id"]),
    ("delete_null_msg_ids", "SELECT pgflow.delete(%s, NULL::bigint[])", ["{q}"], "22004", ["msg_ids"]),
    ("delete_null_in_msg_ids", "SELECT pgflow.delete(%s, ARRAY[1, NULL]::bigint[])", ["{q}"], "22004", ["msg_ids[2]"]),
    ("delete_read_cts_length", "SELECT pgflow.delete(%s, ARRAY[1, 2]::bigint[], ARRAY[1])", ["{q}"], "22023", ["read_cts", "msg_ids"]),
    ("delete_two_dimensional", "SELECT pgflow.delete(%s, '{{1},{2}}'::bigint[])", ["{q}"], "22023", ["msg_ids", "one-dimensional"]),
    ("delete_unknown_queue", "SELECT pgflow.delete(%s, 1::bigint)", ["{new}"], "42704", ["{new}"]),
    ("archive_null_msg_id", "SELECT pgflow.archive(%s, NULL::bigint)", ["{q}"], "22004", ["msg_id"]),
    ("archive_null_msg_ids", "SELECT pgflow.archive(%s, NULL::bigint[])", ["{q}"], "22004", ["msg_ids"]),
    ("archive_read_cts_length", "SELECT pgflow.archive(%s, ARRAY[1]::bigint[], ARRAY[1, 1])", ["{q}"], "22023", ["read_cts"]),
    ("archive_unknown_queue", "SELECT pgflow.archive(%s, ARRAY[1]::bigint[])", ["{new}"], "42704", ["{new}"]),
    ("archive_overlong_queue", "SELECT pgflow.archive(%s, 1::bigint)", [LONG], "42622", ["queue_name"]),
    ("set_vt_negative", "SELECT * FROM pgflow.set_vt(%s, 1, -1)", ["{q}"], "22023", ["vt"]),
    ("set_vt_null_vt", "SELECT * FROM pgflow.set_vt(%s, 1, NULL)", ["{q}"], "22004", ["vt"]),
    ("set_vt_null_msg_id", "SELECT * FROM pgflow.set_vt(%s, NULL, 30)", ["{q}"], "22004", ["msg_id"]),
    ("set_vt_unknown_queue", "SELECT * FROM pgflow.set_vt(%s, 1, 30)", ["{new}"], "42704", ["{new}"]),
    ("ack_read_null_ids", "SELECT * FROM pgflow.ack_and_read(%s, NULL, 30)", ["{q}"], "22004", ["ack_msg_ids"]),
    ("ack_read_cts_length", "SELECT * FROM pgflow.ack_and_read(%s, ARRAY[1]::bigint[], 30, 1, true, ARRAY[]::integer[])", ["{q}"], "22023", ["ack_read_cts", "ack_msg_ids"]),
    ("ack_read_null_archive", "SELECT * FROM pgflow.ack_and_read(%s, ARRAY[1]::bigint[], 30, 1, NULL)", ["{q}"], "22004", ["archive"]),
    ("ack_read_qty_zero", "SELECT * FROM pgflow.ack_and_read(%s, ARRAY[1]::bigint[], 30, 0)", ["{q}"], "22023", ["qty"]),
    ("ack_read_negative_vt", "SELECT * FROM pgflow.ack_and_read(%s, ARRAY[1]::bigint[], -1)", ["{q}"], "22023", ["vt"]),
    # --- state: a message must have been delivered before it can be failed ----------------------
    ("nack_undelivered", "SELECT * FROM pgflow.nack(%s, 2, 'boom')", ["{q}"], "55000", ["message 2", "not been delivered"]),
    # --- channel names, checked in Rust --------------------------------------------------------
    ("queue_channel_null", "SELECT pgflow.queue_channel(%s)", [None], "22004", ["queue_name"]),
    ("queue_channel_empty", "SELECT pgflow.queue_channel(%s)", [""], "22023", ["queue_name"]),
    ("queue_channel_overlong", "SELECT pgflow.queue_channel(%s)", [LONG], "42622", ["queue_name", "49"]),
    ("queue_channel_injection", "SELECT pgflow.queue_channel(%s)", [INJECTION[2]], "22023", ["queue_name"]),
    ("queue_channel_non_ascii", "SELECT pgflow.queue_channel(%s)", [NON_ASCII[0]], "22023", ["queue_name"]),
    ("flow_channel_null", "SELECT pgflow.flow_channel(%s)", [None], "22004", ["flow_slug"]),
    ("flow_channel_overlong", "SELECT pgflow.flow_channel(%s)", [LONG], "42622", ["flow_slug"]),
    ("flow_channel_non_ascii", "SELECT pgflow.flow_channel(%s)", [NON_ASCII[1]], "22023", ["flow_slug"]),
    ("flow_channel_injection", "SELECT pgflow.flow_channel(%s)", [INJECTION[0]], "22023", ["flow_slug"]),
]


def snapshot(conn, queue):
    """Everything a bad call could have changed."""
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM pgflow.queues), (SELECT count(*) FROM pgflow.messages),"
        " (SELECT count(*) FROM pgflow.archive), (SELECT count(*) FROM pgflow.dlq),"
        " (SELECT coalesce(max(queue_id), 0) FROM pgflow.queues)"
    ).fetchone()
    rows = conn.execute(
        "SELECT msg_id, read_ct, vt, message, headers FROM pgflow.list_pending_messages(%s)"
        " ORDER BY msg_id",
        (queue,),
    ).fetchall()
    opts = conn.execute(
        "SELECT max_retries, retry_delay_ms, max_retry_delay_ms, retry_jitter, notify"
        " FROM pgflow.list_queues() WHERE queue_name = %s",
        (queue,),
    ).fetchone()
    return counts, rows, opts


@pytest.fixture
def loaded_queue(conn, queue):
    """The test queue with message 1 leased once and message 2 never delivered."""
    conn.execute("SELECT pgflow.send_batch(%s, ARRAY['{\"n\": 1}', '{\"n\": 2}']::jsonb[])", (queue,))
    (msg_id, read_ct), = conn.execute("SELECT msg_id, read_ct FROM pgflow.read(%s, 300, 1)", (queue,)).fetchall()
    assert (msg_id, read_ct) == (1, 1)
    return queue


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("sql,params,state,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(conn, loaded_queue, sql, params, state, words):
    new = unique_name("absent")
    fill = {"{q}": loaded_queue, "{new}": new}
    params = [fill.get(p, p) if isinstance(p, str) else p for p in params]
    words = [w.replace("{new}", new) for w in words]
    conn.execute("SET pgflow.max_batch_size = 5")
    before = snapshot(conn, loaded_queue)
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        err = e
    else:
        pytest.fail(f"no error from {sql} {params!r}")
    assert err.sqlstate != "XX000", err
    assert err.sqlstate == state, f"{err.sqlstate}: {err.diag.message_primary}"
    for w in words:
        assert w in err.diag.message_primary, f"{w!r} not in {err.diag.message_primary!r}"
    assert snapshot(conn, loaded_queue) == before
    # the session is still usable, and no queue of the bad name came into being
    assert conn.execute("SELECT count(*) FROM pgflow.list_queues() WHERE queue_name = ANY(%s)",
                        ([p for p in params if isinstance(p, str) and p != loaded_queue],)).fetchone()[0] == 0


def test_batch_at_the_limit_is_accepted(conn, queue):
    """The limit itself is allowed: the over-limit case above fails for being over, not for size."""
    conn.execute("SET pgflow.max_batch_size = 5")
    ids = [r[0] for r in conn.execute("SELECT pgflow.send_batch(%s, array_fill('{}'::jsonb, ARRAY[5]))",
                                      (queue,)).fetchall()]
    assert len(ids) == 5
    assert conn.execute("SHOW pgflow.max_batch_size").fetchone()[0] == "5"
    conn.execute("RESET pgflow.max_batch_size")
    assert conn.execute("SHOW pgflow.max_batch_size").fetchone()[0] == "10000"


def test_names_at_the_limit_are_accepted(conn):
    name = "Q_" + "9" * 46  # 48 bytes, letters, digits and underscore
    try:
        assert conn.execute("SELECT pgflow.create_queue(%s)", (name,)).fetchone()[0] is True
        assert conn.execute("SELECT pgflow.queue_channel(%s)", (name,)).fetchone()[0] == "pgflow.queue." + name
        assert conn.execute("SELECT pgflow.flow_channel(%s)", (name,)).fetchone()[0] == "pgflow.flow." + name
    finally:
        conn.execute("SELECT pgflow.drop_queue(%s)", (name,))


def test_injection_shaped_names_leave_the_tables_alone(conn):
    """Names are data, never SQL: after every attempt the tables are all still there."""
    for name in INJECTION:
        for sql in ("SELECT pgflow.create_queue(%s)", "SELECT pgflow.send(%s, '{}')",
                    "SELECT pgflow.drop_queue(%s)", "SELECT pgflow.purge_queue(%s)"):
            with pytest.raises(psycopg.Error) as e:
                conn.execute(sql, (name,))
            assert e.value.sqlstate == "22023"
    assert conn.execute("SELECT to_regclass('pgflow.messages') IS NOT NULL AND to_regclass('x') IS NULL"
                        ).fetchone()[0]


# --- no internal errors, no backtraces --------------------------------------------------------

def deep_json(depth):
    return "[" * depth + "1" + "]" * depth


def test_deep_json_is_accepted_wherever_send_accepts_it(conn):
    """jsonb that send accepts (nested 10,000 deep) is accepted by every function taking jsonb:
    0.1.0's start_flow failed with XX000 (a JSON parser's recursion limit in the event code),
    even with pgflow.workflow_events = off. No path parses user JSON to pass it on."""
    q = unique_name()
    flow = unique_name("f")
    conn.execute("SELECT pgflow.create_queue(%s)", (q,))
    conn.execute("SELECT pgflow.create_flow(%s)", (flow,))
    conn.execute("SELECT pgflow.add_step(%s, 'a')", (flow,))
    try:
        for deep in (deep_json(200), deep_json(10000)):  # small enough to be announced; large
            assert conn.execute("SELECT pgflow.send(%s, %s::jsonb)", (q, deep)).fetchone()[0] > 0
            assert conn.execute("SELECT pgflow.send_with_notify(%s, %s::jsonb)", (q, deep)).fetchone()[0] > 0
            assert conn.execute("SELECT count(*) FROM pgflow.send_batch(%s, ARRAY[%s::jsonb])", (q, deep)).fetchone()[0] == 1
            for events in ("all", "runs", "off"):
                conn.execute(f"SET pgflow.workflow_events = '{events}'")
                run_id = conn.execute("SELECT run_id FROM pgflow.start_flow(%s, %s::jsonb)", (flow, deep)).fetchone()[0]
                (size,) = conn.execute("SELECT octet_length(input::text) FROM pgflow.poll_for_tasks(%s, 30, 1, 0)",
                                       (flow,)).fetchone()
                assert size > 400
                outcome = conn.execute("SELECT pgflow.complete_task(%s, 'a', 0, %s::jsonb)", (run_id, deep)).fetchone()[0]
                assert outcome == "completed"
                assert conn.execute("SELECT status, jsonb_typeof(output) FROM pgflow.runs WHERE run_id = %s",
                                    (run_id,)).fetchone() == ("completed", "object")
            conn.execute("RESET pgflow.workflow_events")
    finally:
        conn.execute("SELECT pgflow.drop_flow(%s)", (flow,))
        conn.execute("SELECT pgflow.drop_queue(%s)", (q,))


def no_backtrace(e):
    """PostgreSQL's own cancel and timeout errors carry no DETAIL; a Rust backtrace would be
    there (frames such as "0: std::thread::local::LocalKey<T>::with")."""
    text = "\n".join(filter(None, [e.diag.message_detail, e.diag.context]))
    return not e.diag.message_detail and "pgrx" not in text and "std::" not in text


def test_a_cancelled_wait_reports_57014_without_a_backtrace(conn, make_conn):
    """The test cluster runs with RUST_BACKTRACE=1: a statement timeout or a cancel of a blocked
    read_with_poll or poll_for_tasks (what every graceful shutdown does) is 57014 as PostgreSQL
    raises it; 0.1.0 put a 40-line Rust backtrace in DETAIL."""
    import threading
    import time
    q = unique_name()
    flow = unique_name("f")
    conn.execute("SELECT pgflow.create_queue(%s)", (q,))
    conn.execute("SELECT pgflow.create_flow(%s)", (flow,))
    try:
        c = make_conn()
        c.execute("SET statement_timeout = '300ms'")
        for sql, args in [("SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 5, 100)", (q,)),
                          ("SELECT * FROM pgflow.poll_for_tasks(%s, 30, 1, 5, 100)", (flow,))]:
            e = error_of(c, sql, args)
            assert e.sqlstate == "57014", (sql, e.sqlstate)
            assert no_backtrace(e), e.diag.message_detail
        c.execute("RESET statement_timeout")
        pid = c.info.backend_pid
        for sql, args in [("SELECT * FROM pgflow.read_with_poll(%s, 30, 1, 10, 100)", (q,)),
                          ("SELECT * FROM pgflow.poll_for_tasks(%s, 30, 1, 10, 100)", (flow,))]:
            timer = threading.Timer(0.5, lambda: conn.execute("SELECT pg_cancel_backend(%s)", (pid,)))
            timer.start()
            t = time.monotonic()
            e = error_of(c, sql, args)
            timer.join()
            assert e.sqlstate == "57014" and time.monotonic() - t < 5
            assert no_backtrace(e), e.diag.message_detail
        # the session goes on
        assert c.execute("SELECT count(*) FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()[0] == 0
    finally:
        conn.execute("SELECT pgflow.drop_flow(%s)", (flow,))
        conn.execute("SELECT pgflow.drop_queue(%s)", (q,))


def test_the_message_trigger_refuses_any_other_use(conn):
    """pgflow._messages_inserted() reads queue_id and msg_id from the row it fires for: on any
    other table, event or level it raises 39P01 instead of reading what is not there (a
    statement trigger has no row: 0.1.0 read through a null pointer)."""
    t = unique_name("t")
    conn.execute(f"CREATE TABLE public.{t} (a text, b text)")
    conn.execute(f"CREATE TABLE public.{t}_2 (a bigint, b bigint)")
    try:
        for table, timing in [(t, "AFTER INSERT ON public.{} FOR EACH ROW"),
                              (f"{t}_2", "AFTER INSERT ON public.{} FOR EACH STATEMENT"),
                              (f"{t}_2", "AFTER UPDATE ON public.{} FOR EACH ROW")]:
            conn.execute(f"CREATE TRIGGER fuzz_trigger {timing.format(table)} "
                         "EXECUTE FUNCTION pgflow._messages_inserted()")
            e = error_of(conn, f"INSERT INTO public.{table} VALUES (NULL, NULL); "
                               f"UPDATE public.{table} SET a = a")
            assert e.sqlstate == "39P01", (timing, e.sqlstate, e.diag.message_primary)
            assert "row trigger after insert on pgflow.messages" in e.diag.message_primary
            conn.execute(f"DROP TRIGGER fuzz_trigger ON public.{table}")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.execute(f"DROP TABLE public.{t}, public.{t}_2")
