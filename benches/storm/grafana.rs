//! The requests Grafana (10–12) sends to a Prometheus data source, as the storm
//! replays them.
//!
//! Panel queries are form POSTs to `/api/v1/query_range` whose step comes from the
//! panel's time range and width (Grafana's `intervalv2` rounding, at least the data
//! source's 15 s scrape interval, at most 11,000 points) and whose start and end are
//! floored to that step; `$__interval` and `$__rate_interval` are interpolated from
//! the step. Instant targets (stat, gauge, bar gauge and table panels) are form POSTs
//! to `/api/v1/query` at the refresh's "now" in milliseconds, aligned to nothing.
//! Times are written as Grafana's `formatTime` writes them. The metric browser's calls
//! (labels, label values with `match[]`, series) are GETs over the range snapped to
//! whole minutes, as the data source's default "low" cache level does.

use std::sync::Arc;

use crate::harness::grafana_seconds;

/// The data source's scrape interval (Grafana's default): the smallest step.
pub const SCRAPE_INTERVAL_MS: i64 = 15_000;
/// Grafana never asks Prometheus for more points per series than this.
const SAFE_RESOLUTION: i64 = 11_000;
const MINUTE_MS: i64 = 60_000;

/// One HTTP call Grafana makes.
#[derive(Debug, Clone)]
pub enum Call {
    /// A range panel target.
    Range {
        expr: Arc<str>,
        range_ms: i64,
        step_ms: i64,
    },
    /// An instant target (`instant: true, range: false`): evaluated at "now", to the
    /// millisecond, unaligned.
    Instant { expr: Arc<str> },
    /// The metric browser: label names over the last `range_ms`.
    Labels { range_ms: i64 },
    /// Values of `label`, optionally of the series matching `matcher`
    /// (dashboard variables, the metric browser).
    LabelValues {
        label: Arc<str>,
        matcher: Option<Arc<str>>,
        range_ms: i64,
    },
    /// Series matching `matcher` (the metric browser, once a metric is picked).
    Series { matcher: Arc<str>, range_ms: i64 },
}

/// What to send: a POST form or a GET with query parameters.
pub struct HttpCall {
    pub post: bool,
    pub path: String,
    pub params: Vec<(&'static str, String)>,
}

impl Call {
    /// A range target over the last `range_ms`, drawn `max_data_points` pixels wide,
    /// with the target's own minimum interval if it sets one.
    pub fn range(expr: &str, range_ms: i64, max_data_points: i64, min_interval_ms: i64) -> Call {
        let step_ms = step_ms(range_ms, max_data_points, min_interval_ms);
        Call::Range {
            expr: interpolate(expr, step_ms, range_ms).into(),
            range_ms,
            step_ms,
        }
    }

    /// The expression, for query calls.
    pub fn expr(&self) -> Option<&str> {
        match self {
            Call::Range { expr, .. } | Call::Instant { expr } => Some(expr),
            _ => None,
        }
    }

    /// The call as Grafana would send it at `now_ms`.
    pub fn http(&self, now_ms: i64) -> HttpCall {
        match self {
            Call::Range {
                expr,
                range_ms,
                step_ms,
            } => {
                let end = now_ms.div_euclid(*step_ms) * step_ms;
                let start = (now_ms - range_ms).div_euclid(*step_ms) * step_ms;
                HttpCall {
                    post: true,
                    path: "/api/v1/query_range".into(),
                    params: vec![
                        ("query", expr.to_string()),
                        ("start", grafana_seconds(start)),
                        ("end", grafana_seconds(end)),
                        ("step", grafana_seconds(*step_ms)),
                    ],
                }
            }
            Call::Instant { expr } => HttpCall {
                post: true,
                path: "/api/v1/query".into(),
                params: vec![
                    ("query", expr.to_string()),
                    ("time", grafana_seconds(now_ms)),
                ],
            },
            Call::Labels { range_ms } => HttpCall {
                post: false,
                path: "/api/v1/labels".into(),
                params: snapped(now_ms, *range_ms),
            },
            Call::LabelValues {
                label,
                matcher,
                range_ms,
            } => {
                let mut params = snapped(now_ms, *range_ms);
                if let Some(m) = matcher {
                    params.push(("match[]", m.to_string()));
                }
                HttpCall {
                    post: false,
                    path: format!("/api/v1/label/{label}/values"),
                    params,
                }
            }
            Call::Series { matcher, range_ms } => {
                let mut params = snapped(now_ms, *range_ms);
                params.push(("match[]", matcher.to_string()));
                HttpCall {
                    post: false,
                    path: "/api/v1/series".into(),
                    params,
                }
            }
        }
    }

    /// The first sample time (ms) this call can touch when sent at `now_ms`, given
    /// how far before its start the expression reaches (`reach_ms`).
    pub fn oldest(&self, now_ms: i64, reach_ms: i64) -> i64 {
        match self {
            Call::Range {
                range_ms, step_ms, ..
            } => (now_ms - range_ms).div_euclid(*step_ms) * step_ms - reach_ms,
            Call::Instant { .. } => now_ms - reach_ms,
            Call::Labels { range_ms }
            | Call::LabelValues { range_ms, .. }
            | Call::Series { range_ms, .. } => floor_minute(now_ms - range_ms),
        }
    }
}

/// Grafana's step: the range spread over the panel's pixels, rounded to a "nice"
/// interval, no finer than the minimum interval, and coarse enough for at most
/// 11,000 points.
fn step_ms(range_ms: i64, max_data_points: i64, min_interval_ms: i64) -> i64 {
    let raw = range_ms / max_data_points.max(1);
    let calculated = if raw < min_interval_ms {
        min_interval_ms
    } else {
        round_interval(raw)
    };
    calculated.max(round_interval(range_ms / SAFE_RESOLUTION))
}

/// Grafana's `roundInterval` (pkg/tsdb/intervalv2): each bound maps to the nice
/// interval below it.
fn round_interval(ms: i64) -> i64 {
    const S: i64 = 1000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;
    const D: i64 = 24 * H;
    #[rustfmt::skip]
    const TABLE: &[(i64, i64)] = &[
        (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500),
        (1500, S), (3500, 2 * S), (7500, 5 * S), (12500, 10 * S), (17500, 15 * S),
        (25 * S, 20 * S), (45 * S, 30 * S), (90 * S, M), (210 * S, 2 * M),
        (450 * S, 5 * M), (750 * S, 10 * M), (1050 * S, 15 * M), (1500 * S, 20 * M),
        (2700 * S, 30 * M), (5400 * S, H), (9000 * S, 2 * H), (16200 * S, 3 * H),
        (32400 * S, 6 * H), (D, 12 * H), (2 * D, D), (7 * D, D), (21 * D, 7 * D),
    ];
    TABLE
        .iter()
        .find(|(bound, _)| ms <= *bound)
        .map_or(if ms < 42 * D { 30 * D } else { 365 * D }, |(_, nice)| {
            *nice
        })
}

/// Replace Grafana's interval variables the way its Prometheus backend does:
/// `$__interval` is the step, `$__rate_interval` is
/// max(step + scrape interval, 4 × scrape interval), `$__range` the range.
fn interpolate(expr: &str, step_ms: i64, range_ms: i64) -> String {
    let rate = (step_ms + SCRAPE_INTERVAL_MS).max(4 * SCRAPE_INTERVAL_MS);
    expr.replace("${__rate_interval}", &duration(rate))
        .replace("$__rate_interval", &duration(rate))
        .replace("${__interval}", &duration(step_ms))
        .replace("$__interval", &duration(step_ms))
        .replace("${__range}", &duration(range_ms))
        .replace("$__range", &duration(range_ms))
}

/// A Prometheus duration in its largest whole unit: `1h`, `5m`, `75s`.
fn duration(ms: i64) -> String {
    match ms {
        _ if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % MINUTE_MS == 0 => format!("{}m", ms / MINUTE_MS),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// Start floored and end rounded up to whole minutes: one answer per minute for
/// every metric browser in the company.
fn snapped(now_ms: i64, range_ms: i64) -> Vec<(&'static str, String)> {
    vec![
        ("start", grafana_seconds(floor_minute(now_ms - range_ms))),
        ("end", grafana_seconds(floor_minute(now_ms + MINUTE_MS - 1))),
    ]
}

fn floor_minute(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS) * MINUTE_MS
}
