-- Workflow layer: runs, tasks and their events.
--
-- The task path (poll_for_tasks, start_tasks, complete_task and what a completed step sets
-- off) is in Rust (src/workflow/); it calls the PL/pgSQL functions here for its rare paths.
--
-- Plans: the public PL/pgSQL functions here (start_flow, fail_task) keep one generic plan per
-- statement per backend (plan_cache_mode = force_generic_plan): otherwise the plan cache keeps
-- choosing custom plans and plans every statement again at every call, which costs more than
-- running it. The plan shape is pinned so it is right at any table size: index scans
-- (enable_seqscan = off) and nested loops (no hash or merge joins). Internal functions (named
-- _...) pin only search_path: they run inside the public ones, whose settings are in effect
-- when their statements are planned. The task path in Rust carries no SET clauses: src/pg/spi.rs
-- pins the search path and the plan shape of its statements, and of the internal functions
-- they call (its rare paths), without a SET scope at every call.
--
-- Lock order, everywhere: the flow lock (pgflow._lock_flow: exclusive for definitions and
-- drop_flow, shared for start_flow, complete_task and fail_task), then the run, then task
-- messages (in msg_id order), then step states
-- (in step_index order), then task rows. Every function that changes a run's step states
-- or ends a task takes the run lock before anything else. The run lock is a transaction-scoped
-- advisory lock keyed by the run id (pgflow._lock_run): it serialises the same work a row lock
-- on pgflow.runs would, but writes no WAL and dirties no page, which matters as it is taken
-- once per task. Claiming (poll_for_tasks, start_tasks) locks only messages and then their
-- task rows, and never waits for a run lock (it only tries, on the rare path that needs one),
-- so no two workers can wait on each other in a cycle. Because a run's step states change only
-- under its run lock, sibling steps completing at once are serialised: a dependent step is
-- started exactly once, and exactly one completion completes the run. The exception is the
-- completion of a map step's task: it takes the run lock shared, so a map's tasks complete at
-- once, and a hand-on (a queued task's message locked FOR KEY SHARE) or the run's finisher lock
-- decides which one completes the step (see complete_task in src/workflow/ and
-- docs/workflows.md, Locks).
--
-- Events go through pgflow._on_commit_notify: one notification per channel per transaction,
-- sent at commit, nothing on rollback.

-- A new run id: a version 7 UUID (48 bits of Unix time in milliseconds, then random bits).
-- Runs started in turn get ascending ids, so the indexes keyed by run_id (runs, step_states,
-- step_tasks) take new entries at their right end instead of all over: far fewer index pages
-- touched per task, hence fewer full-page images in the WAL after each checkpoint.
CREATE FUNCTION pgflow._time_ordered_uuid() RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b bytea := uuid_send(gen_random_uuid());
BEGIN
    b := overlay(b PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                 FROM 1 FOR 6);
    -- version 7 in the high nibble of byte 6 (a version 4 UUID has 0100 there)
    b := set_byte(b, 6, (get_byte(b, 6) & 15) | 112);
    RETURN encode(b, 'hex')::uuid;
END
$$;

-- pgflow._emit(flow_slug, event) announces a workflow event on the flow's channel and on
-- pgflow.flows as pgflow.workflow_events allows; it is in Rust (src/workflow/), the one place
-- that rule lives, shared with the task path.

-- The output of a completed step of a run: a single step's task output, a map step's array, a
-- signal step's payload.
CREATE FUNCTION pgflow._step_output(run_id uuid, step_slug text, step_type text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    o jsonb;
BEGIN
    IF step_type <> 'single' THEN
        SELECT s.output INTO o FROM pgflow.step_states s
         WHERE s.run_id = _step_output.run_id AND s.step_slug = _step_output.step_slug;
    ELSE
        SELECT t.output INTO o FROM pgflow.step_tasks t
         WHERE t.run_id = _step_output.run_id AND t.step_slug = _step_output.step_slug AND t.task_index = 0;
    END IF;
    RETURN o;
END
$$;

-- A run is failing (the caller holds its run lock): its queued and started tasks (with
-- step_slug: those of that step only, which is being skipped) are no longer handed out. Their
-- messages are locked in msg_id order, then deleted.
CREATE FUNCTION pgflow._drop_run_messages(run_id uuid, queue_id bigint, step_slug text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ids bigint[];
BEGIN
    ids := ARRAY(SELECT t.message_id FROM pgflow.step_tasks t
                  WHERE t.run_id = _drop_run_messages.run_id AND t.status IN ('queued', 'started')
                    AND (_drop_run_messages.step_slug IS NULL OR t.step_slug = _drop_run_messages.step_slug)
                  ORDER BY t.message_id);
    IF cardinality(ids) > 0 THEN
        PERFORM 1 FROM pgflow.messages m
         WHERE m.queue_id = _drop_run_messages.queue_id AND m.msg_id = ANY (ids) ORDER BY m.msg_id FOR UPDATE;
        DELETE FROM pgflow.messages m WHERE m.queue_id = _drop_run_messages.queue_id AND m.msg_id = ANY (ids);
    END IF;
END
$$;

-- Mark run r failed because of step failed_step (the caller holds its run lock and has dropped
-- its messages, failed the step state and the task) and announce it.
CREATE FUNCTION pgflow._fail_run(r pgflow.runs, queue_id bigint, failed_step text, error text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE pgflow.runs SET status = 'failed', failed_at = clock_timestamp() WHERE run_id = r.run_id;
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_failed', 'run_id', r.run_id, 'flow_slug', r.flow_slug,
        'failed_step', failed_step));
END
$$;

-- Step st of run r cannot start (the caller holds the run lock): a map over a non-array, or a
-- condition not met with when_unmet fail. Its state becomes failed with err, and the run fails.
CREATE FUNCTION pgflow._fail_step_start(r pgflow.runs, q pgflow.queues, st pgflow.steps, err text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, failed_at, error_message)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'failed', 0, now_, err)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'failed', remaining_deps = 0, failed_at = now_, error_message = err;
    PERFORM pgflow._fail_run(r, q.queue_id, st.step_slug, err);
END
$$;

-- Skip step st of run r (the caller holds the run lock) for `reason` (condition, exhausted,
-- no_input; the event says it), keeping `why` on its state; with cascade, every step after it
-- that has not started is skipped too (reason cascade). A skipped step counts as finished for
-- its dependents, which run without its key in their input, and for its run, which completes
-- when every step has completed or been skipped. Returns false if the run failed meanwhile.
CREATE FUNCTION pgflow._skip_step(r pgflow.runs, q pgflow.queues, st pgflow.steps, cascade boolean,
                                  reason text, why text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    s text;
BEGIN
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, skipped_at, error_message)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'skipped', 0, now_, why)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'skipped', remaining_deps = 0, skipped_at = now_, error_message = why;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_skipped', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug,
        'reason', reason));
    IF cascade THEN
        FOR s IN
            WITH RECURSIVE after_it AS (
                SELECT d.step_slug FROM pgflow.deps d WHERE d.flow_slug = r.flow_slug AND d.dep_slug = st.step_slug
                UNION
                SELECT d.step_slug FROM pgflow.deps d JOIN after_it a ON d.dep_slug = a.step_slug
                 WHERE d.flow_slug = r.flow_slug
            )
            UPDATE pgflow.step_states ss
               SET status = 'skipped', remaining_deps = 0, skipped_at = now_,
                   error_message = format('skipped with step "%s"', st.step_slug)
              FROM after_it
             WHERE ss.run_id = r.run_id AND ss.step_slug = after_it.step_slug AND ss.status = 'created'
            RETURNING ss.step_slug
        LOOP
            PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
                'event', 'step_skipped', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', s,
                'reason', 'cascade'));
        END LOOP;
    END IF;
    RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
END
$$;

-- Signal step st of run r is ready (the caller holds the run lock): it completes at once with
-- the signal that came before, or waits for one (pgflow.signal_waits, until its timeout).
CREATE FUNCTION pgflow._start_signal_step(r pgflow.runs, q pgflow.queues, st pgflow.steps) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    payload jsonb;
BEGIN
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, remaining_tasks,
                                    initial_tasks, created_at, started_at)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'waiting', 0, 0, 0, now_, now_)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'waiting', remaining_deps = 0, remaining_tasks = 0, initial_tasks = 0, started_at = now_,
           failed_at = NULL, error_message = NULL;
    SELECT s.payload INTO payload FROM pgflow.signals s WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
    IF FOUND THEN
        RETURN pgflow._apply_signal(r, q, st, payload);
    END IF;
    INSERT INTO pgflow.signal_waits (run_id, step_slug, flow_slug, waiting_since, deadline)
    VALUES (r.run_id, st.step_slug, r.flow_slug, now_,
            now_ + make_interval(secs => st.opt_timeout))
    ON CONFLICT (run_id, step_slug) DO UPDATE SET waiting_since = excluded.waiting_since, deadline = excluded.deadline;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_waiting', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug));
    RETURN true;
END
$$;

-- The waiting signal step st of run r completes with the signal's payload (the caller holds the
-- run lock), and the steps after it go on. Returns false if the run failed meanwhile.
CREATE FUNCTION pgflow._apply_signal(r pgflow.runs, q pgflow.queues, st pgflow.steps, payload jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    UPDATE pgflow.step_states ss SET status = 'completed', output = payload, completed_at = now_
     WHERE ss.run_id = r.run_id AND ss.step_slug = st.step_slug;
    UPDATE pgflow.signals s SET applied_at = now_ WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id AND w.step_slug = st.step_slug;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_signalled', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug));
    RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
END
$$;

-- The array map step st of run r maps over: the run input for a root map step, or the output
-- of its one dependency, dep (NULL when that step was skipped).
CREATE FUNCTION pgflow._map_array(r pgflow.runs, st pgflow.steps, OUT dep text, OUT arr jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    dep_type text;
BEGIN
    IF st.deps_count = 0 THEN
        arr := r.input;
        RETURN;
    END IF;
    SELECT d.dep_slug, s.step_type INTO dep, dep_type
      FROM pgflow.deps d JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.dep_slug
     WHERE d.flow_slug = st.flow_slug AND d.step_slug = st.step_slug;
    arr := pgflow._step_output(r.run_id, dep, dep_type);
END
$$;

-- Start step st of run r (all its deps completed; the caller holds the run lock): set its state
-- to started and queue its tasks, one for a single step, one per array element for a map step.
-- A task's message has the priority of its step's step_index: tasks of later steps are served
-- before those of earlier ones, so runs under way finish before new runs start (fewer runs in
-- flight, shorter run latency, and a small set of pages touched per task).
-- A map over an empty array completes at once with []; over a non-array it fails the run; over
-- the output of a skipped step it is skipped. A step with a condition is tested first, on the
-- input its task would get (pgflow._step_input): unmet, it is skipped (when_unmet skip or
-- skip_cascade) or fails the run (fail). Returns false if the run failed.
CREATE FUNCTION pgflow._start_step(r pgflow.runs, q pgflow.queues, st pgflow.steps) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    visible_at timestamptz := now_ + make_interval(secs => coalesce(st.opt_start_delay, 0));
    arr jsonb;
    n integer;
    dep text;
    inp jsonb;
BEGIN
    IF st.if_input IS NOT NULL OR st.if_not_input IS NOT NULL THEN
        inp := pgflow._step_input(r.run_id, r.flow_slug, st.step_slug);
        IF NOT (coalesce(inp @> st.if_input, true) AND NOT coalesce(inp @> st.if_not_input, false)) THEN
            IF st.when_unmet = 'fail' THEN
                PERFORM pgflow._fail_step_start(r, q, st, format('the condition of step "%s" is not met', st.step_slug));
                RETURN false;
            END IF;
            RETURN pgflow._skip_step(r, q, st, st.when_unmet = 'skip_cascade', 'condition', 'its condition is not met');
        END IF;
    END IF;
    IF st.step_type = 'signal' THEN
        RETURN pgflow._start_signal_step(r, q, st);
    END IF;
    IF st.step_type = 'single' THEN
        PERFORM pgflow._start_single_step(r.run_id, r.flow_slug, q.queue_id, q.msg_seq, st.step_slug,
                                          st.step_index, coalesce(st.opt_start_delay, 0), st.deps_count = 0);
        RETURN true;
    END IF;

    -- A map step: the array it maps over, the run input or its one dependency's output.
    SELECT m.dep, m.arr INTO dep, arr FROM pgflow._map_array(r, st) m;
    IF arr IS NULL AND dep IS NOT NULL
       AND EXISTS (SELECT 1 FROM pgflow.step_states ss
                    WHERE ss.run_id = r.run_id AND ss.step_slug = dep AND ss.status = 'skipped') THEN
        RETURN pgflow._skip_step(r, q, st, false, 'no_input',
                                 format('step "%s", whose output it maps over, was skipped', dep));
    END IF;
    IF jsonb_typeof(arr) IS DISTINCT FROM 'array' THEN
        PERFORM pgflow._fail_step_start(r, q, st, format(
            'map step "%s" needs an array to map over, but %s is a JSON %s',
            st.step_slug, CASE WHEN dep IS NULL THEN 'the run input' ELSE format('the output of step "%s"', dep) END,
            coalesce(jsonb_typeof(arr), 'null')));
        RETURN false;
    END IF;
    n := jsonb_array_length(arr);

    -- A root step's state is created here, a dependent's (created by start_flow) updated: one
    -- write either way (no INSERT ... ON CONFLICT, which would lock the row before updating it).
    IF st.deps_count = 0 THEN
        INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, remaining_tasks,
                                        initial_tasks, created_at, started_at, completed_at, output)
        VALUES (r.flow_slug, r.run_id, st.step_slug, CASE WHEN n = 0 THEN 'completed' ELSE 'started' END, 0, n, n,
                now_, now_, CASE WHEN n = 0 THEN now_ END, CASE WHEN n = 0 THEN '[]'::jsonb END);
    ELSE
        UPDATE pgflow.step_states
           SET status = CASE WHEN n = 0 THEN 'completed' ELSE 'started' END, remaining_deps = 0,
               remaining_tasks = n, initial_tasks = n, started_at = now_,
               completed_at = CASE WHEN n = 0 THEN now_ END, output = CASE WHEN n = 0 THEN '[]'::jsonb END
         WHERE run_id = r.run_id AND step_slug = st.step_slug;
    END IF;

    IF n = 0 THEN
        RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
    END IF;

    -- One message and one task per element, in element order, in two set-based statements
    -- (no batch limit applies: this is not pgflow.send_batch).
    WITH m AS (
        INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
        SELECT q.queue_id, nextval(q.msg_seq), visible_at, st.step_index,
               jsonb_build_object('run_id', r.run_id, 'step_slug', st.step_slug, 'task_index', e.i - 1,
                                  'input', e.v)
          FROM jsonb_array_elements(arr) WITH ORDINALITY AS e(v, i)
         ORDER BY e.i
        RETURNING msg_id, (message ->> 'task_index')::integer AS task_index
    )
    INSERT INTO pgflow.step_tasks (flow_slug, run_id, step_slug, task_index, message_id, queued_at)
    SELECT r.flow_slug, r.run_id, st.step_slug, m.task_index, m.msg_id, now_ FROM m;
    IF visible_at > now_ THEN
        PERFORM pgflow._due_at(q.queue_id, visible_at);
    END IF;
    RETURN true;
END
$$;

-- Start single step step_slug of run run_id (a root step: root = true): its state, message and
-- task, the task visible after start_delay seconds. In Rust (src/workflow/ SingleStep), where
-- a completing task starts its dependents directly; declared for _start_step above.
CREATE FUNCTION pgflow._start_single_step(run_id uuid, flow_slug text, queue_id bigint, msg_seq regclass,
                                          step_slug text, step_index integer, start_delay integer,
                                          root boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_start_single_step';

-- Step step_slug of run run_id has just completed or been skipped (its state says so; the caller
-- holds the run lock): start the dependents whose deps are now all finished, in step_index
-- order, and complete the run when no step is left. Returns false if the run failed meanwhile
-- (a map over a non-array, a condition with when_unmet fail). In Rust (src/workflow/), where complete_task calls it
-- directly; declared for _start_step above.
CREATE FUNCTION pgflow._step_completed(run_id uuid, queue_id bigint, step_slug text) RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_step_completed';

---------------------------------------------------------------------------------------------
-- Starting runs
---------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.start_flow(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS pgflow.runs
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    q pgflow.queues;
    r pgflow.runs;
    st pgflow.steps;
BEGIN
    -- shared: a drop_flow under way finishes first, and then the flow is gone (42704)
    PERFORM pgflow._lock_flow(start_flow.flow_slug, false);
    f := pgflow._flow(start_flow.flow_slug);
    IF start_flow.input IS NULL THEN
        RAISE EXCEPTION 'input must not be null' USING ERRCODE = '22004',
            HINT = 'Pass ''{}''::jsonb (or JSON null, ''null''::jsonb) for a run without input.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug) THEN
        RAISE EXCEPTION 'flow "%" has no steps', f.flow_slug USING ERRCODE = '55000',
            HINT = 'Add steps with pgflow.add_step before starting runs.';
    END IF;
    q := pgflow._queue(f.flow_slug);
    INSERT INTO pgflow.runs (run_id, flow_slug, input)
    VALUES (coalesce(start_flow.run_id, pgflow._time_ordered_uuid()), f.flow_slug, start_flow.input)
    ON CONFLICT (run_id) DO NOTHING
    RETURNING * INTO r;
    IF NOT FOUND THEN
        -- An explicit run_id works as an idempotency key: starting the same run again returns it.
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = start_flow.run_id;
        IF r.flow_slug = f.flow_slug AND r.input = start_flow.input THEN
            RETURN r;
        END IF;
        RAISE EXCEPTION 'run % already exists with another flow or input', start_flow.run_id
            USING ERRCODE = '42710', HINT = 'Pass a new run_id, or NULL to have one generated.';
    END IF;
    PERFORM pgflow._emit(f.flow_slug, jsonb_build_object(
        'event', 'workflow_started', 'run_id', r.run_id, 'flow_slug', f.flow_slug));
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, remaining_deps)
    SELECT f.flow_slug, r.run_id, s.step_slug, s.deps_count
      FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.deps_count > 0
     ORDER BY s.step_index;
    FOR st IN SELECT * FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.deps_count = 0 ORDER BY s.step_index LOOP
        EXIT WHEN NOT pgflow._start_step(r, q, st);
    END LOOP;
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = r.run_id;
    RETURN r;
END
$$;
COMMENT ON FUNCTION pgflow.start_flow(text, jsonb, uuid) IS
'Start a run of a flow with the given input (any JSON value, not SQL NULL); returns the run row. Creates the state of every step and queues the tasks of the root steps (after their start_delay). A given run_id acts as an idempotency key: starting it again with the same flow and input returns the existing run; with another flow or input fails with 42710. A root map step over an input that is not an array fails the run at once.';

---------------------------------------------------------------------------------------------
-- Claiming tasks
---------------------------------------------------------------------------------------------

-- Task task_index of step st ran out of attempts, or failed with retry => false (the caller
-- holds the run lock and has deleted the task's message), or (task_index NULL) signal step st
-- waited out its timeout: the one home of what follows, for fail_task, a timed-out last
-- attempt and a signal's timeout. The task fails; then, as the step's when_exhausted
-- says, the step and the run fail (fail: the run's other tasks are no longer handed out), or
-- the step is skipped (skip, skip_cascade: its other tasks are cancelled, and the run goes
-- on). Returns the outcome: failed or step_skipped.
CREATE FUNCTION pgflow._task_exhausted(r pgflow.runs, q pgflow.queues, st pgflow.steps, task_index integer,
                                       attempts integer, err text, reason text) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    IF task_index IS NOT NULL THEN
        UPDATE pgflow.step_tasks t SET status = 'failed', error_message = err, failed_at = now_, attempts_count = attempts
         WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.task_index = _task_exhausted.task_index;
        PERFORM pgflow._emit_task_failed(r.run_id, r.flow_slug, st.step_slug, task_index, attempts, false, reason);
    END IF;
    IF st.when_exhausted = 'fail' THEN
        PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
        UPDATE pgflow.step_states s SET status = 'failed', failed_at = now_, error_message = err
         WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
        PERFORM pgflow._fail_run(r, q.queue_id, st.step_slug, err);
        RETURN 'failed';
    END IF;
    -- the step's other tasks (a map step's): their messages, then the tasks
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id, st.step_slug);
    UPDATE pgflow.step_tasks t SET status = 'cancelled'
     WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.status IN ('queued', 'started');
    PERFORM pgflow._skip_step(r, q, st, st.when_exhausted = 'skip_cascade', 'exhausted', err);
    RETURN 'step_skipped';
END
$$;

-- The last allowed attempt of a task timed out (its message came back after max_attempts
-- deliveries): fail the task, its step and its run. The caller holds the message lock, so the
-- run lock is only tried: if busy, the message is looked at again a second later.
CREATE FUNCTION pgflow._task_timed_out(f pgflow.flows, q pgflow.queues, st pgflow.steps, msg_id bigint,
                                       run_id uuid, task_index integer, read_ct integer) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    tstatus text;
    err text;
    now_ timestamptz := clock_timestamp();
BEGIN
    IF pgflow._lock_run(_task_timed_out.run_id, false) THEN
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _task_timed_out.run_id;
    END IF;
    IF r.run_id IS NULL THEN
        UPDATE pgflow.messages m SET vt = now_ + interval '1 second'
         WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
        RETURN;
    END IF;
    SELECT t.status INTO tstatus FROM pgflow.step_tasks t
     WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.task_index = _task_timed_out.task_index;
    IF r.status <> 'started' OR tstatus IS DISTINCT FROM 'started' THEN
        DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
        RETURN;
    END IF;
    err := format('timed out: not completed within %s s on its last attempt (%s of %s)',
                  coalesce(st.opt_timeout, f.opt_timeout), read_ct - 1, coalesce(st.opt_max_attempts, f.opt_max_attempts));
    DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
    PERFORM pgflow._task_exhausted(r, q, st, task_index, read_ct - 1, err, 'timeout');
END
$$;

-- A message just leased by a claim (poll_for_tasks, start_tasks) whose task cannot start, as
-- src/workflow/ found: a message that is not a task of this flow is dead-lettered; one whose
-- run failed or whose task is done is deleted; a task whose last allowed attempt timed out
-- fails (and with it its step and run). The statuses that make a task unstartable never change
-- back, so what is found here is what the claim found; a task found startable all the same is
-- released at once for the next claim.
CREATE FUNCTION pgflow._claimed_not_startable(f pgflow.flows, q pgflow.queues, msg_id bigint, read_ct integer,
                                              rid uuid, sslug text, tidx integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    st pgflow.steps;
    rstatus text;
    tstatus text;
BEGIN
    -- rid, sslug and tidx: the task the message names, NULL where its body is not a
    -- well-formed task (parsed by the claim statement in src/workflow/)
    IF rid IS NOT NULL AND sslug IS NOT NULL AND tidx IS NOT NULL THEN
        SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.step_slug = sslug;
    END IF;
    IF st.step_slug IS NULL THEN
        PERFORM pgflow._dead_letter(q, _claimed_not_startable.msg_id, format('not a task of flow "%s"', f.flow_slug));
        RETURN;
    END IF;
    SELECT x.status, t.status INTO rstatus, tstatus
      FROM pgflow.runs x
      LEFT JOIN pgflow.step_tasks t ON t.run_id = x.run_id AND t.step_slug = sslug AND t.task_index = tidx
     WHERE x.run_id = rid;
    IF rstatus IS DISTINCT FROM 'started' OR tstatus IS NULL OR tstatus NOT IN ('queued', 'started') THEN
        -- the run failed or the task is done: nothing to hand out
        DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _claimed_not_startable.msg_id;
    ELSIF _claimed_not_startable.read_ct > coalesce(st.opt_max_attempts, f.opt_max_attempts) THEN
        PERFORM pgflow._task_timed_out(f, q, st, _claimed_not_startable.msg_id, rid, tidx,
                                       _claimed_not_startable.read_ct);
    ELSE
        UPDATE pgflow.messages m SET vt = clock_timestamp()
         WHERE m.queue_id = q.queue_id AND m.msg_id = _claimed_not_startable.msg_id;
    END IF;
END
$$;

-- The task path (start_tasks, poll_for_tasks, complete_task) is in Rust (src/workflow/),
-- its plans pinned to index scans and nested loops by src/pg/spi.rs whatever the tables held when
-- they were planned.
CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_start_tasks';
COMMENT ON FUNCTION pgflow.start_tasks(text, bigint[], uuid) IS
'Start the tasks of messages a worker read from the flow''s queue (pgflow.read or read_with_poll): marks each task started, counts the attempt, leases it for its step''s timeout, and returns (flow_slug, run_id, step_slug, task_index, msg_id, input). input is {"run": <run input>, "<dep>": <dep output>, ...}, or the array element for a map task. Messages of failed runs or finished tasks are dropped and not returned; a task whose last attempt timed out fails (and with it its step and run). worker_id is recorded and may be passed to complete_task / fail_task.';

CREATE FUNCTION pgflow.poll_for_tasks(flow_slug text, vt integer, qty integer, max_poll_seconds integer DEFAULT 5,
                                      poll_interval_ms integer DEFAULT 100, worker_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.step_task_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_poll_for_tasks';
COMMENT ON FUNCTION pgflow.poll_for_tasks(text, integer, integer, integer, integer, uuid) IS
'Claim up to qty tasks of a flow in one statement: leases their messages and starts them as pgflow.start_tasks does, returning (flow_slug, run_id, step_slug, task_index, msg_id, input). Each task is leased for its step''s timeout (vt applies only to a stray message that is not a task). Waits up to max_poll_seconds for tasks, woken at the commit that queues new ones (looking again every poll_interval_ms for timed-out tasks and delayed retries). worker_id, optional, is recorded as the task''s last_worker_id.';

---------------------------------------------------------------------------------------------
-- Completing and failing tasks
---------------------------------------------------------------------------------------------

-- Common prologue of complete_task and fail_task: lock the run, read the task, and say why
-- nothing is to be done (NULL if the task can be ended). Raises for unknown runs, steps, tasks.
CREATE FUNCTION pgflow._end_task_check(run_id uuid, step_slug text, task_index integer, worker_id uuid,
                                       OUT r pgflow.runs, OUT t pgflow.step_tasks, OUT outcome text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF _end_task_check.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    IF _end_task_check.step_slug IS NULL THEN
        RAISE EXCEPTION 'step_slug must not be null' USING ERRCODE = '22004';
    END IF;
    IF _end_task_check.task_index IS NULL THEN
        RAISE EXCEPTION 'task_index must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM pgflow._lock_run(_end_task_check.run_id, true);
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _end_task_check.run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', _end_task_check.run_id USING ERRCODE = '42704',
            HINT = 'Pass the run_id returned by pgflow.start_tasks or pgflow.poll_for_tasks.';
    END IF;
    SELECT * INTO t FROM pgflow.step_tasks x
     WHERE x.run_id = _end_task_check.run_id AND x.step_slug = _end_task_check.step_slug
       AND x.task_index = _end_task_check.task_index;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(_end_task_check.step_slug, 'step_slug');
        IF NOT EXISTS (SELECT 1 FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = _end_task_check.step_slug) THEN
            RAISE EXCEPTION 'flow "%" of run % has no step "%"', r.flow_slug, _end_task_check.run_id,
                _end_task_check.step_slug USING ERRCODE = '42704',
                HINT = 'Pass the step_slug returned with the task.';
        END IF;
        RAISE EXCEPTION 'run % has no task % of step "%"', _end_task_check.run_id, _end_task_check.task_index,
            _end_task_check.step_slug USING ERRCODE = '42704',
            HINT = 'Tasks exist once their step has started; pass the task_index returned with the task.';
    END IF;
    outcome := pgflow._task_outcome(r.status, t.status, _end_task_check.worker_id, t.last_worker_id, false);
END
$$;

-- The caller's delivery of a task is gone: another worker claimed the task while we waited for
-- its message (read_ct moved past attempt). Say so, changing nothing.
CREATE FUNCTION pgflow._end_task_recheck(run_id uuid, step_slug text, task_index integer, worker_id uuid,
                                         attempt integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t pgflow.step_tasks;
BEGIN
    SELECT * INTO t FROM pgflow.step_tasks x
     WHERE x.run_id = _end_task_recheck.run_id AND x.step_slug = _end_task_recheck.step_slug
       AND x.task_index = _end_task_recheck.task_index;
    RETURN pgflow._task_outcome(NULL, t.status, NULL, NULL, true);
END
$$;

CREATE FUNCTION pgflow.complete_task(run_id uuid, step_slug text, task_index integer, output jsonb,
                                     worker_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_complete_task';
COMMENT ON FUNCTION pgflow.complete_task(uuid, text, integer, jsonb, uuid) IS
'Complete a started task with its output (any JSON value, not SQL NULL). Returns the outcome: completed; or, changing nothing: already_completed (the first completion wins), already_failed, not_started (queued, e.g. waiting for a retry), run_failed, run_cancelled, stale (worker_id given and the task was since handed to another worker). When its step''s last task completes, the step completes (a map step with the array of its task outputs), the dependents whose deps are all complete start, and once every step is complete the run completes with output {<leaf step>: <output>, ...}. Unknown run, step or task: 42704.';

CREATE FUNCTION pgflow.complete_and_poll(run_id uuid, step_slug text, task_index integer, output jsonb,
                                         vt integer DEFAULT 30, qty integer DEFAULT 1, worker_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.step_task_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_complete_and_poll';
COMMENT ON FUNCTION pgflow.complete_and_poll(uuid, text, integer, jsonb, integer, integer, uuid) IS
'A worker''s cycle in one transaction, one commit per task: complete a task as pgflow.complete_task does (same arguments, same rules; its outcome is not returned), then claim up to qty tasks of the run''s flow as pgflow.poll_for_tasks does, without waiting: none visible, no rows (then wait in poll_for_tasks). A task started by this completion (the next step of the same run) can be among them. vt applies only to a stray message that is not a task; worker_id is checked against the completed task and recorded on the claimed ones.';

CREATE FUNCTION pgflow.fail_task(run_id uuid, step_slug text, task_index integer, error_message text,
                                 worker_id uuid DEFAULT NULL, retry boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    t pgflow.step_tasks;
    outcome text;
    chk record;
    f pgflow.flows;
    st pgflow.steps;
    q pgflow.queues;
    err text := pgflow._error_text(fail_task.error_message);
    max_att integer;
    delay_s double precision;
    at timestamptz;
    now_ timestamptz;
BEGIN
    IF fail_task.retry IS NULL THEN
        RAISE EXCEPTION 'retry must not be null' USING ERRCODE = '22004',
            HINT = 'Pass false for an error no retry can fix, true (the default) to retry while attempts last.';
    END IF;
    -- the flow lock, shared, before the run lock (the order of complete_task in src/workflow/)
    PERFORM pgflow._lock_flow(x.flow_slug, false) FROM pgflow.runs x WHERE x.run_id = fail_task.run_id;
    SELECT * INTO chk FROM pgflow._end_task_check(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                                  fail_task.worker_id);
    r := chk.r;
    t := chk.t;
    outcome := chk.outcome;
    IF outcome IS NOT NULL THEN
        RETURN outcome;
    END IF;
    now_ := clock_timestamp();
    SELECT * INTO f FROM pgflow.flows x WHERE x.flow_slug = r.flow_slug;
    SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = fail_task.step_slug;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    max_att := coalesce(st.opt_max_attempts, f.opt_max_attempts);
    IF fail_task.retry AND t.attempts_count < max_att THEN
        -- retry after base_delay * 2^(attempt-1) seconds, at most one day
        delay_s := least(coalesce(st.opt_base_delay, f.opt_base_delay) * power(2::double precision, t.attempts_count - 1),
                         86400);
        at := now_ + make_interval(secs => delay_s);
        UPDATE pgflow.messages m SET vt = at
         WHERE m.queue_id = q.queue_id AND m.msg_id = t.message_id
           AND (fail_task.worker_id IS NULL OR m.read_ct = t.attempts_count);
        IF NOT FOUND AND fail_task.worker_id IS NOT NULL THEN
            RETURN pgflow._end_task_recheck(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                            fail_task.worker_id, t.attempts_count);
        END IF;
        UPDATE pgflow.step_tasks x SET status = 'queued', error_message = err
         WHERE x.run_id = fail_task.run_id AND x.step_slug = fail_task.step_slug AND x.task_index = fail_task.task_index;
        IF delay_s > 0 THEN
            PERFORM pgflow._due_at(q.queue_id, at);
        ELSE
            PERFORM pgflow._on_commit_wake(q.queue_id);
        END IF;
        PERFORM pgflow._emit_task_failed(r.run_id, r.flow_slug, st.step_slug, fail_task.task_index, t.attempts_count, true, 'error');
        RETURN 'retrying';
    END IF;
    -- Out of attempts, or a permanent error (retry => false): the task's message (only the
    -- caller's delivery, when it names its worker_id), then what when_exhausted says.
    DELETE FROM pgflow.messages m
     WHERE m.queue_id = q.queue_id AND m.msg_id = t.message_id
       AND (fail_task.worker_id IS NULL OR m.read_ct = t.attempts_count);
    IF NOT FOUND AND fail_task.worker_id IS NOT NULL THEN
        RETURN pgflow._end_task_recheck(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                        fail_task.worker_id, t.attempts_count);
    END IF;
    RETURN pgflow._task_exhausted(r, q, st, fail_task.task_index, t.attempts_count, err,
                                  CASE WHEN fail_task.retry THEN 'error' ELSE 'permanent' END);
END
$$;
COMMENT ON FUNCTION pgflow.fail_task(uuid, text, integer, text, uuid, boolean) IS
'Report a failed attempt of a started task. Returns retrying (the task is queued again and becomes claimable after base_delay * 2^(attempt-1) seconds, capped at 86400) or failed (it was the last of max_attempts, or retry => false said no retry can fix it: the task, its step and its run fail, and the run''s other queued tasks are no longer handed out) or step_skipped (the same, for a step whose when_exhausted is skip or skip_cascade: the task fails, its step is skipped, its other tasks are cancelled, and the run goes on); or, changing nothing, the no-op outcomes of complete_task (already_completed, already_failed, not_started, run_failed, run_cancelled, step_skipped, stale). The error is kept on the task, truncated to 2000 characters.';

-- The run a call that steers it (cancel_run, retry_run, signal) acts on, under the locks of
-- complete_task and fail_task, in their order: the flow's, shared, then the run's; with
-- lock_row, its row as well (retry_run: prune_runs, which deletes only finished runs, then
-- waits and passes it over). 42704 for a run that does not exist; the caller has refused NULL.
CREATE FUNCTION pgflow._steer_run(run_id uuid, lock_row boolean) RETURNS pgflow.runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
BEGIN
    PERFORM pgflow._lock_flow(x.flow_slug, false) FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id;
    PERFORM pgflow._lock_run(_steer_run.run_id, true);
    IF lock_row THEN
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id FOR UPDATE;
    ELSE
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', _steer_run.run_id USING ERRCODE = '42704',
            HINT = 'Pass the run_id returned by pgflow.start_flow.';
    END IF;
    RETURN r;
END
$$;

-- Cancel a run: its queued and started tasks, its steps not yet finished and the run itself
-- become cancelled, and the run's messages are removed, under the run lock (a complete_task or
-- fail_task under way finishes first; a later one returns run_cancelled and changes nothing).
-- The reason is kept on the cancelled steps (truncated like an error); events carry no reason.
CREATE FUNCTION pgflow.cancel_run(run_id uuid, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    why text := pgflow._error_text(coalesce(cancel_run.reason, 'cancelled'));
BEGIN
    IF cancel_run.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    r := pgflow._steer_run(cancel_run.run_id, false);
    IF r.status <> 'started' THEN
        RETURN 'already_' || r.status;
    END IF;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
    UPDATE pgflow.step_tasks t SET status = 'cancelled'
     WHERE t.run_id = r.run_id AND t.status IN ('queued', 'started');
    UPDATE pgflow.step_states s SET status = 'cancelled', error_message = why
     WHERE s.run_id = r.run_id AND s.status IN ('created', 'started', 'waiting');
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id;
    UPDATE pgflow.runs x SET status = 'cancelled', cancelled_at = clock_timestamp() WHERE x.run_id = r.run_id;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_cancelled', 'run_id', r.run_id, 'flow_slug', r.flow_slug));
    RETURN 'cancelled';
END
$$;
COMMENT ON FUNCTION pgflow.cancel_run(uuid, text) IS
'Cancel a run under way: its queued and started tasks and its unfinished steps become cancelled (the steps keep the reason), its tasks'' messages are removed, and late complete_task or fail_task calls return run_cancelled and change nothing. Returns cancelled; for a run that has finished, changing nothing, already_completed, already_failed or already_cancelled. Unknown run: 42704.';

-- Retry a failed or cancelled run from where it stopped, under the run lock and the run row's
-- lock (so prune_runs, which deletes only finished runs, cannot take it meanwhile). Completed
-- steps and tasks keep their outputs; every other task of a step that had started is queued
-- again with a fresh message (attempts start again from one, visible at once); steps cancelled
-- before they started wait again for their dependencies; a map step that failed before it had
-- tasks (its input was not an array) is started again. What was started again is recorded in
-- pgflow.run_retries first.
CREATE FUNCTION pgflow.retry_run(run_id uuid) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    st record;
    step pgflow.steps;
    arr jsonb;
    n integer;
    now_ timestamptz := clock_timestamp();
BEGIN
    IF retry_run.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    r := pgflow._steer_run(retry_run.run_id, true);
    IF r.status NOT IN ('failed', 'cancelled') THEN
        RETURN 'already_' || r.status;
    END IF;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    n := coalesce((SELECT max(rr.retry_no) FROM pgflow.run_retries rr WHERE rr.run_id = r.run_id), 0) + 1;
    INSERT INTO pgflow.run_retries (run_id, retry_no, previous_status, retried_at, tasks)
    SELECT r.run_id, n, r.status, now_, coalesce(jsonb_agg(jsonb_build_object(
               'step_slug', t.step_slug, 'task_index', t.task_index, 'status', t.status,
               'attempts', t.attempts_count, 'error_message', t.error_message)
               ORDER BY s.step_index, t.task_index), '[]'::jsonb)
      FROM pgflow.step_tasks t
      JOIN pgflow.step_states ss ON ss.run_id = t.run_id AND ss.step_slug = t.step_slug
      JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = t.step_slug
     WHERE t.run_id = r.run_id AND t.status <> 'completed' AND ss.status NOT IN ('completed', 'skipped');
    UPDATE pgflow.runs x SET status = 'started', failed_at = NULL, cancelled_at = NULL WHERE x.run_id = r.run_id;
    r.status := 'started';
    FOR st IN
        SELECT s AS step, ss.status AS state_status, ss.started_at AS state_started_at,
               EXISTS (SELECT 1 FROM pgflow.step_tasks t WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug) AS has_tasks
          FROM pgflow.step_states ss
          JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = ss.step_slug
         WHERE ss.run_id = r.run_id AND ss.status NOT IN ('completed', 'skipped')
         ORDER BY s.step_index
    LOOP
        step := st.step;
        IF NOT st.has_tasks AND (st.state_status = 'failed'
                                 OR step.step_type = 'signal' AND st.state_started_at IS NOT NULL) THEN
            -- a map step that failed before it had tasks, or a signal step that was waiting:
            -- start it again (a root step's state is created by the start)
            IF step.deps_count = 0 THEN
                DELETE FROM pgflow.step_states ss WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
            ELSE
                UPDATE pgflow.step_states ss SET status = 'created', error_message = NULL, failed_at = NULL
                 WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
            END IF;
            IF NOT pgflow._start_step(r, q, step) THEN
                RETURN 'failed';
            END IF;
        ELSIF st.state_started_at IS NULL THEN
            -- not started (cancelled before it did): it starts when its dependencies complete
            UPDATE pgflow.step_states ss SET status = 'created', error_message = NULL, failed_at = NULL
             WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
        ELSE
            arr := NULL;
            IF step.step_type = 'map' THEN
                SELECT m.arr INTO arr FROM pgflow._map_array(r, step) m;
            END IF;
            WITH todo AS (
                SELECT t.task_index FROM pgflow.step_tasks t
                 WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug AND t.status <> 'completed'
            ), m AS (
                INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
                SELECT q.queue_id, nextval(q.msg_seq), now_, step.step_index,
                       jsonb_build_object('run_id', r.run_id, 'step_slug', step.step_slug, 'task_index', todo.task_index)
                       || CASE WHEN step.step_type = 'map' THEN jsonb_build_object('input', arr -> todo.task_index)
                               ELSE '{}'::jsonb END
                  FROM todo ORDER BY todo.task_index
                RETURNING msg_id, (message ->> 'task_index')::integer AS task_index
            )
            UPDATE pgflow.step_tasks t
               SET status = 'queued', message_id = m.msg_id, attempts_count = 0, error_message = NULL,
                   queued_at = now_, started_at = NULL, failed_at = NULL, last_worker_id = NULL
              FROM m
             WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug AND t.task_index = m.task_index;
            UPDATE pgflow.step_states ss
               SET status = 'started', error_message = NULL, failed_at = NULL,
                   remaining_tasks = (SELECT count(*) FROM pgflow.step_tasks t
                                       WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug
                                         AND t.status <> 'completed')
             WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
        END IF;
    END LOOP;
    PERFORM pgflow._on_commit_wake(q.queue_id);
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_retried', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'retry', n));
    RETURN 'retried';
END
$$;
COMMENT ON FUNCTION pgflow.retry_run(uuid) IS
'Carry on a failed or cancelled run from where it stopped, under the same run_id: completed steps and tasks keep their outputs; its failed, cancelled and unfinished tasks are queued again with fresh attempts (visible at once); steps that never started start when their dependencies complete. The tasks started again, with their attempts and last errors, are recorded in pgflow.run_retries (get_run_with_states shows them under "retries"). Returns retried (or failed, when a map step started again fails the run at once: its input is still not an array); for a run under way or completed, changing nothing, already_started or already_completed. Unknown run: 42704.';

-- Signal a signal step of a run (under the flow and run locks, as complete_task): a waiting
-- step completes with the payload as its output and the run goes on; a step not yet ready
-- keeps the signal and completes with it when it becomes ready. One signal per step: another
-- changes nothing and says so.
CREATE FUNCTION pgflow.signal(run_id uuid, step_slug text, payload jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    st pgflow.steps;
    state text;
BEGIN
    IF signal.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    ELSIF signal.step_slug IS NULL THEN
        RAISE EXCEPTION 'step_slug must not be null' USING ERRCODE = '22004';
    ELSIF signal.payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be null' USING ERRCODE = '22004',
            HINT = 'Pass JSON null (''null''::jsonb) for a signal without a payload.';
    END IF;
    r := pgflow._steer_run(signal.run_id, false);
    SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = signal.step_slug;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(signal.step_slug, 'step_slug');
        RAISE EXCEPTION 'flow "%" of run % has no step "%"', r.flow_slug, signal.run_id, signal.step_slug
            USING ERRCODE = '42704';
    ELSIF st.step_type <> 'signal' THEN
        RAISE EXCEPTION 'step_slug "%" names a % step of flow "%", not a signal step', signal.step_slug,
            st.step_type, r.flow_slug USING ERRCODE = '22023',
            HINT = 'Signal the steps added with step_type => ''signal''; a worker completes the others with complete_task.';
    END IF;
    IF r.status <> 'started' THEN
        RETURN 'run_' || r.status;
    END IF;
    IF EXISTS (SELECT 1 FROM pgflow.signals s WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug) THEN
        RETURN 'already_signalled';
    END IF;
    SELECT ss.status INTO state FROM pgflow.step_states ss WHERE ss.run_id = r.run_id AND ss.step_slug = st.step_slug;
    IF state IN ('skipped', 'failed', 'cancelled', 'completed') THEN
        RETURN 'step_' || state;
    END IF;
    INSERT INTO pgflow.signals (run_id, step_slug, payload) VALUES (r.run_id, st.step_slug, signal.payload);
    IF state = 'waiting' THEN
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
        PERFORM pgflow._apply_signal(r, q, st, signal.payload);
        RETURN 'signalled';
    END IF;
    RETURN 'stored';
END
$$;
COMMENT ON FUNCTION pgflow.signal(uuid, text, jsonb) IS
'Signal a signal step of a run (an approval, a webhook, a person''s decision): a waiting step completes with payload (any JSON value, not SQL NULL) as its output, and the steps after it go on. Returns signalled; stored (the step is not ready yet: it completes with this payload when it becomes ready); or, changing nothing, already_signalled (one signal per step), run_completed, run_failed, run_cancelled, step_skipped. Unknown run or step: 42704; a step that is not a signal step: 22023.';

-- Signal steps whose timeout ran out: what their when_exhausted says (the run fails, or the
-- step is skipped), for the maintenance pass. Each under its flow and run locks; a run busy
-- now is looked at on the next pass. At most 1000 per pass. Returns how many ended.
CREATE FUNCTION pgflow._expire_signal_waits() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w record;
    r pgflow.runs;
    q pgflow.queues;
    st pgflow.steps;
    n integer := 0;
BEGIN
    FOR w IN SELECT * FROM pgflow.signal_waits x WHERE x.deadline <= clock_timestamp() ORDER BY x.deadline LIMIT 1000 LOOP
        PERFORM pgflow._lock_flow(w.flow_slug, false);
        CONTINUE WHEN NOT pgflow._lock_run(w.run_id, false);
        -- still waiting, now that the run is ours
        DELETE FROM pgflow.signal_waits x
         WHERE x.run_id = w.run_id AND x.step_slug = w.step_slug AND x.deadline <= clock_timestamp();
        CONTINUE WHEN NOT FOUND;
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = w.run_id;
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
        SELECT * INTO st FROM pgflow.steps x WHERE x.flow_slug = r.flow_slug AND x.step_slug = w.step_slug;
        PERFORM pgflow._task_exhausted(r, q, st, NULL, NULL,
                                       format('no signal within its timeout of %s s', st.opt_timeout), 'timeout');
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

---------------------------------------------------------------------------------------------
-- Inspection
---------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.get_run_with_states(run_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
BEGIN
    IF get_run_with_states.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = get_run_with_states.run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', get_run_with_states.run_id USING ERRCODE = '42704';
    END IF;
    -- the run's fields at the top level, and also under "run" (the layout of the pgflow SQL
    -- project), then "steps"
    RETURN to_jsonb(r) || jsonb_build_object('run', to_jsonb(r), 'steps', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'step_slug', s.step_slug, 'step_type', s.step_type, 'status', ss.status,
                   'remaining_deps', ss.remaining_deps,
                   -- a started map step's state is not counted down task by task: count its tasks
                   'remaining_tasks', CASE WHEN s.step_type = 'map' AND ss.status = 'started'
                                           THEN (SELECT count(*)::integer FROM pgflow.step_tasks t
                                                  WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug
                                                    AND t.status <> 'completed')
                                           ELSE ss.remaining_tasks END,
                   'initial_tasks', ss.initial_tasks, 'error_message', ss.error_message,
                   'created_at', ss.created_at, 'started_at', ss.started_at,
                   'completed_at', ss.completed_at, 'failed_at', ss.failed_at, 'skipped_at', ss.skipped_at,
                   'signal', CASE WHEN s.step_type = 'signal' THEN (
                       SELECT jsonb_build_object('received_at', sg.received_at, 'applied_at', sg.applied_at,
                                                 'deadline', w.deadline)
                         FROM (SELECT 1) one
                         LEFT JOIN pgflow.signals sg ON sg.run_id = r.run_id AND sg.step_slug = s.step_slug
                         LEFT JOIN pgflow.signal_waits w ON w.run_id = r.run_id AND w.step_slug = s.step_slug) END,
                   'tasks', (SELECT jsonb_build_object(
                                 'queued', count(*) FILTER (WHERE t.status = 'queued'),
                                 'started', count(*) FILTER (WHERE t.status = 'started'),
                                 'completed', count(*) FILTER (WHERE t.status = 'completed'),
                                 'failed', count(*) FILTER (WHERE t.status = 'failed'),
                                 'cancelled', count(*) FILTER (WHERE t.status = 'cancelled'),
                                 'attempts', coalesce(sum(t.attempts_count), 0))
                               FROM pgflow.step_tasks t WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug))
                 ORDER BY s.step_index)
          FROM pgflow.steps s
          JOIN pgflow.step_states ss ON ss.run_id = r.run_id AND ss.step_slug = s.step_slug
         WHERE s.flow_slug = r.flow_slug), '[]'::jsonb),
        'retries', coalesce((
        SELECT jsonb_agg(jsonb_build_object('retry', rr.retry_no, 'previous_status', rr.previous_status,
                                            'retried_at', rr.retried_at, 'tasks', rr.tasks)
                         ORDER BY rr.retry_no)
          FROM pgflow.run_retries rr WHERE rr.run_id = r.run_id), '[]'::jsonb));
END
$$;
COMMENT ON FUNCTION pgflow.get_run_with_states(uuid) IS
'A run as one JSON document for psql and dashboards: the run row (status, input, output, times; at the top level and again under "run") and "steps", in definition order, each with its state (status, remaining_deps, remaining_tasks, initial_tasks, error_message, times) and task counts per status ("tasks": {"queued","started","completed","failed","cancelled","attempts"}), and "retries": what each retry_run started again (pgflow.run_retries).';
