//! Sale windows: named spans of time, written with an explicit UTC offset or in an
//! IANA time zone, and which of them is active at an instant. Pure.
//!
//! Local times that do not exist (the hour skipped when clocks go forward) move to
//! the first instant after the gap; ambiguous ones (the hour repeated when clocks go
//! back) take the earlier instant, so a window never starts late or ends early.

use chrono::{DateTime, FixedOffset, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// One planned sale window, resolved to UTC instants. `start` is inclusive, `end`
/// exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Unique across all policy files; the `window` label of `promguard_sale_mode`
    /// and named in refusals.
    pub name: String,
    /// First instant of the window.
    pub start: DateTime<Utc>,
    /// First instant after it.
    pub end: DateTime<Utc>,
    /// How long before `start` promguard fills its cache with what engineers will
    /// open (`warm` in the configuration says what); `None`: no warming.
    pub warm_before: Option<std::time::Duration>,
}

/// The active window at an instant and when sale mode ends if nothing changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active<'a> {
    /// The window containing the instant; the one that started first, when several
    /// overlap.
    pub window: &'a Window,
    /// The end of the run of overlapping or back-to-back windows containing now.
    pub until: DateTime<Utc>,
}

/// Resolve `text` (RFC 3339 with offset, or a local time in `zone`) to UTC.
///
/// # Errors
///
/// A message saying what is wrong with the time or the zone.
pub fn resolve(text: &str, zone: Option<&str>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::<FixedOffset>::parse_from_rfc3339(text) {
        if zone.is_some() {
            return Err(format!(
                "{text:?} has its own UTC offset; drop the offset or the timezone"
            ));
        }
        return Ok(t.with_timezone(&Utc));
    }
    let Some(zone) = zone else {
        return Err(format!(
            "{text:?} needs a UTC offset (2026-11-27T00:00:00+03:00) or a timezone field"
        ));
    };
    let tz: Tz = zone
        .parse()
        .map_err(|_| format!("unknown IANA time zone {zone:?}"))?;
    let local = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S"))
        .map_err(|_| format!("{text:?} is not a local time like 2026-11-27T00:00:00"))?;
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Ok(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, _) => Ok(earlier.with_timezone(&Utc)),
        LocalResult::None => {
            // In a spring-forward gap: the first valid minute after it.
            (1..=180)
                .find_map(|m| {
                    tz.from_local_datetime(&(local + chrono::Duration::minutes(m)))
                        .earliest()
                })
                .map(|t| {
                    let t = t.with_timezone(&Utc);
                    t - chrono::Duration::seconds(i64::from(chrono::Timelike::second(&t)))
                })
                .ok_or_else(|| format!("{text:?} does not exist in {zone}"))
        }
    }
}

/// The window active at `now`, if any. With overlapping windows the one that
/// started first is reported, and `until` covers the whole overlapping run.
pub fn active(windows: &[Window], now: DateTime<Utc>) -> Option<Active<'_>> {
    let window = windows
        .iter()
        .filter(|w| w.start <= now && now < w.end)
        .min_by_key(|w| w.start)?;
    let mut until = window.end;
    // Extend across windows that overlap or touch the run so far.
    loop {
        let next = windows
            .iter()
            .filter(|w| w.start <= until && w.end > until)
            .map(|w| w.end)
            .max();
        match next {
            Some(end) => until = end,
            None => break,
        }
    }
    Some(Active { window, until })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn window(name: &str, start: &str, end: &str) -> Window {
        Window {
            name: name.into(),
            start: utc(start),
            end: utc(end),
            warm_before: None,
        }
    }

    #[test]
    fn offsets_and_zones() {
        assert_eq!(
            resolve("2026-11-27T00:00:00+03:00", None).unwrap(),
            utc("2026-11-26T21:00:00Z")
        );
        assert_eq!(
            resolve("2026-11-27T00:00:00", Some("Europe/Moscow")).unwrap(),
            utc("2026-11-26T21:00:00Z")
        );
        assert_eq!(
            resolve("2026-11-27T00:00:00", Some("America/New_York")).unwrap(),
            utc("2026-11-27T05:00:00Z")
        );
        assert!(resolve("2026-11-27T00:00:00", None).is_err());
        assert!(resolve("2026-11-27T00:00:00", Some("Mars/Olympus")).is_err());
        assert!(resolve("2026-11-27T00:00:00+03:00", Some("Europe/Moscow")).is_err());
        assert!(resolve("27.11.2026", Some("Europe/Moscow")).is_err());
    }

    #[test]
    fn dst_changes() {
        // Europe/Berlin: 2026-03-29 02:00 does not exist; 2026-10-25 02:30 happens twice.
        assert_eq!(
            resolve("2026-03-29T02:30:00", Some("Europe/Berlin")).unwrap(),
            utc("2026-03-29T01:00:00Z"),
            "a time in the gap moves to the first instant after it"
        );
        assert_eq!(
            resolve("2026-10-25T02:30:00", Some("Europe/Berlin")).unwrap(),
            utc("2026-10-25T00:30:00Z"),
            "an ambiguous time takes the earlier instant"
        );
        // A window across the autumn change lasts 25 hours.
        let start = resolve("2026-10-25T00:00:00", Some("Europe/Berlin")).unwrap();
        let end = resolve("2026-10-26T00:00:00", Some("Europe/Berlin")).unwrap();
        assert_eq!((end - start).num_hours(), 25);
    }

    #[test]
    fn boundaries_are_start_inclusive_end_exclusive() {
        let w = [window("bf", "2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z")];
        assert!(active(&w, utc("2026-11-26T23:59:59Z")).is_none());
        assert_eq!(
            active(&w, utc("2026-11-27T00:00:00Z")).unwrap().window.name,
            "bf"
        );
        assert!(active(&w, utc("2026-11-27T23:59:59Z")).is_some());
        assert!(active(&w, utc("2026-11-28T00:00:00Z")).is_none());
    }

    #[test]
    fn overlapping_and_back_to_back_windows_extend_until() {
        let w = [
            window("pre-sale", "2026-11-10T18:00:00Z", "2026-11-11T00:00:00Z"),
            window(
                "singles-day",
                "2026-11-11T00:00:00Z",
                "2026-11-12T00:00:00Z",
            ),
            window(
                "late-support",
                "2026-11-11T20:00:00Z",
                "2026-11-12T06:00:00Z",
            ),
            window(
                "black-friday",
                "2026-11-27T00:00:00Z",
                "2026-11-28T00:00:00Z",
            ),
        ];
        let a = active(&w, utc("2026-11-10T20:00:00Z")).unwrap();
        assert_eq!(a.window.name, "pre-sale");
        assert_eq!(a.until, utc("2026-11-12T06:00:00Z"));
        let b = active(&w, utc("2026-11-11T21:00:00Z")).unwrap();
        assert_eq!(b.window.name, "singles-day");
        assert_eq!(b.until, utc("2026-11-12T06:00:00Z"));
        assert!(active(&w, utc("2026-11-20T00:00:00Z")).is_none());
    }
}
