//! Queue names and flow slugs: the one rule for them. SQL functions call `pgflow._check_name`,
//! the Rust hot paths [`check_name`].

use crate::error::{null_error, raise, shown};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Longest queue name or flow slug, in bytes. Chosen so that every derived name (the queue's
/// notification channel `pgflow.queue.<name>`, the flow's `pgflow.flow.<slug>`) stays under
/// PostgreSQL's 64-byte identifier limit.
pub const MAX_NAME_BYTES: usize = 48;

/// Why a name is refused, if it is.
#[derive(Debug, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    TooLong(usize),
    BadCharacter,
}

pub fn name_problem(value: &str) -> Option<NameProblem> {
    if value.is_empty() {
        Some(NameProblem::Empty)
    } else if value.len() > MAX_NAME_BYTES {
        Some(NameProblem::TooLong(value.len()))
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Some(NameProblem::BadCharacter)
    } else {
        None
    }
}

/// Validate a queue name or slug given as argument `arg`, raising the specific error if it is
/// not allowed.
pub fn check_name(value: Option<&str>, arg: &str) {
    let Some(value) = value else {
        null_error(arg, None)
    };
    match name_problem(value) {
        None => {}
        Some(NameProblem::Empty) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} must not be empty"),
            Some("Names use letters, digits and underscores, 1 to 48 bytes."),
        ),
        Some(NameProblem::TooLong(n)) => raise(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!("{arg} is {n} bytes long, the limit is {MAX_NAME_BYTES}"),
            Some("Names use letters, digits and underscores, 1 to 48 bytes."),
        ),
        Some(NameProblem::BadCharacter) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "{arg} \"{}\" contains a character that is not allowed",
                shown(value)
            ),
            Some("Names use ASCII letters, digits and underscores only."),
        ),
    }
}

/// `pgflow._check_name(value, arg)`: raises the specific error for a malformed name.
#[pg_extern(immutable, parallel_safe, name = "_check_name")]
#[search_path(pg_catalog, pg_temp)]
fn check_name_sql(value: Option<&str>, arg: &str) {
    check_name(value, arg)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn names_follow_the_allow_list() {
        assert_eq!(name_problem("orders_2"), None);
        assert_eq!(name_problem(""), Some(NameProblem::Empty));
        assert_eq!(name_problem(&"a".repeat(48)), None);
        assert_eq!(
            name_problem(&"a".repeat(49)),
            Some(NameProblem::TooLong(49))
        );
        assert_eq!(name_problem("a;drop"), Some(NameProblem::BadCharacter));
        assert_eq!(name_problem("caf\u{e9}"), Some(NameProblem::BadCharacter));
        assert_eq!(name_problem("a b"), Some(NameProblem::BadCharacter));
    }

    #[pg_test(error = "queue_name must not be null")]
    fn null_name_is_refused() {
        check_name(None, "queue_name");
    }
}
