//! Timestamps and durations as Prometheus writes them: parsing and printing, bounded.
//!
//! Every time and duration promguard reads (API parameters, PromQL literals, the
//! configuration, the admin API, the CLI) goes through these functions, which
//! never panic and refuse values outside what a backend can represent. Pure.

use std::time::Duration;

use chrono::DateTime;

/// Milliseconds since the Unix epoch, the unit of every timestamp in promguard.
pub type Millis = i64;

/// The earliest time an API request may name: 0001-01-01T00:00:00Z. Backends store
/// nothing outside years 1 to 9999, and staying this far inside `i64` milliseconds
/// keeps every `time − range − offset` computation far from overflow.
pub const MIN_TIME: Millis = -62_135_596_800_000;
/// The latest time an API request may name: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME: Millis = 253_402_300_799_999;

/// The longest duration accepted anywhere: what Prometheus' Go `time.Duration`
/// (int64 nanoseconds) can hold, about 292 years. Larger values are nonsense that
/// would otherwise overflow arithmetic further on.
pub const MAX_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// Prometheus' spelling of its smallest representable time, which its own clients
/// send for "unbounded" on metadata endpoints.
pub const MIN_TIME_FORMATTED: &str = "-292273086-05-16T16:47:06Z";
/// Prometheus' spelling of its largest representable time: "unbounded" at the
/// other end.
pub const MAX_TIME_FORMATTED: &str = "292277025-08-18T07:12:54.999999999Z";

/// A timestamp parameter: Unix seconds (fractional allowed) or RFC 3339, between
/// [`MIN_TIME`] and [`MAX_TIME`].
///
/// # Errors
///
/// A reason, when the value is neither form or lies outside that span.
pub fn parse_time(value: &str) -> Result<Millis, String> {
    let ms = if let Ok(secs) = value.parse::<f64>() {
        let ms = (secs * 1000.0).round();
        // The range check on the float comes first, so the cast below is exact.
        if !(ms.is_finite() && (MIN_TIME as f64..=MAX_TIME as f64).contains(&ms)) {
            return Err(out_of_range(value));
        }
        ms as Millis
    } else if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        t.timestamp_millis()
    } else {
        return Err(format!("cannot parse {value:?} to a valid timestamp"));
    };
    if (MIN_TIME..=MAX_TIME).contains(&ms) {
        Ok(ms)
    } else {
        Err(out_of_range(value))
    }
}

fn out_of_range(value: &str) -> String {
    format!("timestamp {value:?} is outside the years 1 to 9999, where backends store data")
}

/// A timestamp that may also be one of Prometheus' "unbounded" spellings, which
/// metadata clients send: those become `Millis::MIN` and `Millis::MAX`.
///
/// # Errors
///
/// As [`parse_time`].
pub fn parse_time_or_unbounded(value: &str) -> Result<Millis, String> {
    match value {
        MIN_TIME_FORMATTED => Ok(Millis::MIN),
        MAX_TIME_FORMATTED => Ok(Millis::MAX),
        _ => parse_time(value),
    }
}

/// Unix seconds with millisecond precision, as Prometheus parses them.
pub fn format_time(ms: Millis) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
}

/// A time for people to read, `2026-11-27T09:00:00Z` (seconds, UTC); Unix seconds
/// when out of the calendar's range.
pub fn format_rfc3339(ms: Millis) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(
        || format_time(ms),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// A duration as the HTTP API takes it (`step`, `timeout`): float seconds or the
/// Prometheus duration syntax, positive or zero, at most [`MAX_DURATION`].
///
/// # Errors
///
/// A reason naming the value.
pub fn parse_api_duration(value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(secs) => seconds(secs).ok_or_else(|| {
            format!(
                "cannot parse {value:?} to a valid duration: must be positive, finite and \
                 at most 292 years"
            )
        }),
        Err(_) => parse_duration(value)
            .map_err(|e| format!("cannot parse {value:?} to a valid duration: {e}")),
    }
}

/// Float seconds as a duration, when finite, not negative and at most [`MAX_DURATION`].
pub fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_finite() && secs >= 0.0 && secs <= MAX_DURATION.as_secs_f64() {
        Duration::try_from_secs_f64(secs).ok()
    } else {
        None
    }
}

/// The Prometheus duration syntax: one or more `<integer><unit>` in descending
/// unit order, units `y` (365 days), `w`, `d`, `h`, `m`, `s`, `ms`: `30s`, `1h30m`,
/// `2d`. The result is greater than zero and at most [`MAX_DURATION`].
///
/// # Errors
///
/// A reason, for anything else (signs, fractions, unknown or repeated units, zero,
/// overflow).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u128); 7] = [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let invalid = || format!("not a valid duration string: {text:?}");
    let mut rest = text.as_bytes();
    let mut total: u128 = 0;
    // Units must appear largest first, each at most once.
    let mut next_unit = 0;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 20 {
            return Err(invalid());
        }
        let number: u128 = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(invalid)?;
        rest = &rest[digits..];
        let letters = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = std::str::from_utf8(&rest[..letters]).map_err(|_| invalid())?;
        let at = UNITS[next_unit..]
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(invalid)?;
        total = total.saturating_add(number.saturating_mul(UNITS[next_unit + at].1));
        next_unit += at + 1;
        rest = &rest[letters..];
    }
    if total == 0 {
        return Err("duration must be greater than 0".into());
    }
    let max = MAX_DURATION.as_millis();
    if total > max {
        return Err(format!("duration {text:?} is longer than 292 years"));
    }
    u64::try_from(total)
        .map(Duration::from_millis)
        .map_err(|_| invalid())
}

/// Print a duration in the Prometheus syntax, largest units first (`1h30m`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("y", 365 * 86_400_000u128),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

/// Now on the wall clock, in [`Millis`]; 0 on a clock before 1970.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in milliseconds as a signed count, saturating: callers subtract it
/// from timestamps.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_within_the_years_backends_store() {
        assert_eq!(parse_time("1700000000.123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("4"), Ok(4_000));
        assert_eq!(parse_time("-1.5"), Ok(-1_500));
        assert_eq!(parse_time("2024-11-11T00:00:00Z"), Ok(1_731_283_200_000));
        assert_eq!(parse_time("253402300799.999"), Ok(MAX_TIME));
        for bad in [
            "9000000000000000",
            "253402300800",
            "-62135596801",
            "1e300",
            "NaN",
            "inf",
            "yesterday",
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_time_or_unbounded(MIN_TIME_FORMATTED), Ok(Millis::MIN));
        assert_eq!(parse_time_or_unbounded(MAX_TIME_FORMATTED), Ok(Millis::MAX));
        assert!(parse_time(MIN_TIME_FORMATTED).is_err());
    }

    #[test]
    fn times_round_trip_through_format() {
        assert_eq!(format_time(1_700_000_000_123), "1700000000.123");
        assert_eq!(format_time(-1_500), "-1.500");
        for ms in [0, 1, -1, MIN_TIME, MAX_TIME, 1_700_000_000_123] {
            assert_eq!(parse_time(&format_time(ms)), Ok(ms));
        }
    }

    #[test]
    fn durations_follow_the_prometheus_syntax_and_never_overflow() {
        let ok = |t: &str, ms: u64| assert_eq!(parse_duration(t), Ok(Duration::from_millis(ms)));
        ok("30s", 30_000);
        ok("1h30m", 5_400_000);
        ok("2d", 172_800_000);
        ok(
            "1y2w3d4h5m6s7ms",
            31_536_000_000 + 1_209_600_000 + 259_200_000 + 14_706_007,
        );
        ok("292y", 292 * 31_536_000_000);
        for bad in [
            "",
            "0",
            "0s",
            "-1",
            "-5m",
            "NaN",
            "inf",
            "1e300",
            "1.5h",
            "5",
            "300000y",
            "4294967295y",
            "1m1h",
            "1h1h",
            "5x",
            "m",
            "99999999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_durations_take_seconds_or_the_syntax() {
        assert_eq!(parse_api_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_api_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_api_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_api_duration("0"), Ok(Duration::ZERO));
        for bad in ["-15", "NaN", "inf", "1e300", "abc", "-1m"] {
            assert!(parse_api_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_print_in_their_largest_units() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        for t in ["1h30m", "2d", "1y2w3d4h5m6s7ms"] {
            assert_eq!(format_duration(parse_duration(t).unwrap()), t);
        }
    }
}
