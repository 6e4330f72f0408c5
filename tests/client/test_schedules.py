"""Cron schedules: the cron rule against a minute-by-minute oracle, firing once per tick across
sessions, a killed backend and downtime, time zones, targets going away, bad input and roles.

The test cluster runs the maintenance worker, which fires due schedules too: a test makes a
schedule due and fires it in one transaction where it needs to know who fired, and otherwise
asserts what must hold whoever fired (one message per tick)."""

import random
import time
from datetime import datetime, timedelta

import psycopg
import pytest

from conftest import error_of, session_as, unique_name

# Far from any test's now, so that only the test makes it due.
RARE = "0 0 1 1 *"


def row(conn, name):
    cur = conn.execute("SELECT * FROM pgflow.list_schedules() WHERE schedule_name = %s", (name,))
    values = cur.fetchone()
    return None if values is None else dict(zip([d.name for d in cur.description], values))


def make_due(conn, name, ago="1 hour"):
    conn.execute("""UPDATE pgflow.schedules
                       SET next_fire_at = now() - %s::interval,
                           next_fire_local = (now() - %s::interval) AT TIME ZONE time_zone
                     WHERE schedule_name = %s""", (ago, ago, name))


def fire_now(conn, name, ago="1 hour"):
    """Make the schedule due and run a maintenance pass in the same transaction, so that no
    other pass sees it due first; returns the pass's result."""
    with conn.transaction():
        make_due(conn, name, ago)
        return conn.execute("SELECT pgflow.run_maintenance()").fetchone()[0]


def messages(conn, queue):
    return conn.execute("SELECT msg_id, message, headers FROM pgflow.list_pending_messages(%s) ORDER BY msg_id",
                        (queue,)).fetchall()


# -- the cron rule ---------------------------------------------------------------------------

def field_matches(spec, value, lo, hi):
    for item in spec.split(","):
        rng, _, step = item.partition("/")
        step = int(step) if step else 1
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = int(rng)
            b = hi if "/" in item else a
        if a <= value <= b and (value - a) % step == 0:
            return True
    return False


def oracle_matches(expr, t):
    mi, h, dom, mon, dow = expr.split()
    weekday = (t.weekday() + 1) % 7  # Sunday 0
    d_ok = field_matches(dom, t.day, 1, 31)
    w_ok = field_matches(dow, weekday, 0, 7) or (weekday == 0 and field_matches(dow, 7, 0, 7))
    day_ok = (d_ok and w_ok) if dom.startswith("*") or dow.startswith("*") else (d_ok or w_ok)
    return (field_matches(mi, t.minute, 0, 59) and field_matches(h, t.hour, 0, 23)
            and field_matches(mon, t.month, 1, 12) and day_ok)


def random_field(rng, lo, hi):
    kind = rng.choice(["*", "*", "v", "range", "step", "list", "rangestep"])
    if kind == "*":
        return "*"
    if kind == "v":
        return str(rng.randint(lo, hi))
    a = rng.randint(lo, hi)
    b = rng.randint(a, hi)
    if kind == "range":
        return f"{a}-{b}"
    if kind == "step":
        return f"*/{rng.randint(1, max(1, (hi - lo) // 2))}"
    if kind == "rangestep":
        return f"{a}-{b}/{rng.randint(1, 4)}"
    return ",".join(str(rng.randint(lo, hi)) for _ in range(rng.randint(2, 4)))


def test_next_fire_times_agree_with_a_minute_by_minute_search(conn):
    rng = random.Random(7)
    checked = 0
    while checked < 60:
        expr = " ".join([random_field(rng, 0, 59), random_field(rng, 0, 23),
                         rng.choice(["*", "*", random_field(rng, 1, 28)]),
                         rng.choice(["*", "*", random_field(rng, 1, 12)]),
                         rng.choice(["*", "*", random_field(rng, 0, 7)])])
        after = datetime(2026, 1, 1) + timedelta(minutes=rng.randint(0, 600000), seconds=rng.randint(0, 59))
        (got,) = conn.execute("SELECT pgflow._cron_next(%s, %s)", (expr, after)).fetchone()
        t = after.replace(second=0) + timedelta(minutes=1)
        # search at most 400 days; expressions firing rarer than that are skipped
        limit = t + timedelta(days=400)
        while t < limit and not oracle_matches(expr, t):
            t += timedelta(minutes=1) if oracle_day(expr, t) else timedelta(days=1) - timedelta(
                hours=t.hour, minutes=t.minute)
        if t >= limit:
            continue
        assert got == t, (expr, after)
        checked += 1


def oracle_day(expr, t):
    """Whether any minute of t's day can match (to skip whole days in the search)."""
    _, _, dom, mon, dow = expr.split()
    weekday = (t.weekday() + 1) % 7
    d_ok = field_matches(dom, t.day, 1, 31)
    w_ok = field_matches(dow, weekday, 0, 7) or (weekday == 0 and field_matches(dow, 7, 0, 7))
    day_ok = (d_ok and w_ok) if dom.startswith("*") or dow.startswith("*") else (d_ok or w_ok)
    return field_matches(mon, t.month, 1, 12) and day_ok


@pytest.mark.parametrize("expr,after,expected", [
    ("0 9 * * MON-FRI", "2026-12-05 10:00", "2026-12-07 09:00"),   # Saturday -> Monday
    ("@monthly", "2026-12-06 10:17", "2027-01-01 00:00"),
    ("0 0 29 2 *", "2026-12-06 00:00", "2028-02-29 00:00"),
    ("0 0 13 * FRI", "2026-12-06 00:00", "2026-12-11 00:00"),       # the 13th or a Friday
    ("*/20 * * * *", "2026-12-06 10:40:00", "2026-12-06 11:00"),   # strictly after
])
def test_named_cases(conn, expr, after, expected):
    (got,) = conn.execute("SELECT pgflow._cron_next(%s, %s::timestamp)::text", (expr, after)).fetchone()
    assert got == expected + ":00"


# -- creating, listing, dropping --------------------------------------------------------------

def test_create_list_replace_drop(conn, queue):
    name = unique_name("s")
    (first,) = conn.execute("SELECT pgflow.create_schedule(%s, '*/5 * * * *', %s, '{\"k\": 1}')",
                            (name, queue)).fetchone()
    now = conn.execute("SELECT now()").fetchone()[0]
    assert now < first <= now + timedelta(minutes=5)
    assert first.minute % 5 == 0 and first.second == 0
    r = row(conn, name)
    assert (r["cron"], r["time_zone"], r["queue_name"], r["flow_slug"], r["payload"]) == \
        ("*/5 * * * *", "UTC", queue, None, {"k": 1})
    assert r["next_fire_at"] == first and r["last_fire_at"] is None
    # the same name again replaces it
    conn.execute("SELECT pgflow.create_schedule(%s, '@daily', %s)", (name, queue))
    r = row(conn, name)
    assert (r["cron"], r["payload"]) == ("@daily", {})
    assert (r["next_fire_at"].hour, r["next_fire_at"].minute) == (0, 0)
    assert conn.execute("SELECT pgflow.drop_schedule(%s)", (name,)).fetchone()[0] is True
    assert conn.execute("SELECT pgflow.drop_schedule(%s)", (name,)).fetchone()[0] is False
    assert row(conn, name) is None


def test_time_zones(conn, queue):
    ny, kolkata = unique_name("s"), unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, '0 9 * * *', %s, time_zone => 'America/New_York')",
                 (ny, queue))
    conn.execute("SELECT pgflow.create_schedule(%s, '30 * * * *', %s, time_zone => 'Asia/Kolkata')",
                 (kolkata, queue))
    local = conn.execute("""SELECT (next_fire_at AT TIME ZONE time_zone)::time::text,
                                   extract(minute FROM next_fire_at AT TIME ZONE 'UTC')
                              FROM pgflow.schedules WHERE schedule_name IN (%s, %s)
                             ORDER BY schedule_name = %s""", (ny, kolkata, kolkata)).fetchall()
    assert local[0][0] == "09:00:00"
    assert local[1][0].endswith(":30:00") and local[1][1] == 0  # UTC+5:30


# -- firing -----------------------------------------------------------------------------------

def test_a_due_schedule_fires_once_and_moves_on(conn, queue):
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, %s, %s, '{\"job\": \"report\"}')", (name, RARE, queue))
    result = fire_now(conn, name)
    assert result["schedules_fired"] >= 1
    [(mid, message, headers)] = messages(conn, queue)
    assert message == {"job": "report"}
    r = row(conn, name)
    assert headers["schedule"] == name
    assert datetime.fromisoformat(headers["due_at"]) == r["last_due_at"]
    assert r["last_msg_id"] == mid and r["last_error"] is None and r["last_run_id"] is None
    assert r["last_fire_at"] >= r["last_due_at"]
    assert r["next_fire_at"] > conn.execute("SELECT now()").fetchone()[0]
    assert (r["next_fire_at"].month, r["next_fire_at"].day, r["next_fire_at"].hour) == (1, 1, 0)
    # the next pass finds nothing due
    conn.execute("SELECT pgflow.run_maintenance()")
    assert len(messages(conn, queue)) == 1


def test_after_downtime_one_catch_up_fire_not_a_burst(conn, queue):
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, '* * * * *', %s)", (name, queue))
    fire_now(conn, name, ago="3 days")  # 4320 ticks missed
    for _ in range(3):
        conn.execute("SELECT pgflow.run_maintenance()")
    # one catch-up fire, then at most the ticks of the last minute or so
    assert 1 <= len(messages(conn, queue)) <= 2
    r = row(conn, name)
    now = conn.execute("SELECT now()").fetchone()[0]
    assert now < r["next_fire_at"] <= now + timedelta(minutes=1)


def test_concurrent_passes_fire_a_tick_once(conn, make_conn, queue):
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, %s, %s)", (name, RARE, queue))
    a = make_conn(autocommit=False)
    b = make_conn()
    b.execute("SET statement_timeout = '5s'")
    make_due(conn, name)  # committed: the worker may fire it too
    # the schedules part of a pass (the rest of run_maintenance is not under test here)
    a.execute("SELECT pgflow._fire_schedules()")  # fires it (unless the worker did), holds its row
    # another pass neither waits for the locked row nor fires it
    assert b.execute("SELECT pgflow._fire_schedules()").fetchone()[0] == 0
    a.commit()
    assert b.execute("SELECT pgflow._fire_schedules()").fetchone()[0] == 0
    assert len(messages(conn, queue)) == 1
    assert row(conn, name)["last_msg_id"] == messages(conn, queue)[0][0]


def test_a_pass_killed_before_commit_leaves_the_tick_due(conn, make_conn, queue):
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, %s, %s)", (name, RARE, queue))
    victim = make_conn(autocommit=False)
    pid = victim.info.backend_pid
    make_due(victim, name)
    victim.execute("SELECT pgflow.run_maintenance()")  # fired, not committed
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    assert messages(conn, queue) == []
    assert row(conn, name)["last_fire_at"] is None
    fire_now(conn, name)
    assert len(messages(conn, queue)) == 1


def test_the_worker_fires_due_schedules(conn, queue):
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, %s, %s)", (name, RARE, queue))
    make_due(conn, name)
    deadline = time.monotonic() + 15
    while row(conn, name)["last_fire_at"] is None:
        assert time.monotonic() < deadline, "the worker did not fire the schedule"
        time.sleep(0.1)
    assert len(messages(conn, queue)) == 1


def test_a_flow_schedule_starts_runs(conn, flows):
    slug = flows([{"slug": "only"}])
    name = unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, %s, flow_slug => %s, input => '{\"day\": 1}')",
                 (name, RARE, slug))
    fire_now(conn, name)
    r = row(conn, name)
    assert r["last_run_id"] is not None and r["last_msg_id"] is None and r["last_error"] is None
    run = conn.execute("SELECT flow_slug, input FROM pgflow.runs WHERE run_id = %s", (r["last_run_id"],)).fetchone()
    assert run == (slug, {"day": 1})


def test_a_failing_fire_is_recorded_and_the_schedule_moves_on(conn, make_conn):
    slug = unique_name("f")
    conn.execute("SELECT pgflow.create_flow(%s)", (slug,))  # no steps: start_flow fails (55000)
    try:
        name = unique_name("s")
        conn.execute("SELECT pgflow.create_schedule(%s, %s, flow_slug => %s)", (name, RARE, slug))
        warnings = []
        conn.add_notice_handler(lambda d: warnings.append((d.severity_nonlocalized, d.message_primary)))
        fire_now(conn, name)
        r = row(conn, name)
        assert r["last_error"].startswith("55000: ") and r["last_run_id"] is None
        assert r["next_fire_at"] > r["last_due_at"]
        assert ("WARNING", f'pgflow schedule "{name}" failed to fire: SQLSTATE 55000') in warnings
        assert conn.execute("SELECT count(*) FROM pgflow.runs WHERE flow_slug = %s", (slug,)).fetchone()[0] == 0
    finally:
        conn.execute("SELECT pgflow.drop_flow(%s)", (slug,))


def test_schedules_go_with_their_queue_or_flow(conn, make_queue):
    q = make_queue()
    slug = unique_name("f")
    conn.execute("SELECT pgflow.create_flow(%s)", (slug,))
    a, b = unique_name("s"), unique_name("s")
    conn.execute("SELECT pgflow.create_schedule(%s, '@hourly', %s)", (a, q))
    conn.execute("SELECT pgflow.create_schedule(%s, '@hourly', flow_slug => %s)", (b, slug))
    conn.execute("SELECT pgflow.drop_queue(%s)", (q,))
    conn.execute("SELECT pgflow.drop_flow(%s)", (slug,))
    assert row(conn, a) is None and row(conn, b) is None


# -- bad input and roles ----------------------------------------------------------------------

BAD = [
    ("SELECT pgflow.create_schedule(NULL, '@daily', %(q)s)", "22004", "schedule_name"),
    ("SELECT pgflow.create_schedule('a b', '@daily', %(q)s)", "22023", "schedule_name"),
    ("SELECT pgflow.create_schedule('s', NULL, %(q)s)", "22004", "cron"),
    ("SELECT pgflow.create_schedule('s', '* * * *', %(q)s)", "22023", "cron"),
    ("SELECT pgflow.create_schedule('s', '61 * * * *', %(q)s)", "22023", "cron"),
    ("SELECT pgflow.create_schedule('s', '0 0 30 2 *', %(q)s)", "22023", "never fires"),
    ("SELECT pgflow.create_schedule('s', '@reboot', %(q)s)", "22023", "cron"),
    ("SELECT pgflow.create_schedule('s', '@daily', %(q)s, time_zone => NULL)", "22004", "time_zone"),
    ("SELECT pgflow.create_schedule('s', '@daily', %(q)s, time_zone => 'Mars/Olympus')", "22023", "time_zone"),
    ("SELECT pgflow.create_schedule('s', '@daily')", "22023", "neither"),
    ("SELECT pgflow.create_schedule('s', '@daily', %(q)s, flow_slug => 'x')", "22023", "both"),
    ("SELECT pgflow.create_schedule('s', '@daily', %(q)s, input => '{}')", "22023", "input"),
    ("SELECT pgflow.create_schedule('s', '@daily', flow_slug => 'no_such_flow_s', message => '{}')",
     "22023", "message"),
    ("SELECT pgflow.create_schedule('s', '@daily', 'no_such_queue_s')", "42704", "no_such_queue_s"),
    ("SELECT pgflow.create_schedule('s', '@daily', flow_slug => 'no_such_flow_s')", "42704", "no_such_flow_s"),
    ("SELECT pgflow.drop_schedule(NULL)", "22004", "schedule_name"),
    ("SELECT pgflow.drop_schedule('')", "22023", "schedule_name"),
]


@pytest.mark.parametrize("sql,state,words", BAD)
def test_bad_input(conn, queue, sql, state, words):
    e = error_of(conn, sql, {"q": queue})
    assert e.sqlstate == state, e
    assert words in str(e), e
    assert "panicked" not in str(e) and conn.execute("SELECT count(*) FROM pgflow.schedules "
                                                     "WHERE schedule_name = 's'").fetchone()[0] == 0


def test_a_flows_queue_takes_no_schedule_of_messages(conn, flows):
    slug = flows([{"slug": "only"}])
    e = error_of(conn, "SELECT pgflow.create_schedule('s', '@daily', %s)", (slug,))
    assert e.sqlstate == "55000" and "create_schedule" in str(e)


def test_only_the_admin_role_manages_schedules(conn, queue):
    name = unique_name("s")
    for group in ("pgflow_producer", "pgflow_consumer"):
        with session_as(conn, group) as s:
            for sql in ("SELECT pgflow.create_schedule(%s, '@daily', %s)",
                        "SELECT pgflow.drop_schedule(%s)", "SELECT * FROM pgflow.list_schedules()"):
                args = (name, queue)[:sql.count("%s")]
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    s.execute(sql, args)
    with session_as(conn, "pgflow_admin") as s:
        s.execute("SELECT pgflow.create_schedule(%s, '@daily', %s)", (name, queue))
        assert s.execute("SELECT count(*) FROM pgflow.list_schedules() WHERE schedule_name = %s",
                         (name,)).fetchone()[0] == 1
        assert s.execute("SELECT pgflow.drop_schedule(%s)", (name,)).fetchone()[0] is True
