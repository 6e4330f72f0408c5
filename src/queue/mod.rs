//! The queue layer's hot path in Rust: `send`, `read`, `archive`, `delete` (one message each)
//! and `ack_and_read`, plus the row trigger announcing inserted messages.
//!
//! Why not PL/pgSQL for these: measured, the PL/pgSQL API spent three to four times the server
//! CPU of the same row operations in plain SQL, in nested function calls (each with its own
//! `SET` scope), in expressions prepared again in every transaction and in a statement trigger
//! with a transition table. Here each call checks its arguments in Rust, finds the queue in a
//! per-backend cache, and runs one statement planned once per backend (a kept SPI plan, generic
//! from the start). Rows come back from SPI and go into the result set as they are: a message
//! is never parsed into JSON and printed again.
//!
//! The queue cache maps a queue name to its id, sequence, max_retries and notify flag. Any
//! change to `pgflow.queues` (create, alter, drop) fires a statement trigger that invalidates
//! the table's relcache entry; every backend clears its cache when it processes that
//! invalidation (at its next transaction, or at once after taking the queue-name lock, which
//! send does). Clearing on any relcache invalidation is deliberate: it is rare, and a miss
//! costs one look-up.
//!
//! The functions are declared in `sql/queue/api.sql` (`LANGUAGE c`) with their defaults and
//! COMMENTs, and no `SET` clauses: [`crate::spi`] pins the search path and plan shape of their
//! statements. The argument checks raise exactly the errors the PL/pgSQL helpers raise for the
//! other functions.

pub mod topics;

use crate::error::{null_error, raise};
use crate::events;
use crate::locks::{self, Space};
use crate::names::check_name;
use crate::pg::{
    arg, as_user, column, int_column, json_type, optional_arg, run, text_arg, text_column,
    text_to_string, CFunction, SpiScope, Statement, INT4, INT4ARRAY, INT8, INT8ARRAY, JSONB, OID,
    REGCLASS, TEXT, TIMESTAMPTZ,
};
use crate::v1;
use pgrx::pg_sys::{self, Datum, FunctionCallInfo, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::collections::HashMap;

const MAX_SECONDS: i32 = 31_536_000;
const MAX_QTY: i32 = 100_000;

#[derive(Clone)]
struct QueueInfo {
    id: i64,
    seq: Oid,
    max_retries: i32,
    /// `pgflow.queues.managed_by`: the layer whose functions alone move its messages
    managed_by: Option<String>,
}

#[derive(Default)]
struct QueueCache {
    by_name: HashMap<String, QueueInfo>,
    /// queue_id -> (queue_name, notify), for the row trigger.
    by_id: HashMap<i64, (String, bool)>,
    /// whether pgflow.messages has message groups (None: not looked yet)
    groups: Option<bool>,
}

thread_local! {
    static QUEUES: RefCell<QueueCache> = RefCell::new(QueueCache::default());
}

/// Called from `_PG_init`.
pub fn init() {
    // SAFETY: called once from _PG_init; the callback is a function of this library, which
    // stays loaded for the life of the process.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), Datum::from(0))
    };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: Datum, _relid: Oid) {
    QUEUES.with(|q| *q.borrow_mut() = QueueCache::default());
}

// ---------------------------------------------------------------------------------------------
// Statements, each prepared once per backend
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Stmt {
    LookupByName,
    RaiseQueue,
    FindDedup,
    SendKeyed,
    LookupById,
    Send,
    DueAt,
    Claim,
    DeadLetterExhausted,
    ArchiveOne,
    DeleteOne,
    ArchiveMany,
    DeleteMany,
    AnyVisible,
    AnyVisibleGrouped,
    HasGroups,
    ClaimGrouped,
    ProcOwner,
}

/// The visibility rule of a queue's messages, for the row alias `$t`: in queue `$1` and not
/// leased, delayed or waiting out a retry. One text for the claims (`read` and `pop` here, the
/// workflow's task claim) and the wait.
#[macro_export]
macro_rules! visible {
    ($t:literal) => {
        concat!($t, ".queue_id = $1 AND ", $t, ".vt <= clock_timestamp()")
    };
}

/// The delivery order of a queue's visible messages, for the row alias `$t`: higher priority
/// first, then FIFO by msg_id. What every claim selects before its `LIMIT` and `FOR UPDATE SKIP
/// LOCKED`.
#[macro_export]
macro_rules! deliverable {
    ($t:literal) => {
        concat!($crate::visible!($t), $crate::delivery_order!($t))
    };
}

#[macro_export]
macro_rules! delivery_order {
    ($t:literal) => {
        concat!(" ORDER BY ", $t, ".priority DESC, ", $t, ".msg_id")
    };
}

/// [`deliverable!`] for a schema with message groups: a grouped message is deliverable only as
/// its group's head, when no earlier message of the group is live (visible, leased, delayed or
/// waiting out a retry). So a group is delivered in order and one message at a time; other
/// groups and ungrouped messages are not held up.
macro_rules! deliverable_grouped {
    ($t:literal) => {
        concat!(
            $crate::visible!($t),
            " AND (",
            $t,
            ".group_id IS NULL OR NOT EXISTS (SELECT 1 FROM pgflow.messages g WHERE g.queue_id = ",
            $t,
            ".queue_id AND g.group_id = ",
            $t,
            ".group_id AND g.msg_id < ",
            $t,
            ".msg_id))",
            $crate::delivery_order!($t)
        )
    };
}

/// The claim: `$deliverable` chooses its messages (see Stmt::Claim).
macro_rules! claim_sql {
    ($deliverable:expr) => {
        concat!(
            "UPDATE pgflow.messages m
                    SET vt = clock_timestamp() + make_interval(secs => $2), read_ct = m.read_ct + 1,
                        errors = CASE WHEN m.read_ct > 0 AND NOT coalesce(
                                           m.errors @> jsonb_build_array(jsonb_build_object('attempt', m.read_ct)), false)
                                      THEN coalesce(m.errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
                                           'attempt', m.read_ct, 'error', 'visibility timeout expired without ack or nack',
                                           'at', m.vt))
                                      ELSE m.errors END
                  WHERE m.queue_id = $1 AND m.msg_id = ANY (ARRAY(
                        SELECT c.msg_id FROM pgflow.messages c
                         WHERE ($4::int8[] IS NULL OR c.msg_id <> ALL ($4)) AND ",
            $deliverable,
            "
                         LIMIT $3
                           FOR UPDATE SKIP LOCKED))
                 RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message, m.headers, m.priority"
        )
    };
}

impl Statement for Stmt {
    fn id(self) -> u32 {
        self as u32
    }

    fn sql(self) -> (&'static str, &'static [Oid]) {
        match self {
            // managed_by through to_jsonb: the column is new in 0.2.0, and a database still at
            // 0.1.0 runs this library until it is updated (a cache miss, so rare)
            Stmt::LookupByName => (
                "SELECT queue_id, msg_seq::oid, max_retries, to_jsonb(q) ->> 'managed_by'
                   FROM pgflow.queues q WHERE queue_name = $1",
                &[TEXT],
            ),
            // raises the specific error for a malformed or unknown queue name (pgflow._queue's)
            Stmt::RaiseQueue => ("SELECT pgflow._queue($1)", &[TEXT]),
            Stmt::LookupById => (
                "SELECT queue_name, notify FROM pgflow.queues WHERE queue_id = $1",
                &[INT8],
            ),
            // $1 queue_id, $2 sequence, $3 delay s, $4 priority, $5 message, $6 headers
            // $1 queue_id, $2 its sequence, $3 when it becomes visible (NULL: now), $4 priority,
            // $5 message, $6 headers
            Stmt::Send => (
                "INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message, headers)
                 VALUES ($1, nextval($2), coalesce($3, clock_timestamp()), $4, $5, $6)
                 RETURNING msg_id",
                &[INT8, REGCLASS, TIMESTAMPTZ, INT4, JSONB, JSONB],
            ),
            // $1 queue_id, $2 a deduplication key: the live message holding it
            Stmt::FindDedup => (
                "SELECT msg_id FROM pgflow.messages WHERE queue_id = $1 AND dedup_key = $2",
                &[INT8, TEXT],
            ),
            // Stmt::Send with $7 a deduplication key and $8 a message group (either may be NULL):
            // nothing if a live message holds the key (a concurrent send of the same key is
            // waited for, then found by FindDedup)
            Stmt::SendKeyed => (
                "INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message, headers, dedup_key, group_id)
                 VALUES ($1, nextval($2), coalesce($3, clock_timestamp()), $4, $5, $6, $7, $8)
                 ON CONFLICT (queue_id, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
                 RETURNING msg_id",
                &[INT8, REGCLASS, TIMESTAMPTZ, INT4, JSONB, JSONB, TEXT, TEXT],
            ),
            // $1 queue_id, $2 when: as pgflow._due_at
            Stmt::DueAt => ("SELECT pgflow._due_at($1, $2)", &[INT8, TIMESTAMPTZ]),
            // $1 queue_id, $2 vt s, $3 how many, $4 msg_ids to pass over (NULL: none). The shape
            // of the plain-SQL claim: lock the first visible rows in delivery order, lease them
            // by primary key. A row whose read_ct comes back above max_retries + 1 had exhausted
            // its deliveries: it is dead-lettered by the caller, not delivered.
            //
            // Every attempt leaves its entry in errors: a nack writes its own; a delivery
            // that is claimed again without one had its lease run out (the consumer crashed
            // or hung), and gets "visibility timeout expired" with the time its lease ended.
            // Only redeliveries pay for the test; errors is not indexed, so the update stays
            // HOT. Written here, not in a function, so that a database still at 0.1.0 runs it.
            Stmt::Claim => (claim_sql!(deliverable!("c")), &[INT8, INT4, INT4, INT8ARRAY]),
            // the claim on a schema with message groups (0.2.0 on)
            Stmt::ClaimGrouped => (
                claim_sql!(deliverable_grouped!("c")),
                &[INT8, INT4, INT4, INT8ARRAY],
            ),
            // $1 queue_id, $2 msg_ids whose lease expired after their last delivery: take back
            // the read_ct the claim added, then dead-letter them as pgflow._dead_letter does.
            Stmt::DeadLetterExhausted => (
                "WITH undo AS (
                     UPDATE pgflow.messages m SET read_ct = m.read_ct - 1
                      WHERE m.queue_id = $1 AND m.msg_id = ANY ($2)
                     RETURNING m.msg_id
                 )
                 SELECT count(pgflow._dead_letter(q, undo.msg_id, NULL))
                   FROM undo JOIN pgflow.queues q ON q.queue_id = $1",
                &[INT8, INT8ARRAY],
            ),
            // $1 queue_id, $2 msg_id, $3 read_ct or NULL
            Stmt::ArchiveOne => (
                "WITH gone AS (
                     DELETE FROM pgflow.messages m
                      WHERE m.queue_id = $1 AND m.msg_id = $2 AND ($3::int4 IS NULL OR m.read_ct = $3)
                     RETURNING m.*
                 )
                 INSERT INTO pgflow.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
                 SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM gone
                 RETURNING msg_id",
                &[INT8, INT8, INT4],
            ),
            Stmt::DeleteOne => (
                "DELETE FROM pgflow.messages m
                  WHERE m.queue_id = $1 AND m.msg_id = $2 AND ($3::int4 IS NULL OR m.read_ct = $3)
                 RETURNING m.msg_id",
                &[INT8, INT8, INT4],
            ),
            // $1 queue_id, $2 msg_ids, $3 read_cts or NULL
            Stmt::ArchiveMany => (
                "WITH gone AS (
                     DELETE FROM pgflow.messages m
                      USING unnest($2::int8[], coalesce($3::int4[], '{}')) AS w(id, rc)
                      WHERE m.queue_id = $1 AND m.msg_id = w.id AND (w.rc IS NULL OR m.read_ct = w.rc)
                     RETURNING m.*
                 )
                 INSERT INTO pgflow.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
                 SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM gone
                 RETURNING msg_id",
                &[INT8, INT8ARRAY, INT4ARRAY],
            ),
            Stmt::DeleteMany => (
                "DELETE FROM pgflow.messages m
                  USING unnest($2::int8[], coalesce($3::int4[], '{}')) AS w(id, rc)
                  WHERE m.queue_id = $1 AND m.msg_id = w.id AND (w.rc IS NULL OR m.read_ct = w.rc)
                 RETURNING m.msg_id",
                &[INT8, INT8ARRAY, INT4ARRAY],
            ),
            // $1 queue_id: whether a message could be claimed now
            Stmt::AnyVisible => (
                concat!(
                    "SELECT 1 FROM pgflow.messages c WHERE ",
                    visible!("c"),
                    " LIMIT 1"
                ),
                &[INT8],
            ),
            Stmt::AnyVisibleGrouped => (
                concat!(
                    "SELECT 1 FROM pgflow.messages c WHERE ",
                    deliverable_grouped!("c"),
                    " LIMIT 1"
                ),
                &[INT8],
            ),
            // whether pgflow.messages has message groups (a 0.1.0 schema has not)
            Stmt::HasGroups => (
                "SELECT count(*) FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'pgflow.messages'::pg_catalog.regclass AND attname = 'group_id'
                    AND NOT attisdropped",
                &[],
            ),
            // $1 a function's oid: its owner, whose rights a procedure's statements run with
            Stmt::ProcOwner => (
                "SELECT proowner FROM pg_catalog.pg_proc WHERE oid = $1",
                &[OID],
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

/// An integer argument that must not be NULL and must lie in `range`; `unit` follows the
/// upper bound in the message (" seconds" or "").
fn check_int(
    value: Option<i32>,
    name: &str,
    range: std::ops::RangeInclusive<i32>,
    unit: &str,
    null_hint: Option<&str>,
) -> i32 {
    let Some(v) = value else {
        null_error(name, null_hint)
    };
    if !range.contains(&v) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "{name} must be between {} and {}{unit}, not {v}",
                range.start(),
                range.end()
            ),
            None,
        );
    }
    v
}

fn check_seconds(value: Option<i32>, name: &str, null_hint: Option<&str>) -> i32 {
    check_int(value, name, 0..=MAX_SECONDS, " seconds", null_hint)
}

/// The checks shared by the functions that lease messages: a visibility timeout and a count.
pub(crate) fn check_lease(vt: Option<i32>, qty: Option<i32>) -> (i32, i32) {
    let vt = check_seconds(vt, "vt", Some("vt is the visibility timeout in seconds."));
    (vt, check_int(qty, "qty", 1..=MAX_QTY, "", None))
}

/// The checks shared by the functions that wait for messages (read_with_poll,
/// poll_for_tasks): how long to wait at most, and how often to look again meanwhile.
pub(crate) fn check_poll(
    max_poll_seconds: Option<i32>,
    poll_interval_ms: Option<i32>,
) -> (i32, i32) {
    (
        check_int(max_poll_seconds, "max_poll_seconds", 0..=3600, "", None),
        check_int(poll_interval_ms, "poll_interval_ms", 1..=60_000, "", None),
    )
}

/// Internal `pgflow._check_lease(vt, qty)`, for the PL/pgSQL functions that lease messages.
#[pg_extern(immutable, parallel_safe, name = "_check_lease")]
#[search_path(pg_catalog, pg_temp)]
fn check_lease_sql(vt: Option<i32>, qty: Option<i32>) {
    check_lease(vt, qty);
}

/// Longest deduplication key or message group, in bytes.
const MAX_KEY_BYTES: usize = 128;

/// A deduplication key or message group (argument `arg`), if given: 1 to 128 bytes (22023
/// empty, 54000 longer).
fn check_key(key: Option<&str>, arg: &str) {
    let Some(key) = key else { return };
    if key.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} must not be empty"),
            Some("Pass NULL for none."),
        );
    }
    if key.len() > MAX_KEY_BYTES {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "{arg} is {} bytes long, the limit is {MAX_KEY_BYTES}",
                key.len()
            ),
            Some("Use a hash of a longer key."),
        );
    }
}

/// The optional keys of a send, from arguments `dedup_at` and `group_at` (NULL or not declared:
/// none), checked: (dedup_key, group_id).
///
/// # Safety
/// `fcinfo` is the call information of a function whose arguments at those positions, where
/// declared, are text.
unsafe fn send_keys(
    fcinfo: FunctionCallInfo,
    dedup_at: usize,
    group_at: usize,
) -> (Option<Datum>, Option<Datum>) {
    // SAFETY: the caller's contract; optional_arg reads only declared arguments, and the datums
    // are text, read by text_to_string.
    unsafe {
        let dedup_key = optional_arg(fcinfo, dedup_at);
        let group_id = optional_arg(fcinfo, group_at);
        check_key(dedup_key.map(|k| text_to_string(k)).as_deref(), "dedup_key");
        check_key(group_id.map(|k| text_to_string(k)).as_deref(), "group_id");
        (dedup_key, group_id)
    }
}

/// Internal `pgflow._check_dedup_key(dedup_key)`: [`check_key`] for publish, which checks
/// its arguments before it knows which queues it sends to.
#[pg_extern(immutable, parallel_safe, name = "_check_dedup_key")]
#[search_path(pg_catalog, pg_temp)]
fn check_dedup_key_sql(dedup_key: Option<&str>) {
    check_key(dedup_key, "dedup_key");
}

/// Internal `pgflow._check_group_id(group_id)`: [`check_key`] for send_batch and publish.
#[pg_extern(immutable, parallel_safe, name = "_check_group_id")]
#[search_path(pg_catalog, pg_temp)]
fn check_group_id_sql(group_id: Option<&str>) {
    check_key(group_id, "group_id");
}

/// A message to send: NULL is refused (22004).
fn check_message<T>(message: Option<T>) -> T {
    let Some(message) = message else {
        null_error("message", Some("Send '{}'::jsonb for an empty message."))
    };
    message
}

/// Internal `pgflow._check_poll(max_poll_seconds, poll_interval_ms)`, for read_with_poll.
#[pg_extern(immutable, parallel_safe, name = "_check_poll")]
#[search_path(pg_catalog, pg_temp)]
fn check_poll_sql(max_poll_seconds: Option<i32>, poll_interval_ms: Option<i32>) {
    check_poll(max_poll_seconds, poll_interval_ms);
}

/// The elements of a one-dimensional int8[] or int4[] argument, with their nulls.
unsafe fn array_elements(d: Datum, int8: bool) -> (i32, Vec<Option<i64>>) {
    // SAFETY: the caller passes a non-null datum of an int8[] (int8 true) or int4[] argument;
    // pg_detoast_datum returns a plain array of it, and deconstruct_array is given that array's
    // own element type, length and alignment, so `elems` and `nulls` point to `n` entries each,
    // read only below `n`.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        let ndim = (*arr).ndim;
        let mut elems: *mut Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut n: i32 = 0;
        let (oid, len, align) = if int8 {
            (INT8, 8, pg_sys::TYPALIGN_DOUBLE)
        } else {
            (INT4, 4, pg_sys::TYPALIGN_INT)
        };
        pg_sys::deconstruct_array(
            arr,
            oid,
            len,
            true,
            align as std::ffi::c_char,
            &mut elems,
            &mut nulls,
            &mut n,
        );
        let values = (0..n as usize)
            .map(|i| {
                if *nulls.add(i) {
                    None
                } else if int8 {
                    Some((*elems.add(i)).value() as i64)
                } else {
                    Some((*elems.add(i)).value() as i32 as i64)
                }
            })
            .collect();
        (ndim, values)
    }
}

/// The checks of `pgflow._check_ids`; returns the ids and read_cts.
pub(crate) unsafe fn check_ids(
    ids: Option<Datum>,
    cts: Option<Datum>,
    ids_arg: &str,
    cts_arg: &str,
) -> (Vec<i64>, Option<Vec<Option<i64>>>) {
    // SAFETY: `ids` and `cts` are the non-null datums of arguments declared bigint[] and integer[]
    // (the caller's contract), which is what array_elements reads.
    unsafe {
        let Some(ids) = ids else {
            null_error(ids_arg, None)
        };
        let (ndim, ids) = array_elements(ids, true);
        if ndim > 1 {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("{ids_arg} must be a one-dimensional array"),
                None,
            );
        }
        if let Some(pos) = ids.iter().position(Option::is_none) {
            raise(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{ids_arg}[{}] is null", pos + 1),
                None,
            );
        }
        let ids: Vec<i64> = ids.into_iter().flatten().collect();
        let cts = cts.map(|c| array_elements(c, false));
        if let Some((ndim, cts)) = &cts {
            if *ndim > 1 {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("{cts_arg} must be a one-dimensional array"),
                    None,
                );
            }
            if cts.len() != ids.len() {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!(
                        "{cts_arg} has {} elements but {ids_arg} has {}",
                        cts.len(),
                        ids.len()
                    ),
                    Some(&format!(
                        "Give one {cts_arg} element per {ids_arg} element, or none."
                    )),
                );
            }
        }
        (ids, cts.map(|(_, c)| c))
    }
}

// ---------------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------------

/// The rule that keeps a flow's queue to the workflow layer: a queue whose messages another
/// layer manages (`pgflow.queues.managed_by = 'flow'`: the queue carrying a flow's tasks) is
/// refused to every function of the queue API that would send, acknowledge, drop, delay, fail,
/// reconfigure or redrive its messages (`operation`): each of those could lose a task (its run
/// would wait for ever), start it twice, or start it with a body nobody queued. Reading stays
/// open, since `read` followed by `start_tasks` is a worker's way to take tasks. Raised as
/// 55000 naming the queue and its flow; the PL/pgSQL functions call it as
/// `pgflow._check_unmanaged`.
pub(crate) fn refuse_managed(queue_name: &str, managed_by: Option<&str>, operation: &str) {
    if managed_by.is_none() {
        return;
    }
    let hint = if operation == "drop_queue" {
        "Drop the flow with pgflow.drop_flow(flow_slug) instead.".to_string()
    } else {
        format!(
            "pgflow.{operation} does not work on a flow's queue: start runs with pgflow.start_flow, \
             take tasks with pgflow.poll_for_tasks (or read and start_tasks), end them with \
             complete_task or fail_task, and remove the flow with drop_flow."
        )
    };
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("queue \"{queue_name}\" delivers the tasks of flow \"{queue_name}\""),
        Some(&hint),
    )
}

/// Internal `pgflow._check_unmanaged(queue_name, managed_by, operation)`: [`refuse_managed`]
/// for the PL/pgSQL functions of the queue API.
#[pg_extern(immutable, parallel_safe, name = "_check_unmanaged")]
#[search_path(pg_catalog, pg_temp)]
fn check_unmanaged_sql(queue_name: &str, managed_by: Option<&str>, operation: &str) {
    refuse_managed(queue_name, managed_by, operation);
}

/// The queue named `name`, from the cache or the table; the errors of `pgflow._queue`, and
/// for an `operation` that changes messages, those of [`refuse_managed`] (None: reading).
unsafe fn queue(
    name: Option<&str>,
    name_datum: Option<Datum>,
    operation: Option<&str>,
) -> QueueInfo {
    // SAFETY: the caller passes the text datum of the argument `name` was read from; lookup needs
    // nothing else.
    unsafe {
        let q = lookup(name, name_datum);
        if let (Some(op), Some(name)) = (operation, name) {
            refuse_managed(name, q.managed_by.as_deref(), op);
        }
        q
    }
}

unsafe fn lookup(name: Option<&str>, name_datum: Option<Datum>) -> QueueInfo {
    // SAFETY: `name_datum` is the text datum `name` was read from (the caller's contract) and is
    // only passed as a parameter declared text; called inside an SPI connection, as run requires.
    unsafe {
        let (Some(name), Some(name_datum)) = (name, name_datum) else {
            check_name(None, "queue_name");
            unreachable!("check_name raises for NULL");
        };
        if let Some(q) = QUEUES.with(|c| c.borrow().by_name.get(name).cloned()) {
            return q;
        }
        if run(Stmt::LookupByName, &[Some(name_datum)]) == 0 {
            run(Stmt::RaiseQueue, &[Some(name_datum)]); // raises 42704 (or the name's error)
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "queue not found".into(),
                None,
            );
        }
        let q = QueueInfo {
            id: column(0, 1).map_or(0, |d| d.value() as i64),
            seq: Oid::from(column(0, 2).map_or(0, |d| d.value() as u32)),
            max_retries: column(0, 3).map_or(0, |d| d.value() as i32),
            managed_by: text_column(0, 4),
        };
        QUEUES.with(|c| c.borrow_mut().by_name.insert(name.to_string(), q.clone()));
        q
    }
}

/// Remember that queue `queue_id` has messages becoming visible at `at` (a timestamptz datum),
/// so that its readers are woken and its listeners told then (`pgflow._due_at`).
///
/// # Safety
/// Inside an SPI connection; `at` is a timestamptz datum.
pub(crate) unsafe fn due_at(queue_id: i64, at: Datum) {
    // SAFETY: the caller's contract; the statement's parameters are an int8 and a timestamptz.
    unsafe {
        run(Stmt::DueAt, &[Some(Datum::from(queue_id)), Some(at)]);
    }
}

/// `grouped` if the schema has message groups (pgflow.messages.group_id, from 0.2.0), else
/// `plain`: a database still at 0.1.0 runs the claims without them. Whether it has them is looked
/// up once, again after any invalidation.
///
/// # Safety
/// Inside an SPI connection.
unsafe fn grouped_or(plain: Stmt, grouped: Stmt) -> Stmt {
    // SAFETY: the caller's contract; the statement has no parameters and returns one count.
    unsafe {
        let has = match QUEUES.with(|c| c.borrow().groups) {
            Some(g) => g,
            None => {
                run(Stmt::HasGroups, &[]);
                let g = int_column(0, 1).unwrap_or(0) > 0;
                QUEUES.with(|c| c.borrow_mut().groups = Some(g));
                g
            }
        };
        if has {
            grouped
        } else {
            plain
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The functions
// ---------------------------------------------------------------------------------------------

/// The raw entry points below, as `sql/queue/api.sql` and `sql/queue/tables.sql` declare them.
#[cfg_attr(not(any(test, feature = "pg_test")), allow(dead_code))]
pub(crate) const C_FUNCTIONS: &[CFunction] = &[
    CFunction {
        symbol: "pgflow_send",
        signature: "pgflow.send(text,jsonb,integer,integer,jsonb,text,text)",
        result: "bigint",
    },
    CFunction {
        symbol: "pgflow_send_internal",
        signature:
            "pgflow._send(pgflow.queues,jsonb,timestamp with time zone,integer,jsonb,text,text)",
        result: "bigint",
    },
    CFunction {
        symbol: "pgflow_pop",
        signature: "pgflow.pop(text,integer)",
        result: "SETOF pgflow.message_record",
    },
    CFunction {
        symbol: "pgflow_read",
        signature: "pgflow.read(text,integer,integer)",
        result: "SETOF pgflow.message_record",
    },
    CFunction {
        symbol: "pgflow_archive_one",
        signature: "pgflow.archive(text,bigint,integer)",
        result: "boolean",
    },
    CFunction {
        symbol: "pgflow_delete_one",
        signature: "pgflow.delete(text,bigint,integer)",
        result: "boolean",
    },
    CFunction {
        symbol: "pgflow_archive_many",
        signature: "pgflow.archive(text,bigint[],integer[])",
        result: "SETOF bigint",
    },
    CFunction {
        symbol: "pgflow_delete_many",
        signature: "pgflow.delete(text,bigint[],integer[])",
        result: "SETOF bigint",
    },
    CFunction {
        symbol: "pgflow_ack_and_read",
        signature: "pgflow.ack_and_read(text,bigint[],integer,integer,boolean,integer[])",
        result: "SETOF pgflow.message_record",
    },
    CFunction {
        symbol: "pgflow_messages_inserted",
        signature: "pgflow._messages_inserted()",
        result: "trigger",
    },
    CFunction {
        symbol: "pgflow_wait_for_messages",
        signature: "pgflow.wait_for_messages(text,integer,integer)",
        result: "(procedure)",
    },
    CFunction {
        symbol: "pgflow_check_send",
        signature: "pgflow._check_send(integer,integer,jsonb)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_check_ids",
        signature: "pgflow._check_ids(bigint[],integer[],text,text)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_check_message",
        signature: "pgflow._check_message(jsonb)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_queues_changed",
        signature: "pgflow._queues_changed()",
        result: "trigger",
    },
];

/// The checks of a send's options: `delay` in seconds (0 to a year), a `priority`, `headers` a
/// JSON object or NULL. Returns the delay and the priority datum.
///
/// # Safety
/// `delay` and `priority` are int4 datums, `headers` a jsonb datum, as sent.
unsafe fn check_send(
    delay: Option<Datum>,
    priority: Option<Datum>,
    headers: Option<Datum>,
) -> (i32, Datum) {
    let delay = check_seconds(
        delay.map(|d| d.value() as i32),
        "delay",
        Some("Pass 0 to send without delay."),
    );
    let Some(priority) = priority else {
        null_error(
            "priority",
            Some("Pass 0 for normal priority; higher values are served first."),
        )
    };
    if let Some(h) = headers {
        // SAFETY: a non-null jsonb datum (the caller's contract).
        let kind = unsafe { json_type(h) };
        if kind != "object" {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("headers must be a JSON object or null, not a JSON {kind}"),
                None,
            );
        }
    }
    (delay, priority)
}

v1!(pg_finfo_pgflow_check_send);
/// Internal `pgflow._check_send(delay_seconds, priority, headers)`: [`check_send`] for the
/// PL/pgSQL senders (`send` with a time, `send_batch`, `publish`).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_check_send(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow._check_send as C_FUNCTIONS lists it (checked against pg_proc by a test): integer,
    // integer and jsonb arguments, as check_send reads them.
    unsafe {
        check_send(arg(fcinfo, 0), arg(fcinfo, 1), arg(fcinfo, 2));
    }
    Datum::from(0)
}

v1!(pg_finfo_pgflow_send);
/// `pgflow.send(queue_name, message, delay int, priority, headers) -> bigint`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_send(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for pgflow.send as
    // C_FUNCTIONS lists it (checked against pg_proc by a test), so the argument positions and
    // types read here are those; every SPI statement runs inside the SpiScope.
    unsafe {
        let headers = arg(fcinfo, 4);
        let (delay, priority) = check_send(arg(fcinfo, 2), arg(fcinfo, 3), headers);
        let (dedup_key, group_id) = send_keys(fcinfo, 5, 6);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        // the queue-name lock, shared, before the look-up: a drop_queue that committed while we
        // waited is then seen (42704), never a sequence that is gone
        if let Some(d) = name_datum {
            locks::lock(Space::Queue, d, true, true);
        }
        let q = queue(name.as_deref(), name_datum, Some("send"));
        let message = check_message(arg(fcinfo, 1));
        let visible_at = (delay > 0)
            .then(|| Datum::from(pg_sys::GetCurrentTimestamp() + i64::from(delay) * 1_000_000));
        let keys = Keys {
            dedup_key,
            group_id,
        };
        insert_message(q.id, q.seq, visible_at, priority, message, headers, keys)
    }
}

/// The optional keys of a send: a deduplication key and a message group (text datums).
#[derive(Clone, Copy)]
struct Keys {
    dedup_key: Option<Datum>,
    group_id: Option<Datum>,
}

/// Send one message to the queue `queue_id` (numbered by `seq`), visible from `visible_at` (a
/// timestamptz datum; None: now): the one home of sending a single message, for `send` and,
/// through `pgflow._send`, every PL/pgSQL path (the timestamptz form of send, send_with_notify,
/// publish, retrying dead-lettered messages). A later visibility is remembered so that readers
/// are woken and listeners told when it comes due. Returns the msg_id. With a deduplication
/// key that a live message of the queue holds, nothing is sent and that message's msg_id is
/// returned. A message group makes the message wait for the group's earlier ones.
///
/// # Safety
/// Inside an SPI connection; `priority` is an int4 datum, `message` a non-null jsonb datum,
/// `headers` a jsonb datum, the keys text datums (checked by the caller).
unsafe fn insert_message(
    queue_id: i64,
    seq: Oid,
    visible_at: Option<Datum>,
    priority: Datum,
    message: Datum,
    headers: Option<Datum>,
    keys: Keys,
) -> Datum {
    // SAFETY: the caller's contract; the statements' parameters get datums of their declared
    // types, and a timestamptz datum is an int64 by value, compared as such.
    unsafe {
        let params = [
            Some(Datum::from(queue_id)),
            Some(Datum::from(seq)),
            visible_at,
            Some(priority),
            Some(message),
            headers,
            keys.dedup_key,
            keys.group_id,
        ];
        let msg_id = match (keys.dedup_key, keys.group_id) {
            (None, None) => {
                run(Stmt::Send, &params[..6]);
                column(0, 1).unwrap_or(Datum::from(0))
            }
            (None, Some(_)) => {
                run(Stmt::SendKeyed, &params);
                column(0, 1).unwrap_or(Datum::from(0))
            }
            (Some(key), _) => {
                // The live message holding the key, or ours. A send of the same key that
                // commits while we insert makes the insert do nothing: then it is found; one
                // that is acked in that instant makes us try again.
                let mut sent = None;
                for _ in 0..3 {
                    if run(Stmt::FindDedup, &[Some(Datum::from(queue_id)), Some(key)]) == 1 {
                        return column(0, 1).unwrap_or(Datum::from(0));
                    }
                    if run(Stmt::SendKeyed, &params) == 1 {
                        sent = column(0, 1);
                        break;
                    }
                }
                let Some(id) = sent else {
                    raise(
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        "dedup_key is being sent and acknowledged by other sessions at this moment"
                            .into(),
                        Some("Retry the send."),
                    )
                };
                id
            }
        };
        if let Some(at) = visible_at {
            if at.value() as i64 > pg_sys::GetCurrentTimestamp() {
                due_at(queue_id, at);
            }
        }
        msg_id
    }
}

v1!(pg_finfo_pgflow_send_internal);
/// Internal `pgflow._send(q pgflow.queues, message, visible_at, priority, headers, dedup_key,
/// group_id) -> bigint`:
/// [`insert_message`] for the PL/pgSQL paths, which have checked the queue and the options.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_send_internal(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for pgflow._send as
    // C_FUNCTIONS lists it (checked against pg_proc by a test): argument 0 is a pgflow.queues
    // composite, detoasted before its fields are read by name; the statements run inside the
    // SpiScope.
    unsafe {
        let Some(q) = arg(fcinfo, 0) else {
            null_error("q", None)
        };
        let message = check_message(arg(fcinfo, 1));
        let tuple = pg_sys::pg_detoast_datum(q.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
        let field = |name: &std::ffi::CStr| {
            let mut isnull = false;
            let d = pg_sys::GetAttributeByName(tuple, name.as_ptr(), &mut isnull);
            (!isnull).then_some(d)
        };
        let (Some(queue_id), Some(seq)) = (field(c"queue_id"), field(c"msg_seq")) else {
            null_error("q.queue_id and q.msg_seq", None)
        };
        let priority = arg(fcinfo, 3).unwrap_or(Datum::from(0));
        let _spi = SpiScope::connect();
        let (dedup_key, group_id) = send_keys(fcinfo, 5, 6);
        insert_message(
            queue_id.value() as i64,
            Oid::from(seq.value() as u32),
            arg(fcinfo, 2),
            priority,
            message,
            arg(fcinfo, 4),
            Keys {
                dedup_key,
                group_id,
            },
        )
    }
}

/// Lease up to `qty` messages of `q` for `vt` seconds into the function's result set, in
/// delivery order (as `pgflow._claim` without consume): exhausted messages met on the way are
/// dead-lettered and others looked for in their place.
unsafe fn claim_into(fcinfo: FunctionCallInfo, q: &QueueInfo, vt: i32, qty: i32) -> Vec<i64> {
    // SAFETY: fcinfo is the call information of a set-returning function on which
    // InitMaterializedSRF has been called (the caller's contract), so resultinfo is a
    // ReturnSetInfo with a tuple store and descriptor of message_record; the statement runs inside
    // the caller's SPI connection and its rows are read with bounds-checked accessors.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        let mut want = qty;
        let mut ids = Vec::new();
        loop {
            // A later look (after dead-lettering) passes over what this call delivered: with
            // vt = 0 those rows are visible again, and this transaction's own locks do not hide
            // them.
            let delivered_so_far = (!ids.is_empty())
                .then(|| ids.clone().into_datum())
                .flatten();
            let n = run(
                grouped_or(Stmt::Claim, Stmt::ClaimGrouped),
                &[
                    Some(Datum::from(q.id)),
                    Some(Datum::from(vt)),
                    Some(Datum::from(want)),
                    delivered_so_far,
                ],
            );
            // (priority, msg_id, row) of the delivered rows, to return them in delivery order.
            let mut delivered: Vec<(i32, i64, u64)> = Vec::with_capacity(n as usize);
            let mut exhausted: Vec<i64> = Vec::new();
            for row in 0..n {
                let msg_id = column(row, 1).map_or(0, |d| d.value() as i64);
                let read_ct = column(row, 2).map_or(0, |d| d.value() as i32);
                if read_ct > q.max_retries + 1 {
                    exhausted.push(msg_id);
                } else {
                    delivered.push((column(row, 7).map_or(0, |d| d.value() as i32), msg_id, row));
                }
            }
            delivered.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, msg_id, row) in &delivered {
                ids.push(msg_id);
                let mut values = [Datum::from(0); 7];
                let mut nulls = [false; 7];
                for col in 0..7 {
                    match column(row, col as i32 + 1) {
                        Some(d) => values[col] = d,
                        None => nulls[col] = true,
                    }
                }
                pg_sys::tuplestore_putvalues(
                    (*rsinfo).setResult,
                    (*rsinfo).setDesc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
            }
            want -= delivered.len() as i32;
            if exhausted.is_empty() || want <= 0 {
                if !exhausted.is_empty() {
                    dead_letter(q, &exhausted);
                }
                return ids;
            }
            dead_letter(q, &exhausted);
        }
    }
}

/// Dead-letter the exhausted messages `ids` of `q` (see Stmt::DeadLetterExhausted).
unsafe fn dead_letter(q: &QueueInfo, ids: &[i64]) {
    // SAFETY: called inside an SPI connection (the caller's contract); the parameters are a
    // by-value bigint and an int8[] datum built here, matching the statement's declared types.
    unsafe {
        let ids = pgrx::IntoDatum::into_datum(ids.to_vec()).expect("an array is never NULL");
        run(
            Stmt::DeadLetterExhausted,
            &[Some(Datum::from(q.id)), Some(ids)],
        );
    }
}

v1!(pg_finfo_pgflow_read);
/// `pgflow.read(queue_name, vt, qty) -> SETOF pgflow.message_record`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_read(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for pgflow.read as
    // C_FUNCTIONS lists it (checked against pg_proc by a test), so the argument positions and
    // types read here are those; every SPI statement runs inside the SpiScope.
    unsafe {
        let (vt, qty) = check_lease(
            arg(fcinfo, 1).map(|d| d.value() as i32),
            arg(fcinfo, 2).map(|d| d.value() as i32),
        );
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        let q = queue(name.as_deref(), name_datum, None);
        claim_into(fcinfo, &q, vt, qty);
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_pop);
/// `pgflow.pop(queue_name, qty) -> SETOF pgflow.message_record`: the claim of `read`, then the
/// claimed messages deleted in the same transaction (at-most-once delivery).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_pop(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for pgflow.pop as
    // C_FUNCTIONS lists it (checked against pg_proc by a test), so the argument positions and
    // types read here are those; every SPI statement runs inside the SpiScope, and the id array
    // passed to the delete is built by pgrx from the claimed ids.
    unsafe {
        let (_, qty) = check_lease(Some(0), arg(fcinfo, 1).map(|d| d.value() as i32));
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        let q = queue(name.as_deref(), name_datum, Some("pop"));
        let ids = claim_into(fcinfo, &q, 0, qty);
        if !ids.is_empty() {
            let ids_datum = ids.clone().into_datum().unwrap_or(Datum::from(0));
            ack(&q, &ids, ids_datum, &None, None, false);
        }
        Datum::from(0)
    }
}

/// Acknowledge `ids` (with `cts`) of queue `q` by archiving or deleting them.
unsafe fn ack(
    q: &QueueInfo,
    ids: &[i64],
    ids_datum: Datum,
    cts: &Option<Vec<Option<i64>>>,
    cts_datum: Option<Datum>,
    to_archive: bool,
) -> u64 {
    // SAFETY: called inside an SPI connection (the caller's contract); `ids_datum` and `cts_datum`
    // are the int8[] and int4[] datums `ids` and `cts` were read from, passed as parameters of
    // those declared types.
    unsafe {
        if ids.len() == 1 {
            let ct = cts
                .as_ref()
                .and_then(|c| c[0])
                .map(|c| Datum::from(c as i32));
            ack_single(q, Datum::from(ids[0]), ct, to_archive)
        } else {
            let stmt = if to_archive {
                Stmt::ArchiveMany
            } else {
                Stmt::DeleteMany
            };
            run(stmt, &[Some(Datum::from(q.id)), Some(ids_datum), cts_datum])
        }
    }
}

/// Archive or delete message `msg_id` of `q` if its read_ct matches (any when `read_ct` is
/// None); returns how many rows it acted on (0 or 1).
unsafe fn ack_single(
    q: &QueueInfo,
    msg_id: Datum,
    read_ct: Option<Datum>,
    to_archive: bool,
) -> u64 {
    // SAFETY: called inside an SPI connection (the caller's contract); the parameters are by-value
    // bigint and integer datums matching the statement's declared types.
    unsafe {
        let stmt = if to_archive {
            Stmt::ArchiveOne
        } else {
            Stmt::DeleteOne
        };
        run(stmt, &[Some(Datum::from(q.id)), Some(msg_id), read_ct])
    }
}

/// `pgflow.archive(queue_name, msg_id, read_ct)` and `pgflow.delete(...)`: one message.
unsafe fn ack_one(fcinfo: FunctionCallInfo, to_archive: bool) -> Datum {
    // SAFETY: fcinfo is the valid call information of pgflow.archive or pgflow.delete (text,
    // bigint, integer) (the caller's contract), read at those positions and types; every SPI
    // statement runs inside the SpiScope.
    unsafe {
        let Some(msg_id) = arg(fcinfo, 1) else {
            null_error("msg_id", None)
        };
        let read_ct = arg(fcinfo, 2);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        let q = queue(
            name.as_deref(),
            name_datum,
            Some(if to_archive { "archive" } else { "delete" }),
        );
        Datum::from(ack_single(&q, msg_id, read_ct, to_archive) > 0)
    }
}

/// `pgflow.archive(queue_name, msg_ids, read_cts)` and `pgflow.delete(...)`: several messages;
/// returns the ids acted on (a set of bigint).
unsafe fn ack_many(fcinfo: FunctionCallInfo, to_archive: bool) -> Datum {
    // SAFETY: fcinfo is the valid call information of the array forms of pgflow.archive or
    // pgflow.delete (text, bigint[], integer[]) returning SETOF bigint (the caller's contract),
    // read at those positions and types; InitMaterializedSRF with the expected descriptor (one
    // bigint column) gives the tuple store written to; every SPI statement runs inside the
    // SpiScope.
    unsafe {
        let ids_datum = arg(fcinfo, 1);
        let cts_datum = arg(fcinfo, 2);
        let (ids, cts) = check_ids(ids_datum, cts_datum, "msg_ids", "read_cts");
        pg_sys::InitMaterializedSRF(fcinfo, pg_sys::MAT_SRF_USE_EXPECTED_DESC);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        let q = queue(
            name.as_deref(),
            name_datum,
            Some(if to_archive { "archive" } else { "delete" }),
        );
        let Some(ids_datum) = ids_datum else {
            unreachable!("check_ids raises for NULL")
        };
        let n = ack(&q, &ids, ids_datum, &cts, cts_datum, to_archive);
        let acted: Vec<i64> = if ids.len() == 1 {
            ids.iter().copied().filter(|_| n > 0).collect()
        } else {
            (0..n).filter_map(|row| int_column(row, 1)).collect()
        };
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        for id in acted {
            let mut value = Datum::from(id);
            let mut isnull = false;
            // raw pointers: PostgreSQL 18 declares them const, 15 mutable
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                &raw mut value,
                &raw mut isnull,
            );
        }
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_archive_many);
/// `pgflow.archive(queue_name, msg_ids, read_cts) -> SETOF bigint`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_archive_many(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for the array form
    // of pgflow.archive as C_FUNCTIONS lists it, which is what ack_many reads.
    unsafe { ack_many(fcinfo, true) }
}

v1!(pg_finfo_pgflow_delete_many);
/// `pgflow.delete(queue_name, msg_ids, read_cts) -> SETOF bigint`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_delete_many(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for the array form
    // of pgflow.delete as C_FUNCTIONS lists it, which is what ack_many reads.
    unsafe { ack_many(fcinfo, false) }
}

v1!(pg_finfo_pgflow_archive_one);
/// `pgflow.archive(queue_name, msg_id, read_ct) -> boolean`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_archive_one(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.archive(text, bigint, integer), which is what ack_one reads.
    unsafe { ack_one(fcinfo, true) }
}

v1!(pg_finfo_pgflow_delete_one);
/// `pgflow.delete(queue_name, msg_id, read_ct) -> boolean`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_delete_one(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.delete(text, bigint, integer), which is what ack_one reads.
    unsafe { ack_one(fcinfo, false) }
}

v1!(pg_finfo_pgflow_ack_and_read);
/// `pgflow.ack_and_read(queue_name, ack_msg_ids, vt, qty, archive, ack_read_cts)`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_ack_and_read(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow.ack_and_read as C_FUNCTIONS lists it (checked against pg_proc by a test), so the
    // argument positions and types read here are those; every SPI statement runs inside the
    // SpiScope.
    unsafe {
        let ids_datum = arg(fcinfo, 1);
        let cts_datum = arg(fcinfo, 5);
        let (ids, cts) = check_ids(ids_datum, cts_datum, "ack_msg_ids", "ack_read_cts");
        let (vt, qty) = check_lease(
            arg(fcinfo, 2).map(|d| d.value() as i32),
            arg(fcinfo, 3).map(|d| d.value() as i32),
        );
        let Some(to_archive) = arg(fcinfo, 4) else {
            null_error("archive", None)
        };
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let _spi = SpiScope::connect();
        let q = queue(name.as_deref(), name_datum, Some("ack_and_read"));
        if !ids.is_empty() {
            ack(
                &q,
                &ids,
                ids_datum.unwrap_or(Datum::from(0)),
                &cts,
                cts_datum,
                to_archive.value() != 0,
            );
        }
        claim_into(fcinfo, &q, vt, qty);
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_wait_for_messages);
/// `CALL pgflow.wait_for_messages(queue_name, max_poll_seconds, poll_interval_ms)`: wait until
/// the queue (or the flow's queue) has a message to read, up to `max_poll_seconds`, holding no
/// snapshot while it waits, so VACUUM and HOT pruning go on. A procedure: between its looks it
/// commits, which releases the snapshot of the look (and that of the CALL). Then `read` or
/// `poll_for_tasks` takes the work. Its statements run with the rights of its owner (the
/// extension's), as a SECURITY DEFINER function's would; a procedure that commits cannot be
/// SECURITY DEFINER itself. Who may call it is decided by EXECUTE on it.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_wait_for_messages(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 procedure with valid call information for
    // pgflow.wait_for_messages as C_FUNCTIONS lists it (checked against pg_proc by a test), so
    // the argument positions and types read here are those; its context is dereferenced only
    // once checked to be a CallContext; every SPI statement runs inside the non-atomic SPI
    // connection, which SPI_commit keeps across the commits.
    unsafe {
        let (max_poll_seconds, poll_interval_ms) = check_poll(
            arg(fcinfo, 1).map(|d| d.value() as i32),
            arg(fcinfo, 2).map(|d| d.value() as i32),
        );
        let context = (*fcinfo).context;
        let nonatomic = !context.is_null()
            && (*context).type_ == pg_sys::NodeTag::T_CallContext
            && !(*(context as *mut pg_sys::CallContext)).atomic;
        if !nonatomic {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_TERMINATION,
                "pgflow.wait_for_messages must be called with CALL outside a transaction block"
                    .into(),
                Some(
                    "It commits while it waits. Inside a transaction, use pgflow.read_with_poll or pgflow.poll_for_tasks, which hold a snapshot while they wait.",
                ),
            );
        }
        let name_datum = arg(fcinfo, 0);
        let name = text_arg(fcinfo, 0);
        let fn_oid = (*(*fcinfo).flinfo).fn_oid;
        let _spi = SpiScope::connect_nonatomic();
        run(Stmt::ProcOwner, &[Some(Datum::from(fn_oid))]);
        let owner = Oid::from(int_column(0, 1).unwrap_or(0) as u32);
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(max_poll_seconds as u64);
        loop {
            // The epoch is taken before the look, so a send committing between the look and
            // the wait still wakes it; the queue is looked up again after every commit, so a
            // queue dropped meanwhile is a 42704.
            let (queue_id, epoch, ready) = as_user(owner, || {
                let q = queue(name.as_deref(), name_datum, None);
                let epoch = events::wake_epoch(q.id);
                (
                    q.id,
                    epoch,
                    run(
                        grouped_or(Stmt::AnyVisible, Stmt::AnyVisibleGrouped),
                        &[Some(Datum::from(q.id))],
                    ) > 0,
                )
            });
            // ends the look's transaction: no snapshot is held from here on
            pg_sys::SPI_commit();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if ready || left.is_zero() {
                return Datum::from(0);
            }
            let wait = left.as_millis().min(poll_interval_ms as u128).max(1) as i32;
            events::wait_for_wake(queue_id, epoch, wait);
        }
    }
}

v1!(pg_finfo_pgflow_check_ids);
/// Internal `pgflow._check_ids(msg_ids, read_cts, ids_arg, cts_arg)`: [`check_ids`] for the
/// PL/pgSQL functions taking arrays of ids (`delete`, `archive`, `set_vt`, ...).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_check_ids(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow._check_ids as C_FUNCTIONS lists it (checked against pg_proc by a test): bigint[],
    // integer[] and two text arguments, read at those positions and types.
    unsafe {
        let ids_arg = text_arg(fcinfo, 2).unwrap_or_else(|| "msg_ids".into());
        let cts_arg = text_arg(fcinfo, 3).unwrap_or_else(|| "read_cts".into());
        check_ids(arg(fcinfo, 0), arg(fcinfo, 1), &ids_arg, &cts_arg);
    }
    Datum::from(0)
}

v1!(pg_finfo_pgflow_check_message);
/// Internal `pgflow._check_message(message jsonb)`: the rule of [`check_message`], for
/// `publish`. A raw function so that the message is never converted (a jsonb nested 10,000
/// deep is a valid message; only its NULL-ness matters here).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_check_message(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with valid call information for
    // pgflow._check_message as C_FUNCTIONS lists it (checked against pg_proc by a test); only
    // the null flag of its one argument is read.
    unsafe {
        check_message(arg(fcinfo, 0));
    }
    Datum::from(0)
}

/// The TriggerData of a call, or the error for a trigger function called any other way.
unsafe fn trigger_data(fcinfo: FunctionCallInfo, function: &str) -> *mut pg_sys::TriggerData {
    // SAFETY: fcinfo is the valid call information PostgreSQL passed (the caller's contract); its
    // context is dereferenced only after checking it is a non-null TriggerData node.
    unsafe {
        let trigdata = (*fcinfo).context as *mut pg_sys::TriggerData;
        if trigdata.is_null() || (*trigdata).type_ != pg_sys::NodeTag::T_TriggerData {
            raise(
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                format!("{function} must be called as a trigger"),
                None,
            );
        }
        trigdata
    }
}

v1!(pg_finfo_pgflow_messages_inserted);
/// Row trigger `AFTER INSERT ON pgflow.messages`: every inserted message, whatever inserted it
/// (send, send_batch, a DLQ retry, a workflow task), wakes the queue's blocked readers at
/// commit and, for a queue with notify on, is counted in the commit's announcement.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_messages_inserted(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: trigger_data returned a checked TriggerData, whose relation, descriptor and tuple
    // PostgreSQL keeps valid for the call; the event, table and columns are checked (row insert,
    // pgflow.messages, two bigint columns) before heap_getattr reads the tuple.
    unsafe {
        let trigdata = trigger_data(fcinfo, "pgflow._messages_inserted()");
        // Only as the row trigger after insert on pgflow.messages, whose first two columns are
        // queue_id and msg_id (bigint, not null): anything else is refused, never read.
        let event = (*trigdata).tg_event;
        let tuple = (*trigdata).tg_trigtuple;
        let tupdesc = (*(*trigdata).tg_relation).rd_att;
        let is_row_insert = event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_INSERT
            && event & pg_sys::TRIGGER_EVENT_ROW != 0;
        // SPI_gettypeid checks the column number, and answers InvalidOid for one out of range
        let bigint_at = |n: i32| pg_sys::SPI_gettypeid(tupdesc, n) == INT8;
        if !is_row_insert || tuple.is_null() || !bigint_at(1) || !bigint_at(2) {
            raise(
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "pgflow._messages_inserted() must be a row trigger after insert on pgflow.messages"
                    .into(),
                None,
            );
        }
        let mut isnull = false;
        let queue_id = pg_sys::SPI_getbinval(tuple, tupdesc, 1, &mut isnull).value() as i64;
        let queue_id_null = isnull;
        let msg_id = pg_sys::SPI_getbinval(tuple, tupdesc, 2, &mut isnull).value() as i64;
        if queue_id_null || isnull {
            raise(
                PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                "pgflow._messages_inserted(): a message row without queue_id or msg_id".into(),
                None,
            );
        }
        let known = QUEUES.with(|c| c.borrow().by_id.get(&queue_id).cloned());
        let (name, notify) = match known {
            Some(k) => k,
            None => {
                let _spi = SpiScope::connect();
                if run(Stmt::LookupById, &[Some(Datum::from(queue_id))]) == 0 {
                    return Datum::from(0); // the queue is being dropped in this transaction
                }
                let name = text_to_string(column(0, 1).unwrap_or(Datum::from(0)));
                let notify = column(0, 2).is_some_and(|d| d.value() != 0);
                QUEUES.with(|cache| {
                    cache
                        .borrow_mut()
                        .by_id
                        .insert(queue_id, (name.clone(), notify))
                });
                (name, notify)
            }
        };
        events::add_sent(queue_id, &name, msg_id, msg_id, 1, notify);
        Datum::from(0)
    }
}

v1!(pg_finfo_pgflow_queues_changed);
/// Statement trigger on `pgflow.queues`: a queue was created, altered or dropped; every
/// backend's queue cache must forget what it knew.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_queues_changed(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: trigger_data returned a checked TriggerData, whose relation PostgreSQL keeps open
    // for the call; invalidating its relcache entry has no other precondition.
    unsafe {
        let trigdata = trigger_data(fcinfo, "pgflow._queues_changed()");
        pg_sys::CacheInvalidateRelcacheByRelid((*(*trigdata).tg_relation).rd_id);
        Datum::from(0)
    }
}
