//! Topics: the rules for routing keys and binding patterns, and how a pattern matches a key
//! (an AMQP topic exchange's). The bindings and `publish` are SQL (`sql/queue/topics.sql`),
//! which calls these.
//!
//! A routing key is dot-separated words of letters, digits, `_` and `-` (`orders.eu.created`).
//! A pattern is the same, where a word may also be `*` (exactly one word) or `#` (zero or more
//! words): `orders.*.created`, `orders.#`, `#`.

use crate::error::null_error;
use crate::error::{raise, shown};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Longest routing key or pattern, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;

/// Why a routing key (or, with `wildcards`, a pattern) is refused, if it is.
pub fn topic_problem(value: &str, wildcards: bool) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.len() > MAX_TOPIC_BYTES {
        return Some(format!(
            "must be at most {MAX_TOPIC_BYTES} bytes, not {}",
            value.len()
        ));
    }
    for word in value.split('.') {
        if word.is_empty() {
            return Some("has an empty word (a leading, trailing or double dot)".into());
        }
        if wildcards && (word == "*" || word == "#") {
            continue;
        }
        if !word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Some(format!(
                "has the word \"{}\", which is not letters, digits, '_' and '-'{}",
                shown(word),
                if wildcards {
                    ", nor a lone '*' or '#'"
                } else {
                    ""
                }
            ));
        }
    }
    None
}

/// Validate a routing key (`wildcards` false) or pattern given as argument `arg`: 22004 when
/// NULL, 22023 naming the argument and the problem otherwise.
pub fn check_topic<'a>(value: Option<&'a str>, arg: &str, wildcards: bool) -> &'a str {
    let Some(value) = value else {
        null_error(arg, None)
    };
    if let Some(problem) = topic_problem(value, wildcards) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} {problem}"),
            Some(if wildcards {
                "A pattern is dot-separated words of letters, digits, '_' and '-'; a word may be '*' (one word) or '#' (zero or more words)."
            } else {
                "A routing key is dot-separated words of letters, digits, '_' and '-', without wildcards."
            }),
        );
    }
    value
}

/// Whether `pattern` matches `routing_key`, word by word: `*` takes exactly one word, `#` any
/// number, including none. Dynamic programming over the two word lists, so a pattern of many
/// `#` costs its length times the key's, never an exponential search.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = routing_key.split('.').collect();
    let (n, m) = (p.len(), k.len());
    // rest[j]: p[i + 1..] matches k[j..]; row[j]: p[i..] matches k[j..]
    let mut rest = vec![false; m + 1];
    rest[m] = true;
    for i in (0..n).rev() {
        let mut row = vec![false; m + 1];
        for j in (0..=m).rev() {
            row[j] = match p[i] {
                "#" => rest[j] || (j < m && row[j + 1]),
                "*" => j < m && rest[j + 1],
                word => j < m && k[j] == word && rest[j + 1],
            };
        }
        rest = row;
    }
    rest[0]
}

/// Internal `pgflow._check_topic(value, arg, wildcards)`: [`check_topic`] for the SQL side.
#[pg_extern(immutable, parallel_safe, name = "_check_topic")]
#[search_path(pg_catalog, pg_temp)]
fn check_topic_sql(value: Option<&str>, arg: &str, wildcards: bool) {
    check_topic(value, arg, wildcards);
}

/// Internal `pgflow._topic_matches(pattern, routing_key)`: [`matches`].
#[pg_extern(immutable, parallel_safe, strict, name = "_topic_matches")]
#[search_path(pg_catalog, pg_temp)]
fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    matches(pattern, routing_key)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn patterns_match_as_an_amqp_topic_exchange_does() {
        let cases = [
            ("orders.created", "orders.created", true),
            ("orders.created", "orders.updated", false),
            ("orders.*", "orders.created", true),
            ("orders.*", "orders", false),
            ("orders.*", "orders.eu.created", false),
            ("orders.#", "orders", true),
            ("orders.#", "orders.eu.created", true),
            ("#", "anything.at.all", true),
            ("#", "x", true),
            ("#.created", "created", true),
            ("#.created", "orders.eu.created", true),
            ("#.created", "orders.eu.updated", false),
            ("orders.#.created", "orders.created", true),
            ("orders.#.created", "orders.a.b.created", true),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("*.#.*", "a", false),
            ("*.#.*", "a.b", true),
            ("#.#", "a.b.c", true),
            ("a.#.b.#.c", "a.x.b.y.z.c", true),
            ("a.#.b.#.c", "a.x.c.b", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(matches(pattern, key), expected, "{pattern} ~ {key}");
        }
        // many '#' against a long key: answered at once
        let pattern = ["#"; 120].join(".") + ".z";
        let key = ["a"; 120].join(".");
        assert!(!matches(&pattern, &key));
    }

    #[pg_test]
    fn keys_and_patterns_are_words() {
        assert_eq!(topic_problem("orders.eu-west.created_1", false), None);
        assert_eq!(topic_problem("orders.*.#", true), None);
        assert!(topic_problem("orders.*", false).is_some());
        assert!(topic_problem("orders..x", true).is_some());
        assert!(topic_problem(".x", true).is_some());
        assert!(topic_problem("x.", true).is_some());
        assert!(topic_problem("a*.b", true).is_some());
        assert!(topic_problem("", true).is_some());
        assert!(topic_problem(&"a".repeat(256), true).is_some());
        assert!(topic_problem("é", true).is_some());
    }
}
