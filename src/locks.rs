//! pgflow's advisory locks, in one place: their key spaces, how a key is derived, and the
//! internal SQL functions through which the PL/pgSQL side takes the same locks.
//!
//! Every lock is transaction-scoped and keyed by (space, `hashtext(key)`): the lock manager only,
//! nothing written. Two keys sharing a hash only serialise each other, which is harmless.
//!
//! | space | key | taken shared by | taken exclusive by |
//! |---|---|---|---|
//! | [`Space::Queue`] (`'pgfq'`) | queue name | what uses a queue's message sequence (send, send_batch, get_queue_stats, nack, bind_topic, ...) | create_queue, drop_queue |
//! | [`Space::Flow`] (`'pgff'`) | flow slug | what starts or ends a flow's work (start_flow, complete_task, fail_task) | create_flow, create_flow_from_shape, drop_flow |
//! | [`Space::Run`] (`'pgfw'`) | run id as text | complete_task of a map step's task | everything else that moves a run forward (complete_task of a single step's task, fail_task, timeouts, start_flow, cancel_run, retry_run, signal) |
//! | [`Space::Finisher`] (`'pgfs'`) | run id as text | | a map task's completion that may be its step's last |
//!
//! The lock order is flow, then run, then finisher (then rows: step state, task; several in id
//! order). How a map step's tasks complete at once, and only one completion completes the
//! step, is told at [`crate::workflow`]'s `complete_task`.

use crate::pg::{arg, text_datum, uuid_string, CFunction};
use crate::v1;
use pgrx::pg_sys::{self, Datum, FunctionCallInfo};
use pgrx::prelude::*;

/// A key space of pgflow's advisory locks (the first int4 of the lock tag).
#[derive(Clone, Copy)]
pub enum Space {
    /// Queue names: `'pgfq'`.
    Queue = 1885824625,
    /// Flow slugs: `'pgff'`.
    Flow = 1885824614,
    /// Run ids: `'pgfw'`.
    Run = 1885824631,
    /// Run ids, for the completion of a map step: `'pgfs'`.
    Finisher = 1885824627,
}

// fmgr entry points of the built-in functions, called through DirectFunctionCall (the bindings
// only expose them wrapped as Rust functions, which are no PGFunction pointers).
unsafe extern "C-unwind" {
    #[link_name = "hashtext"]
    fn builtin_hashtext(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_advisory_xact_lock_int4"]
    fn builtin_lock(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_advisory_xact_lock_shared_int4"]
    fn builtin_lock_shared(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_try_advisory_xact_lock_int4"]
    fn builtin_try_lock(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_try_advisory_xact_lock_shared_int4"]
    fn builtin_try_lock_shared(fcinfo: FunctionCallInfo) -> Datum;
}

/// Take the lock (`space`, hashtext(`key`)), shared or exclusive, waiting if `wait` (then it
/// returns true) or only trying; then process pending invalidations, so that what committed
/// while we waited (a dropped queue, say) is seen.
///
/// # Safety
/// `key` is a non-null text datum; called inside a transaction, which releases the lock.
pub unsafe fn lock(space: Space, key: Datum, shared: bool, wait: bool) -> bool {
    // SAFETY: `key` is a text datum (the caller's contract) passed to hashtext; the space and the
    // hash are by-value int4 datums passed to the built-in advisory lock functions as their SQL
    // forms pass them, and their boolean or void results are read as such.
    unsafe {
        let hash = pg_sys::DirectFunctionCall1Coll(
            Some(builtin_hashtext),
            pg_sys::DEFAULT_COLLATION_OID,
            key,
        );
        let f = match (wait, shared) {
            (true, true) => builtin_lock_shared,
            (true, false) => builtin_lock,
            (false, true) => builtin_try_lock_shared,
            (false, false) => builtin_try_lock,
        };
        let got = pg_sys::DirectFunctionCall2Coll(
            Some(f),
            pg_sys::InvalidOid,
            Datum::from(space as i32),
            hash,
        );
        pg_sys::AcceptInvalidationMessages();
        wait || got.value() != 0
    }
}

/// The lock of `space` (the run lock, or the finisher lock of a map step's completion) keyed by
/// `run_id` (a uuid datum), shared or exclusive, waiting for it (true) or only trying: [`lock`]
/// with the run id printed as the key. A map task's completion takes the run lock shared: it
/// excludes what takes it exclusive, not the completions of the run's other map tasks.
///
/// # Safety
/// `run_id` is a non-null uuid datum; called inside a transaction.
pub unsafe fn lock_run_id(space: Space, run_id: Datum, shared: bool, wait: bool) -> bool {
    // SAFETY: the caller passes a uuid datum, printed by uuid_string into the text key.
    unsafe { lock(space, text_datum(&uuid_string(run_id)), shared, wait) }
}

// ---------------------------------------------------------------------------------------------
// The same locks for the PL/pgSQL side (raw functions: no SET clause, they run no statement)
// ---------------------------------------------------------------------------------------------

/// The raw entry points below, as `sql/locks.sql` declares them.
#[cfg_attr(not(any(test, feature = "pg_test")), allow(dead_code))]
pub(crate) const C_FUNCTIONS: &[CFunction] = &[
    CFunction {
        symbol: "pgflow_lock_queue_name",
        signature: "pgflow._lock_queue_name(text,boolean)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_try_lock_queue_name",
        signature: "pgflow._try_lock_queue_name(text)",
        result: "boolean",
    },
    CFunction {
        symbol: "pgflow_lock_flow",
        signature: "pgflow._lock_flow(text,boolean)",
        result: "void",
    },
    CFunction {
        symbol: "pgflow_lock_run",
        signature: "pgflow._lock_run(uuid,boolean)",
        result: "boolean",
    },
];

/// The key and flag of a (key, flag) lock function: no key, no lock (as the SQL forms
/// `pg_advisory_xact_lock(space, hashtext(NULL))` took none); a NULL flag is false.
///
/// # Safety
/// `fcinfo` is the call information of a function whose arguments are (text or uuid, boolean).
unsafe fn key_and_flag(fcinfo: FunctionCallInfo) -> Option<(Datum, bool)> {
    // SAFETY: the caller's contract: argument 0 is a text or uuid datum, argument 1 a boolean.
    unsafe {
        let flag = arg(fcinfo, 1).is_some_and(|b| b.value() != 0);
        arg(fcinfo, 0).map(|key| (key, flag))
    }
}

v1!(pg_finfo_pgflow_lock_queue_name);
/// Internal `pgflow._lock_queue_name(queue_name text, exclusive boolean)`: the queue-name lock,
/// exclusive or shared, waiting for it.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_lock_queue_name(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with its (text, boolean) arguments as
    // C_FUNCTIONS lists them (checked against pg_proc by a test).
    unsafe {
        if let Some((name, exclusive)) = key_and_flag(fcinfo) {
            lock(Space::Queue, name, !exclusive, true);
        }
    }
    Datum::from(0)
}

v1!(pg_finfo_pgflow_try_lock_queue_name);
/// Internal `pgflow._try_lock_queue_name(queue_name text) -> boolean`: the queue-name lock,
/// shared, if it can be had without waiting.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_try_lock_queue_name(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with its text argument as C_FUNCTIONS
    // lists it (checked against pg_proc by a test).
    unsafe {
        let got = arg(fcinfo, 0).is_some_and(|name| lock(Space::Queue, name, true, false));
        Datum::from(got)
    }
}

v1!(pg_finfo_pgflow_lock_flow);
/// Internal `pgflow._lock_flow(flow_slug text, exclusive boolean)`: the flow lock, waiting for
/// it.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_lock_flow(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with its (text, boolean) arguments as
    // C_FUNCTIONS lists them (checked against pg_proc by a test).
    unsafe {
        if let Some((slug, exclusive)) = key_and_flag(fcinfo) {
            lock(Space::Flow, slug, !exclusive, true);
        }
    }
    Datum::from(0)
}

v1!(pg_finfo_pgflow_lock_run);
/// Internal `pgflow._lock_run(run_id uuid, wait boolean) -> boolean`: the run lock, waiting for
/// it (true) or only trying (whether it was had).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pgflow_lock_run(fcinfo: FunctionCallInfo) -> Datum {
    // SAFETY: PostgreSQL calls this V1 function with its (uuid, boolean) arguments as
    // C_FUNCTIONS lists them (checked against pg_proc by a test); the uuid is printed into the
    // text key.
    unsafe {
        let got = key_and_flag(fcinfo)
            .is_some_and(|(run_id, wait)| lock_run_id(Space::Run, run_id, false, wait));
        Datum::from(got)
    }
}
