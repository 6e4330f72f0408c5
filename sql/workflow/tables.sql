-- Workflow layer: tables.
--
-- Definitions: pgflow.flows, pgflow.steps, pgflow.deps (a DAG, built in dependency order).
-- Runtime: pgflow.runs, pgflow.step_states, pgflow.step_tasks. A task travels as one message
-- of the queue named after its flow; the message body identifies the task
-- ({"run_id","step_slug","task_index"}, plus "input" for a map task) and stays the same across
-- its attempts, so a task's attempts are the message's deliveries (read_ct).
--
-- The runtime tables carry no foreign keys: a foreign-key check locks the referenced row
-- (FOR KEY SHARE) on every insert, which would add a write to every queued task. Their
-- integrity is kept by the functions, which take the run row lock first (see workflows.md).
-- fillfactor leaves room so that the updates a task and a step state go through stay HOT
-- (no indexed column changes), writing no index entries.

CREATE TABLE pgflow.flows (
    flow_slug         text PRIMARY KEY,
    opt_max_attempts  integer NOT NULL DEFAULT 3,
    opt_base_delay    integer NOT NULL DEFAULT 1,
    opt_timeout       integer NOT NULL DEFAULT 60,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT flows_slug_allowed CHECK (flow_slug ~ '^[A-Za-z0-9_]{1,48}$'),
    CONSTRAINT flows_max_attempts_range CHECK (opt_max_attempts BETWEEN 1 AND 100),
    CONSTRAINT flows_base_delay_range CHECK (opt_base_delay BETWEEN 0 AND 86400),
    CONSTRAINT flows_timeout_range CHECK (opt_timeout BETWEEN 1 AND 86400)
);
COMMENT ON TABLE pgflow.flows IS 'pgflow: one row per flow (workflow definition) with its default task options.';

CREATE TABLE pgflow.steps (
    flow_slug         text NOT NULL REFERENCES pgflow.flows (flow_slug),
    step_slug         text NOT NULL,
    step_type         text NOT NULL DEFAULT 'single',
    -- definition order (0, 1, ...): a step's deps always have smaller indexes
    step_index        integer NOT NULL,
    deps_count        integer NOT NULL DEFAULT 0,
    -- NULL: inherit the flow's option
    opt_max_attempts  integer,
    opt_base_delay    integer,
    opt_timeout       integer,
    opt_start_delay   integer,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the step's condition: its input must contain if_input and must not contain if_not_input
    -- (jsonb @>); when_unmet says what an unmet condition does, when_exhausted what running
    -- out of attempts does
    if_input          jsonb,
    if_not_input      jsonb,
    when_unmet        text NOT NULL DEFAULT 'skip',
    when_exhausted    text NOT NULL DEFAULT 'fail',
    PRIMARY KEY (flow_slug, step_slug),
    UNIQUE (flow_slug, step_index),
    CONSTRAINT steps_slug_allowed CHECK (step_slug ~ '^[A-Za-z0-9_]{1,48}$'),
    CONSTRAINT steps_type_allowed CHECK (step_type IN ('single', 'map', 'signal')),
    CONSTRAINT steps_map_deps CHECK (step_type <> 'map' OR deps_count <= 1),
    CONSTRAINT steps_max_attempts_range CHECK (opt_max_attempts BETWEEN 1 AND 100),
    CONSTRAINT steps_base_delay_range CHECK (opt_base_delay BETWEEN 0 AND 86400),
    CONSTRAINT steps_timeout_range CHECK (opt_timeout BETWEEN 1 AND CASE WHEN step_type = 'signal' THEN 31536000 ELSE 86400 END),
    CONSTRAINT steps_start_delay_range CHECK (opt_start_delay BETWEEN 0 AND 31536000),
    CONSTRAINT steps_when_unmet_allowed CHECK (when_unmet IN ('skip', 'skip_cascade', 'fail')),
    CONSTRAINT steps_when_exhausted_allowed CHECK (when_exhausted IN ('fail', 'skip', 'skip_cascade'))
);
COMMENT ON TABLE pgflow.steps IS 'pgflow: the steps of each flow, in definition order, with their type, option overrides and condition.';

CREATE TABLE pgflow.deps (
    flow_slug   text NOT NULL,
    dep_slug    text NOT NULL,
    step_slug   text NOT NULL,
    -- position of dep_slug in the deps_slugs array given to add_step
    dep_index   integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (flow_slug, dep_slug, step_slug),
    FOREIGN KEY (flow_slug, dep_slug) REFERENCES pgflow.steps (flow_slug, step_slug),
    FOREIGN KEY (flow_slug, step_slug) REFERENCES pgflow.steps (flow_slug, step_slug),
    CONSTRAINT deps_not_self CHECK (dep_slug <> step_slug)
);
CREATE INDEX deps_of_step ON pgflow.deps (flow_slug, step_slug, dep_index);
COMMENT ON TABLE pgflow.deps IS 'pgflow: dependency edges: step_slug runs once dep_slug has completed.';

CREATE TABLE pgflow.runs (
    run_id        uuid PRIMARY KEY,
    flow_slug     text NOT NULL,
    status        text NOT NULL DEFAULT 'started',
    input         jsonb NOT NULL,
    output        jsonb,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at  timestamptz,
    failed_at     timestamptz,
    cancelled_at  timestamptz,
    CONSTRAINT runs_status_allowed CHECK (status IN ('started', 'completed', 'failed', 'cancelled'))
) WITH (fillfactor = 70);
COMMENT ON TABLE pgflow.runs IS 'pgflow: one row per flow run: status started, completed, failed or cancelled; output {<leaf step>: <its output>} once completed.';

CREATE TABLE pgflow.step_states (
    flow_slug        text NOT NULL,
    run_id           uuid NOT NULL,
    step_slug        text NOT NULL,
    status           text NOT NULL DEFAULT 'created',
    remaining_deps   integer NOT NULL,
    remaining_tasks  integer,
    initial_tasks    integer,
    -- the step's output when it is a map step (array of its task outputs, in element order);
    -- a single step's output is its task's output
    output           jsonb,
    error_message    text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    completed_at     timestamptz,
    failed_at        timestamptz,
    skipped_at       timestamptz,
    PRIMARY KEY (run_id, step_slug),
    CONSTRAINT step_states_status_allowed CHECK (status IN ('created', 'started', 'completed', 'failed', 'cancelled', 'skipped', 'waiting'))
) WITH (fillfactor = 60);
COMMENT ON TABLE pgflow.step_states IS 'pgflow: state of each step of each run: created (waiting for deps), started (tasks queued), completed, failed, cancelled (its run was cancelled before it finished) or skipped (its condition was not met, it ran out of attempts with when_exhausted skip, or a step it depends on was skipped with skip_cascade); a signal step is waiting while it waits for its signal.';

CREATE TABLE pgflow.step_tasks (
    flow_slug       text NOT NULL,
    run_id          uuid NOT NULL,
    step_slug       text NOT NULL,
    task_index      integer NOT NULL,
    message_id      bigint NOT NULL,
    status          text NOT NULL DEFAULT 'queued',
    attempts_count  integer NOT NULL DEFAULT 0,
    error_message   text,
    output          jsonb,
    queued_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at      timestamptz,
    completed_at    timestamptz,
    failed_at       timestamptz,
    last_worker_id  uuid,
    PRIMARY KEY (run_id, step_slug, task_index),
    CONSTRAINT step_tasks_status_allowed CHECK (status IN ('queued', 'started', 'completed', 'failed', 'cancelled'))
) WITH (fillfactor = 60);
COMMENT ON TABLE pgflow.step_tasks IS 'pgflow: one row per task (one per single step, one per array element of a map step): queued, started, completed, failed or cancelled, with attempts, output and last error.';

-- What each retry_run started again: the run's tasks as they were (status, attempts, last
-- error) before they were queued afresh, so a retried run's history stays readable.
CREATE TABLE pgflow.run_retries (
    run_id           uuid NOT NULL,
    retry_no         integer NOT NULL,
    previous_status  text NOT NULL,
    retried_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- [{"step_slug", "task_index", "status", "attempts", "error_message"}, ...]
    tasks            jsonb NOT NULL,
    PRIMARY KEY (run_id, retry_no)
);
COMMENT ON TABLE pgflow.run_retries IS 'pgflow: one row per retry_run of a run: its status before, and the tasks started again with their attempts and last errors.';

-- Signals: the payload pgflow.signal gave a signal step of a run, kept from its arrival (also
-- before the step is ready) and applied when the step is ready (applied_at).
CREATE TABLE pgflow.signals (
    run_id       uuid NOT NULL,
    step_slug    text NOT NULL,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_at   timestamptz,
    PRIMARY KEY (run_id, step_slug)
);
COMMENT ON TABLE pgflow.signals IS 'pgflow: the signal received for each signal step of a run (at most one), and when it was applied.';

-- The signal steps waiting now, one row each from the moment a step starts waiting until its
-- signal, its timeout or the end of its run: what pgflow.waiting_signals shows and what the
-- maintenance pass looks through for timeouts (deadline), without an index on step_states.
CREATE TABLE pgflow.signal_waits (
    run_id         uuid NOT NULL,
    step_slug      text NOT NULL,
    flow_slug      text NOT NULL,
    waiting_since  timestamptz NOT NULL DEFAULT clock_timestamp(),
    deadline       timestamptz,
    PRIMARY KEY (run_id, step_slug)
);
CREATE INDEX signal_waits_deadline ON pgflow.signal_waits (deadline) WHERE deadline IS NOT NULL;
COMMENT ON TABLE pgflow.signal_waits IS 'pgflow: the signal steps waiting for their signal, with the time their timeout ends.';

CREATE VIEW pgflow.waiting_signals AS
    SELECT w.flow_slug, w.run_id, w.step_slug, w.waiting_since, w.deadline
      FROM pgflow.signal_waits w;
COMMENT ON VIEW pgflow.waiting_signals IS 'pgflow: what each run waits for: its signal steps waiting for pgflow.signal, since when, and until when (deadline, NULL: no timeout).';

CREATE TYPE pgflow.step_task_record AS (
    flow_slug   text,
    run_id      uuid,
    step_slug   text,
    task_index  integer,
    msg_id      bigint,
    input       jsonb
);
COMMENT ON TYPE pgflow.step_task_record IS 'pgflow: a task handed to a worker by pgflow.start_tasks or pgflow.poll_for_tasks, with its input.';
