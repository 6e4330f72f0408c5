"""Monitoring from SQL: pgflow.metrics() read by the Prometheus project's own parser, and
pgflow.queue_health against per-queue alert thresholds."""
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import session_as, sqlstate, error_of


def scrape(conn):
    text = conn.execute("SELECT pgflow.metrics()").fetchone()[0]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for f in families.values():
        for s in f.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, families, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def health(conn, queue):
    return conn.execute("SELECT status, reason, dlq_depth, alert_dlq_depth, alert_oldest_age "
                        "FROM pgflow.queue_health WHERE queue_name = %s", (queue,)).fetchone()


def dead_letter_one(conn, queue):
    """Send one message and let its only delivery's lease run out: the next read dead-letters it."""
    conn.execute("SELECT pgflow.send(%s, '{\"poison\": true}')", (queue,))
    assert len(conn.execute("SELECT * FROM pgflow.read(%s, 1, 1)", (queue,)).fetchall()) == 1
    time.sleep(1.1)
    assert conn.execute("SELECT * FROM pgflow.read(%s, 1, 1)", (queue,)).fetchall() == []


def test_metrics_parse_and_count_each_state(conn, make_queue, flows):
    q = make_queue(max_retries=0)
    for i in range(3):
        conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    conn.execute("SELECT pgflow.send(%s, '{}', 60)", (q,))          # delayed
    conn.execute("SELECT * FROM pgflow.read(%s, 30, 1)", (q,))       # one leased
    (archived,) = conn.execute("SELECT msg_id FROM pgflow.read(%s, 30, 1)", (q,)).fetchone()
    conn.execute("SELECT pgflow.archive(%s, %s)", (q, archived))
    flow = flows([{"slug": "a"}])
    conn.execute("SELECT pgflow.start_flow(%s, '{}')", (flow,))

    text, families, samples = scrape(conn)
    assert text.endswith("\n")
    assert value(samples, "pgflow_queue_depth", queue=q) == 3
    assert value(samples, "pgflow_queue_messages", queue=q, state="visible") == 1
    assert value(samples, "pgflow_queue_messages", queue=q, state="in_flight") == 1
    assert value(samples, "pgflow_queue_messages", queue=q, state="delayed") == 1
    assert value(samples, "pgflow_queue_archived_messages", queue=q) == 1
    assert value(samples, "pgflow_queue_dlq_messages", queue=q) == 0
    assert value(samples, "pgflow_queue_sent_total", queue=q) == 4
    assert families["pgflow_queue_sent"].type == "counter"
    assert value(samples, "pgflow_queue_oldest_visible_age_seconds", queue=q) >= 0
    assert value(samples, "pgflow_queue_health", queue=q) == 0
    # a flow's queue is a queue; its run and task are counted by flow and status
    assert value(samples, "pgflow_queue_depth", queue=flow) == 1
    assert value(samples, "pgflow_flow_runs", flow=flow, status="started") == 1
    assert value(samples, "pgflow_flow_tasks", flow=flow, status="queued") == 1
    for name in ["pgflow_queue_depth", "pgflow_queue_messages", "pgflow_queue_health", "pgflow_flow_runs",
                 "pgflow_flow_tasks", "pgflow_queue_oldest_visible_age_seconds"]:
        assert families[name].type == "gauge" and families[name].documentation


def test_oldest_visible_age_grows_while_nothing_reads(conn, queue):
    conn.execute("SELECT pgflow.send(%s, '{}')", (queue,))
    time.sleep(0.3)
    age = conn.execute("SELECT oldest_visible_age_sec FROM pgflow.get_queue_stats(%s)", (queue,)).fetchone()[0]
    assert age >= 0.3
    conn.execute("SELECT * FROM pgflow.read(%s, 30, 1)", (queue,))
    assert conn.execute("SELECT oldest_visible_age_sec FROM pgflow.get_queue_stats(%s)",
                        (queue,)).fetchone()[0] == 0


def test_health_follows_the_thresholds(conn, make_queue):
    q = make_queue(max_retries=0)
    assert health(conn, q) == ("ok", None, 0, 0, 0)
    dead_letter_one(conn, q)
    assert health(conn, q)[0] == "ok"                                # no threshold set
    conn.execute("SELECT pgflow.alter_queue(%s, alert_dlq_depth => 1)", (q,))
    status, reason, depth, alert, _ = health(conn, q)
    assert (status, depth, alert) == ("warning", 1, 1) and "1 dead-lettered" in reason
    dead_letter_one(conn, q)
    assert health(conn, q)[0] == "critical"                          # twice the threshold
    _, _, samples = scrape(conn)
    assert value(samples, "pgflow_queue_health", queue=q) == 2
    assert value(samples, "pgflow_queue_dlq_messages", queue=q) == 2
    # the age alert: a message waiting longer than the threshold
    conn.execute("SELECT pgflow.alter_queue(%s, alert_dlq_depth => 0, alert_oldest_age => 1)", (q,))
    assert health(conn, q)[0] == "ok"
    conn.execute("SELECT pgflow.send(%s, '{}')", (q,))
    time.sleep(1.1)
    status, reason, *_ = health(conn, q)
    assert status == "warning" and "oldest visible message waiting" in reason
    # other options are kept by a call that sets only alerts
    assert conn.execute("SELECT max_retries FROM pgflow.queues WHERE queue_name = %s", (q,)).fetchone()[0] == 0


@pytest.mark.parametrize("args, state, needle", [
    ("alert_dlq_depth => -1", "22023", "alert_dlq_depth"),
    ("alert_dlq_depth => 2000000000", "22023", "alert_dlq_depth"),
    ("alert_oldest_age => -5", "22023", "alert_oldest_age"),
    ("alert_oldest_age => 31536001", "22023", "alert_oldest_age"),
])
def test_bad_alert_thresholds_are_refused_and_change_nothing(conn, queue, args, state, needle):
    before = conn.execute("SELECT alert_dlq_depth, alert_oldest_age FROM pgflow.queues WHERE queue_name = %s",
                          (queue,)).fetchone()
    sql = f"SELECT pgflow.alter_queue(%s, {args})"
    assert sqlstate(conn, sql, (queue,)) == state
    assert needle in str(error_of(conn, sql, (queue,)))
    assert conn.execute("SELECT alert_dlq_depth, alert_oldest_age FROM pgflow.queues WHERE queue_name = %s",
                        (queue,)).fetchone() == before


def test_a_flows_queue_takes_no_alerts_through_alter_queue(conn, flows):
    flow = flows([{"slug": "a"}])
    assert sqlstate(conn, "SELECT pgflow.alter_queue(%s, alert_dlq_depth => 1)", (flow,)) == "55000"


def test_every_role_may_read_health_and_metrics(conn, queue):
    for role in ["pgflow_producer", "pgflow_consumer", "pgflow_admin"]:
        with session_as(conn, role) as s:
            assert s.execute("SELECT count(*) FROM pgflow.queue_health WHERE queue_name = %s",
                             (queue,)).fetchone()[0] == 1
            assert f'queue="{queue}"' in s.execute("SELECT pgflow.metrics()").fetchone()[0]
            if role != "pgflow_admin":
                assert sqlstate(s, "SELECT pgflow.alter_queue(%s, alert_dlq_depth => 1)", (queue,)) == "42501"
