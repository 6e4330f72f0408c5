//! The workflow layer's task path in Rust: `poll_for_tasks`, `start_tasks`, `complete_task`
//! and what a completed step sets off (`_step_completed`).
//!
//! Why not PL/pgSQL for these: every task goes through a claim and a completion, and measured,
//! the PL/pgSQL versions spent most of their time around the statements rather than in them:
//! in nested function calls (each with its own `SET` scope and composite arguments) and in
//! statements each doing one small thing. Here a claim is one statement for the batch plus one
//! per task (start it and build its input), and a completion one statement for the message,
//! the step state and the task together, plus one per dependent step it starts (or one that
//! completes the run). Statements are planned once per backend (see [`crate::spi`]).
//!
//! The rare paths stay in PL/pgSQL, called from here: the specific errors for unknown runs,
//! steps and tasks (`_end_task_check`), a stale delivery (`_end_task_recheck`), a claimed
//! message whose task cannot start (`_claimed_not_startable`: stray, finished, timed out),
//! and starting a map step or a delayed step (`_start_step`).
//!
//! Locks and their order are those described at the top of `sql/workflow/runtime.sql`.

use crate::error::{null_error, raise};
use crate::events;
use crate::gucs::{WorkflowEvents, WORKFLOW_EVENTS};
use crate::locks::{self, Space};
use crate::pg::{
    arg, column, int_column, run, text_column, text_datum, text_to_string, uuid_string, CFunction,
    SpiScope, Statement, BOOL, INT4, INT8, INT8ARRAY, JSONB, REGCLASS, TEXT, UUID,
};
use crate::queue::{check_ids, check_lease, check_poll};
use crate::v1;
use pgrx::pg_sys::{self, Datum, FunctionCallInfo, Oid};
use pgrx::prelude::{pg_extern, search_path, Spi};
use pgrx::PgSqlErrorCode;
use serde_json::{json, Value};

#[derive(Clone, Copy)]
enum Stmt {
    FlowOf,
    FlowOfRun,
    QueuedTaskLock,
    TaskQueued,
    TasksLeft,
    RaiseFlow,
    ClaimTasks,
    LeaseGiven,
    StartTask,
    NotStartable,
    TaskOf,
    EndTaskCheck,
    EndTaskRecheck,
    FinishTask,
    MapStepOutput,
    Dependents,
    StartSingleStep,
    StartStep,
    DecrementDeps,
    CompleteRun,
    RunAndQueue,
    StepInput,
    DependentState,
}

/// The input of a step's task (a map task gets its array element instead), the one place it is
/// built: `{"run": <run input>, "<dep>": <its output>, ...}` (a single step's output is its
/// task's, a map or signal step's is on its state), where a skipped dependency (whose
/// output is SQL NULL: a completed step's never is) leaves no key. `$run_input` is the run's
/// input, `$run`, `$flow` and `$step` the parameters naming the run, its flow and the step.
/// Used by [`Stmt::StartTask`] and [`Stmt::StepInput`] (a step's condition).
macro_rules! step_input {
    ($run_input:literal, $run:literal, $flow:literal, $step:literal) => {
        concat!(
            "jsonb_build_object('run', ", $run_input, ") || coalesce((
                 SELECT jsonb_object_agg(d.dep_slug, o.output) FILTER (WHERE o.output IS NOT NULL)
                   FROM pgflow.deps d
                   JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.dep_slug
                   LEFT JOIN pgflow.step_states ss
                          ON s.step_type <> 'single' AND ss.run_id = ", $run, " AND ss.step_slug = d.dep_slug
                   LEFT JOIN pgflow.step_tasks tt
                          ON s.step_type = 'single' AND tt.run_id = ", $run, "
                         AND tt.step_slug = d.dep_slug AND tt.task_index = 0
                  CROSS JOIN LATERAL (SELECT CASE WHEN s.step_type = 'single' THEN tt.output ELSE ss.output END
                                                 AS output) o
                  WHERE d.flow_slug = ", $flow, " AND d.step_slug = ", $step, "), '{}'::jsonb)"
        )
    };
}

/// The task a claimed message's body names: run_id, step_slug and task_index, each NULL where
/// the body does not hold a well-formed one.
macro_rules! named_task {
    () => {
        "CASE WHEN m.message ->> 'run_id' ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
              THEN (m.message ->> 'run_id')::uuid END,
         CASE WHEN jsonb_typeof(m.message -> 'step_slug') = 'string' THEN m.message ->> 'step_slug' END,
         CASE WHEN jsonb_typeof(m.message -> 'task_index') = 'number'
               AND m.message ->> 'task_index' ~ '^[0-9]{1,9}$'
              THEN (m.message ->> 'task_index')::integer END"
    };
}

/// The columns a claim returns, used by [`Stmt::ClaimTasks`] and [`Stmt::LeaseGiven`]:
/// msg_id, read_ct, body, the task the body names ([`named_task`]), and whether this message
/// is that task's own: the one it was queued with (`step_tasks.message_id`). Only then is it
/// the task's delivery. Any other message naming a task (a copy, whoever put it in the queue)
/// is a stray, and never starts it: one task, one delivery, with the body pgflow queued.
macro_rules! claimed_columns {
    () => {
        concat!(
            "m.msg_id, m.read_ct, m.message, ",
            named_task!(),
            ", EXISTS (SELECT 1 FROM pgflow.step_tasks t
                        WHERE (t.run_id, t.step_slug, t.task_index) = (",
            named_task!(),
            ") AND t.message_id = m.msg_id)"
        )
    };
}

/// A claimed message's lease: its step's timeout, or (a message that is not a task of the
/// flow) `$2` seconds. `$4` flow_slug, `$5` the flow's timeout.
macro_rules! task_lease {
    () => {
        "vt = clock_timestamp() + make_interval(secs => coalesce(
                 (SELECT s.opt_timeout FROM pgflow.steps s
                   WHERE s.flow_slug = $4 AND s.step_slug = m.message ->> 'step_slug'),
                 CASE WHEN m.message ? 'run_id' THEN $5 ELSE $2 END))"
    };
}

impl Statement for Stmt {
    fn id(self) -> u32 {
        self as u32
    }

    fn sql(self) -> (&'static str, &'static [Oid]) {
        match self {
            Stmt::FlowOf => (
                "SELECT f.opt_timeout, f.opt_max_attempts, q.queue_id
                   FROM pgflow.flows f JOIN pgflow.queues q ON q.queue_name = f.flow_slug
                  WHERE f.flow_slug = $1",
                &[TEXT],
            ),
            // $1 run_id, $2 step_slug, $3 task_index: the run's flow, and whether the task is
            // one of a map step (whose completion takes the run lock shared)
            Stmt::FlowOfRun => (
                "SELECT r.flow_slug,
                        EXISTS (SELECT 1 FROM pgflow.step_tasks t
                                  JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = t.step_slug
                                 WHERE t.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3
                                   AND s.step_type = 'map')
                   FROM pgflow.runs r WHERE r.run_id = $1",
                &[UUID, TEXT, INT4],
            ),
            // $1 run_id, $2 step_slug, $3 task_index, $4 queue_id: the task of the map step
            // that is still queued and last in line to be claimed whose message no claim holds,
            // with its message locked FOR KEY SHARE (which a claim's FOR UPDATE SKIP LOCKED passes
            // over) until this transaction ends
            Stmt::QueuedTaskLock => (
                "SELECT t.task_index FROM pgflow.step_tasks t
                   JOIN pgflow.messages m ON m.queue_id = $4 AND m.msg_id = t.message_id
                  WHERE t.run_id = $1 AND t.step_slug = $2 AND t.task_index <> $3 AND t.status = 'queued'
                  ORDER BY t.task_index DESC
                  LIMIT 1
                    FOR KEY SHARE OF m SKIP LOCKED",
                &[UUID, TEXT, INT4, INT8],
            ),
            // $1 run_id, $2 step_slug, $3 task_index: whether the task is queued
            Stmt::TaskQueued => (
                "SELECT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                                 WHERE t.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3
                                   AND t.status = 'queued')",
                &[UUID, TEXT, INT4],
            ),
            // $1 run_id, $2 step_slug: whether a task of the map step is not completed
            Stmt::TasksLeft => (
                "SELECT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                                 WHERE t.run_id = $1 AND t.step_slug = $2 AND t.status <> 'completed')",
                &[UUID, TEXT],
            ),
            // raises the specific error for a NULL, malformed or unknown flow slug
            Stmt::RaiseFlow => ("SELECT pgflow._flow($1)", &[TEXT]),
            // $1 queue_id, $2 vt, $3 qty, $4 flow_slug, $5 flow timeout. Lease the next visible
            // messages: an ordered scan of the delivery-order index, a nested loop over the key.
            Stmt::ClaimTasks => (
                concat!(
                    "WITH c AS (
                         SELECT m.msg_id FROM pgflow.messages m
                          WHERE ",
                    crate::deliverable!("m"),
                    "
                          LIMIT $3
                            FOR UPDATE SKIP LOCKED
                     )
                     UPDATE pgflow.messages m SET ",
                    task_lease!(),
                    ", read_ct = m.read_ct + 1
                       FROM c
                      WHERE m.queue_id = $1 AND m.msg_id = c.msg_id
                     RETURNING ",
                    claimed_columns!()
                ),
                &[INT8, INT4, INT4, TEXT, INT4],
            ),
            // $1 queue_id, $2 the flow's timeout, $3 msg_ids, $4 flow_slug, $5 the flow's
            // timeout: lease messages a worker read (start_tasks), locked in msg_id order.
            Stmt::LeaseGiven => (
                concat!(
                    "WITH c AS (
                         SELECT m.msg_id FROM pgflow.messages m
                          WHERE m.queue_id = $1 AND m.msg_id = ANY ($3) AND m.read_ct > 0
                          ORDER BY m.msg_id
                            FOR UPDATE
                     )
                     UPDATE pgflow.messages m SET ",
                    task_lease!(),
                    " FROM c
                      WHERE m.queue_id = $1 AND m.msg_id = c.msg_id AND m.read_ct > 0
                     RETURNING ",
                    claimed_columns!()
                ),
                &[INT8, INT4, INT8ARRAY, TEXT, INT4],
            ),
            // $1 run_id, $2 step_slug, $3 task_index, $4 attempt (read_ct), $5 worker_id,
            // $6 flow_slug, $7 the flow's max_attempts, $8 message body, $9 the flow's timeout.
            // Start the task if its run is running, it is queued or started (a retry after a
            // timeout), and this attempt is allowed; return its previous status, its timeout,
            // its input ({"run": ..., "<dep>": <output>, ...}, or the element of a map task)
            // and whether it was started. No row: the task cannot start (see NotStartable).
            Stmt::StartTask => (
                concat!(
                    "WITH cur AS (
                     SELECT t.status AS old_status, r.input AS run_input, s.step_type, s.deps_count,
                            coalesce(s.opt_timeout, $9) AS timeout
                       FROM pgflow.step_tasks t
                       JOIN pgflow.runs r ON r.run_id = t.run_id
                       JOIN pgflow.steps s ON s.flow_slug = $6 AND s.step_slug = t.step_slug
                      WHERE t.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3
                        AND r.status = 'started' AND t.status IN ('queued', 'started')
                        AND $4 <= coalesce(s.opt_max_attempts, $7)
                 ), started AS (
                     UPDATE pgflow.step_tasks t
                        SET status = 'started', attempts_count = $4, started_at = clock_timestamp(),
                            last_worker_id = $5
                       FROM cur
                      WHERE t.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3
                        AND t.status IN ('queued', 'started')
                     RETURNING 1
                 )
                 SELECT cur.old_status, cur.timeout,
                        CASE WHEN cur.step_type = 'map' THEN $8 -> 'input'
                             WHEN cur.deps_count = 0 THEN jsonb_build_object('run', cur.run_input)
                             ELSE ",
                step_input!("cur.run_input", "$1", "$6", "$2"),
                "
                        END,
                        (SELECT count(*) FROM started)
                   FROM cur"
                ),
                &[UUID, TEXT, INT4, INT4, UUID, TEXT, INT4, JSONB, INT4],
            ),
            // $1 flow_slug, $2 queue_id, $3 msg_id, $4 read_ct, $5-$7 the task the message
            // names (run_id, step_slug, task_index; NULL where it is not a well-formed task)
            Stmt::NotStartable => (
                "SELECT pgflow._claimed_not_startable(f, q, $3, $4, $5, $6, $7)
                   FROM pgflow.flows f JOIN pgflow.queues q ON q.queue_id = $2
                  WHERE f.flow_slug = $1",
                &[TEXT, INT8, INT8, INT4, UUID, TEXT, INT4],
            ),
            // $1 run_id, $2 step_slug, $3 task_index: the run, the task, its step and queue
            Stmt::TaskOf => (
                "SELECT r.status, r.flow_slug, t.status, t.last_worker_id, t.attempts_count, t.message_id,
                        s.step_type, q.queue_id, q.msg_seq::oid
                   FROM pgflow.runs r
                   JOIN pgflow.step_tasks t ON t.run_id = r.run_id AND t.step_slug = $2 AND t.task_index = $3
                   JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = t.step_slug
                   JOIN pgflow.queues q ON q.queue_name = r.flow_slug
                  WHERE r.run_id = $1",
                &[UUID, TEXT, INT4],
            ),
            // raises the specific errors for NULL or unknown runs, steps and tasks
            Stmt::EndTaskCheck => (
                "SELECT outcome FROM pgflow._end_task_check($1, $2, $3, $4)",
                &[UUID, TEXT, INT4, UUID],
            ),
            Stmt::EndTaskRecheck => (
                "SELECT pgflow._end_task_recheck($1, $2, $3, $4, $5)",
                &[UUID, TEXT, INT4, UUID, INT4],
            ),
            // $1 queue_id, $2 msg_id, $3 worker_id, $4 attempt, $5 run_id, $6 step_slug,
            // $7 task_index, $8 output, $9 single step. Message, then step state (a single
            // step's: a map step's is not counted down task by task, see complete_task), then
            // task (the subqueries run in that order). The message goes first: when the caller
            // names its worker_id, only the delivery it was given (read_ct = its attempt), so
            // a claim by another worker that committed while we waited makes this a no-op.
            Stmt::FinishTask => (
                "WITH gone AS (
                     DELETE FROM pgflow.messages m
                      WHERE m.queue_id = $1 AND m.msg_id = $2 AND ($3::uuid IS NULL OR m.read_ct = $4)
                     RETURNING 1
                 ), ss AS (
                     UPDATE pgflow.step_states s
                        SET remaining_tasks = s.remaining_tasks - 1,
                            status = CASE WHEN s.remaining_tasks = 1 AND $9 THEN 'completed' ELSE s.status END,
                            completed_at = CASE WHEN s.remaining_tasks = 1 AND $9 THEN clock_timestamp()
                                                ELSE s.completed_at END
                      WHERE $9 AND s.run_id = $5 AND s.step_slug = $6
                        AND ($3::uuid IS NULL OR EXISTS (SELECT 1 FROM gone))
                     RETURNING s.remaining_tasks
                 ), tt AS (
                     UPDATE pgflow.step_tasks x
                        SET status = 'completed', output = $8, completed_at = clock_timestamp()
                      WHERE x.run_id = $5 AND x.step_slug = $6 AND x.task_index = $7 AND x.status = 'started'
                        AND ($3::uuid IS NULL OR EXISTS (SELECT 1 FROM gone))
                     RETURNING round(extract(epoch FROM x.completed_at - x.started_at) * 1000)::bigint AS ms
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT remaining_tasks FROM ss), (SELECT ms FROM tt),
                        (SELECT count(*) FROM tt)",
                &[INT8, INT8, UUID, INT4, UUID, TEXT, INT4, JSONB, BOOL],
            ),
            // $1 run_id, $2 step_slug: a map step's last task completed
            Stmt::MapStepOutput => (
                "UPDATE pgflow.step_states s
                    SET status = 'completed', completed_at = clock_timestamp(), remaining_tasks = 0,
                        output = (SELECT jsonb_agg(x.output ORDER BY x.task_index) FROM pgflow.step_tasks x
                                   WHERE x.run_id = $1 AND x.step_slug = $2)
                  WHERE s.run_id = $1 AND s.step_slug = $2",
                &[UUID, TEXT],
            ),
            // $1 flow_slug, $2 step_slug, $3 run_id: the steps depending on a step
            // The dependents still waiting (a skip_cascade has skipped the others), and whether
            // each has a condition (read through to_jsonb, so that the statement also runs on a
            // database still at 0.1.0, whose steps have none).
            Stmt::Dependents => (
                "SELECT s.step_slug, s.step_type, s.step_index, coalesce(s.opt_start_delay, 0), ss.remaining_deps,
                        (j.step ->> 'if_input') IS NOT NULL OR (j.step ->> 'if_not_input') IS NOT NULL
                   FROM pgflow.deps d
                   JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.step_slug
                   JOIN pgflow.step_states ss ON ss.run_id = $3 AND ss.step_slug = d.step_slug
                  CROSS JOIN LATERAL (SELECT to_jsonb(s) AS step) j
                  WHERE d.flow_slug = $1 AND d.dep_slug = $2 AND ss.status = 'created'
                  ORDER BY s.step_index",
                &[TEXT, TEXT, UUID],
            ),
            // $1 run_id, $2 step_slug, $3 flow_slug, $4 queue_id, $5 sequence, $6 step_index,
            // $7 start delay (seconds), $8 a root step: start a single step, its state (a root
            // step's is created here, a dependent's, created by start_flow, updated: one write
            // either way), its message and its task. Returns when the task becomes visible.
            Stmt::StartSingleStep => (
                "WITH st AS (
                     UPDATE pgflow.step_states
                        SET status = 'started', remaining_deps = 0, remaining_tasks = 1, initial_tasks = 1,
                            started_at = clock_timestamp()
                      WHERE NOT $8 AND run_id = $1 AND step_slug = $2
                     RETURNING 1
                 ), root AS (
                     INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps,
                                                     remaining_tasks, initial_tasks, created_at, started_at)
                     SELECT $3, $1, $2, 'started', 0, 1, 1, clock_timestamp(), clock_timestamp() WHERE $8
                     RETURNING 1
                 ), m AS (
                     INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
                     SELECT $4, nextval($5), clock_timestamp() + make_interval(secs => $7), $6,
                            jsonb_build_object('run_id', $1, 'step_slug', $2, 'task_index', 0)
                       FROM (SELECT 1 FROM st UNION ALL SELECT 1 FROM root) started
                     RETURNING msg_id, vt
                 ), t AS (
                     INSERT INTO pgflow.step_tasks (flow_slug, run_id, step_slug, task_index, message_id, queued_at)
                     SELECT $3, $1, $2, 0, m.msg_id, clock_timestamp() FROM m
                 )
                 SELECT vt FROM m",
                &[UUID, TEXT, TEXT, INT8, REGCLASS, INT4, INT4, BOOL],
            ),
            // $1 run_id, $2 queue_id, $3 step_slug: a map step's start
            Stmt::StartStep => (
                "SELECT pgflow._start_step(r, q, s)
                   FROM pgflow.runs r
                   JOIN pgflow.queues q ON q.queue_id = $2
                   JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = $3
                  WHERE r.run_id = $1",
                &[UUID, INT8, TEXT],
            ),
            Stmt::DecrementDeps => (
                "UPDATE pgflow.step_states SET remaining_deps = remaining_deps - 1
                  WHERE run_id = $1 AND step_slug = $2",
                &[UUID, TEXT],
            ),
            // $1 run_id: complete the run if every step of its flow has completed or been
            // skipped (a root step not yet started has no state: a run whose first root was
            // skipped or mapped over [] is not complete), with output {<leaf step>: <its output>,
            // ...} of the leaves that completed; returns its flow and duration.
            Stmt::CompleteRun => (
                "UPDATE pgflow.runs r
                    SET status = 'completed', completed_at = clock_timestamp(),
                        output = coalesce((
                            SELECT jsonb_object_agg(s.step_slug, pgflow._step_output(r.run_id, s.step_slug, s.step_type))
                              FROM pgflow.steps s
                              JOIN pgflow.step_states ss ON ss.run_id = r.run_id AND ss.step_slug = s.step_slug
                             WHERE s.flow_slug = r.flow_slug AND ss.status = 'completed'
                               AND NOT EXISTS (SELECT 1 FROM pgflow.deps d
                                                WHERE d.flow_slug = s.flow_slug AND d.dep_slug = s.step_slug)),
                            '{}'::jsonb)
                  WHERE r.run_id = $1 AND r.status = 'started'
                    AND NOT EXISTS (SELECT 1 FROM pgflow.steps s
                                      LEFT JOIN pgflow.step_states ss ON ss.run_id = $1 AND ss.step_slug = s.step_slug
                                     WHERE s.flow_slug = r.flow_slug
                                       AND (ss.status IS NULL OR ss.status NOT IN ('completed', 'skipped')))
                 RETURNING r.flow_slug, round(extract(epoch FROM clock_timestamp() - r.started_at) * 1000)::bigint",
                &[UUID],
            ),
            Stmt::RunAndQueue => (
                "SELECT r.flow_slug, q.msg_seq::oid FROM pgflow.runs r JOIN pgflow.queues q ON q.queue_id = $2
                  WHERE r.run_id = $1",
                &[UUID, INT8],
            ),
            // $1 run_id, $2 step_slug: a dependent's state as it is now
            Stmt::DependentState => (
                "SELECT status = 'created', remaining_deps FROM pgflow.step_states
                  WHERE run_id = $1 AND step_slug = $2",
                &[UUID, TEXT],
            ),
            // $1 run_id, $2 flow_slug, $3 step_slug: the input the step's task would get
            Stmt::StepInput => (
                concat!(
                    "SELECT ",
                    step_input!("r.input", "$1", "$2", "$3"),
                    " FROM pgflow.runs r WHERE r.run_id = $1"
                ),
                &[UUID, TEXT, TEXT],
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The 16 bytes of a uuid datum.
unsafe fn uuid_bytes<'a>(d: Datum) -> &'a [u8] {
    // SAFETY: the caller passes a non-null uuid datum, a pointer to its 16 bytes (pg_uuid_t),
    // read as such and not beyond, while the datum lives (the call or the SPI result).
    unsafe { std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16) }
}

/// Why a task cannot be ended now, or None when it can: the one rule of the task-ending outcomes,
/// for complete_task (here) and fail_task (`pgflow._end_task_check`, `_end_task_recheck`, through
/// `pgflow._task_outcome`). `worker_id` is the caller's (None: any), `last_worker` the worker the
/// task was last handed to; `delivery_gone` says the caller's delivery was since handed to
/// another worker.
pub(crate) fn task_outcome(
    run_status: Option<&str>,
    task_status: Option<&str>,
    worker_id: Option<&[u8]>,
    last_worker: Option<&[u8]>,
    delivery_gone: bool,
) -> Option<&'static str> {
    let stale = delivery_gone || worker_id.is_some_and(|w| last_worker != Some(w));
    match (run_status, task_status) {
        (Some("failed"), _) => Some("run_failed"),
        (Some("cancelled"), _) => Some("run_cancelled"),
        (_, Some("completed")) => Some("already_completed"),
        (_, Some("failed")) => Some("already_failed"),
        // in a run under way, a task is cancelled only when its step was skipped
        (_, Some("cancelled")) => Some("step_skipped"),
        (_, Some("queued")) => Some("not_started"),
        _ if stale => Some("stale"),
        _ => None,
    }
}

/// Internal `pgflow._task_outcome(run_status, task_status, worker_id, last_worker_id,
/// delivery_gone)`: [`task_outcome`] for the PL/pgSQL side.
#[pg_extern(immutable, parallel_safe, name = "_task_outcome")]
#[search_path(pg_catalog, pg_temp)]
fn task_outcome_sql(
    run_status: Option<&str>,
    task_status: Option<&str>,
    worker_id: Option<pgrx::Uuid>,
    last_worker_id: Option<pgrx::Uuid>,
    delivery_gone: Option<bool>,
) -> Option<&'static str> {
    task_outcome(
        run_status,
        task_status,
        worker_id.as_ref().map(|u| u.as_bytes().as_slice()),
        last_worker_id.as_ref().map(|u| u.as_bytes().as_slice()),
        delivery_gone.unwrap_or(false),
    )
}

/// Internal `pgflow._step_input(run_id, flow_slug, step_slug)`: the input the step's task would
/// get now ([`step_input`]), for `pgflow._start_step` to test a step's condition on.
#[pg_extern(stable, name = "_step_input")]
#[search_path(pg_catalog, pg_temp)]
fn step_input_sql(run_id: pgrx::Uuid, flow_slug: &str, step_slug: &str) -> Option<pgrx::JsonB> {
    let (sql, _) = Stmt::StepInput.sql();
    crate::pg::as_raised(|| {
        Spi::get_one_with_args::<pgrx::JsonB>(
            sql,
            &[run_id.into(), flow_slug.into(), step_slug.into()],
        )
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!("the input of step \"{step_slug}\" could not be built: {e}"),
            None,
        )
    })
}

/// Announce a workflow event as `pgflow._emit` does, as the setting pgflow.workflow_events
/// allows: on the flow's channel and on `pgflow.flows`, at commit.
fn emit(flow_slug: &str, event: Value) {
    let is_task_event = event["event"]
        .as_str()
        .is_some_and(|e| e.starts_with("task_"));
    match WORKFLOW_EVENTS.get() {
        WorkflowEvents::Off => return,
        WorkflowEvents::Runs if is_task_event => return,
        _ => {}
    }
    events::add_event(events::flow_channel_of(flow_slug), event.clone());
    events::add_event("pgflow.flows".to_string(), event);
}

/// Internal `pgflow._emit(flow_slug, event)`: [`emit`] for the PL/pgSQL side of the workflow
/// layer (start_flow, fail_task, failing runs), so the rule of pgflow.workflow_events lives
/// here only.
#[pg_extern(volatile, parallel_unsafe, name = "_emit")]
#[search_path(pg_catalog, pg_temp)]
fn emit_sql(flow_slug: &str, event: pgrx::JsonB) {
    emit(flow_slug, event.0);
}

/// The `task_failed` event: its one shape, announced by the claim (a retry after a timeout) and,
/// through `pgflow._emit_task_failed`, by fail_task and a last attempt timing out.
struct TaskFailed<'a> {
    run_id: &'a str,
    flow_slug: &'a str,
    step_slug: &'a str,
    task_index: i32,
    attempt: i32,
    will_retry: bool,
    /// `error` (fail_task) or `timeout`
    reason: &'a str,
}

impl TaskFailed<'_> {
    fn event(&self) -> Value {
        json!({"event": "task_failed", "run_id": self.run_id, "flow_slug": self.flow_slug,
               "step_slug": self.step_slug, "task_index": self.task_index, "attempt": self.attempt,
               "will_retry": self.will_retry, "reason": self.reason})
    }
}

/// Internal `pgflow._emit_task_failed(...)`: announce a [`TaskFailed`] for the PL/pgSQL side.
#[pg_extern(volatile, parallel_unsafe, name = "_emit_task_failed")]
#[search_path(pg_catalog, pg_temp)]
fn emit_task_failed_sql(
    run_id: pgrx::Uuid,
    flow_slug: &str,
    step_slug: &str,
    task_index: i32,
    attempt: i32,
    will_retry: bool,
    reason: &str,
) {
    let run_id = run_id.to_string();
    let failed = TaskFailed {
        run_id: &run_id,
        flow_slug,
        step_slug,
        task_index,
        attempt,
        will_retry,
        reason,
    };
    emit(flow_slug, failed.event());
}

fn task_events() -> bool {
    matches!(WORKFLOW_EVENTS.get(), WorkflowEvents::All)
}

/// A flow's options and queue.
struct Flow {
    slug: String,
    slug_datum: Datum,
    timeout: i32,
    max_attempts: i32,
    queue_id: i64,
}

unsafe fn flow(slug: Option<Datum>) -> Flow {
    // SAFETY: called inside an SPI connection (the caller's contract); `slug` is a text datum,
    // passed as the statement's text parameter and read by text_to_string, and the result columns
    // are read with bounds-checked accessors.
    unsafe {
        if let Some(d) = slug {
            if run(Stmt::FlowOf, &[Some(d)]) == 1 {
                return Flow {
                    slug: text_to_string(d),
                    slug_datum: d,
                    timeout: int_column(0, 1).unwrap_or(0) as i32,
                    max_attempts: int_column(0, 2).unwrap_or(0) as i32,
                    queue_id: int_column(0, 3).unwrap_or(0),
                };
            }
        }
        run(Stmt::RaiseFlow, &[slug]);
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "flow without its queue".into(),
            None,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Claiming tasks
// ---------------------------------------------------------------------------------------------

/// A message the claim just leased.
struct Claimed {
    msg_id: i64,
    read_ct: i32,
    body: Datum,
    run_id: Option<Datum>,
    step_slug: Option<Datum>,
    task_index: Option<i32>,
}

/// The rows of the last claim statement, in msg_id order.
unsafe fn claimed_rows(n: u64) -> Vec<Claimed> {
    // SAFETY: called inside an SPI connection right after a claim statement (the caller's
    // contract), whose result columns are read by position with bounds-checked accessors; uuid and
    // text columns are copied before the next statement.
    unsafe {
        let mut rows: Vec<Claimed> = (0..n)
            .map(|row| {
                // a message that is not its task's own is handled as one naming no task
                let its_own = int_column(row, 7) == Some(1);
                Claimed {
                    msg_id: int_column(row, 1).unwrap_or(0),
                    read_ct: int_column(row, 2).unwrap_or(0) as i32,
                    body: column(row, 3).unwrap_or(Datum::from(0)),
                    run_id: column(row, 4).filter(|_| its_own),
                    step_slug: column(row, 5).filter(|_| its_own),
                    task_index: int_column(row, 6).filter(|_| its_own).map(|i| i as i32),
                }
            })
            .collect();
        rows.sort_unstable_by_key(|c| c.msg_id);
        rows
    }
}

/// Start the tasks of messages just leased by this transaction, in msg_id order, adding each
/// started task to the function's result set; returns how many were started.
unsafe fn start_claimed(
    fcinfo: FunctionCallInfo,
    f: &Flow,
    claimed: &[Claimed],
    worker_id: Option<Datum>,
) -> usize {
    // SAFETY: fcinfo is the call information of a set-returning function on which
    // InitMaterializedSRF has been called (the caller's contract), so resultinfo is a
    // ReturnSetInfo with a tuple store and descriptor of step_task_record; statements run inside
    // the caller's SPI connection with datums of their declared types.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        let mut started = 0;
        for c in claimed {
            let (Some(run_id), Some(step_slug), Some(task_index)) =
                (c.run_id, c.step_slug, c.task_index)
            else {
                not_startable(f, c);
                continue;
            };
            let n = run(
                Stmt::StartTask,
                &[
                    Some(run_id),
                    Some(step_slug),
                    Some(Datum::from(task_index)),
                    Some(Datum::from(c.read_ct)),
                    worker_id,
                    Some(f.slug_datum),
                    Some(Datum::from(f.max_attempts)),
                    Some(c.body),
                    Some(Datum::from(f.timeout)),
                ],
            );
            if n == 0 || int_column(0, 4) != Some(1) {
                not_startable(f, c);
                continue;
            }
            let retry_after_timeout = text_column(0, 1).as_deref() == Some("started");
            let input = column(0, 3);
            let step = text_to_string(step_slug);
            if task_events() {
                let run = uuid_string(run_id);
                if retry_after_timeout {
                    let failed = TaskFailed {
                        run_id: &run,
                        flow_slug: &f.slug,
                        step_slug: &step,
                        task_index,
                        attempt: c.read_ct - 1,
                        will_retry: true,
                        reason: "timeout",
                    };
                    emit(&f.slug, failed.event());
                }
                emit(
                    &f.slug,
                    json!({"event": "task_started", "run_id": run, "flow_slug": f.slug,
                       "step_slug": step, "task_index": task_index, "attempt": c.read_ct}),
                );
            }
            let mut values = [
                f.slug_datum,
                run_id,
                step_slug,
                Datum::from(task_index),
                Datum::from(c.msg_id),
                input.unwrap_or(Datum::from(0)),
            ];
            let mut nulls = [false, false, false, false, false, input.is_none()];
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            started += 1;
        }
        started
    }
}

/// Claim up to `qty` visible tasks of flow `f` (leased `vt` seconds if a stray message) and
/// start them, adding each to the function's result set; returns how many were started.
unsafe fn claim(
    fcinfo: FunctionCallInfo,
    f: &Flow,
    vt: i32,
    qty: i32,
    worker_id: Option<Datum>,
) -> usize {
    // SAFETY: the caller's contract is start_claimed's (a set-returning call with its result
    // materialised, inside an SPI connection); the statement gets by-value datums of its types.
    unsafe {
        let n = run(
            Stmt::ClaimTasks,
            &[
                Some(Datum::from(f.queue_id)),
                Some(Datum::from(vt)),
                Some(Datum::from(qty)),
                Some(f.slug_datum),
                Some(Datum::from(f.timeout)),
            ],
        );
        if n == 0 {
            return 0;
        }
        start_claimed(fcinfo, f, &claimed_rows(n), worker_id)
    }
}

/// A claimed message whose task cannot start: dead-lettered, dropped or failed in PL/pgSQL.
unsafe fn not_startable(f: &Flow, c: &Claimed) {
    // SAFETY: called inside an SPI connection (the caller's contract); the parameters are the
    // flow's text datum and by-value bigint and integer datums, or uuid and text datums copied
    // from the claim, matching the statement's declared types.
    unsafe {
        run(
            Stmt::NotStartable,
            &[
                Some(f.slug_datum),
                Some(Datum::from(f.queue_id)),
                Some(Datum::from(c.msg_id)),
                Some(Datum::from(c.read_ct)),
                c.run_id,
                c.step_slug,
                c.task_index.map(Datum::from),
            ],
        );
    }
}

/// The raw entry points below, as `sql/workflow/runtime.sql` declares them.
#[cfg_attr(not(any(test, feature = "pg_test")), allow(dead_code))]
pub(crate) const C_FUNCTIONS: &[CFunction] = &[
    CFunction {
        symbol: "pgflow_poll_for_tasks",
        signature: "pgflow.poll_for_tasks(text,integer,integer,integer,integer,uuid)",
        result: "SETOF pgflow.step_task_record",
    },
    CFunction {
        symbol: "pgflow_start_tasks",
        signature: "pgflow.start_tasks(text,bigint[],uuid)",
        result: "SETOF pgflow.step_task_record",
    },
    CFunction {
        symbol: "pgflow_complete_task",
        signature: "pgflow.complete_task(uuid,text,integer,jsonb,uuid)",
        result: "text",
    },
    CFunction {
        symbol: "pgflow_complete_and_poll",
        signature: "pgflow.complete_and_poll(uuid,text,integer,jsonb,integer,integer,uuid)",
        result: "SETOF pgflow.step_task_record",
    },
    CFunction {
        symbol: "pgflow_start_single_step",
        signature:
            "pgflow._start_single_step(uuid,text,bigint,regclass,text,integer,integer,boolean)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_step_completed",
        signature: "pgflow._step_completed(uuid,bigint,text)",
        result: "boolean",
    },
];

v1!(pg_finfo_pgflow_poll_for_tasks);
/// `pgflow.poll_for_tasks(flow_slug, vt, qty, max_poll_seconds, poll_interval_ms, worker_id)`
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_poll_for_tasks(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.poll_for_tasks as C_FUNCTIONS lists it (checked against pg_proc by a test), so the
    // argument positions and types read here are those; every SPI statement runs inside the
    // SpiScope.
    unsafe {
        let int = |i| arg(fcinfo, i).map(|d: Datum| d.value() as i32);
        let worker_id = arg(fcinfo, 5);
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let _spi = SpiScope::connect();
        let f = flow(arg(fcinfo, 0));
        let (vt, qty) = check_lease(int(1), int(2));
        let (max_poll_seconds, poll_interval_ms) = check_poll(int(3), int(4));
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(max_poll_seconds as u64);
        loop {
            // Taken before looking, so tasks queued by a commit between the look and the wait
            // wake us.
            let epoch = events::wake_epoch(f.queue_id);
            if claim(fcinfo, &f, vt, qty, worker_id) > 0 {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let wait_ms = (left.as_millis() as i64).clamp(1, poll_interval_ms as i64);
            events::wait_for_wake(f.queue_id, epoch, wait_ms as i32);
        }
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_start_tasks);
/// `pgflow.start_tasks(flow_slug, msg_ids, worker_id)`
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_start_tasks(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for pgflow.start_tasks
    // as C_FUNCTIONS lists it (checked against pg_proc by a test), so the argument positions and
    // types read here are those; every SPI statement runs inside the SpiScope.
    unsafe {
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let _spi = SpiScope::connect();
        let f = flow(arg(fcinfo, 0));
        let ids = arg(fcinfo, 1);
        check_ids(ids, None, "msg_ids", "read_cts");
        let Some(worker_id) = arg(fcinfo, 2) else {
            null_error(
            "worker_id",
            Some("Each worker passes a uuid of its own; complete_task and fail_task can check it."),
        )
        };
        let n = run(
            Stmt::LeaseGiven,
            &[
                Some(Datum::from(f.queue_id)),
                Some(Datum::from(f.timeout)),
                ids,
                Some(f.slug_datum),
                Some(Datum::from(f.timeout)),
            ],
        );
        if n > 0 {
            start_claimed(fcinfo, &f, &claimed_rows(n), Some(worker_id));
        }
        Datum::from(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Completing tasks
// ---------------------------------------------------------------------------------------------

v1!(pg_finfo_pgflow_complete_task);
/// `pgflow.complete_task(run_id, step_slug, task_index, output, worker_id) -> text`
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_complete_task(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.complete_task as C_FUNCTIONS lists it (checked against pg_proc by a test), which is
    // what complete_task reads; its SPI statements run inside the SpiScope and the outcome is
    // copied into a text datum after it ends.
    unsafe {
        let outcome = {
            let _spi = SpiScope::connect();
            let args = [0, 1, 2, 3, 4].map(|i| arg(fcinfo, i));
            complete_task(args).0
        };
        text_datum(&outcome)
    }
}

v1!(pg_finfo_pgflow_complete_and_poll);
/// `pgflow.complete_and_poll(run_id, step_slug, task_index, output, vt, qty, worker_id)`:
/// complete_task, then (in the same transaction, without waiting) a claim of the flow's tasks.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_complete_and_poll(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.complete_and_poll as C_FUNCTIONS lists it (checked against pg_proc by a test), so
    // the argument positions and types read here are those; every SPI statement runs inside the
    // SpiScope.
    unsafe {
        let int = |i| arg(fcinfo, i).map(|d: Datum| d.value() as i32);
        let (vt, qty) = check_lease(int(4), int(5));
        let worker_id = arg(fcinfo, 6);
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let _spi = SpiScope::connect();
        let (_, flow_slug) = complete_task([0, 1, 2, 3, 6].map(|i| arg(fcinfo, i)));
        let f = flow(Some(text_datum(&flow_slug)));
        claim(fcinfo, &f, vt, qty, worker_id);
        Datum::from(0)
    }
}

/// complete_task with its arguments (run_id, step_slug, task_index, output, worker_id): the
/// outcome, and the run's flow.
unsafe fn complete_task(args: [Option<Datum>; 5]) -> (String, String) {
    // SAFETY: the arguments are datums of complete_task's declared types (the caller's
    // contract); called inside an SPI connection.
    unsafe {
        let [run_id, step_slug, task_index, output, worker_id] = args;
        let Some(output) = output else {
            null_error(
                "output",
                Some("Pass JSON null ('null'::jsonb) for a task without output."),
            )
        };
        let check_params = [run_id, step_slug, task_index, worker_id];
        let (Some(run_id), Some(step_slug), Some(task_index)) = (run_id, step_slug, task_index)
        else {
            run(Stmt::EndTaskCheck, &check_params); // raises the specific 22004
            unreachable!("_end_task_check raises for NULL arguments");
        };
        // The flow lock, shared, then the run lock: a drop_flow under way finishes first, and the
        // task is then looked up afresh (gone: 42704), never used with a dropped queue's sequence.
        //
        // A map step's tasks complete at once: their completions take the run lock shared (what
        // else moves the run forward takes it exclusive), count nothing down, and only one of
        // them completes the step. Before finishing its task, a completion looks for a task of
        // the step still queued whose message no claim holds, and locks that message FOR KEY
        // SHARE: claims pass over it until this transaction ends, so that task is claimed, and
        // then completed, only after this commit, by a completion that sees this one. Holding
        // that, this completion hands the step's completion on and is done. If there is none
        // (every task left is claimed, or none is left), it takes the run's finisher lock,
        // finishes its task and then, looking afresh, completes the step if no task is left: of
        // two such completions the second waits for the first's commit and sees its task
        // completed. Lock order: flow, run, finisher (before any row), rows. Two reports of one
        // task: the second's task update finds it completed and changes nothing.
        let mut map_task = false;
        if run(
            Stmt::FlowOfRun,
            &[Some(run_id), Some(step_slug), Some(task_index)],
        ) == 1
        {
            if let Some(flow) = column(0, 1) {
                locks::lock(Space::Flow, flow, true, true);
            }
            map_task = column(0, 2).is_some_and(|m| m.value() != 0);
        }
        let index = task_index.value() as i32;
        // a map task's completion takes the run lock shared
        locks::lock_run_id(Space::Run, run_id, map_task, true);
        if run(
            Stmt::TaskOf,
            &[Some(run_id), Some(step_slug), Some(task_index)],
        ) == 0
        {
            run(Stmt::EndTaskCheck, &check_params); // raises the specific 42704
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "task not found".into(),
                None,
            );
        }
        let run_status = text_column(0, 1).unwrap_or_default();
        let flow_slug = text_column(0, 2).unwrap_or_default();
        let task_status = text_column(0, 3).unwrap_or_default();
        let last_worker = column(0, 4);
        let attempt = int_column(0, 5).unwrap_or(0) as i32;
        let message_id = int_column(0, 6).unwrap_or(0);
        let single = text_column(0, 7).as_deref() == Some("single");
        let queue_id = int_column(0, 8).unwrap_or(0);
        let seq = Oid::from(int_column(0, 9).unwrap_or(0) as u32);
        let outcome = task_outcome(
            Some(&run_status),
            Some(&task_status),
            worker_id.map(|w| uuid_bytes(w)),
            last_worker.map(|l| uuid_bytes(l)),
            false,
        );
        if let Some(outcome) = outcome {
            return (outcome.to_string(), flow_slug);
        }
        let handed_on = map_task && !single && hand_on(run_id, step_slug, index, queue_id);
        if map_task && !single && !handed_on {
            locks::lock_run_id(Space::Finisher, run_id, false, true);
        }
        run(
            Stmt::FinishTask,
            &[
                Some(Datum::from(queue_id)),
                Some(Datum::from(message_id)),
                worker_id,
                Some(Datum::from(attempt)),
                Some(run_id),
                Some(step_slug),
                Some(task_index),
                Some(output),
                Some(Datum::from(single)),
            ],
        );
        let deleted = int_column(0, 1).unwrap_or(0);
        let left_tasks = int_column(0, 2);
        let duration_ms = int_column(0, 3);
        if int_column(0, 4) == Some(0) && worker_id.is_none() {
            // a second report of a map task, at the same time as the first
            return ("already_completed".to_string(), flow_slug);
        }
        if deleted == 0 && worker_id.is_some() {
            run(
                Stmt::EndTaskRecheck,
                &[
                    Some(run_id),
                    Some(step_slug),
                    Some(task_index),
                    worker_id,
                    Some(Datum::from(attempt)),
                ],
            );
            let outcome = text_column(0, 1).unwrap_or_else(|| "stale".into());
            return (outcome, flow_slug);
        }
        if task_events() {
            emit(
                &flow_slug,
                json!({"event": "task_completed", "run_id": uuid_string(run_id), "flow_slug": flow_slug,
                   "step_slug": text_to_string(step_slug), "task_index": index,
                   "duration_ms": duration_ms}),
            );
        }
        let step_done = if single {
            left_tasks == Some(0)
        } else {
            !handed_on
                && run(Stmt::TasksLeft, &[Some(run_id), Some(step_slug)]) == 1
                && column(0, 1).is_some_and(|left| left.value() == 0)
        };
        if step_done {
            if !single {
                run(Stmt::MapStepOutput, &[Some(run_id), Some(step_slug)]);
            }
            step_completed(run_id, &flow_slug, queue_id, seq, step_slug);
        }
        ("completed".to_string(), flow_slug)
    }
}

/// A map task's completion hands its step's completion on to another task of the step (see
/// complete_task): true if it locked the message of a task of the step still queued. The task
/// is looked at again once its message is locked: a claim that committed between the look and
/// the lock has started it, and a started task must not be handed on to. Readers blocked on the
/// flow's queue are woken at commit, when the message can be claimed again.
unsafe fn hand_on(run_id: Datum, step_slug: Datum, task_index: i32, queue_id: i64) -> bool {
    // SAFETY: called inside an SPI connection (the caller's contract) with a uuid and a text
    // datum; the statements' columns are read with bounds-checked accessors.
    unsafe {
        for _ in 0..8 {
            let n = run(
                Stmt::QueuedTaskLock,
                &[
                    Some(run_id),
                    Some(step_slug),
                    Some(Datum::from(task_index)),
                    Some(Datum::from(queue_id)),
                ],
            );
            if n == 0 {
                return false;
            }
            let Some(other) = int_column(0, 1) else {
                return false;
            };
            let still_queued = run(
                Stmt::TaskQueued,
                &[
                    Some(run_id),
                    Some(step_slug),
                    Some(Datum::from(other as i32)),
                ],
            ) == 1
                && column(0, 1).is_some_and(|queued| queued.value() != 0);
            if still_queued {
                events::add_wake(queue_id);
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Completed steps
// ---------------------------------------------------------------------------------------------

/// Step `step_slug` of run `run_id` has just completed or been skipped (its state says so; the
/// caller holds the run lock): start the dependents whose deps are now all finished, in
/// step_index order, and complete the run when no step is left. Returns false if the run
/// failed meanwhile (a map over a non-array, a condition with when_unmet fail).
unsafe fn step_completed(
    run_id: Datum,
    flow_slug: &str,
    queue_id: i64,
    seq: Oid,
    step_slug: Datum,
) -> bool {
    // SAFETY: called inside an SPI connection (the caller's contract); `run_id` is a uuid datum,
    // `step_slug` a text datum, and the statements get parameters of their declared types; `seq`
    // is the flow queue's sequence, read with nextval's own function.
    unsafe {
        let flow_datum = text_datum(flow_slug);
        let n = run(
            Stmt::Dependents,
            &[Some(flow_datum), Some(step_slug), Some(run_id)],
        );
        // (step_slug, single without a condition, step_index, start delay, remaining_deps)
        let dependents: Vec<(Datum, bool, i32, i32, i64)> = (0..n)
            .map(|row| {
                (
                    column(row, 1).unwrap_or(Datum::from(0)),
                    text_column(row, 2).as_deref() == Some("single")
                        && column(row, 6).is_some_and(|c| c.value() == 0),
                    int_column(row, 3).unwrap_or(0) as i32,
                    int_column(row, 4).unwrap_or(0) as i32,
                    int_column(row, 5).unwrap_or(0),
                )
            })
            .collect();
        // Starting a map step or a step with a condition may finish steps at once (a map over
        // [], a skipped step), which counts down the deps of the dependents after it in this
        // list: from then on each is read again before it is counted down or started.
        let mut nested = false;
        for &(dep, single, step_index, delay, remaining_deps) in &dependents {
            let mut remaining_deps = remaining_deps;
            if nested {
                run(Stmt::DependentState, &[Some(run_id), Some(dep)]);
                if column(0, 1).is_none_or(|waiting| waiting.value() == 0) {
                    continue;
                }
                remaining_deps = int_column(0, 2).unwrap_or(0);
            }
            if remaining_deps != 1 {
                run(Stmt::DecrementDeps, &[Some(run_id), Some(dep)]);
            } else if single {
                let step = SingleStep {
                    run_id,
                    step_slug: dep,
                    flow_slug: flow_datum,
                    queue_id,
                    seq,
                    step_index,
                    delay,
                    root: false,
                };
                step.start();
            } else {
                // a map step, or a step with a condition: pgflow._start_step
                nested = true;
                run(
                    Stmt::StartStep,
                    &[Some(run_id), Some(Datum::from(queue_id)), Some(dep)],
                );
                if column(0, 1).is_some_and(|ok| ok.value() == 0) {
                    return false;
                }
            }
        }
        if dependents.is_empty() && run(Stmt::CompleteRun, &[Some(run_id)]) == 1 {
            let duration_ms = int_column(0, 2);
            emit(
                flow_slug,
                json!({"event": "workflow_completed", "run_id": uuid_string(run_id),
                   "flow_slug": flow_slug, "duration_ms": duration_ms}),
            );
        }
        true
    }
}

/// A single step to start: the one home of starting a single step (a root one from start_flow, a
/// dependent one when its deps complete), with or without start delay.
struct SingleStep {
    run_id: Datum,
    step_slug: Datum,
    flow_slug: Datum,
    queue_id: i64,
    seq: Oid,
    step_index: i32,
    /// start delay, seconds
    delay: i32,
    /// a root step, whose state does not exist yet
    root: bool,
}

impl SingleStep {
    /// Start it: its state, message and task in one statement; a delayed task is remembered so
    /// that its readers are woken when it comes due.
    ///
    /// # Safety
    /// Inside an SPI connection; `run_id` is a uuid datum, `step_slug` and `flow_slug` text
    /// datums, `seq` the flow queue's sequence.
    unsafe fn start(&self) {
        // SAFETY: the caller's contract; the statement gets parameters of its declared types, and
        // the time it returns is passed on as the timestamptz datum it is.
        unsafe {
            let n = run(
                Stmt::StartSingleStep,
                &[
                    Some(self.run_id),
                    Some(self.step_slug),
                    Some(self.flow_slug),
                    Some(Datum::from(self.queue_id)),
                    Some(Datum::from(self.seq)),
                    Some(Datum::from(self.step_index)),
                    Some(Datum::from(self.delay)),
                    Some(Datum::from(self.root)),
                ],
            );
            if n == 1 && self.delay > 0 {
                if let Some(vt) = column(0, 1) {
                    crate::queue::due_at(self.queue_id, vt);
                }
            }
        }
    }
}

v1!(pg_finfo_pgflow_start_single_step);
/// Internal `pgflow._start_single_step(run_id, flow_slug, queue_id, msg_seq, step_slug,
/// step_index, start_delay, root)`: [`SingleStep::start`] for `pgflow._start_step`.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_start_single_step(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow._start_single_step as C_FUNCTIONS lists it (checked against pg_proc by a test), so
    // the argument positions and types read here are those; the statement runs inside the
    // SpiScope.
    unsafe {
        let args: Vec<Option<Datum>> = (0..8).map(|i| arg(fcinfo, i)).collect();
        let [Some(run_id), Some(flow_slug), Some(queue_id), Some(seq), Some(step_slug), Some(step_index), Some(delay), Some(root)] =
            args[..]
        else {
            null_error(
                "run_id, flow_slug, queue_id, msg_seq, step_slug, step_index, start_delay and root",
                None,
            )
        };
        let _spi = SpiScope::connect();
        SingleStep {
            run_id,
            step_slug,
            flow_slug,
            queue_id: queue_id.value() as i64,
            seq: Oid::from(seq.value() as u32),
            step_index: step_index.value() as i32,
            delay: delay.value() as i32,
            root: root.value() != 0,
        }
        .start();
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_step_completed);
/// Internal `pgflow._step_completed(run_id, queue_id, step_slug) -> boolean`, for
/// `pgflow._start_step` (a map step over an empty array completes at once).
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_step_completed(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow._step_completed as C_FUNCTIONS lists it (checked against pg_proc by a test), so the
    // argument positions and types read here are those; every SPI statement runs inside the
    // SpiScope.
    unsafe {
        let (Some(run_id), Some(queue_id), Some(step_slug)) =
            (arg(fcinfo, 0), arg(fcinfo, 1), arg(fcinfo, 2))
        else {
            null_error("run_id, queue_id and step_slug", None)
        };
        let _spi = SpiScope::connect();
        if run(Stmt::RunAndQueue, &[Some(run_id), Some(queue_id)]) == 0 {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("run {} does not exist", uuid_string(run_id)),
                None,
            );
        }
        let flow_slug = text_column(0, 1).unwrap_or_default();
        let seq = Oid::from(int_column(0, 2).unwrap_or(0) as u32);
        Datum::from(step_completed(
            run_id,
            &flow_slug,
            queue_id.value() as i64,
            seq,
            step_slug,
        ))
    }
}
