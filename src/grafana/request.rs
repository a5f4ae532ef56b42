//! One HTTP call Grafana makes to a Prometheus data source, and how it writes it; pure.
//!
//! Query calls are form POSTs (the provisioned data source's `httpMethod: POST`), times
//! as Go's shortest float of Unix seconds (`formatTime` in
//! `pkg/promlib/client/client.go`). A range query's start and end are floored to its
//! step (`AlignTimeRange`); an instant query is evaluated at the range's end to the
//! millisecond, aligned to nothing (`QueryInstant`). The metric browser's and the
//! variables' metadata calls are GETs over the range snapped outwards to whole minutes,
//! the data source's default "low" cache level (`getRangeSnapInterval` in
//! `packages/grafana-prometheus/src/language_utils.ts`).
//!
//! The viewers modelled here use a browser on UTC: `utcOffsetSec` is 0, so ranges are
//! floored to multiples of the step since the epoch. [`align`] shows what another time
//! zone does to steps that do not divide its offset.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::interpolate::interpolate;
use super::interval::{MINUTE, Resolution};

/// One HTTP call Grafana makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A range target: the expression as sent, over the last `range_ms` at `step_ms`.
    Range {
        /// The expression as sent.
        expr: Arc<str>,
        /// The time range's length.
        range_ms: i64,
        /// The step.
        step_ms: i64,
    },
    /// An instant target (`instant: true, range: false`): evaluated at "now", to the
    /// millisecond, unaligned.
    Instant {
        /// The expression as sent.
        expr: Arc<str>,
    },
    /// The metric browser: label names over the last `range_ms`.
    Labels {
        /// The time range's length.
        range_ms: i64,
    },
    /// Values of `label`, optionally of the series matching `matcher` (dashboard
    /// variables, the metric browser).
    LabelValues {
        /// The label.
        label: Arc<str>,
        /// The series selector, if any.
        matcher: Option<Arc<str>>,
        /// The time range's length.
        range_ms: i64,
    },
    /// Series matching `matcher` (the metric browser, once a metric is picked).
    Series {
        /// The series selector.
        matcher: Arc<str>,
        /// The time range's length.
        range_ms: i64,
    },
}

/// What to send: a POST form or a GET with query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// A form POST, else a GET with query parameters.
    pub post: bool,
    /// The API path.
    pub path: String,
    /// The form or query parameters, in order.
    pub params: Vec<(&'static str, String)>,
}

impl Call {
    /// A range target at `resolution`, its expression interpolated with the
    /// dashboard's `variables` and Grafana's built-ins.
    ///
    /// # Errors
    ///
    /// An undefined variable (see [`interpolate`]).
    pub fn range(
        expr: &str,
        resolution: &Resolution,
        variables: &BTreeMap<String, String>,
    ) -> Result<Call, String> {
        Ok(Call::Range {
            expr: interpolate(expr, variables, resolution)?.into(),
            range_ms: resolution.range_ms,
            step_ms: resolution.step_ms,
        })
    }

    /// An instant target; the server interpolates it at the same `resolution` as a
    /// range target of the same panel.
    ///
    /// # Errors
    ///
    /// An undefined variable (see [`interpolate`]).
    pub fn instant(
        expr: &str,
        resolution: &Resolution,
        variables: &BTreeMap<String, String>,
    ) -> Result<Call, String> {
        Ok(Call::Instant {
            expr: interpolate(expr, variables, resolution)?.into(),
        })
    }

    /// The expression, for query calls.
    pub fn expr(&self) -> Option<&str> {
        match self {
            Call::Range { expr, .. } | Call::Instant { expr } => Some(expr),
            _ => None,
        }
    }

    /// The step of a range call.
    pub fn step_ms(&self) -> Option<i64> {
        match self {
            Call::Range { step_ms, .. } => Some(*step_ms),
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
            } => HttpCall {
                post: true,
                path: "/api/v1/query_range".into(),
                params: vec![
                    ("query", expr.to_string()),
                    ("start", format_time(align(now_ms - range_ms, *step_ms, 0))),
                    ("end", format_time(align(now_ms, *step_ms, 0))),
                    ("step", format_time(*step_ms)),
                ],
            },
            Call::Instant { expr } => HttpCall {
                post: true,
                path: "/api/v1/query".into(),
                params: vec![("query", expr.to_string()), ("time", format_time(now_ms))],
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
            } => align(now_ms - range_ms, *step_ms, 0) - reach_ms,
            Call::Instant { .. } => now_ms - reach_ms,
            Call::Labels { range_ms }
            | Call::LabelValues { range_ms, .. }
            | Call::Series { range_ms, .. } => floor_minute(now_ms - range_ms),
        }
    }
}

/// Unix milliseconds as Grafana writes a time or a step: Go's
/// `strconv.FormatFloat(seconds, 'f', -1, 64)` of whole seconds plus the fraction, the
/// shortest decimal that reads back as the same float (`1795770042`,
/// `1795770042.12`, `0.5`), which is what Rust's `Display` for `f64` prints.
pub fn format_time(ms: i64) -> String {
    let seconds = ms.div_euclid(1000) as f64 + (ms.rem_euclid(1000) * 1_000_000) as f64 / 1e9;
    format!("{seconds}")
}

/// `ms` floored to a multiple of `step_ms` in a time zone `utc_offset_s` seconds east
/// of UTC (`AlignTimeRange`): a 2 h step in Moscow (UTC+3) starts at odd UTC hours.
/// Integer arithmetic; Grafana's float64 nanoseconds give the same result for any
/// time and step it sends.
pub fn align(ms: i64, step_ms: i64, utc_offset_s: i64) -> i64 {
    let offset_ms = utc_offset_s * 1000;
    (ms + offset_ms).div_euclid(step_ms) * step_ms - offset_ms
}

/// Start floored and end rounded up to whole minutes: one answer per minute for every
/// metric browser in the company.
fn snapped(now_ms: i64, range_ms: i64) -> Vec<(&'static str, String)> {
    vec![
        ("start", format_time(floor_minute(now_ms - range_ms))),
        ("end", format_time(floor_minute(now_ms + MINUTE - 1))),
    ]
}

fn floor_minute(ms: i64) -> i64 {
    ms.div_euclid(MINUTE) * MINUTE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grafana::interval::{HOUR, SECOND};

    #[test]
    fn times_as_go_writes_seconds() {
        for (ms, text) in [
            (1_795_770_042_000, "1795770042"),
            (1_795_770_042_120, "1795770042.12"),
            (1_795_770_042_123, "1795770042.123"),
            (1_795_770_042_001, "1795770042.001"),
            (15_000, "15"),
            (500, "0.5"),
            (0, "0"),
        ] {
            assert_eq!(format_time(ms), text, "{ms}");
        }
    }

    #[test]
    fn ranges_floor_to_the_step_in_the_viewers_time_zone() {
        let t = 1_795_770_042_123; // 2026-11-27 09:00:42.123 UTC
        assert_eq!(align(t, 30 * SECOND, 0), 1_795_770_030_000);
        assert_eq!(align(t, 2 * HOUR, 0), 1_795_766_400_000); // 08:00 UTC
        // In Moscow (UTC+3) a 2 h step starts at even Moscow hours: 09:00 UTC.
        assert_eq!(align(t, 2 * HOUR, 3 * 3600), 1_795_770_000_000);
        // A step dividing the offset is aligned alike.
        assert_eq!(align(t, HOUR, 3 * 3600), align(t, HOUR, 0));
    }

    #[test]
    fn calls_as_sent() {
        let now = 1_795_770_042_123;
        let range = Call::Range {
            expr: "up".into(),
            range_ms: 6 * HOUR,
            step_ms: 30 * SECOND,
        };
        assert_eq!(
            range.http(now),
            HttpCall {
                post: true,
                path: "/api/v1/query_range".into(),
                params: vec![
                    ("query", "up".into()),
                    ("start", "1795748430".into()),
                    ("end", "1795770030".into()),
                    ("step", "30".into()),
                ],
            }
        );
        let instant = Call::Instant { expr: "up".into() };
        assert_eq!(
            instant.http(now).params,
            vec![("query", "up".into()), ("time", "1795770042.123".into())]
        );
        let values = Call::LabelValues {
            label: "region".into(),
            matcher: Some("shop_orders_total".into()),
            range_ms: 6 * HOUR,
        };
        assert_eq!(
            values.http(now),
            HttpCall {
                post: false,
                path: "/api/v1/label/region/values".into(),
                params: vec![
                    ("start", "1795748400".into()),
                    ("end", "1795770060".into()),
                    ("match[]", "shop_orders_total".into()),
                ],
            }
        );
    }
}
