//! Time extents of range-query results: the grid, chunking, planning and merging.
//!
//! A range query evaluates at `phase + k·step`; every step is independent, so the
//! result can be cut at step-aligned boundaries and stitched back exactly. Results
//! are kept in fixed absolute chunks ([`chunk_interval`]); [`missing`] says which
//! spans a request still needs from the backend, [`Matrix`] parses and prints the
//! Prometheus JSON, and [`assemble`] joins pieces into one answer. Pure.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The evaluation timestamps of a range query: `phase + k·step`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub step: i64,
    pub phase: i64,
}

/// A closed span of grid timestamps, `from ≤ to`, both on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: i64,
    pub to: i64,
}

impl Grid {
    /// The grid of a range query starting at `start`.
    pub fn new(start: i64, step: i64) -> Self {
        Grid {
            step,
            phase: start.rem_euclid(step),
        }
    }

    pub fn at_or_after(&self, t: i64) -> i64 {
        let k = (t - self.phase).div_euclid(self.step);
        let g = self.phase + k * self.step;
        if g < t { g + self.step } else { g }
    }

    pub fn at_or_before(&self, t: i64) -> i64 {
        let k = (t - self.phase).div_euclid(self.step);
        self.phase + k * self.step
    }

    /// Grid timestamps within `[lo, hi]`, if any.
    pub fn span_within(&self, lo: i64, hi: i64) -> Option<Span> {
        let from = self.at_or_after(lo);
        let to = self.at_or_before(hi);
        (from <= to).then_some(Span { from, to })
    }

    /// Grid timestamps of chunk `index` (absolute interval `[index·c, (index+1)·c)`).
    pub fn chunk(&self, index: i64, interval: i64) -> Option<Span> {
        self.span_within(index * interval, (index + 1) * interval - 1)
    }
}

impl Span {
    pub fn intersect(&self, other: &Span) -> Option<Span> {
        let from = self.from.max(other.from);
        let to = self.to.min(other.to);
        (from <= to).then_some(Span { from, to })
    }

    pub fn contains(&self, t: i64) -> bool {
        self.from <= t && t <= self.to
    }

    /// Number of grid points in the span.
    pub fn points(&self, step: i64) -> i64 {
        (self.to - self.from) / step + 1
    }
}

/// Chunk length for a step: about a hundred to a few hundred points per chunk, so
/// a refresh re-reads little and a long panel is not thousands of entries. Never
/// shorter than sixty steps, so a span has at most one chunk per sixty of its
/// points (plus its two ends), whatever its length.
pub fn chunk_interval(step: i64) -> i64 {
    const HOUR: i64 = 3_600_000;
    match step {
        s if s <= 60_000 => HOUR,
        s if s <= 15 * 60_000 => 24 * HOUR,
        s => (7 * 24 * HOUR).max(s.saturating_mul(100)),
    }
}

/// The chunk indexes a span touches. With [`chunk_interval`]'s chunks there are
/// at most `points / 60 + 2` of them.
pub fn chunks_of(span: Span, interval: i64) -> std::ops::RangeInclusive<i64> {
    span.from.div_euclid(interval)..=span.to.div_euclid(interval)
}

/// The spans of `want` not covered by the chunks' `cached` coverage, merged where
/// they are adjacent, in time order: what must be fetched from the backend.
pub fn missing(
    grid: &Grid,
    interval: i64,
    want: Span,
    cached: impl Fn(i64) -> Option<Span>,
) -> Vec<Span> {
    let mut gaps: Vec<Span> = Vec::new();
    let mut push = |gap: Span| match gaps.last_mut() {
        Some(last) if gap.from <= last.to + grid.step => last.to = last.to.max(gap.to),
        _ => gaps.push(gap),
    };
    for index in chunks_of(want, interval) {
        let Some(need) = grid.chunk(index, interval).and_then(|c| c.intersect(&want)) else {
            continue;
        };
        match cached(index).and_then(|c| c.intersect(&need)) {
            None => push(need),
            Some(have) => {
                if need.from < have.from {
                    push(Span {
                        from: need.from,
                        to: have.from - grid.step,
                    });
                }
                if have.to < need.to {
                    push(Span {
                        from: have.to + grid.step,
                        to: need.to,
                    });
                }
            }
        }
    }
    gaps
}

/// How a backend writes fractional timestamps: Prometheus always with three
/// decimals (`.500`), VictoriaMetrics as short as possible (`.5`). Kept so a
/// stitched answer reads exactly like a direct one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampStyle {
    #[default]
    Millis3,
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
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    pub fn push(&mut self, ts: i64, value: &str) {
        self.ts.push(ts);
        self.text.push_str(value);
        self.ends
            .push(u32::try_from(self.text.len()).unwrap_or(u32::MAX));
    }

    pub fn get(&self, i: usize) -> (i64, &str) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        (self.ts[i], &self.text[start..self.ends[i] as usize])
    }

    /// Indexes of the points within `span`.
    fn range(&self, span: Span) -> std::ops::Range<usize> {
        let lo = self.ts.partition_point(|&t| t < span.from);
        let hi = self.ts.partition_point(|&t| t <= span.to);
        lo..hi.max(lo)
    }

    fn extend_within(&mut self, other: &Points, span: Span) {
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
    pub points: Points,
}

/// A parsed `resultType: matrix` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matrix {
    pub series: Vec<Series>,
    pub style: TimestampStyle,
}

/// Why an answer cannot be cut into extents; it is then cached whole or not at all.
#[derive(Debug, PartialEq, Eq)]
pub enum NotSplittable {
    Invalid,
    NotMatrix,
    HasWarnings,
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

    /// The part of this matrix within `span`; series without points there are dropped.
    pub fn slice(&self, span: Span) -> Matrix {
        assemble(&[(span, self)])
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

/// Join disjoint pieces, each valid within its span, into one matrix over their
/// union: series matched by label set, points in time order, series sorted by
/// label set as Prometheus sorts them, series without points dropped.
pub fn assemble(pieces: &[(Span, &Matrix)]) -> Matrix {
    let mut order: Vec<&(Span, &Matrix)> = pieces.iter().collect();
    order.sort_by_key(|(span, _)| span.from);
    let mut by_metric: HashMap<Arc<str>, Points> = HashMap::new();
    let mut style = None;
    for (span, matrix) in order {
        style.get_or_insert(matrix.style);
        for s in &matrix.series {
            let range = s.points.range(*span);
            if range.is_empty() {
                continue;
            }
            by_metric
                .entry(s.metric.clone())
                .or_default()
                .extend_within(&s.points, *span);
        }
    }
    let mut series: Vec<(Vec<(String, String)>, Series)> = by_metric
        .into_iter()
        .map(|(metric, points)| (label_order(&metric), Series { metric, points }))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.metric.cmp(&b.1.metric)));
    Matrix {
        series: series.into_iter().map(|(_, s)| s).collect(),
        style: style.unwrap_or_default(),
    }
}

/// Merge newly fetched data (valid in `fresh`) into a chunk's cached data (valid
/// in `old`): the union when they touch or overlap, else only the new data.
pub fn merge_chunk(
    step: i64,
    old: Option<(Span, &Matrix)>,
    fresh: (Span, &Matrix),
) -> (Span, Matrix) {
    let (fspan, fmatrix) = fresh;
    match old {
        Some((ospan, omatrix))
            if ospan.from <= fspan.to + step && fspan.from <= ospan.to + step =>
        {
            let mut pieces = vec![(fspan, fmatrix)];
            if ospan.from < fspan.from {
                pieces.push((
                    Span {
                        from: ospan.from,
                        to: fspan.from - step,
                    },
                    omatrix,
                ));
            }
            if ospan.to > fspan.to {
                pieces.push((
                    Span {
                        from: fspan.to + step,
                        to: ospan.to,
                    },
                    omatrix,
                ));
            }
            let union = Span {
                from: ospan.from.min(fspan.from),
                to: ospan.to.max(fspan.to),
            };
            (union, assemble(&pieces))
        }
        _ => (fspan, fmatrix.slice(fspan)),
    }
}

/// Prometheus' `labels.Compare` order: label pairs sorted by name, compared pair by
/// pair, shorter first. A `BTreeMap` gives the byte-wise name order Go uses.
fn label_order(metric: &str) -> Vec<(String, String)> {
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

impl PartialOrd for Span {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Span {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.from, self.to).cmp(&(other.from, other.to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn span(from: i64, to: i64) -> Span {
        Span { from, to }
    }

    #[test]
    fn grid_alignment() {
        let g = Grid::new(15_000, 60_000);
        assert_eq!(g.phase, 15_000);
        assert_eq!(g.at_or_after(0), 15_000);
        assert_eq!(g.at_or_after(15_000), 15_000);
        assert_eq!(g.at_or_after(15_001), 75_000);
        assert_eq!(g.at_or_before(74_999), 15_000);
        assert_eq!(g.at_or_before(-1), -45_000);
        assert_eq!(g.chunk(0, H), Some(span(15_000, H - 45_000)));
        assert_eq!(Grid::new(0, 2 * H).chunk(1, H), None);
    }

    #[test]
    fn answers_off_the_asked_grid_are_recognised() {
        // VictoriaMetrics' answer to start 1794280834, step 3600: 100 points from
        // 1794279600, a multiple of the step, not the grid that was asked for.
        let vm = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1794279600,"1"],[1794283200,"2"]]}]}}"#,
        )
        .unwrap();
        let asked = Grid::new(1_794_280_834_000, 3_600_000);
        let want = span(1_794_280_834_000, 1_794_284_434_000);
        assert!(!vm.on_grid(&asked, want));
        let aligned = Grid::new(1_794_279_600_000, 3_600_000);
        assert!(vm.on_grid(&aligned, span(1_794_279_600_000, 1_794_283_200_000)));
        assert!(
            !vm.on_grid(&aligned, span(1_794_283_200_000, 1_794_283_200_000)),
            "points outside the span asked for"
        );
    }

    #[test]
    fn chunks_stay_few_whatever_the_span() {
        // 11,000 points at every step up to thousands of years: at most one chunk
        // per hundred points plus the two ends.
        for step in [
            1_000,
            60_000,
            900_000,
            3_600_000,
            86_400_000,
            1_000_000_000_000,
        ] {
            let interval = chunk_interval(step);
            assert!(interval >= step * 60, "step {step}");
            let from = -62_135_596_800_000_i64 / step * step;
            let want = Span {
                from,
                to: from + 11_000 * step,
            };
            let chunks = chunks_of(want, interval).count() as i64;
            assert!(chunks <= 11_000 / 60 + 2, "step {step}: {chunks} chunks");
        }
    }

    /// (want, cached coverage per chunk, expected fetches); step 1 min, 1 h chunks.
    type MissingCase = (Span, Vec<(i64, Span)>, Vec<Span>);

    #[test]
    fn missing_spans() {
        let g = Grid::new(0, 60_000);
        let m = 60_000;
        let cases: Vec<MissingCase> = vec![
            // nothing cached: one fetch for the whole range, not one per chunk
            (span(0, 3 * H), vec![], vec![span(0, 3 * H)]),
            // fully cached
            (
                span(0, 2 * H - m),
                vec![(0, span(0, H - m)), (1, span(H, 2 * H - m))],
                vec![],
            ),
            // the moving tail: cached up to 1:30, want up to 1:50
            (
                span(0, H + 50 * m),
                vec![(0, span(0, H - m)), (1, span(H, H + 30 * m))],
                vec![span(H + 31 * m, H + 50 * m)],
            ),
            // a hole in the middle and the head
            (
                span(0, 3 * H - m),
                vec![(0, span(10 * m, H - m)), (2, span(2 * H, 3 * H - m))],
                vec![span(0, 9 * m), span(H, 2 * H - m)],
            ),
            // adjacent gaps across a chunk boundary merge into one fetch
            (
                span(0, 2 * H - m),
                vec![(0, span(0, 30 * m)), (1, span(H + 10 * m, 2 * H - m))],
                vec![span(31 * m, H + 9 * m)],
            ),
        ];
        for (want, cached, expected) in cases {
            let lookup = |i: i64| cached.iter().find(|(c, _)| *c == i).map(|(_, s)| *s);
            assert_eq!(missing(&g, H, want, lookup), expected, "want {want:?}");
        }
    }

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
    fn assemble_stitches_pieces_and_sorts_series_like_prometheus() {
        let a = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"job":"b"},"values":[[60,"1"],[120,"2"]]},{"metric":{"job":"a"},"values":[[60,"3"]]}]}}"#,
        )
        .unwrap();
        let b = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"job":"c"},"values":[[180,"9"]]},{"metric":{"job":"b"},"values":[[180,"4"],[240,"5"]]}]}}"#,
        )
        .unwrap();
        let joined = assemble(&[(span(180_000, 240_000), &b), (span(60_000, 120_000), &a)]);
        assert_eq!(
            joined.to_json(),
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"job":"a"},"values":[[60,"3"]]},{"metric":{"job":"b"},"values":[[60,"1"],[120,"2"],[180,"4"],[240,"5"]]},{"metric":{"job":"c"},"values":[[180,"9"]]}]}}"#
        );
        // Pieces only contribute points inside their span.
        let clipped = assemble(&[(span(60_000, 60_000), &a), (span(240_000, 240_000), &b)]);
        assert_eq!(clipped.point_count(), 3);
    }

    #[test]
    fn label_order_matches_prometheus_compare() {
        // Compared pair by pair: {__name__="a"} < {__name__="a", x="1"} < {__name__="b"}.
        let m = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"__name__":"b"},"values":[[1,"1"]]},{"metric":{"__name__":"a","x":"1"},"values":[[1,"1"]]},{"metric":{"__name__":"a"},"values":[[1,"1"]]}]}}"#,
        )
        .unwrap();
        let sorted = assemble(&[(span(0, 1000), &m)]);
        let names: Vec<&str> = sorted.series.iter().map(|s| &*s.metric).collect();
        assert_eq!(
            names,
            [
                r#"{"__name__":"a"}"#,
                r#"{"__name__":"a","x":"1"}"#,
                r#"{"__name__":"b"}"#
            ]
        );
    }

    #[test]
    fn merge_chunk_extends_adjacent_and_replaces_disjoint() {
        let old = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"j":"a"},"values":[[60,"1"],[120,"2"]]}]}}"#,
        )
        .unwrap();
        let new = Matrix::parse(
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"j":"a"},"values":[[180,"3"]]}]}}"#,
        )
        .unwrap();
        let (s, m) = merge_chunk(
            60_000,
            Some((span(60_000, 120_000), &old)),
            (span(180_000, 180_000), &new),
        );
        assert_eq!(s, span(60_000, 180_000));
        assert_eq!(m.point_count(), 3);
        let (s, m) = merge_chunk(
            60_000,
            Some((span(60_000, 120_000), &old)),
            (span(600_000, 600_000), &new),
        );
        assert_eq!(s, span(600_000, 600_000));
        assert_eq!(m.point_count(), 0);
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
