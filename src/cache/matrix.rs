//! The Prometheus API's matrix answers: parsed into compact series and printed
//! back exactly as the backend wrote them (label sets as text, values as text,
//! timestamps in the backend's style). The extent algebra in [`super::extent`]
//! cuts and joins these. Pure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::extent::{Grid, Span};

/// How a backend writes fractional timestamps: Prometheus always with three
/// decimals (`.500`), VictoriaMetrics as short as possible (`.5`). Kept so a
/// stitched answer reads exactly like a direct one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampStyle {
    /// Prometheus: a fraction always has three digits (`.500`); the style assumed
    /// until an answer shows otherwise.
    #[default]
    Millis3,
    /// VictoriaMetrics: trailing zeros of a fraction dropped (`.5`).
    Shortest,
}

/// One series' points, stored compactly: timestamps, and the value strings
/// concatenated with their end offsets (values stay the backend's exact text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Points {
    ts: Vec<i64>,
    ends: Vec<u32>,
    text: String,
}

impl Points {
    /// How many points the series has.
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether the series has no points.
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Append a point. Timestamps must come in increasing order: spans are looked up
    /// by binary search.
    pub fn push(&mut self, ts: i64, value: &str) {
        self.ts.push(ts);
        self.text.push_str(value);
        self.ends
            .push(u32::try_from(self.text.len()).unwrap_or(u32::MAX));
    }

    /// Point `i`: its timestamp in milliseconds and its value as the backend wrote it.
    ///
    /// # Panics
    ///
    /// When `i` is not below [`Points::len`].
    pub fn get(&self, i: usize) -> (i64, &str) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        (self.ts[i], &self.text[start..self.ends[i] as usize])
    }

    /// Indexes of the points within `span`.
    pub(crate) fn range(&self, span: Span) -> std::ops::Range<usize> {
        let lo = self.ts.partition_point(|&t| t < span.from);
        let hi = self.ts.partition_point(|&t| t <= span.to);
        lo..hi.max(lo)
    }

    pub(crate) fn extend_within(&mut self, other: &Points, span: Span) {
        for i in other.range(span) {
            let (t, v) = other.get(i);
            self.push(t, v);
        }
    }

    fn bytes(&self) -> usize {
        self.ts.len() * 8 + self.ends.len() * 4 + self.text.len()
    }
}

/// One series of a matrix: its label set as the backend printed it, and its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The `metric` object's exact JSON text; backends print label sets sorted by
    /// name, so equal text means equal label sets.
    pub metric: Arc<str>,
    /// Its points in time order.
    pub points: Points,
}

/// A parsed `resultType: matrix` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matrix {
    /// In the backend's order when parsed; [`super::extent::assemble`] sorts as
    /// Prometheus does.
    pub series: Vec<Series>,
    /// How to print fractional timestamps, as learnt from the answer's own points.
    pub style: TimestampStyle,
}

/// Why an answer cannot be cut into extents; it is then cached whole or not at all.
#[derive(Debug, PartialEq, Eq)]
pub enum NotSplittable {
    /// Not a JSON success answer, or a timestamp promguard cannot read (more than
    /// three decimals).
    Invalid,
    /// A success of another result type than `matrix`.
    NotMatrix,
    /// The answer carries `warnings` or `infos`, which speak for the whole range and
    /// would be lost or repeated in pieces.
    HasWarnings,
    /// A series has native histogram points, which [`Points`] cannot hold.
    NativeHistograms,
}

#[derive(Deserialize)]
struct RawAnswer<'a> {
    #[serde(borrow)]
    status: &'a str,
    #[serde(borrow)]
    data: Option<RawData<'a>>,
    warnings: Option<serde::de::IgnoredAny>,
    infos: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(rename = "resultType", borrow)]
    result_type: &'a str,
    #[serde(borrow)]
    result: Vec<RawSeries<'a>>,
}

#[derive(Deserialize)]
struct RawSeries<'a> {
    #[serde(borrow)]
    metric: &'a RawValue,
    #[serde(borrow, default)]
    values: Vec<(&'a RawValue, &'a str)>,
    histograms: Option<serde::de::IgnoredAny>,
}

impl Matrix {
    /// Parse a successful range-query answer.
    ///
    /// # Errors
    ///
    /// [`NotSplittable`] when the body is not a plain matrix without warnings.
    pub fn parse(body: &[u8]) -> Result<Matrix, NotSplittable> {
        let raw: RawAnswer = serde_json::from_slice(body).map_err(|_| NotSplittable::Invalid)?;
        if raw.status != "success" {
            return Err(NotSplittable::Invalid);
        }
        if raw.warnings.is_some() || raw.infos.is_some() {
            return Err(NotSplittable::HasWarnings);
        }
        let data = raw.data.ok_or(NotSplittable::Invalid)?;
        if data.result_type != "matrix" {
            return Err(NotSplittable::NotMatrix);
        }
        let mut style = TimestampStyle::default();
        let mut series = Vec::with_capacity(data.result.len());
        for s in data.result {
            if s.histograms.is_some() {
                return Err(NotSplittable::NativeHistograms);
            }
            let mut points = Points::default();
            for (ts, value) in s.values {
                let (ms, seen) = parse_timestamp(ts.get()).ok_or(NotSplittable::Invalid)?;
                if let Some(seen) = seen {
                    style = seen;
                }
                points.push(ms, value);
            }
            series.push(Series {
                metric: Arc::from(s.metric.get()),
                points,
            });
        }
        Ok(Matrix { series, style })
    }

    /// Give back the room its vectors grew into: a stored chunk is counted by
    /// [`Matrix::bytes`], which assumes no slack.
    pub fn shrink_to_fit(&mut self) {
        self.series.shrink_to_fit();
        for s in &mut self.series {
            s.points.ts.shrink_to_fit();
            s.points.ends.shrink_to_fit();
            s.points.text.shrink_to_fit();
        }
    }

    /// Approximate heap size, for the cache's byte bound.
    pub fn bytes(&self) -> usize {
        self.series
            .iter()
            .map(|s| s.metric.len() + s.points.bytes() + 64)
            .sum::<usize>()
            + 32
    }

    /// Points over all series, for `promguard_cache_points_{fetched,served}_total`.
    pub fn point_count(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum()
    }

    /// Whether every point lies on `grid` within `span`: what a backend must
    /// answer for a range query on that grid. VictoriaMetrics moves unaligned
    /// ranges of 50 points or more onto multiples of the step, and such an answer
    /// must never be stored as extents of the grid it was asked for.
    pub fn on_grid(&self, grid: &Grid, span: Span) -> bool {
        self.series.iter().all(|s| {
            s.points.ts.iter().all(|&t| {
                span.from <= t && t <= span.to && (t - grid.phase).rem_euclid(grid.step) == 0
            })
        })
    }

    /// Print as a Prometheus API success body.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.bytes() + 64);
        out.push_str(r#"{"status":"success","data":{"resultType":"matrix","result":["#);
        for (i, s) in self.series.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(r#"{"metric":"#);
            out.push_str(&s.metric);
            out.push_str(r#","values":["#);
            for p in 0..s.points.len() {
                let (ts, value) = s.points.get(p);
                if p > 0 {
                    out.push(',');
                }
                out.push('[');
                write_timestamp(&mut out, ts, self.style);
                out.push_str(",\"");
                out.push_str(value);
                out.push_str("\"]");
            }
            out.push_str("]}");
        }
        out.push_str("]}}");
        out
    }
}

/// Prometheus' `labels.Compare` order: label pairs sorted by name, compared pair by
/// pair, shorter first. A `BTreeMap` gives the byte-wise name order Go uses.
pub(crate) fn label_order(metric: &str) -> Vec<(String, String)> {
    serde_json::from_str::<BTreeMap<String, String>>(metric)
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

/// Parse a JSON number timestamp exactly to milliseconds, noting its style when
/// the text reveals it.
fn parse_timestamp(text: &str) -> Option<(i64, Option<TimestampStyle>)> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut millis: i64 = 0;
    for (i, b) in fraction.bytes().enumerate() {
        millis += i64::from(b - b'0') * [100, 10, 1][i];
    }
    let style = match fraction.len() {
        3 if fraction.ends_with('0') => Some(TimestampStyle::Millis3),
        1 | 2 => Some(TimestampStyle::Shortest),
        _ => None,
    };
    let ms = secs.checked_mul(1000)?.checked_add(millis)?;
    Some((if negative { -ms } else { ms }, style))
}

fn write_timestamp(out: &mut String, ms: i64, style: TimestampStyle) {
    if ms < 0 {
        out.push('-');
    }
    let abs = ms.unsigned_abs();
    let _ = write!(out, "{}", abs / 1000);
    let fraction = abs % 1000;
    if fraction == 0 {
        return;
    }
    match style {
        TimestampStyle::Millis3 => {
            let _ = write!(out, ".{fraction:03}");
        }
        TimestampStyle::Shortest => {
            let text = format!("{fraction:03}");
            out.push('.');
            out.push_str(text.trim_end_matches('0'));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROM: &str = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"__name__":"up","job":"a"},"values":[[60,"1"],[120.500,"2"],[180,"3"]]},{"metric":{"job":"b"},"values":[[60,"NaN"],[180,"+Inf"]]}]}}"#;

    #[test]
    fn parse_and_print_round_trip_exactly() {
        let m = Matrix::parse(PROM.as_bytes()).unwrap();
        assert_eq!(m.style, TimestampStyle::Millis3);
        assert_eq!(m.point_count(), 5);
        assert_eq!(m.to_json(), PROM);

        let vm = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"a":"1"},"values":[[1795319303.5,"0.25"],[1795319364,"1.25"]]}]}}"#;
        let m = Matrix::parse(vm.as_bytes()).unwrap();
        assert_eq!(m.style, TimestampStyle::Shortest);
        assert_eq!(m.to_json(), vm);
    }

    #[test]
    fn what_cannot_be_split() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(
            Matrix::parse(vector.as_bytes()),
            Err(NotSplittable::NotMatrix)
        );
        let warned = r#"{"status":"success","warnings":["partial"],"data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(
            Matrix::parse(warned.as_bytes()),
            Err(NotSplittable::HasWarnings)
        );
        let hist = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"histograms":[[1,{}]]}]}}"#;
        assert_eq!(
            Matrix::parse(hist.as_bytes()),
            Err(NotSplittable::NativeHistograms)
        );
        assert_eq!(Matrix::parse(b"<html>"), Err(NotSplittable::Invalid));
        let exp = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1e9,"1"]]}]}}"#;
        assert_eq!(Matrix::parse(exp.as_bytes()), Err(NotSplittable::Invalid));
    }

    #[test]
    fn label_order_matches_prometheus_compare() {
        // Compared pair by pair: {__name__="a"} < {__name__="a", x="1"} < {__name__="b"}.
        let mut metrics = [
            r#"{"__name__":"b"}"#,
            r#"{"__name__":"a","x":"1"}"#,
            r#"{"__name__":"a"}"#,
        ];
        metrics.sort_by_key(|m| label_order(m));
        assert_eq!(
            metrics,
            [
                r#"{"__name__":"a"}"#,
                r#"{"__name__":"a","x":"1"}"#,
                r#"{"__name__":"b"}"#
            ]
        );
    }

    #[test]
    fn timestamps_parse_exactly() {
        assert_eq!(
            parse_timestamp("1700000000"),
            Some((1_700_000_000_000, None))
        );
        assert_eq!(
            parse_timestamp("1700000000.5"),
            Some((1_700_000_000_500, Some(TimestampStyle::Shortest)))
        );
        assert_eq!(
            parse_timestamp("1700000000.250"),
            Some((1_700_000_000_250, Some(TimestampStyle::Millis3)))
        );
        assert_eq!(
            parse_timestamp("-1.5"),
            Some((-1500, Some(TimestampStyle::Shortest)))
        );
        assert_eq!(parse_timestamp("1.2345"), None);
        let mut s = String::new();
        write_timestamp(&mut s, -1500, TimestampStyle::Millis3);
        assert_eq!(s, "-1.500");
    }
}
