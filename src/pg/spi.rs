//! Plumbing shared by the Rust hot paths ([`crate::queue`], [`crate::workflow`]): raw V1
//! function entry points, their arguments, and statements run through SPI with one plan kept
//! per backend.
//!
//! Why kept plans: a statement prepared with `SPI_prepare_cursor(.., CURSOR_OPT_GENERIC_PLAN)`
//! and `SPI_keepplan` is parsed and planned once per backend, then only revalidated, which is
//! what PL/pgSQL does for its statements, without PL/pgSQL's per-call costs.
//!
//! Why statements are pinned here rather than by `SET` clauses on the functions: a `SET`
//! clause makes every call save, set and restore each setting through the GUC machinery, and a
//! changed search_path makes the plan cache recompute and compare it at every execution;
//! measured on the queue's send-read-archive lifecycle, that was about a tenth of the server
//! time. So every statement run by [`run`] is parsed and revalidated under a fixed search path
//! (pg_catalog alone, no temporary schema: an override, pushed and popped around the
//! statement, which costs a list copy), and planned with sequential and bitmap scans, hash and
//! merge joins and JIT off by a planner hook that applies those settings only while a statement of
//! ours is being planned (once per backend, and again after an invalidation). The plans are
//! the same index plans whatever the caller's settings or the tables' size when planned.

use super::fmgr::text_to_string;
use crate::error::raise;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{PgLogLevel, PgSqlErrorCode, PgTryBuilder};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

pub const TEXT: Oid = pg_sys::TEXTOID;
pub const INT4: Oid = pg_sys::INT4OID;
pub const INT8: Oid = pg_sys::INT8OID;
pub const JSONB: Oid = pg_sys::JSONBOID;
pub const UUID: Oid = pg_sys::UUIDOID;
pub const BOOL: Oid = pg_sys::BOOLOID;
pub const REGCLASS: Oid = pg_sys::REGCLASSOID;
pub const TIMESTAMPTZ: Oid = pg_sys::TIMESTAMPTZOID;
pub const OID: Oid = pg_sys::OIDOID;
pub const INT4ARRAY: Oid = pg_sys::INT4ARRAYOID;
pub const INT8ARRAY: Oid = pg_sys::INT8ARRAYOID;

/// A statement: its SQL text and parameter types. Implemented by each module's enum of them.
pub trait Statement: Copy + 'static {
    fn sql(self) -> (&'static str, &'static [Oid]);
    /// Its number within its enum (`self as u32`): with the enum's type, the key of its plan.
    fn id(self) -> u32;
}

thread_local! {
    /// Kept plans by statement: the type of its module's enum and its number in it.
    static PLANS: RefCell<HashMap<(std::any::TypeId, u32), pg_sys::SPIPlanPtr>> =
        RefCell::new(HashMap::new());
}

/// The kept plan of `stmt`, prepared on first use in this backend. Call inside SPI.
unsafe fn plan<S: Statement>(stmt: S) -> pg_sys::SPIPlanPtr {
    // SAFETY: called inside an SPI connection (the caller's contract); the text is a NUL-free
    // static string and `types` a local vector as long as the count passed, both outliving the
    // call; the prepared plan is kept (SPI_keepplan) before it is stored for later calls.
    unsafe {
        let (sql, types) = stmt.sql();
        let key = (std::any::TypeId::of::<S>(), stmt.id());
        if let Some(kept) = PLANS.with(|p| p.borrow().get(&key).copied()) {
            return kept;
        }
        let text = CString::new(sql).expect("statement text holds no NUL");
        let mut types = types.to_vec();
        let prepared = pg_sys::SPI_prepare_cursor(
            text.as_ptr(),
            types.len() as i32,
            types.as_mut_ptr(),
            pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
        );
        if prepared.is_null() || pg_sys::SPI_keepplan(prepared) != 0 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "pgflow could not prepare a statement".into(),
                None,
            );
        }
        PLANS.with(|p| p.borrow_mut().insert(key, prepared));
        prepared
    }
}

/// A parameter: its value, or None for SQL NULL.
pub type Param = Option<Datum>;

/// Run a kept statement; returns the number of rows it returned or changed.
///
/// An error raised while it runs (a constraint, a lock timeout, a PL/pgSQL helper raising the
/// specific error for bad input) reaches the client as it was raised: same SQLSTATE, message,
/// detail and hint, without the Rust backtrace pgrx would otherwise add to its DETAIL when the
/// server runs with RUST_BACKTRACE set.
pub unsafe fn run(stmt: impl Statement, params: &[Param]) -> u64 {
    // SAFETY: called inside an SPI connection with `params` matching the statement's parameter
    // types (the caller's contract, checked by the statement table's types); the search path is
    // pinned and unpinned on this backend's own namespace stack, and an error unwinds through
    // PgTryBuilder, which restores the depth counter.
    unsafe {
        let execute = std::panic::AssertUnwindSafe(|| {
            let pinned = pin_search_path();
            let n = execute(stmt, params);
            // On an error the pin is left to the (sub)transaction's abort, which undoes it.
            unpin_search_path(pinned);
            n
        });
        PINNED_DEPTH.with(|d| d.set(d.get() + 1));
        // one try block per statement: the depth is restored and an error passed on as raised
        PgTryBuilder::new(execute)
            .finally(|| PINNED_DEPTH.with(|d| d.set(d.get() - 1)))
            .catch_others(as_raised_again)
            .execute()
    }
}

/// Run `f`, so that an ERROR PostgreSQL raises inside it (a statement's error, a cancel or
/// statement timeout met while waiting, a lock timeout) reaches the client and the server log
/// as it was raised: same SQLSTATE, message, detail and hint, and no Rust backtrace, which
/// pgrx would otherwise put in DETAIL whenever the server runs with RUST_BACKTRACE set.
pub fn as_raised<R>(f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(as_raised_again)
        .execute()
}

/// Raise a caught PostgreSQL ERROR again as it was raised; anything else goes on unwinding.
fn as_raised_again<R>(caught: CaughtError) -> R {
    match caught {
        CaughtError::PostgresError(e) if e.level() == PgLogLevel::ERROR => {
            let mut report =
                ErrorReport::new(e.sql_error_code(), e.message().to_string(), "pgflow");
            if let Some(detail) = e.detail() {
                report = report.set_detail(detail);
            }
            if let Some(hint) = e.hint() {
                report = report.set_hint(hint);
            }
            report.report(PgLogLevel::ERROR);
            unreachable!("ereport(ERROR) returned")
        }
        other => other.rethrow(),
    }
}

/// Make pg_catalog the only schema searched (no temporary schema either), until
/// [`unpin_search_path`]: an override pushed on the namespace stack, which costs a list copy.
#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn pin_search_path() -> std::ffi::c_int {
    // SAFETY: the override is a local struct copied by PushOverrideSearchPath (into the current
    // memory context) before it returns; inside a transaction, as every SQL function call is.
    unsafe {
        let mut path = pg_sys::OverrideSearchPath {
            schemas: std::ptr::null_mut(),
            addCatalog: true,
            addTemp: false,
            generation: 0,
        };
        pg_sys::PushOverrideSearchPath(&mut path);
        0
    }
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn unpin_search_path(_level: std::ffi::c_int) {
    // SAFETY: pops the override pushed by the matching pin_search_path of the same statement (run
    // pairs them), so the namespace stack is left as it was found.
    unsafe {
        pg_sys::PopOverrideSearchPath();
    }
}

/// PostgreSQL 17 removed the override stack. There the path is set as PostgreSQL's own
/// maintenance commands restrict theirs (`RestrictSearchPath`): `search_path` set to
/// `pg_catalog, pg_temp` at a GUC nest level of its own, undone by [`unpin_search_path`] or by
/// the (sub)transaction's abort. The temporary schema comes last, so it can hide no relation
/// or type, and it is never searched for functions or operators. PostgreSQL 17 caches each
/// search path it computes, so setting one the backend has seen costs a hash look-up.
#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn pin_search_path() -> std::ffi::c_int {
    // SAFETY: the override is a local struct copied by PushOverrideSearchPath (into the current
    // memory context) before it returns; inside a transaction, as every SQL function call is.
    unsafe {
        let level = raw::NewGUCNestLevel();
        set_at_nest_level(c"search_path", c"pg_catalog, pg_temp");
        level
    }
}

/// Set a setting for the current GUC nest level (saved, restored by `AtEOXact_GUC` or by the
/// (sub)transaction's abort), without pgrx's error guard (see [`pinned_planner`]).
unsafe fn set_at_nest_level(name: &CStr, value: &CStr) {
    // SAFETY: both strings are NUL-terminated CStrs that outlive the call; called inside a
    // transaction at a GUC nest level opened by the caller, which undoes the setting.
    unsafe {
        raw::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            PgLogLevel::ERROR as std::ffi::c_int,
            false,
        );
    }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn unpin_search_path(level: std::ffi::c_int) {
    // SAFETY: pops the override pushed by the matching pin_search_path of the same statement (run
    // pairs them), so the namespace stack is left as it was found.
    unsafe {
        raw::AtEOXact_GUC(true, level);
    }
}

thread_local! {
    /// How many statements of ours are running in this backend (nested ones included): while
    /// it is above zero, whatever is planned is planned with the settings of [`PINNED_PLANNING`].
    static PINNED_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The settings our statements are planned with: plain index scans and nested loops whatever
/// the statistics or the caller's cost settings say (a queue is often empty when its
/// statements are first planned; a bitmap scan would read and sort a whole backlog to claim
/// one message), no JIT.
const PINNED_PLANNING: [(&CStr, &CStr); 5] = [
    (c"enable_seqscan", c"off"),
    (c"enable_bitmapscan", c"off"),
    (c"enable_hashjoin", c"off"),
    (c"enable_mergejoin", c"off"),
    (c"jit", c"off"),
];

static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;

/// Install the planner hook. Called from `_PG_init`, before any statement of ours is prepared.
pub fn init() {
    // SAFETY: called once from _PG_init, before any query of this process is planned, so no
    // one reads the hook while it is chained.
    unsafe {
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(pinned_planner);
    }
}

/// The planner, with [`PINNED_PLANNING`] applied while a statement of ours is running. The
/// settings go through the GUC machinery at a nest level of their own, so an error while
/// planning restores the caller's values with the (sub)transaction's abort.
///
/// Every query of the backend is planned through here, so an error raised while planning (a
/// constant expression that fails, a helper raising on bad input) must reach the caller
/// exactly as raised, context included. That is why this is no `#[pg_guard]` function and
/// calls PostgreSQL directly: a guard would turn the error into a Rust panic and raise it
/// again, changed. Nothing here needs dropping or can panic, so PostgreSQL's longjmp past this
/// frame skips no Rust clean-up.
unsafe extern "C-unwind" fn pinned_planner(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: installed as planner_hook in _PG_init, so PostgreSQL calls it with the planner's own
    // valid arguments, passed on unchanged; it opens and closes its own GUC nest level around the
    // previous planner and holds nothing that needs dropping if that planner raises.
    unsafe {
        let pinned = PINNED_DEPTH.with(|d| d.get()) > 0;
        let mut level = 0;
        if pinned {
            level = raw::NewGUCNestLevel();
            for (name, value) in PINNED_PLANNING {
                set_at_nest_level(name, value);
            }
        }
        let planner = PREVIOUS_PLANNER.unwrap_or(raw::standard_planner);
        let planned = planner(parse, query_string, cursor_options, bound_params);
        if pinned {
            raw::AtEOXact_GUC(true, level);
        }
        planned
    }
}

/// PostgreSQL functions called without pgrx's error guard (see [`pinned_planner`]).
mod raw {
    use pgrx::pg_sys;
    use std::ffi::{c_char, c_int};
    unsafe extern "C-unwind" {
        pub fn NewGUCNestLevel() -> c_int;
        pub fn AtEOXact_GUC(is_commit: bool, nest_level: c_int);
        pub fn set_config_option(
            name: *const c_char,
            value: *const c_char,
            context: pg_sys::GucContext::Type,
            source: pg_sys::GucSource::Type,
            action: pg_sys::GucAction::Type,
            change_val: bool,
            elevel: c_int,
            is_reload: bool,
        ) -> c_int;
        pub fn standard_planner(
            parse: *mut pg_sys::Query,
            query_string: *const c_char,
            cursor_options: c_int,
            bound_params: pg_sys::ParamListInfo,
        ) -> *mut pg_sys::PlannedStmt;
    }
}

unsafe fn execute(stmt: impl Statement, params: &[Param]) -> u64 {
    // SAFETY: called inside an SPI connection by run; `values` and `nulls` are local vectors of
    // the statement's parameter count that outlive SPI_execute_plan, and the plan comes from
    // plan() for the same statement.
    unsafe {
        let mut values: Vec<Datum> = params.iter().map(|p| p.unwrap_or(Datum::from(0))).collect();
        let nulls: Vec<std::ffi::c_char> = params
            .iter()
            .map(|p| if p.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
            .collect();
        let rc =
            pg_sys::SPI_execute_plan(plan(stmt), values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc < 0 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("pgflow statement failed: SPI code {rc}"),
                None,
            );
        }
        pg_sys::SPI_processed
    }
}

/// Column `col` (1-based) of result row `row` of the last statement. A row or column the
/// statement did not return is an error (55000), never a read past the result: it can only
/// mean the extension's SQL objects are not those this library was built for.
pub unsafe fn column(row: u64, col: i32) -> Option<Datum> {
    // SAFETY: the row and column are checked against SPI_processed and the result's natts before
    // SPI_getbinval reads them, and SPI_tuptable is only dereferenced when not null.
    unsafe {
        let table = pg_sys::SPI_tuptable;
        let (rows, cols) = if table.is_null() {
            (0, 0)
        } else {
            (pg_sys::SPI_processed, (*(*table).tupdesc).natts)
        };
        if row >= rows || col < 1 || col > cols {
            raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pgflow read row {} column {col} of a result of {rows} rows and {cols} columns",
                row + 1
            ),
            Some("The extension's SQL objects do not match its library: run ALTER EXTENSION pgflow UPDATE."),
        );
        }
        let mut isnull = false;
        let d = pg_sys::SPI_getbinval(
            *(*table).vals.add(row as usize),
            (*table).tupdesc,
            col,
            &mut isnull,
        );
        (!isnull).then_some(d)
    }
}

/// Column `col` of row `row` as a Rust string (None for NULL).
pub unsafe fn text_column(row: u64, col: i32) -> Option<String> {
    // SAFETY: column() checks the bounds; the caller's contract is that the column is of type
    // text, which text_to_string needs.
    unsafe { column(row, col).map(|d| text_to_string(d)) }
}

/// Column `col` of row `row`, a by-value datum copied out of SPI memory (int, bool, ...).
pub unsafe fn int_column(row: u64, col: i32) -> Option<i64> {
    // SAFETY: column() checks the bounds; the caller's contract is that the column is a by-value
    // integer type, whose datum is the value itself.
    unsafe { column(row, col).map(|d| d.value() as i64) }
}

/// An SPI connection, finished when dropped.
pub struct SpiScope;

impl SpiScope {
    pub unsafe fn connect() -> SpiScope {
        // SAFETY: the caller's contract is SPI_connect's: a backend inside a transaction.
        unsafe { Self::connect_with(0) }
    }

    /// A connection that may commit (`SPI_commit`): for a procedure called by CALL in a
    /// non-atomic context, which the caller has checked.
    pub unsafe fn connect_nonatomic() -> SpiScope {
        // SAFETY: the caller's contract: a procedure's non-atomic call.
        unsafe { Self::connect_with(pg_sys::SPI_OPT_NONATOMIC as i32) }
    }

    unsafe fn connect_with(options: i32) -> SpiScope {
        // SAFETY: SPI_connect_ext has no preconditions beyond running in a backend inside a
        // transaction, which every SQL function call is; a failure is raised as an ERROR.
        unsafe {
            if pg_sys::SPI_connect_ext(options) != pg_sys::SPI_OK_CONNECT as i32 {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "SPI_connect failed".into(),
                    None,
                );
            }
            SpiScope
        }
    }
}

/// Run `f` with the rights of `user`, as a SECURITY DEFINER function runs its body: the user
/// id is switched with `SECURITY_LOCAL_USERID_CHANGE` (so `SET ROLE` and the like are refused
/// meanwhile) and switched back after. An ERROR inside ends the (sub)transaction, whose abort
/// restores the user id it started with.
pub fn as_user<R>(user: Oid, f: impl FnOnce() -> R) -> R {
    let mut caller = pg_sys::InvalidOid;
    let mut context: std::ffi::c_int = 0;
    // SAFETY: both read and set this backend's own user id and security context, with a valid
    // pointer to locals and an existing role's oid (the caller's contract).
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut caller, &mut context);
        pg_sys::SetUserIdAndSecContext(
            user,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int,
        );
    }
    let r = f();
    // SAFETY: as above, back to what it was.
    unsafe { pg_sys::SetUserIdAndSecContext(caller, context) };
    r
}

impl Drop for SpiScope {
    fn drop(&mut self) {
        // Not reached when an ERROR unwinds: the transaction's abort cleans SPI up then.
        // SAFETY: a SpiScope exists only after a successful SPI_connect, finished here once.
        unsafe { pg_sys::SPI_finish() };
    }
}
