//! How long one step of a panel's query is, and the other intervals Grafana derives
//! from the time range and the panel's size; pure arithmetic, all in milliseconds.
//!
//! [`Resolution::new`] follows the browser's `rangeutil.calculateInterval` and the
//! server's `calculatePrometheusInterval` and `calculateRateInterval`
//! (`pkg/promlib/models/query.go`) with `intervalv2.Calculate` and
//! `CalculateSafeInterval`; the module docs of [`super`] say what each contributes.

/// Milliseconds in a second, minute, hour, day and week.
pub const SECOND: i64 = 1000;
/// Milliseconds in a minute.
pub const MINUTE: i64 = 60 * SECOND;
/// Milliseconds in an hour.
pub const HOUR: i64 = 60 * MINUTE;
/// Milliseconds in a day.
pub const DAY: i64 = 24 * HOUR;
/// Milliseconds in a week.
pub const WEEK: i64 = 7 * DAY;
/// Grafana's year in `$__interval` (`gtime.FormatInterval`): 365 days.
const YEAR: i64 = 365 * DAY;
const NANOS_PER_MS: i64 = 1_000_000;

/// The server never asks for more points per series than this (`safeResolution`).
pub const SAFE_RESOLUTION: i64 = 11_000;

/// Grafana's nice intervals: an interval below a bound (see [`Rounding`] for "on" it)
/// rounds to the value beside it. Both of Grafana's copies list these pairs; the
/// server's also splits the one-day row at two days, to the same value.
const NICE: [(i64, i64); 29] = [
    (10, 1),
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, SECOND),
    (3_500, 2 * SECOND),
    (7_500, 5 * SECOND),
    (12_500, 10 * SECOND),
    (17_500, 15 * SECOND),
    (25 * SECOND, 20 * SECOND),
    (45 * SECOND, 30 * SECOND),
    (90 * SECOND, MINUTE),
    (210 * SECOND, 2 * MINUTE),
    (450 * SECOND, 5 * MINUTE),
    (750 * SECOND, 10 * MINUTE),
    (1_050 * SECOND, 15 * MINUTE),
    (1_500 * SECOND, 20 * MINUTE),
    (2_700 * SECOND, 30 * MINUTE),
    (5_400 * SECOND, HOUR),
    (9_000 * SECOND, 2 * HOUR),
    (16_200 * SECOND, 3 * HOUR),
    (32_400 * SECOND, 6 * HOUR),
    (DAY, 12 * HOUR),
    (WEEK, DAY),
    (3 * WEEK, WEEK),
    // Both copies compare this last bound strictly; past it, a year.
    (6 * WEEK, 30 * DAY),
];

/// Which copy of the table rounds: they differ only for an interval exactly on a
/// bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// The browser's `rangeutil.roundInterval`: a bound rounds up (`interval < bound`).
    Browser,
    /// The server's `gtime.RoundInterval`: a bound rounds down (`interval <= bound`),
    /// except six weeks.
    Server,
}

/// `nanos` rounded to one of Grafana's nice intervals, in milliseconds.
pub fn round_interval(nanos: i64, rounding: Rounding) -> i64 {
    let last = NICE.len() - 1;
    NICE.iter()
        .enumerate()
        .find(|&(i, &(bound, _))| {
            let bound = bound * NANOS_PER_MS;
            nanos < bound || (rounding == Rounding::Server && i < last && nanos == bound)
        })
        .map_or(YEAR, |(_, &(_, nice))| nice)
}

/// An interval as dashboards write them (`30s`, `5m`, `6h`, `1d`; a bare number is
/// seconds), in milliseconds.
///
/// # Errors
///
/// For anything else: fractions, several units, months and years (which the browser
/// and the server read differently) and variables are not modelled.
pub fn parse_interval(text: &str) -> Result<i64, String> {
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = text.split_at(digits);
    let unit = match unit {
        "" | "s" => SECOND,
        "ms" => 1,
        "m" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        "w" => WEEK,
        _ => return Err(format!("interval {text:?} is not <integer><ms|s|m|h|d|w>")),
    };
    number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("interval {text:?} is not <integer><ms|s|m|h|d|w>"))
}

/// An interval as `$__interval` has it (`gtime.FormatInterval`): its largest whole
/// unit, truncated (`90s` is `1m`).
pub fn format_interval(ms: i64) -> String {
    [
        (YEAR, "y"),
        (DAY, "d"),
        (HOUR, "h"),
        (MINUTE, "m"),
        (SECOND, "s"),
        (1, "ms"),
    ]
    .iter()
    .find(|(unit, _)| ms >= *unit)
    .map_or("1ms".to_string(), |(unit, name)| {
        format!("{}{name}", ms / unit)
    })
}

/// An interval as `$__rate_interval` has it, Go's `time.Duration.String`: `1m0s`,
/// `1m15s`, `2h0m0s`, `500ms`.
pub fn format_go_duration(ms: i64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < SECOND {
        return format!("{ms}ms");
    }
    let (hours, minutes) = (ms / HOUR, ms / MINUTE % 60);
    let (seconds, millis) = (ms / SECOND % 60, ms % SECOND);
    let seconds = if millis == 0 {
        seconds.to_string()
    } else {
        format!("{seconds}.{millis:03}")
            .trim_end_matches('0')
            .to_string()
    };
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// A Prometheus data source's settings that size its queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSource {
    /// `jsonData.timeInterval`, the "Scrape interval": the browser's floor for
    /// `intervalMs` on panels without a min interval, and the base of
    /// `$__rate_interval` for targets without a min step.
    pub scrape_interval_ms: i64,
}

impl DataSource {
    /// A data source without `timeInterval`: both sides then use 15 s.
    pub const GRAFANA_DEFAULT: DataSource = DataSource {
        scrape_interval_ms: 15 * SECOND,
    };
}

/// What sizes one target's query besides its time range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// The panel's `maxDataPoints`, else its width in pixels: what the browser sends.
    pub max_data_points: i64,
    /// The panel's "Min interval" (`interval` in the panel's JSON).
    pub panel_min_interval_ms: Option<i64>,
    /// The target's "Min step" (`interval` in the target's JSON).
    pub target_min_step_ms: Option<i64>,
}

/// What Grafana derives for one target from the length of its time range; the same
/// wherever the range ends, so it can be computed once per panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// The time range's length (`$__range`).
    pub range_ms: i64,
    /// The browser's `intervalMs`, sent with the query.
    pub interval_ms: i64,
    /// The step the server sends (`$__interval`).
    pub step_ms: i64,
    /// `$__rate_interval`: the browser's interval plus one scrape, at least four
    /// scrapes, the scrape being the target's min step or the data source's.
    pub rate_interval_ms: i64,
}

impl Resolution {
    /// What Grafana derives for a range of `range_ms` sized by `sizing`. A
    /// `maxDataPoints` below one (a hand-edited dashboard) counts as one point, and
    /// intervals too long to count in nanoseconds stop at the longest that can.
    pub fn new(range_ms: i64, sizing: Sizing, data_source: DataSource) -> Resolution {
        let range_ns = range_ms.saturating_mul(NANOS_PER_MS);
        // Both sides divide the range by the points; the server in whole nanoseconds,
        // which decides on exactly the same side of every bound as the browser's float.
        let per_point = range_ns / sizing.max_data_points.max(1);

        let floor = sizing
            .panel_min_interval_ms
            .unwrap_or(data_source.scrape_interval_ms);
        let interval_ms = round_interval(per_point, Rounding::Browser).max(floor);

        // `GetIntervalFrom`: the browser's interval stands in for a missing min step,
        // so a quotient the browser rounded up keeps the browser's value.
        let min_ms = sizing.target_min_step_ms.unwrap_or(interval_ms);
        let calculated = if per_point < min_ms.saturating_mul(NANOS_PER_MS) {
            min_ms
        } else {
            round_interval(per_point, Rounding::Server)
        };
        let safe = round_interval(range_ns / SAFE_RESOLUTION, Rounding::Server);

        let scrape = sizing
            .target_min_step_ms
            .unwrap_or(data_source.scrape_interval_ms);
        Resolution {
            range_ms,
            interval_ms,
            step_ms: calculated.max(safe),
            rate_interval_ms: interval_ms
                .saturating_add(scrape)
                .max(scrape.saturating_mul(4)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PANEL: Sizing = Sizing {
        max_data_points: 1000,
        panel_min_interval_ms: None,
        target_min_step_ms: None,
    };

    fn nanos(ms: i64) -> i64 {
        ms * NANOS_PER_MS
    }

    #[test]
    fn both_copies_round_alike_except_on_a_bound() {
        use Rounding::{Browser, Server};
        #[rustfmt::skip]
        let cases: &[(i64, i64, i64)] = &[
            // (interval, browser, server), from rangeutil.roundInterval and gtime.RoundInterval.
            (nanos(5), 1, 1),
            (nanos(10), 10, 1),
            (nanos(11_973), 10 * SECOND, 10 * SECOND),
            (nanos(12_500), 15 * SECOND, 10 * SECOND),
            (nanos(12_500) + 1, 15 * SECOND, 15 * SECOND),
            (nanos(45 * SECOND), MINUTE, 30 * SECOND),
            (nanos(17 * MINUTE + 30 * SECOND), 20 * MINUTE, 15 * MINUTE),
            // A 20-minute interval is 20m in both; neither table jumps to 30m there.
            (nanos(20 * MINUTE), 20 * MINUTE, 20 * MINUTE),
            (nanos(25 * MINUTE), 30 * MINUTE, 20 * MINUTE),
            (nanos(25 * MINUTE) + 1, 30 * MINUTE, 30 * MINUTE),
            (nanos(14 * HOUR + 34 * MINUTE), 12 * HOUR, 12 * HOUR),
            (nanos(DAY), DAY, 12 * HOUR),
            (nanos(2 * DAY), DAY, DAY),
            (nanos(WEEK), WEEK, DAY),
            (nanos(3 * WEEK), 30 * DAY, WEEK),
            (nanos(6 * WEEK) - 1, 30 * DAY, 30 * DAY),
            // Both compare six weeks strictly.
            (nanos(6 * WEEK), YEAR, YEAR),
            (nanos(3 * YEAR), YEAR, YEAR),
        ];
        for &(interval, browser, server) in cases {
            assert_eq!(
                round_interval(interval, Browser),
                browser,
                "browser, {interval} ns"
            );
            assert_eq!(
                round_interval(interval, Server),
                server,
                "server, {interval} ns"
            );
        }
    }

    #[test]
    fn a_curated_panel_keeps_its_min_interval() {
        // orders.json, "Orders per minute": 6 h over 1,804 px, panel min interval 30 s.
        // 11.97 s per point; the browser rounds to 10 s and raises it to 30 s, and the
        // server's quotient is below that minimum, so the step is 30 s.
        let r = Resolution::new(
            6 * HOUR,
            Sizing {
                max_data_points: 1804,
                panel_min_interval_ms: Some(30 * SECOND),
                target_min_step_ms: None,
            },
            DataSource::GRAFANA_DEFAULT,
        );
        assert_eq!(
            r,
            Resolution {
                range_ms: 6 * HOUR,
                interval_ms: 30 * SECOND,
                step_ms: 30 * SECOND,
                rate_interval_ms: MINUTE,
            }
        );
    }

    /// What Grafana derives for `range_ms`: (intervalMs, step, `$__rate_interval`).
    const fn derived(range_ms: i64, interval_ms: i64, step_ms: i64, rate_ms: i64) -> Resolution {
        Resolution {
            range_ms,
            interval_ms,
            step_ms,
            rate_interval_ms: rate_ms,
        }
    }

    #[test]
    fn resolutions_derived_from_grafanas_source() {
        #[rustfmt::skip]
        let cases: &[(&str, Sizing, Resolution)] = &[
            ("below the scrape interval: 15 s", PANEL,
                derived(HOUR, 15 * SECOND, 15 * SECOND, MINUTE)),
            ("20 minutes per point: 20m", PANEL,
                derived(1000 * 20 * MINUTE, 20 * MINUTE, 20 * MINUTE, 20 * MINUTE + 15 * SECOND)),
            // On the 25-minute bound the browser rounds up to 30m, and its interval is
            // the server's minimum: the step is 30m, not the server's own 20m.
            ("on a bound, no min step", PANEL,
                derived(1000 * 25 * MINUTE, 30 * MINUTE, 30 * MINUTE, 30 * MINUTE + 15 * SECOND)),
            ("on a bound, own min step", Sizing { target_min_step_ms: Some(MINUTE), ..PANEL },
                derived(1000 * 25 * MINUTE, 30 * MINUTE, 20 * MINUTE, 31 * MINUTE)),
            // The target's min step is the server's minimum and the rate's scrape.
            ("own min step above the quotient",
                Sizing { max_data_points: 1804, panel_min_interval_ms: Some(30 * SECOND),
                         target_min_step_ms: Some(5 * MINUTE) },
                derived(6 * HOUR, 30 * SECOND, 5 * MINUTE, 20 * MINUTE)),
            // 30 days at 20,000 points would be 2m; 11,000 points at most makes it 5m.
            ("the safe resolution", Sizing { max_data_points: 20_000, ..PANEL },
                derived(30 * DAY, 2 * MINUTE, 5 * MINUTE, 2 * MINUTE + 15 * SECOND)),
            ("three years", Sizing { max_data_points: 1804, ..PANEL },
                derived(3 * YEAR, 12 * HOUR, 12 * HOUR, 12 * HOUR + 15 * SECOND)),
            // The server rounds a quotient above the panel's min interval on its own,
            // possibly below that minimum: 41 s per point with a 40 s min is 30 s.
            ("a min interval the server undercuts",
                Sizing { panel_min_interval_ms: Some(40 * SECOND), ..PANEL },
                derived(1000 * 41 * SECOND, 40 * SECOND, 30 * SECOND, MINUTE)),
        ];
        for (what, sizing, want) in cases {
            let got = Resolution::new(want.range_ms, *sizing, DataSource::GRAFANA_DEFAULT);
            assert_eq!(got, *want, "{what}");
        }
    }

    #[test]
    fn intervals_are_read_and_written_as_grafana_does() {
        for (text, ms) in [
            ("30s", 30 * SECOND),
            ("15", 15 * SECOND),
            ("500ms", 500),
            ("5m", 5 * MINUTE),
            ("6h", 6 * HOUR),
            ("2d", 2 * DAY),
            ("1w", WEEK),
        ] {
            assert_eq!(parse_interval(text), Ok(ms), "{text}");
        }
        for text in ["", "1.5m", "1m30s", "1M", "1y", "$__interval", "m"] {
            assert!(parse_interval(text).is_err(), "{text:?}");
        }
        for (ms, interval, go) in [
            (500, "500ms", "500ms"),
            (15 * SECOND, "15s", "15s"),
            (MINUTE, "1m", "1m0s"),
            (75 * SECOND, "1m", "1m15s"),
            (90 * SECOND + 500, "1m", "1m30.5s"),
            (2 * HOUR, "2h", "2h0m0s"),
            (WEEK, "7d", "168h0m0s"),
            (YEAR + DAY, "1y", "8784h0m0s"),
        ] {
            assert_eq!(format_interval(ms), interval, "{ms} ms");
            assert_eq!(format_go_duration(ms), go, "{ms} ms");
        }
    }

    #[test]
    fn rate_intervals_as_written_are_promql_durations() {
        for ms in [
            MINUTE,
            75 * SECOND,
            20 * MINUTE + 15 * SECOND,
            2 * HOUR,
            WEEK,
        ] {
            let text = format_go_duration(ms);
            let parsed = promql_parser::util::parse_duration(&text)
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                parsed.as_millis(),
                u128::try_from(ms).unwrap_or(0),
                "{text}"
            );
        }
    }
}
