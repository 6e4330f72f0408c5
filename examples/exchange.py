#!/usr/bin/env python3
"""Two services exchanging messages through pgflow queues, topics and message groups.

Instances (here `singularity_1`, `singularity_2`) send proposals, metrics and patterns to a
central service; the central service answers each proposal with a consensus result, and sends
rollback triggers (high priority) and safety profiles to one instance or to all of them.

    instance -> central   proposals_for_consensus_queue (grouped by instance),
                          metrics_to_guardian_queue, patterns_for_aggregator_queue
    central -> instance   one inbox queue per instance, `inbox__<instance_id>`, reached through
                          topics: routing keys `<kind>.<instance_id>` or `<kind>.all`

Design decisions, each one a consequence of how a queue works:

* **Routing back to the right instance: topics.** A consumer leases whatever is first in a
  queue; a queue cannot be read "only for me". So each instance reads its own inbox, bound to
  the patterns `*.<instance_id>` and `*.all`. The central service publishes a result to
  `result.<instance_id>`, a rollback to `rollback.<instance_id>` and a safety profile to
  `safety.all`: one publish, one copy in every inbox it concerns, all in one transaction.
  Two instances need five queues (three to the central service, one inbox each) instead of
  nine, and no sender loops over instances. Messages still carry `instance_id`; an instance
  refuses a message addressed to another one (a routing bug: it goes to the DLQ, where an
  operator sees it).
* **Order per instance: message groups.** Proposals are sent with `group_id` = the instance,
  so the central service's workers take one instance's proposals in the order sent, one at a
  time, while proposals of other instances go on in parallel. Results in an inbox are grouped
  too (`results`), so an instance applies them in order.
* **Exactly one result per proposal.** The central service publishes the result and archives
  the proposal in one transaction, passing the proposal's read_ct: if its lease expired and
  another worker took the proposal, the archive returns false and the transaction is rolled
  back, so no second result is ever committed.
* **Failures.** A handler that raises nacks the message with the error text; the queue retries it
  with exponential backoff (`retry_delay_ms` * 2^(attempt-1)); after `max_retries` + 1 = 4
  deliveries it is dead-lettered with the error of every attempt. A worker that dies holding a
  lease loses nothing: the lease expires and the message is delivered again.
* **Priority.** Rollback triggers are published with priority 10 and no group: in an inbox they
  come before any backlog of results.
* **Alerts.** Every queue alerts at one dead-lettered message (`alter_queue(...,
  alert_dlq_depth => 1)`): `SELECT * FROM pgflow.queue_health` names the queue and why, and
  `pgflow.metrics()` exports the same for Prometheus.
* **Waiting.** An idle worker blocks in `read_with_poll` on its main queue, which returns as
  soon as a send to it commits (pgflow preloaded) and otherwise polls.

Run against a database holding the extension:

    python3 examples/exchange.py "host=127.0.0.1 port=5499 user=postgres dbname=pgflow_demo"

The test suite (tests/client/test_exchange.py) drives the same classes.
"""

import datetime
import json
import sys
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

TO_CENTRAL = ["proposals_for_consensus_queue", "metrics_to_guardian_queue", "patterns_for_aggregator_queue"]
MAX_RETRIES = 3
RETRY_DELAY_MS = 1000
ROLLBACK_PRIORITY = 10


def inbox(instance_id):
    """The queue an instance reads everything the central service sends it from."""
    return f"inbox__{instance_id}"


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def setup(conn, instance_ids, retry_delay_ms=RETRY_DELAY_MS):
    """Create every queue of the exchange and the inboxes' topic bindings (idempotent); returns
    the queue names."""
    names = list(TO_CENTRAL) + [inbox(i) for i in instance_ids]
    for name in names:
        conn.execute(
            "SELECT pgflow.create_queue(%s, max_retries => %s, retry_delay_ms => %s)",
            (name, MAX_RETRIES, retry_delay_ms),
        )
        conn.execute("SELECT pgflow.alter_queue(%s, alert_dlq_depth => 1)", (name,))
    for i in instance_ids:
        for pattern in (f"*.{i}", "*.all"):
            conn.execute("SELECT pgflow.bind_topic(%s, %s)", (pattern, inbox(i)))
    return names


class LeaseLost(Exception):
    """The message was delivered to someone else meanwhile: our work is rolled back."""


def consume_one(conn, queue, handler, vt=30):
    """Lease one message of queue and handle it. The handler's writes and the archive of the
    message commit together; if the handler raises, the message is nacked with the error.
    Returns True if a message was leased."""
    row = conn.execute(
        "SELECT msg_id, read_ct, message, headers FROM pgflow.read(%s, %s, 1)", (queue, vt)
    ).fetchone()
    if row is None:
        return False
    handle(conn, queue, row, handler)
    return True


def handle(conn, queue, row, handler):
    msg_id, read_ct, message, headers = row
    try:
        with conn.transaction():
            handler(conn, message, headers or {}, read_ct)
            if not conn.execute("SELECT pgflow.archive(%s, %s, %s)", (queue, msg_id, read_ct)).fetchone()[0]:
                raise LeaseLost()
    except LeaseLost:
        pass
    except Exception as e:  # the handler failed: report the attempt
        conn.execute("SELECT pgflow.nack(%s, %s, %s, %s)", (queue, msg_id, f"{type(e).__name__}: {e}", read_ct))


class Service:
    """A pool of worker threads, each with its own connection, until stop()."""

    def __init__(self, dsn, workers):
        self.dsn = dsn
        self.n_workers = workers
        self.threads = []
        self.stopping = threading.Event()
        self.errors = []

    def start(self):
        self.stopping.clear()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.n_workers)]
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(10)
        self.threads = []

    def _run(self):
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stopping.is_set():
                    if not self.step(conn):
                        self.wait(conn)
        except Exception as e:  # surfaced by the caller
            self.errors.append(e)

    def step(self, conn):
        """Handle what is there, in priority order; False when there was nothing."""
        for queue, handler in self.routes():
            if consume_one(conn, queue, handler):
                return True
        return False

    def wait(self, conn):
        """Block on the main queue until a send commits (or 1 s), then handle what came."""
        queue, handler = self.routes()[self.main_route]
        row = conn.execute(
            "SELECT msg_id, read_ct, message, headers FROM pgflow.read_with_poll(%s, 30, 1, 1, 100)", (queue,)
        ).fetchone()
        if row is not None:
            handle(conn, queue, row, handler)


class Central(Service):
    """Receives proposals, metrics and patterns; answers proposals with consensus results."""

    main_route = 0

    def __init__(self, dsn, workers=3, proposal_hook=None):
        super().__init__(dsn, workers)
        self.proposal_hook = proposal_hook  # called (proposal, attempt) before voting; may raise
        self.lock = threading.Lock()
        self.metrics = []
        self.patterns = []
        self.voted = []  # (instance_id, proposal_id), in the order voted on

    def routes(self):
        return [
            ("proposals_for_consensus_queue", self.on_proposal),
            ("metrics_to_guardian_queue", self.on_metrics),
            ("patterns_for_aggregator_queue", self.on_pattern),
        ]

    def on_proposal(self, conn, proposal, headers, attempt):
        if self.proposal_hook:
            self.proposal_hook(proposal, attempt)
        with self.lock:
            self.voted.append((proposal["instance_id"], proposal["proposal_id"]))
        votes = {"safety_agent": "approve", "performance_agent": "approve",
                 "architecture_agent": "approve" if proposal["risk_score"] < 5 else "reject"}
        approvals = sum(v == "approve" for v in votes.values())
        result = {
            "type": "consensus_result",
            "proposal_id": proposal["proposal_id"],
            "instance_id": proposal["instance_id"],
            "status": "approved" if approvals == len(votes) else "rejected",
            "votes": votes,
            "confidence": 0.95 if approvals == len(votes) else 0.6,
            "timestamp": now(),
        }
        publish(conn, f"result.{proposal['instance_id']}", result, group="results")

    def on_metrics(self, conn, metrics, headers, attempt):
        with self.lock:
            self.metrics.append(metrics)

    def on_pattern(self, conn, pattern, headers, attempt):
        with self.lock:
            self.patterns.append(pattern)


def publish(conn, routing_key, message, priority=0, group=None):
    """Publish to the inboxes bound to routing_key; returns how many got a copy."""
    return len(conn.execute(
        "SELECT msg_id FROM pgflow.publish(%s, %s, 0, %s, %s, group_id => %s)",
        (routing_key, Jsonb(message), priority, Jsonb({"instance_id": message["instance_id"]}), group),
    ).fetchall())


def send_rollback(conn, instance_id, proposal_id, reason):
    """A rollback trigger to one instance (instance_id) or to every instance ("all")."""
    return publish(conn, f"rollback.{instance_id}", {
        "type": "rollback_trigger", "proposal_id": proposal_id, "instance_id": instance_id,
        "reason": reason, "timestamp": now()}, priority=ROLLBACK_PRIORITY)


def send_safety_profile(conn, instance_id, profile):
    """A safety profile to one instance, or to every instance ("all"): one publish."""
    return publish(conn, f"safety.{instance_id}", {
        "type": "guardian_safety_profile", "instance_id": instance_id, "profile": profile, "timestamp": now()})


class Instance(Service):
    """Sends proposals; receives its own results, rollback triggers and safety profiles in its
    inbox."""

    main_route = 0

    def __init__(self, dsn, instance_id, workers=3):
        super().__init__(dsn, workers)
        self.instance_id = instance_id
        self.lock = threading.Lock()
        self.received = []  # (kind, message), in the order handled

    def routes(self):
        return [(inbox(self.instance_id), self.on_message)]

    def on_message(self, conn, message, headers, attempt):
        addressed = message.get("instance_id")
        if addressed not in (self.instance_id, "all") or headers.get("instance_id") != addressed:
            raise ValueError(f"message for {addressed!r} delivered to {self.instance_id!r}")
        with self.lock:
            self.received.append((message["type"], message))

    def results(self):
        with self.lock:
            return [m for kind, m in self.received if kind == "consensus_result"]

    def propose(self, conn, code_change, impact_score=8.0, risk_score=1.0, agent_type="BugFixerAgent"):
        proposal_id = str(uuid.uuid4())
        # grouped by instance: the central service takes this instance's proposals in order
        conn.execute("SELECT pgflow.send(%s, %s, 0, 0, %s, group_id => %s)", ("proposals_for_consensus_queue", Jsonb({
            "type": "proposal_for_consensus",
            "proposal_id": proposal_id,
            "instance_id": self.instance_id,
            "agent_type": agent_type,
            "code_change": code_change,
            "impact_score": impact_score,
            "risk_score": risk_score,
            "timestamp": now(),
        }), Jsonb({"instance_id": self.instance_id}), self.instance_id))
        return proposal_id

    def send_metrics(self, conn, metrics):
        conn.execute("SELECT pgflow.send(%s, %s)", ("metrics_to_guardian_queue", Jsonb(
            {"type": "metrics", "instance_id": self.instance_id, "metrics": metrics, "timestamp": now()})))

    def send_pattern(self, conn, pattern):
        conn.execute("SELECT pgflow.send(%s, %s)", ("patterns_for_aggregator_queue", Jsonb(
            {"type": "pattern", "instance_id": self.instance_id, "pattern": pattern, "timestamp": now()})))


def main(dsn):
    ids = ["singularity_1", "singularity_2"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgflow")
        setup(conn, ids)
        instances = {i: Instance(dsn, i).start() for i in ids}
        central = Central(dsn).start()
        sent = {i: [instances[i].propose(conn, {"file": f"mod_{n}.py", "patch": "..."}) for n in range(10)]
                for i in ids}
        instances["singularity_1"].send_metrics(conn, {"cpu": 0.42})
        send_rollback(conn, "singularity_2", sent["singularity_2"][0], "error rate above threshold")
        print("safety profile published to", send_safety_profile(conn, "all", {"max_risk": 5}), "inboxes")
        deadline = time.time() + 30
        while time.time() < deadline and any(len(instances[i].results()) < 10 for i in ids):
            time.sleep(0.1)
        central.stop()
        for inst in instances.values():
            inst.stop()
        for i in ids:
            results = instances[i].results()
            kinds = [k for k, _ in instances[i].received]
            print(f"{i}: {len(results)} consensus results, {kinds.count('rollback_trigger')} rollback trigger(s), "
                  f"{kinds.count('guardian_safety_profile')} safety profile(s)")
            print("  e.g.", json.dumps(results[0]) if results else "-")
        print("central: metrics received:", len(central.metrics))
        for row in conn.execute("SELECT queue_name, status, reason FROM pgflow.queue_health "
                                "WHERE queue_name = ANY(%s)", (setup(conn, ids),)).fetchall():
            print("health:", *[v for v in row if v is not None])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "host=127.0.0.1 port=5499 user=postgres dbname=pgflow_demo")
