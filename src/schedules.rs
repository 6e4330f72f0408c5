//! Schedules: the one rule for five-field cron expressions and their next fire time. The
//! schedules themselves, and firing them, are SQL (`sql/maintenance/schedules.sql`), which calls
//! `pgflow._cron_next`.
//!
//! An expression is five fields, `minute hour day-of-month month day-of-week`, or one of the
//! macros `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
//! A field is a comma-separated list of items; an item is `*`, a value or a range `a-b`,
//! optionally followed by a step `/n` (`*/15`, `8-18/2`; `a/n` runs from `a` to the field's
//! end). Months and weekdays may be named (`JAN`..`DEC`, `SUN`..`SAT`, any case); Sunday is
//! 0 or 7. As in Vixie cron, when both day fields are restricted (neither starts with `*`), a day
//! matches if either does; otherwise both must.
//!
//! Times are wall-clock times (a `timestamp` without time zone): the SQL side converts them to
//! and from the schedule's time zone, so this module knows nothing of time zones.

use crate::error::{null_error, raise, shown};
use pgrx::datum::Timestamp;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

const HINT: &str = "A cron expression is five fields, minute hour day-of-month month day-of-week \
                    (for example '*/15 * * * *' or '0 9 * * MON-FRI'), or one of @hourly, @daily, \
                    @weekly, @monthly, @yearly.";

/// A parsed cron expression: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_star: bool,
    weekdays_star: bool,
}

struct Field {
    name: &'static str,
    lo: u32,
    hi: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field {
    name: "minute",
    lo: 0,
    hi: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    lo: 0,
    hi: 23,
    names: &[],
};
const DAY: Field = Field {
    name: "day-of-month",
    lo: 1,
    hi: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    lo: 1,
    hi: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const WEEKDAY: Field = Field {
    name: "day-of-week",
    lo: 0,
    hi: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

impl Field {
    fn value(&self, text: &str) -> Result<u32, String> {
        if let Some(i) = self.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
            return Ok(i as u32 + if self.lo == 1 { 1 } else { 0 });
        }
        let v: u32 = text
            .parse()
            .ok()
            .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| format!("field {} has \"{}\", not a value", self.name, shown(text)))?;
        if v < self.lo || v > self.hi {
            return Err(format!(
                "field {} has {v}, out of its range {}-{}",
                self.name, self.lo, self.hi
            ));
        }
        Ok(v)
    }

    /// The allowed values as bits, and whether the field starts with `*`.
    fn parse(&self, text: &str) -> Result<(u64, bool), String> {
        let mut bits = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    let n: u32 = step
                        .parse()
                        .ok()
                        .filter(|n| *n > 0 && step.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| {
                            format!(
                                "field {} has the step \"{}\", not a whole number above 0",
                                self.name,
                                shown(step)
                            )
                        })?;
                    (range, n)
                }
                None => (item, 1),
            };
            let (from, to) = if range == "*" {
                (self.lo, self.hi)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!(
                        "field {} has the range {a}-{b}, which runs backwards",
                        self.name
                    ));
                }
                (a, b)
            } else {
                let a = self.value(range)?;
                (
                    a,
                    if step > 1 || item.contains('/') {
                        self.hi
                    } else {
                        a
                    },
                )
            };
            let mut v = from;
            while v <= to {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok((bits, text.starts_with('*')))
    }
}

/// Days in `month` of `year` (proleptic Gregorian).
fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The civil date of a day counted from 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MINUTE_US: i64 = 60_000_000;
const DAY_US: i64 = 1440 * MINUTE_US;
/// PostgreSQL's timestamps count from 2000-01-01, 10957 days after 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// How far ahead a fire time is looked for: a schedule that can fire fires within this many
/// days (the longest gap is February 29 between 2096 and 2104).
const HORIZON_DAYS: i64 = 9 * 366;

impl Cron {
    /// Parse an expression; the error says what is wrong, without the argument's name.
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let expr = expr.trim();
        let expanded = match expr.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!("has the unknown macro \"{}\"", shown(expr)))
            }
            _ => expr,
        };
        let fields: Vec<&str> = expanded.split_ascii_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!("has {} fields, not five", fields.len()));
        }
        let (minutes, _) = MINUTE.parse(fields[0])?;
        let (hours, _) = HOUR.parse(fields[1])?;
        let (days, days_star) = DAY.parse(fields[2])?;
        let (months, _) = MONTH.parse(fields[3])?;
        let (weekdays, weekdays_star) = WEEKDAY.parse(fields[4])?;
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f; // 7 is Sunday, as 0 is
        let cron = Cron {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            days_star,
            weekdays_star,
        };
        // Only the day of the month can make an expression that never fires (30 2 ...): when
        // the weekday field takes part, some week day always comes.
        let by_day_only = !days_star && weekdays_star;
        if by_day_only
            && !(1..=12).any(|m| {
                cron.months & (1 << m) != 0
                    && (1..=days_in_month(2000, m)).any(|d| cron.days & (1 << d) != 0)
            })
        {
            return Err("never fires: no month of it has any of its days".into());
        }
        Ok(cron)
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let d = self.days & (1 << day) != 0;
        let w = self.weekdays & (1 << weekday) != 0;
        if self.days_star || self.weekdays_star {
            d && w
        } else {
            d || w
        }
    }

    /// The first fire time strictly after `after`, both in microseconds since 2000-01-01 of
    /// wall-clock time; `None` if there is none within the horizon.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let start = after
            .div_euclid(MINUTE_US)
            .checked_add(1)?
            .checked_mul(MINUTE_US)?;
        let first_day = start.div_euclid(DAY_US);
        let first_minute = (start.rem_euclid(DAY_US) / MINUTE_US) as u32;
        for offset in 0..HORIZON_DAYS {
            let day = first_day + offset;
            let (_, month, mday) = civil_from_days(day + PG_EPOCH_DAYS);
            // 1970-01-01 was a Thursday
            let weekday = (day + PG_EPOCH_DAYS + 4).rem_euclid(7) as u32;
            if self.months & (1 << month) == 0 || !self.day_matches(mday, weekday) {
                continue;
            }
            let from = if offset == 0 { first_minute } else { 0 };
            if let Some(m) = (from..1440)
                .find(|m| self.hours & (1 << (m / 60)) != 0 && self.minutes & (1 << (m % 60)) != 0)
            {
                return (day * DAY_US).checked_add(i64::from(m) * MINUTE_US);
            }
        }
        None
    }
}

/// Parse `cron`, given as argument `arg`: 22004 when NULL, 22023 naming the argument otherwise.
pub fn check_cron(cron: Option<&str>, arg: &str) -> Cron {
    let Some(cron) = cron else {
        null_error(arg, Some(HINT))
    };
    Cron::parse(cron).unwrap_or_else(|problem| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} \"{}\" {problem}", shown(cron)),
            Some(HINT),
        )
    })
}

/// Internal `pgflow._cron_next(cron, after)`: the first wall-clock time after `after` at which
/// `cron` fires (checked as argument `cron`).
#[pg_extern(immutable, parallel_safe, name = "_cron_next")]
#[search_path(pg_catalog, pg_temp)]
fn cron_next(cron: Option<&str>, after: Option<Timestamp>) -> Timestamp {
    let parsed = check_cron(cron, "cron");
    let Some(after) = after else {
        null_error("after", None)
    };
    let next = if after.is_finite() {
        parsed.next_after(after.into_inner())
    } else {
        None
    };
    next.and_then(|t| Timestamp::try_from(t).ok())
        .unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
                "cron has no fire time after the given time".into(),
                None,
            )
        })
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    /// Microseconds since 2000-01-01 of a wall-clock time.
    fn at(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        let mut days = 0i64;
        for year in 2000..y {
            days += if days_in_month(year, 2) == 29 {
                366
            } else {
                365
            };
        }
        for m in 1..mo {
            days += i64::from(days_in_month(y, m));
        }
        days += i64::from(d) - 1;
        days * DAY_US + i64::from(h * 60 + mi) * MINUTE_US
    }

    fn next(expr: &str, after: i64) -> i64 {
        Cron::parse(expr).unwrap().next_after(after).unwrap()
    }

    #[pg_test]
    fn next_fire_times() {
        let t = at(2026, 12, 6, 10, 17); // a Sunday
        assert_eq!(next("* * * * *", t), at(2026, 12, 6, 10, 18));
        assert_eq!(next("* * * * *", t + 30_000_000), at(2026, 12, 6, 10, 18));
        assert_eq!(next("*/15 * * * *", t), at(2026, 12, 6, 10, 30));
        assert_eq!(next("0 9 * * MON-FRI", t), at(2026, 12, 7, 9, 0));
        assert_eq!(next("0 0 1 * *", t), at(2027, 1, 1, 0, 0));
        assert_eq!(next("@yearly", t), at(2027, 1, 1, 0, 0));
        assert_eq!(next("@weekly", t), at(2026, 12, 13, 0, 0));
        assert_eq!(next("0 0 * * 7", t), at(2026, 12, 13, 0, 0));
        assert_eq!(next("0 0 29 2 *", t), at(2028, 2, 29, 0, 0));
        assert_eq!(
            next("0 0 29 2 *", at(2096, 3, 1, 0, 0)),
            at(2104, 2, 29, 0, 0)
        );
        assert_eq!(next("30 8-18/4 * * *", t), at(2026, 12, 6, 12, 30));
        assert_eq!(next("5/20 * * * *", t), at(2026, 12, 6, 10, 25));
        assert_eq!(next("0 12 * dec,JAN *", t), at(2026, 12, 6, 12, 0));
        // both day fields restricted: either matches (the 13th, or any Friday)
        assert_eq!(next("0 0 13 * 5", t), at(2026, 12, 11, 0, 0));
        // a day-of-month step counts as restricted only if it does not start with *
        assert_eq!(next("0 0 */2 * 1", t), at(2026, 12, 7, 0, 0));
        // before 2000-01-01 (negative microseconds)
        let y2k = at(2000, 1, 1, 0, 0);
        assert_eq!(next("0 0 * * *", y2k - MINUTE_US), y2k);
        assert_eq!(next("0 0 1 1 *", y2k - 5 * DAY_US), y2k);
        assert_eq!(next("0 0 * * *", y2k - 5 * DAY_US - 1), y2k - 5 * DAY_US);
    }

    #[pg_test]
    fn bad_expressions_say_what_is_wrong() {
        for (expr, words) in [
            ("* * * *", "4 fields"),
            ("60 * * * *", "field minute has 60"),
            ("* 24 * * *", "field hour"),
            ("* * 0 * *", "field day-of-month"),
            ("* * * 13 *", "field month"),
            ("* * * * 8", "field day-of-week"),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "backwards"),
            ("a * * * *", "not a value"),
            ("0 0 30 2 *", "never fires"),
            ("@reboot", "unknown macro"),
            ("", "0 fields"),
        ] {
            let e = Cron::parse(expr).unwrap_err();
            assert!(e.contains(words), "{expr}: {e}");
        }
        assert!(Cron::parse("0 0 31 2,4 *").is_err());
        assert!(Cron::parse("0 0 31 2,3 *").is_ok());
        assert!(Cron::parse("0 0 30 2 1").is_ok());
    }
}
