//! The fmgr side of the raw V1 entry points: their arguments, text and uuid datums, built-in
//! functions called directly, and the list each module keeps of its entry points' SQL
//! declarations (checked against `pg_proc` by a test).

use pgrx::pg_sys::{self, Datum, FunctionCallInfo};
use std::ffi::CStr;

/// Argument `i` of a V1 call, None for SQL NULL.
pub unsafe fn arg(fcinfo: FunctionCallInfo, i: usize) -> Option<Datum> {
    // SAFETY: fcinfo is the valid call information PostgreSQL passed to a V1 function (the
    // caller's contract); the slice is built from its own nargs and indexing it is bounds-checked.
    unsafe {
        let a = (*fcinfo).args.as_slice((*fcinfo).nargs as usize)[i];
        (!a.isnull).then_some(a.value)
    }
}

/// Argument `i` of a V1 call whose SQL declaration may predate it (an older release's
/// declaration has fewer arguments): None when it is not declared, or SQL NULL.
pub unsafe fn optional_arg(fcinfo: FunctionCallInfo, i: usize) -> Option<Datum> {
    // SAFETY: fcinfo is the valid call information PostgreSQL passed to a V1 function (the
    // caller's contract); arg is called only for an index below its nargs.
    unsafe {
        if i < (*fcinfo).nargs as usize {
            arg(fcinfo, i)
        } else {
            None
        }
    }
}

/// A text datum as a Rust string.
pub unsafe fn text_to_string(d: Datum) -> String {
    // SAFETY: the caller passes a non-null text datum (a varlena, possibly toasted, which
    // text_to_cstring detoasts); the C string it returns is palloc'd, copied into a Rust String,
    // then freed.
    unsafe {
        let c = pg_sys::text_to_cstring(d.cast_mut_ptr());
        let s = CStr::from_ptr(c).to_string_lossy().into_owned();
        pg_sys::pfree(c.cast());
        s
    }
}

/// A text argument as a Rust string.
pub unsafe fn text_arg(fcinfo: FunctionCallInfo, i: usize) -> Option<String> {
    // SAFETY: arg() reads the argument within bounds; the caller's contract is that argument `i`
    // is declared text.
    unsafe { arg(fcinfo, i).map(|d| text_to_string(d)) }
}

/// A Rust string as a text datum, in the current memory context.
pub unsafe fn text_datum(s: &str) -> Datum {
    // SAFETY: the pointer and length describe `s`, a valid UTF-8 slice that outlives the call; the
    // text is copied into the current memory context.
    unsafe {
        Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr().cast(),
            s.len() as i32,
        ))
    }
}

// fmgr entry points of built-in functions, called through DirectFunctionCall (the bindings
// only expose them wrapped as Rust functions, which are no PGFunction pointers).
unsafe extern "C-unwind" {
    #[link_name = "jsonb_typeof"]
    fn builtin_jsonb_typeof(fcinfo: FunctionCallInfo) -> Datum;
}

/// A uuid datum in its text form (8-4-4-4-12 lower-case hex).
pub unsafe fn uuid_string(d: Datum) -> String {
    // SAFETY: the caller passes a non-null uuid datum, a pointer to its 16 bytes (pg_uuid_t), read
    // as such and not beyond.
    unsafe {
        let b = std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16);
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}

/// `jsonb_typeof` of a jsonb datum.
pub unsafe fn json_type(d: Datum) -> String {
    // SAFETY: the caller passes a non-null jsonb datum, which is what jsonb_typeof reads; its text
    // result is read by text_to_string.
    unsafe {
        text_to_string(pg_sys::DirectFunctionCall1Coll(
            Some(builtin_jsonb_typeof),
            pg_sys::InvalidOid,
            d,
        ))
    }
}

/// A raw V1 function as its SQL declaration must read: the C symbol, the `regprocedure` text and
/// the result (`pg_get_function_result`). The entry points read their arguments by position,
/// so each module lists its own next to the functions, and `every_c_function_is_declared_as_its_rust_reads_it`
/// compares the lists with `pg_proc`.
#[cfg_attr(not(any(test, feature = "pg_test")), allow(dead_code))]
pub struct CFunction {
    pub symbol: &'static str,
    pub signature: &'static str,
    pub result: &'static str,
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

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Every C function of the extension that is not a pgrx wrapper is one of the modules'
    /// raw entry points, declared with the argument types and result its Rust reads.
    #[pg_test]
    fn every_c_function_is_declared_as_its_rust_reads_it() {
        let mut expected: Vec<(String, String, String)> = crate::queue::C_FUNCTIONS
            .iter()
            .chain(crate::workflow::C_FUNCTIONS)
            .chain(crate::locks::C_FUNCTIONS)
            .map(|f| (f.symbol.into(), f.signature.into(), f.result.into()))
            .collect();
        expected.sort();
        let declared: Vec<(String, String, String)> = Spi::connect(|client| {
            client
                .select(
                    "SELECT p.prosrc, p.oid::regprocedure::text,
                            coalesce(pg_get_function_result(p.oid), '(procedure)')
                       FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                      WHERE l.lanname = 'c' AND p.pronamespace = 'pgflow'::regnamespace
                        AND p.prosrc NOT LIKE '%\\_wrapper'
                      ORDER BY 1, 2, 3",
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| {
                    (
                        row.get::<String>(1).unwrap().unwrap(),
                        row.get::<String>(2).unwrap().unwrap(),
                        row.get::<String>(3).unwrap().unwrap(),
                    )
                })
                .collect()
        });
        assert_eq!(declared, expected);
    }
}
