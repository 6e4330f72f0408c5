//! Plumbing shared by the Rust hot paths ([`crate::queue`], [`crate::workflow`]): raw V1
//! function entry points, their arguments, and statements run through SPI with one plan kept
//! per backend.
//!
//! Why kept plans: a statement prepared with `SPI_prepare_cursor(.., CURSOR_OPT_GENERIC_PLAN)`
//! and `SPI_keepplan` is parsed and planned once per backend, then only revalidated, which is
//! what PL/pgSQL does for its statements, without PL/pgSQL's per-call costs. The functions
//! that run them are declared with `SET` clauses (search_path, no sequential scans, no hash or
//! merge joins), so a plan made again after an invalidation is the same index plan.

use crate::errors::raise;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::pg_sys::{self, Datum, FunctionCallInfo, Oid};
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
pub const INT4ARRAY: Oid = pg_sys::INT4ARRAYOID;
pub const INT8ARRAY: Oid = pg_sys::INT8ARRAYOID;

/// A statement: its SQL text and parameter types. Implemented by each module's enum of them.
pub trait Statement: Copy {
    fn sql(self) -> (&'static str, &'static [Oid]);
}

thread_local! {
    /// Kept plans by the address of their SQL text (each text is a distinct static string).
    static PLANS: RefCell<HashMap<usize, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

/// The kept plan of `stmt`, prepared on first use in this backend. Call inside SPI.
unsafe fn plan(stmt: impl Statement) -> pg_sys::SPIPlanPtr {
    let (sql, types) = stmt.sql();
    let key = sql.as_ptr() as usize;
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

/// A parameter: its value, or None for SQL NULL.
pub type Param = Option<Datum>;

/// Run a kept statement; returns the number of rows it returned or changed.
///
/// An error raised while it runs (a constraint, a lock timeout, a PL/pgSQL helper raising the
/// specific error for bad input) reaches the client as it was raised: same SQLSTATE, message,
/// detail and hint, without the Rust backtrace pgrx would otherwise add to its DETAIL when the
/// server runs with RUST_BACKTRACE set.
pub unsafe fn run(stmt: impl Statement, params: &[Param]) -> u64 {
    let execute = std::panic::AssertUnwindSafe(|| execute(stmt, params));
    PgTryBuilder::new(execute)
        .catch_others(|caught| match caught {
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
        })
        .execute()
}

unsafe fn execute(stmt: impl Statement, params: &[Param]) -> u64 {
    let mut values: Vec<Datum> = params.iter().map(|p| p.unwrap_or(Datum::from(0))).collect();
    let nulls: Vec<std::ffi::c_char> = params
        .iter()
        .map(|p| if p.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    let rc = pg_sys::SPI_execute_plan(plan(stmt), values.as_mut_ptr(), nulls.as_ptr(), false, 0);
    if rc < 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("pgflow statement failed: SPI code {rc}"),
            None,
        );
    }
    pg_sys::SPI_processed
}

/// Column `col` (1-based) of result row `row` of the last statement.
pub unsafe fn column(row: u64, col: i32) -> Option<Datum> {
    let table = pg_sys::SPI_tuptable;
    let mut isnull = false;
    let d = pg_sys::SPI_getbinval(
        *(*table).vals.add(row as usize),
        (*table).tupdesc,
        col,
        &mut isnull,
    );
    (!isnull).then_some(d)
}

/// Column `col` of row `row` as a Rust string (None for NULL).
pub unsafe fn text_column(row: u64, col: i32) -> Option<String> {
    column(row, col).map(|d| text_to_string(d))
}

/// Column `col` of row `row`, a by-value datum copied out of SPI memory (int, bool, ...).
pub unsafe fn int_column(row: u64, col: i32) -> Option<i64> {
    column(row, col).map(|d| d.value() as i64)
}

/// An SPI connection, finished when dropped.
pub struct SpiScope;

impl SpiScope {
    pub unsafe fn connect() -> SpiScope {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "SPI_connect failed".into(),
                None,
            );
        }
        SpiScope
    }
}

impl Drop for SpiScope {
    fn drop(&mut self) {
        // Not reached when an ERROR unwinds: the transaction's abort cleans SPI up then.
        unsafe { pg_sys::SPI_finish() };
    }
}

/// Argument `i` of a V1 call, None for SQL NULL.
pub unsafe fn arg(fcinfo: FunctionCallInfo, i: usize) -> Option<Datum> {
    let a = (*fcinfo).args.as_slice((*fcinfo).nargs as usize)[i];
    (!a.isnull).then_some(a.value)
}

/// A text datum as a Rust string.
pub unsafe fn text_to_string(d: Datum) -> String {
    let c = pg_sys::text_to_cstring(d.cast_mut_ptr());
    let s = CStr::from_ptr(c).to_string_lossy().into_owned();
    pg_sys::pfree(c.cast());
    s
}

/// A text argument as a Rust string.
pub unsafe fn text_arg(fcinfo: FunctionCallInfo, i: usize) -> Option<String> {
    arg(fcinfo, i).map(|d| text_to_string(d))
}

/// A Rust string as a text datum, in the current memory context.
pub unsafe fn text_datum(s: &str) -> Datum {
    Datum::from(pg_sys::cstring_to_text_with_len(
        s.as_ptr().cast(),
        s.len() as i32,
    ))
}

/// The null-argument error: 22004 naming the argument.
pub fn null_error(name: &str, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{name} must not be null"),
        hint,
    )
}

// fmgr entry points of built-in functions, called through DirectFunctionCall (the bindings
// only expose them wrapped as Rust functions, which are no PGFunction pointers).
unsafe extern "C-unwind" {
    #[link_name = "hashtext"]
    fn builtin_hashtext(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_advisory_xact_lock_int4"]
    fn builtin_advisory_xact_lock_int4(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "pg_advisory_xact_lock_shared_int4"]
    fn builtin_advisory_xact_lock_shared_int4(fcinfo: FunctionCallInfo) -> Datum;
    #[link_name = "jsonb_typeof"]
    fn builtin_jsonb_typeof(fcinfo: FunctionCallInfo) -> Datum;
}

/// Take the transaction-scoped advisory lock (`space`, hashtext(`key`)), exclusive or shared,
/// as `pg_advisory_xact_lock(space, hashtext(key))` does, then process pending invalidations
/// so that what committed while we waited is seen.
pub unsafe fn advisory_xact_lock(space: i32, key: Datum, shared: bool) {
    let hash =
        pg_sys::DirectFunctionCall1Coll(Some(builtin_hashtext), pg_sys::DEFAULT_COLLATION_OID, key);
    let f = if shared {
        builtin_advisory_xact_lock_shared_int4
    } else {
        builtin_advisory_xact_lock_int4
    };
    pg_sys::DirectFunctionCall2Coll(Some(f), pg_sys::InvalidOid, Datum::from(space), hash);
    pg_sys::AcceptInvalidationMessages();
}

/// `jsonb_typeof` of a jsonb datum.
pub unsafe fn json_type(d: Datum) -> String {
    text_to_string(pg_sys::DirectFunctionCall1Coll(
        Some(builtin_jsonb_typeof),
        pg_sys::InvalidOid,
        d,
    ))
}

/// Declares the `pg_finfo_<name>` record that marks a raw function as V1 calling convention.
#[macro_export]
macro_rules! v1 {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C-unwind" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            static V1: pgrx::pg_sys::Pg_finfo_record =
                pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
