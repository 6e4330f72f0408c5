"""Workflow load for the crash harness: flow runs started and worked on while the server is
killed, then checked and finished after the restart. Used only when the workflow layer
(pgflow.start_flow) exists.

The flow, `crash_flow` (max_attempts 10, no retry delay, task timeout 2 s):

    root (single, outputs [1, 2, 3]) --> fan (map: x -> 10 x) --+
        \\--------------------------> left (single) ------------+--> join (sum of fan's outputs)
         \\-------------------------> gate (signal) ------------+

and a leaf `audit` (deps root) with the condition {"run": {"audit": true}}, skipped in the runs
whose input says otherwise: a finished run's output is {"join": 60}, plus {"audit": "A"} where
the input asked for the audit. `gate` is a signal step: the steering thread signals the
waiting gates as it goes, and every gate still waiting after the restart is signalled. A starter thread starts runs with explicit run
ids, logged once start_flow's COMMIT returned; worker threads claim tasks with
poll_for_tasks, fail 10% of their attempts (retried at once) and complete the rest, logging a
completion once complete_task's COMMIT returned "completed". A steering thread cancels runs
under way (cancel_run) and retries cancelled ones (retry_run) meanwhile; after the restart,
every run left cancelled or failed is retried before the workers finish them all.
"""

import random
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

FLOW = "crash_flow"
TIMEOUT = 2
MAX_ATTEMPTS = 10


def available(cluster):
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'start_flow' "
            "AND pronamespace = 'pgflow'::regnamespace)").fetchone()[0]


def define(cluster):
    with cluster.connect() as conn:
        conn.execute("SELECT pgflow.create_flow(%s, max_attempts => %s, base_delay => 0, timeout => %s)",
                     (FLOW, MAX_ATTEMPTS, TIMEOUT))
        conn.execute("SELECT pgflow.add_step(%s, 'root')", (FLOW,))
        conn.execute("SELECT pgflow.add_step(%s, 'fan', ARRAY['root'], step_type => 'map')", (FLOW,))
        conn.execute("SELECT pgflow.add_step(%s, 'left', ARRAY['root'])", (FLOW,))
        conn.execute("SELECT pgflow.add_step(%s, 'gate', ARRAY['root'], step_type => 'signal')", (FLOW,))
        conn.execute("SELECT pgflow.add_step(%s, 'join', ARRAY['fan', 'left', 'gate'])", (FLOW,))
        conn.execute("""SELECT pgflow.add_step(%s, 'audit', ARRAY['root'], if_input => '{"run": {"audit": true}}')""",
                     (FLOW,))


def output_of(step, task_input):
    if step == "root":
        return [1, 2, 3]
    if step == "fan":
        return task_input * 10
    if step == "left":
        return "L"
    if step == "audit":
        return "A"
    return sum(task_input["fan"])


class Load:
    def __init__(self, cluster, cycle, rng):
        self.cluster = cluster
        self.cycle = cycle
        self.rng = rng
        self.lock = threading.Lock()
        self.started = set()         # run ids whose start_flow committed
        self.uncertain = set()       # run ids whose start_flow got no answer
        self.completed = set()       # (run_id, step, index) whose complete_task committed "completed"
        self.failures = 0
        self.cancels = 0
        self.retries = 0
        self.signals = 0
        self.killed = threading.Event()  # set just before the SIGKILL
        self.errors = []                 # client errors before the kill

    def error(self, who, e):
        if not self.killed.is_set():
            with self.lock:
                self.errors.append(f"{who}: {type(e).__name__}: {e}")

    def threads(self, stop):
        return ([threading.Thread(target=self.starter, args=(stop, random.Random(self.rng.random())))]
                + [threading.Thread(target=self.worker, args=(stop, random.Random(self.rng.random()), 0.1))
                   for _ in range(2)]
                + [threading.Thread(target=self.steerer, args=(stop, random.Random(self.rng.random())))])

    def summary(self):
        with self.lock:
            return (f"{len(self.started)} runs started, {len(self.uncertain)} uncertain, "
                    f"{len(self.completed)} task completions, {self.failures} simulated task failures, "
                    f"{self.cancels} runs cancelled, {self.retries} retried, {self.signals} gates signalled")

    def starter(self, stop, rng):
        try:
            conn = self.cluster.connect()
        except psycopg.Error:
            return
        with conn:
            while not stop.is_set():
                run_id = uuid.UUID(int=rng.getrandbits(128))
                try:
                    conn.execute("SELECT pgflow.start_flow(%s, %s, %s)",
                                 (FLOW, Jsonb({"cycle": self.cycle, "audit": rng.random() < 0.5}), run_id))
                except psycopg.Error as e:
                    self.error("starter", e)
                    with self.lock:
                        self.uncertain.add(run_id)
                    return
                with self.lock:
                    self.started.add(run_id)
                time.sleep(0.02 + rng.random() * 0.03)

    def steerer(self, stop, rng):
        try:
            conn = self.cluster.connect()
        except psycopg.Error:
            return
        with conn:
            while not stop.is_set():
                time.sleep(0.05 + rng.random() * 0.1)
                try:
                    for (run_id,) in conn.execute("SELECT run_id FROM pgflow.waiting_signals WHERE flow_slug = %s "
                                                  "LIMIT 5", (FLOW,)).fetchall():
                        if conn.execute("SELECT pgflow.signal(%s, 'gate', '{\"ok\": true}')",
                                        (run_id,)).fetchone()[0] == "signalled":
                            with self.lock:
                                self.signals += 1
                    # a run under way is cancelled, a cancelled or failed one retried
                    row = conn.execute("SELECT run_id, status FROM pgflow.runs WHERE flow_slug = %s "
                                       "AND status <> 'completed' ORDER BY random() LIMIT 1", (FLOW,)).fetchone()
                    if row is None:
                        continue
                    run_id, status = row
                    if status == "started":
                        outcome = conn.execute("SELECT pgflow.cancel_run(%s, 'steered')", (run_id,)).fetchone()[0]
                        counter = "cancels" if outcome == "cancelled" else None
                    else:
                        outcome = conn.execute("SELECT pgflow.retry_run(%s)", (run_id,)).fetchone()[0]
                        counter = "retries" if outcome == "retried" else None
                except psycopg.Error as e:
                    self.error("steerer", e)
                    return
                if counter:
                    with self.lock:
                        setattr(self, counter, getattr(self, counter) + 1)

    def work_once(self, conn, worker_id, rng, p_fail):
        tasks = conn.execute(
            "SELECT run_id, step_slug, task_index, input FROM pgflow.poll_for_tasks(%s, 30, 5, 0, worker_id => %s)",
            (FLOW, worker_id)).fetchall()
        for run_id, step, index, task_input in tasks:
            if rng.random() < p_fail:
                conn.execute("SELECT pgflow.fail_task(%s, %s, %s, 'simulated failure', %s)",
                             (run_id, step, index, worker_id))
                with self.lock:
                    self.failures += 1
                continue
            outcome = conn.execute("SELECT pgflow.complete_task(%s, %s, %s, %s, %s)",
                                   (run_id, step, index, Jsonb(output_of(step, task_input)), worker_id)).fetchone()[0]
            if outcome == "completed":
                with self.lock:
                    self.completed.add((run_id, step, index))
        return len(tasks)

    def worker(self, stop, rng, p_fail):
        worker_id = uuid.UUID(int=rng.getrandbits(128))
        try:
            conn = self.cluster.connect()
        except psycopg.Error:
            return
        with conn:
            while not stop.is_set():
                try:
                    if self.work_once(conn, worker_id, rng, p_fail) == 0:
                        time.sleep(0.01)
                except psycopg.Error as e:
                    self.error("worker", e)
                    return

    def run_ids(self):
        with self.lock:
            return list(self.started | self.uncertain)

    def check_counters(self, res, label):
        ids = self.run_ids()
        with self.cluster.connect() as conn:
            qid = conn.execute("SELECT queue_id FROM pgflow.queues WHERE queue_name = %s", (FLOW,)).fetchone()[0]
            present = {r[0] for r in conn.execute("SELECT run_id FROM pgflow.runs WHERE run_id = ANY(%s)", (ids,))}
            with self.lock:
                missing_runs = [r for r in self.started if r not in present]
                done = set(self.completed)
            res.check(f"{label}: every run whose start_flow committed exists", not missing_runs,
                      f"{len(missing_runs)} missing, e.g. {missing_runs[:3]}")

            bad_tasks = conn.execute("""
                WITH t AS (
                    SELECT run_id, step_slug, count(*) AS n, count(*) FILTER (WHERE status = 'completed') AS done
                      FROM pgflow.step_tasks WHERE run_id = ANY(%(ids)s) GROUP BY run_id, step_slug)
                SELECT s.run_id, s.step_slug, s.status, s.initial_tasks, s.remaining_tasks,
                       coalesce(t.n, 0), coalesce(t.done, 0)
                  FROM pgflow.step_states s LEFT JOIN t USING (run_id, step_slug)
                  JOIN pgflow.steps st ON st.flow_slug = s.flow_slug AND st.step_slug = s.step_slug
                 WHERE s.run_id = ANY(%(ids)s)
                   AND ((s.status IN ('started', 'completed')
                         AND (s.initial_tasks IS DISTINCT FROM coalesce(t.n, 0)
                              -- a started map step's state is not counted down task by task
                              OR (s.remaining_tasks IS DISTINCT FROM coalesce(t.n, 0) - coalesce(t.done, 0)
                                  AND NOT (st.step_type = 'map' AND s.status = 'started'))))
                        OR (s.status = 'completed' AND s.remaining_tasks <> 0)
                        -- every task completed and the step not: nobody completed it
                        OR (s.status = 'started' AND t.n > 0 AND t.done = t.n)
                        OR (s.status = 'created' AND coalesce(t.n, 0) <> 0))""", {"ids": ids}).fetchall()
            res.check(f"{label}: each step state's task counters equal its task rows", not bad_tasks,
                      f"{len(bad_tasks)} step states, e.g. {bad_tasks[:3]}")

            bad_deps = conn.execute("""
                SELECT s.run_id, s.step_slug, s.status, s.remaining_deps,
                       (SELECT count(*) FROM pgflow.deps d
                          JOIN pgflow.step_states ds ON ds.run_id = s.run_id AND ds.step_slug = d.dep_slug
                         WHERE d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug AND ds.status NOT IN ('completed', 'skipped'))
                  FROM pgflow.step_states s JOIN pgflow.runs r USING (run_id)
                 WHERE s.run_id = ANY(%(ids)s) AND r.status = 'started'
                   AND ((s.status = 'created' AND s.remaining_deps <> (
                            SELECT count(*) FROM pgflow.deps d
                              JOIN pgflow.step_states ds ON ds.run_id = s.run_id AND ds.step_slug = d.dep_slug
                             WHERE d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug AND ds.status NOT IN ('completed', 'skipped')))
                        OR (s.status = 'created' AND s.remaining_deps = 0)
                        OR (s.status <> 'created' AND s.remaining_deps <> 0))""", {"ids": ids}).fetchall()
            res.check(f"{label}: remaining_deps equal the unfinished dependencies, and no ready step is left unstarted",
                      not bad_deps, f"{len(bad_deps)} step states, e.g. {bad_deps[:3]}")

            bad_msgs = conn.execute("""
                SELECT t.run_id, t.step_slug, t.task_index, t.status, r.status,
                       EXISTS (SELECT 1 FROM pgflow.messages m WHERE m.queue_id = %(qid)s AND m.msg_id = t.message_id)
                  FROM pgflow.step_tasks t JOIN pgflow.runs r USING (run_id)
                 WHERE t.run_id = ANY(%(ids)s)
                   AND (r.status = 'started' AND t.status IN ('queued', 'started'))
                       <> EXISTS (SELECT 1 FROM pgflow.messages m WHERE m.queue_id = %(qid)s AND m.msg_id = t.message_id)
                """, {"ids": ids, "qid": qid}).fetchall()
            res.check(f"{label}: a task has a message exactly while it is queued or started in a running run",
                      not bad_msgs, f"{len(bad_msgs)} tasks, e.g. {bad_msgs[:3]}")

            bad_runs = conn.execute("""
                SELECT r.run_id, r.status,
                       (SELECT count(*) FROM pgflow.step_states s WHERE s.run_id = r.run_id AND s.status NOT IN ('completed', 'skipped'))
                  FROM pgflow.runs r
                 WHERE r.run_id = ANY(%(ids)s)
                   AND (r.status = 'completed') <> NOT EXISTS (
                        SELECT 1 FROM pgflow.step_states s WHERE s.run_id = r.run_id AND s.status NOT IN ('completed', 'skipped'))
                """, {"ids": ids}).fetchall()
            res.check(f"{label}: a run is completed exactly when all its steps are (or were skipped)", not bad_runs,
                      f"{len(bad_runs)} runs, e.g. {bad_runs[:3]}")

            not_done = [k for k in done if conn.execute(
                "SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = %s AND task_index = %s",
                k).fetchone()[0] != "completed"]
            res.check(f"{label}: every task whose complete_task committed is completed", not not_done,
                      f"{len(not_done)} tasks, e.g. {not_done[:3]}")

    def finish_and_check(self, res, label, deadline_s=90):
        """Workers come back (no failures this time) and finish every run of the cycle."""
        ids = self.run_ids()
        rng = random.Random(self.rng.random())
        worker_id = uuid.uuid4()
        t_end = time.time() + deadline_s
        with self.cluster.connect() as conn:
            conn.execute("SELECT pgflow.retry_run(run_id) FROM pgflow.runs "
                         "WHERE run_id = ANY(%s) AND status IN ('cancelled', 'failed')", (ids,))
            while time.time() < t_end:
                conn.execute("SELECT pgflow.signal(run_id, step_slug, '{\"ok\": true}') FROM pgflow.waiting_signals "
                             "WHERE run_id = ANY(%s)", (ids,))
                if self.work_once(conn, worker_id, rng, 0.0) == 0:
                    left = conn.execute("SELECT count(*) FROM pgflow.runs WHERE run_id = ANY(%s) AND status = 'started'",
                                        (ids,)).fetchone()[0]
                    if left == 0:
                        break
                    time.sleep(0.2)
            rows = conn.execute("SELECT status, output = CASE WHEN input @> '{\"audit\": true}' "
                                "THEN '{\"join\": 60, \"audit\": \"A\"}'::jsonb ELSE '{\"join\": 60}' END, "
                                "input @> '{\"audit\": true}', count(*) FROM pgflow.runs WHERE run_id = ANY(%s) "
                                "GROUP BY 1, 2, 3", (ids,)).fetchall()
        summary = {(s, ok, audited): n for s, ok, audited, n in rows}
        wrong = {k: n for k, n in summary.items() if k[:2] != ("completed", True)}
        res.check(f"{label}: every run interrupted by the crash finished once workers returned, "
                  f"with output {{'join': 60}} and the audit where asked for ({sum(summary.values())} runs, "
                  f"{sum(n for k, n in summary.items() if k[2])} audited)", not wrong, f"{wrong}")
        self.check_counters(res, f"{label} after finishing")
