"""The two-service exchange of examples/exchange.py, end to end: two instances and one central
service, each a pool of worker threads with their own connections; topics route the central
service's messages, groups keep each instance's proposals in order, queue_health raises alerts.

Queue names are fixed by the exchange, so this module starts by dropping and recreating them.
"""

import os
import sys
import threading
import time

import psycopg
import pytest

from conftest import DSN, connect

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import exchange  # noqa: E402
from exchange import Central, Instance, inbox  # noqa: E402

IDS = ["singularity_1", "singularity_2"]


def all_queues():
    return exchange.TO_CENTRAL + [inbox(i) for i in IDS]


def reset(conn):
    for name in all_queues():
        conn.execute("SELECT pgflow.drop_queue(%s)", (name,))
        conn.execute("SELECT pgflow.purge_dlq(%s)", (name,))
    exchange.setup(conn, IDS)


@pytest.fixture(scope="module")
def admin():
    c = connect()
    reset(c)
    yield c
    for name in all_queues():
        c.execute("SELECT pgflow.drop_queue(%s)", (name,))
        c.execute("SELECT pgflow.purge_dlq(%s)", (name,))
    c.close()


@pytest.fixture
def services(admin):
    """Start/stop helpers; everything started is stopped at the end, and the queues are left
    empty for the next test."""
    started = []

    def start(svc):
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        svc.stopping.set()  # all at once: each worker may be blocked up to 1 s in read_with_poll
    for svc in started:
        svc.stop()
    for svc in started:
        assert not svc.errors, svc.errors
    for name in all_queues():
        admin.execute("SELECT pgflow.purge_queue(%s)", (name,))


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def depth(conn, q):
    return conn.execute("SELECT depth FROM pgflow.get_queue_stats(%s)", (q,)).fetchone()[0]


def test_queues_have_the_exchange_options(admin):
    rows = {r[0]: r[1:] for r in admin.execute(
        "SELECT queue_name, max_retries, retry_delay_ms FROM pgflow.list_queues()").fetchall()}
    assert len(all_queues()) == 5                 # nine with a queue per message kind and instance
    for name in all_queues():
        assert rows[name] == (3, 1000), name
        assert len(name.encode()) <= 48
    bindings = admin.execute("SELECT pattern, queue_name FROM pgflow.list_topic_bindings() "
                             "WHERE queue_name = ANY(%s) ORDER BY 2, 1", (all_queues(),)).fetchall()
    assert bindings == [(p, inbox(i)) for i in IDS for p in ("*.all", f"*.{i}")]


def test_hundred_concurrent_proposals_each_get_one_result_at_the_right_instance(admin, services):
    instances = {i: services(Instance(DSN, i, workers=3)) for i in IDS}
    services(Central(DSN, workers=3))
    sent = {i: [] for i in IDS}
    lock = threading.Lock()

    def propose(instance_id, n):
        with connect() as c:
            for k in range(n):
                pid = instances[instance_id].propose(c, {"file": f"f{k}.py", "diff": "-a\n+b"})
                with lock:
                    sent[instance_id].append(pid)
            instances[instance_id].send_metrics(c, {"cpu": 0.5})
            instances[instance_id].send_pattern(c, {"name": "retry-loop", "count": n})

    # 100 proposals from 4 producer threads, two per instance
    producers = [threading.Thread(target=propose, args=(i, 25)) for i in IDS for _ in range(2)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    wait_until(lambda: all(len(instances[i].results()) >= 50 for i in IDS), 30, "100 results")
    time.sleep(0.3)  # nothing more may arrive
    for i in IDS:
        results = instances[i].results()
        ids = [r["proposal_id"] for r in results]
        assert sorted(ids) == sorted(sent[i])  # exactly one result per proposal, only our own
        assert all(r["instance_id"] == i and r["type"] == "consensus_result" for r in results)
        assert all(r["status"] == "approved" and r["confidence"] == 0.95 for r in results)
    assert depth(admin, "proposals_for_consensus_queue") == 0
    assert admin.execute("SELECT count(*) FROM pgflow.dlq WHERE queue_name = ANY(%s)",
                         (all_queues(),)).fetchone()[0] == 0


def test_rollback_trigger_overtakes_a_backlog(admin, services):
    i = "singularity_1"
    central = services(Central(DSN, workers=2))
    inst = Instance(DSN, i, workers=3)  # not started: its results pile up
    with connect() as c:
        pids = [inst.propose(c, {"n": k}) for k in range(30)]
    wait_until(lambda: depth(admin, inbox(i)) == 30, 20, "a backlog of 30 results")
    central.stop()
    assert exchange.send_rollback(admin, i, pids[0], "error rate above threshold") == 1
    t_start = admin.execute("SELECT clock_timestamp()").fetchone()[0]
    services(inst)
    wait_until(lambda: len(inst.received) == 31, 20, "backlog and rollback consumed")
    # Server-side lease times (archive keeps vt = lease time + 30 s).
    rows = admin.execute(
        """SELECT a.message ->> 'type', a.vt - interval '30 seconds' AS leased_at
             FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id)
            WHERE q.queue_name = %s AND a.archived_at >= %s""", (inbox(i), t_start)).fetchall()
    rollback_at = [t for kind, t in rows if kind == "rollback_trigger"]
    results_at = [t for kind, t in rows if kind == "consensus_result"]
    assert len(rollback_at) == 1 and len(results_at) == 30
    # The rollback has the higher priority; results are one group, leased one at a time, so at
    # most the one a worker had already taken is leased before it.
    assert sum(1 for t in results_at if t < rollback_at[0]) <= 1
    # and the instance applied its results in the order it proposed
    assert [r["proposal_id"] for r in inst.results()] == pids


def test_one_publish_reaches_every_instance(admin, services):
    instances = {i: services(Instance(DSN, i, workers=1)) for i in IDS}
    assert exchange.send_safety_profile(admin, "all", {"max_risk": 5}) == 2
    assert exchange.send_safety_profile(admin, "singularity_2", {"max_risk": 3}) == 1
    wait_until(lambda: len(instances["singularity_2"].received) == 2 and len(instances["singularity_1"].received) == 1,
               15, "the profiles")
    assert [m["profile"] for _, m in instances["singularity_1"].received] == [{"max_risk": 5}]
    assert sorted(m["profile"]["max_risk"] for _, m in instances["singularity_2"].received) == [3, 5]


def test_each_instances_proposals_are_voted_on_in_order(admin, services):
    central = Central(DSN, workers=3)
    instances = {i: Instance(DSN, i, workers=1) for i in IDS}
    with connect() as c:
        sent = {i: [instances[i].propose(c, {"k": k}) for k in range(15)] for i in IDS}
    services(central)
    wait_until(lambda: len(central.voted) == 30, 20, "30 votes")
    for i in IDS:
        assert [p for inst, p in central.voted if inst == i] == sent[i]


def test_handler_failing_three_times_then_succeeding_completes(admin, services):
    admin.execute("SELECT pgflow.alter_queue('proposals_for_consensus_queue', retry_delay_ms => 50)")
    try:
        attempts = []

        def flaky(proposal, attempt):
            attempts.append(attempt)
            if attempt <= 3:
                raise RuntimeError(f"vote service unavailable (attempt {attempt})")

        inst = services(Instance(DSN, "singularity_2", workers=2))
        services(Central(DSN, workers=2, proposal_hook=flaky))
        with connect() as c:
            pid = inst.propose(c, {"file": "x.py"})
        wait_until(lambda: len(inst.results()) == 1, 15, "the result")
        assert inst.results()[0]["proposal_id"] == pid
        assert attempts == [1, 2, 3, 4]
        # archived at its fourth delivery
        assert admin.execute(
            """SELECT a.read_ct FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id)
                WHERE q.queue_name = 'proposals_for_consensus_queue' AND a.message->>'proposal_id' = %s""",
            (pid,)).fetchone()[0] == 4
    finally:
        admin.execute("SELECT pgflow.alter_queue('proposals_for_consensus_queue', retry_delay_ms => 1000)")


def test_poison_message_goes_to_dlq_and_is_redriven(admin, services):
    admin.execute("SELECT pgflow.alter_queue('proposals_for_consensus_queue', retry_delay_ms => 50)")
    try:
        healthy = threading.Event()

        def broken(proposal, attempt):
            if not healthy.is_set():
                raise RuntimeError(f"cannot parse code_change (attempt {attempt})")

        inst = services(Instance(DSN, "singularity_1", workers=2))
        services(Central(DSN, workers=2, proposal_hook=broken))
        with connect() as c:
            pid = inst.propose(c, {"file": "poison.py"})

        def dead():
            return admin.execute(
                """SELECT dlq_id, attempts, errors FROM pgflow.list_dlq_messages('proposals_for_consensus_queue')
                    WHERE message->>'proposal_id' = %s""", (pid,)).fetchone()

        wait_until(lambda: dead() is not None, 15, "the dead-lettered proposal")
        status, reason = admin.execute("SELECT status, reason FROM pgflow.queue_health "
                                       "WHERE queue_name = 'proposals_for_consensus_queue'").fetchone()
        assert status == "warning" and "1 dead-lettered" in reason
        assert 'pgflow_queue_health{queue="proposals_for_consensus_queue"} 1' in \
            admin.execute("SELECT pgflow.metrics()").fetchone()[0]
        dlq_id, attempts, errors = dead()
        assert attempts == 4
        assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
        assert all("cannot parse code_change" in e["error"] for e in errors)
        assert inst.results() == []
        healthy.set()
        new_id = admin.execute("SELECT pgflow.retry_dlq_message(%s)", (dlq_id,)).fetchone()[0]
        assert new_id is not None
        wait_until(lambda: len(inst.results()) == 1, 15, "the result after redrive")
        assert inst.results()[0]["proposal_id"] == pid
        assert dead() is None
        assert admin.execute("SELECT status FROM pgflow.queue_health "
                             "WHERE queue_name = 'proposals_for_consensus_queue'").fetchone()[0] == "ok"
    finally:
        admin.execute("SELECT pgflow.alter_queue('proposals_for_consensus_queue', retry_delay_ms => 1000)")


def test_consumer_dying_with_a_lease_loses_nothing(admin, services):
    inst = services(Instance(DSN, "singularity_2", workers=2))
    with connect() as c:
        pid = inst.propose(c, {"file": "crash.py"})
    doomed = connect()
    row = doomed.execute("SELECT msg_id, read_ct FROM pgflow.read('proposals_for_consensus_queue', 2, 1)").fetchone()
    assert row is not None
    doomed.close()  # dies without ack or nack
    services(Central(DSN, workers=2))
    wait_until(lambda: len(inst.results()) == 1, 15, "the result after the lease expired")
    assert inst.results()[0]["proposal_id"] == pid
    assert admin.execute(
        """SELECT a.read_ct FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id)
            WHERE q.queue_name = 'proposals_for_consensus_queue' AND a.msg_id = %s""", (row[0],)).fetchone()[0] == 2


def test_central_down_messages_wait_then_all_consumed(admin, services):
    instances = {i: services(Instance(DSN, i, workers=2)) for i in IDS}
    sent = {i: [] for i in IDS}
    with connect() as c:
        for k in range(20):
            for i in IDS:
                sent[i].append(instances[i].propose(c, {"k": k}))
    time.sleep(0.5)
    assert depth(admin, "proposals_for_consensus_queue") == 40  # waiting, nothing lost
    assert all(inst.results() == [] for inst in instances.values())
    services(Central(DSN, workers=3))
    wait_until(lambda: all(len(instances[i].results()) == 20 for i in IDS), 20, "all 40 results")
    for i in IDS:
        assert sorted(r["proposal_id"] for r in instances[i].results()) == sorted(sent[i])
    assert depth(admin, "proposals_for_consensus_queue") == 0


def test_misrouted_message_is_refused_and_dead_lettered(admin, services):
    q = inbox("singularity_1")
    admin.execute("SELECT pgflow.alter_queue(%s, retry_delay_ms => 0)", (q,))
    try:
        inst = services(Instance(DSN, "singularity_1", workers=1))
        admin.execute("SELECT pgflow.send(%s, %s)", (q, psycopg.types.json.Jsonb(
            {"type": "consensus_result", "instance_id": "singularity_2"})))
        wait_until(lambda: admin.execute(
            "SELECT count(*) FROM pgflow.dlq WHERE queue_name = %s", (q,)).fetchone()[0] == 1, 15, "dead-lettered")
        assert inst.results() == []
        assert admin.execute("SELECT status FROM pgflow.queue_health WHERE queue_name = %s", (q,)).fetchone()[0] \
            == "warning"
    finally:
        admin.execute("SELECT pgflow.alter_queue(%s, retry_delay_ms => 1000)", (q,))
