//! Errors pgflow raises from Rust: each with its SQLSTATE, a message naming the argument, and a
//! hint where one helps.

use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raise an ERROR with the given SQLSTATE, message and optional hint. Never returns.
pub fn raise(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(code, message, "pgflow");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// A short, printable rendering of a user value for an error message: never the whole of an
/// overlong argument, never a control character.
pub fn shown(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if value.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

/// The null-argument error: 22004 naming the argument.
pub fn null_error(name: &str, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{name} must not be null"),
        hint,
    )
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn shown_values_are_bounded() {
        assert_eq!(shown("abc"), "abc");
        assert_eq!(shown(&"x".repeat(100)).len(), 67);
        assert_eq!(shown("a\nb"), "a?b");
    }
}
