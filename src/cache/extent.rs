//! Time extents of range-query results: the grid, chunking, planning and merging.
//!
//! A range query evaluates at `phase + k·step`; every step is independent, so the
//! result can be cut at step-aligned boundaries and stitched back exactly. Results
//! are kept in fixed absolute chunks ([`chunk_interval`]); [`missing`] says which
//! spans a request still needs from the backend, [`updated_chunks`] what to keep
//! of what was fetched, and [`assemble`] joins pieces into one answer. Values,
//! not I/O: the cache's fill applies them. Pure.

use std::collections::HashMap;
use std::sync::Arc;

use super::matrix::Matrix;
use super::matrix::{Points, Series, label_order};

/// The evaluation timestamps of a range query: `phase + k·step`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Milliseconds between evaluations; always positive (the parser refuses `step ≤ 0`).
    pub step: i64,
    /// `start mod step`, in `[0, step)`: ranges with the same step and phase share
    /// timestamps, whatever their start.
    pub phase: i64,
}

/// A closed span of grid timestamps, `from ≤ to`, both on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First grid timestamp, in milliseconds.
    pub from: i64,
    /// Last grid timestamp, included.
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

    /// The first grid timestamp at or after `t`.
    pub fn at_or_after(&self, t: i64) -> i64 {
        let k = (t - self.phase).div_euclid(self.step);
        let g = self.phase + k * self.step;
        if g < t { g + self.step } else { g }
    }

    /// The last grid timestamp at or before `t`.
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
    /// The grid timestamps both spans share, if any; both must be on the same grid.
    pub fn intersect(&self, other: &Span) -> Option<Span> {
        let from = self.from.max(other.from);
        let to = self.to.min(other.to);
        (from <= to).then_some(Span { from, to })
    }

    /// Number of grid points in the span.
    pub fn points(&self, step: i64) -> i64 {
        (self.to - self.from) / step + 1
    }

    /// Whether this span holds every point of `other`.
    pub fn covers(&self, other: &Span) -> bool {
        self.from <= other.from && other.to <= self.to
    }
}

/// Whether chunk `index`, held as `have`, lacks some of its points within
/// `stable` (the immutable part of what is wanted, if any): then another replica
/// serving the same panel may hold more of it.
pub fn short_of(grid: &Grid, interval: i64, stable: Option<Span>, index: i64, have: &Span) -> bool {
    stable
        .and_then(|stable| grid.chunk(index, interval)?.intersect(&stable))
        .is_some_and(|need| !have.covers(&need))
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

/// `gaps` with every span that holds grid time `at` and earlier ones cut into
/// two, the second starting at `at`: where a long panel's fetches move from the
/// long-term store to the recent Prometheus.
pub fn cut_at(grid: &Grid, gaps: Vec<Span>, at: i64) -> Vec<Span> {
    let at = grid.at_or_after(at);
    let mut cut = Vec::with_capacity(gaps.len() + 1);
    for gap in gaps {
        if gap.from < at && at <= gap.to {
            cut.push(Span {
                from: gap.from,
                to: at - grid.step,
            });
            cut.push(Span {
                from: at,
                to: gap.to,
            });
        } else {
            cut.push(gap);
        }
    }
    cut
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

/// What to keep of `fetched` pieces (each valid within its span): their immutable
/// part, at or before `stable_to`, cut at chunk boundaries and merged with what the
/// chunk already held (`cached`). Each returned chunk is (index, span, matrix).
pub fn updated_chunks<'a>(
    grid: &Grid,
    interval: i64,
    stable_to: i64,
    cached: impl Fn(i64) -> Option<(Span, &'a Matrix)>,
    fetched: &[(Span, Matrix)],
) -> Vec<(i64, Span, Matrix)> {
    let mut updated: Vec<(i64, Span, Matrix)> = Vec::new();
    for (gap, matrix) in fetched {
        let Some(stable) = gap.intersect(&Span {
            from: gap.from,
            to: stable_to,
        }) else {
            continue;
        };
        for i in chunks_of(stable, interval) {
            let Some(part) = grid.chunk(i, interval).and_then(|c| c.intersect(&stable)) else {
                continue;
            };
            let merged = match updated.iter().position(|(j, _, _)| *j == i) {
                Some(at) => {
                    let (_, span, old) = updated.swap_remove(at);
                    merge_chunk(grid.step, Some((span, &old)), (part, matrix))
                }
                None => merge_chunk(grid.step, cached(i), (part, matrix)),
            };
            updated.push((i, merged.0, merged.1));
        }
    }
    updated.sort_by_key(|(i, _, _)| *i);
    updated
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
        _ => (fspan, assemble(&[(fspan, fmatrix)])),
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
    fn a_chunk_short_of_the_immutable_points_wanted_is_known() {
        let g = Grid::new(0, 60_000);
        let stable = Some(span(0, 2 * H - 60_000));
        // Chunk 1 (the second hour) held only to its middle: short.
        assert!(short_of(&g, H, stable, 1, &span(H, H + H / 2)));
        assert!(!short_of(&g, H, stable, 1, &span(H, 2 * H - 60_000)));
        // Points past the immutable part are never held, so they are not lacking.
        assert!(!short_of(
            &g,
            H,
            Some(span(0, H + H / 2)),
            1,
            &span(H, H + H / 2)
        ));
        assert!(!short_of(&g, H, None, 1, &span(H, H)));
        assert!(span(0, 10).covers(&span(0, 10)) && !span(1, 10).covers(&span(0, 10)));
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
    fn gaps_are_cut_on_the_grid_where_the_recent_data_starts() {
        let g = Grid::new(0, 60_000);
        let m = 60_000;
        let gaps = vec![span(0, 10 * m), span(20 * m, 30 * m)];
        // Off the grid, the cut moves up to the next step.
        assert_eq!(
            cut_at(&g, gaps.clone(), 5 * m - 1),
            vec![span(0, 4 * m), span(5 * m, 10 * m), span(20 * m, 30 * m)]
        );
        // A gap starting at the cut, or wholly before or after it, stays whole.
        assert_eq!(cut_at(&g, gaps.clone(), 20 * m), gaps);
        assert_eq!(cut_at(&g, gaps.clone(), 15 * m), gaps);
        assert_eq!(cut_at(&g, gaps.clone(), 31 * m), gaps);
        assert_eq!(
            cut_at(&g, gaps.clone(), 30 * m),
            vec![span(0, 10 * m), span(20 * m, 29 * m), span(30 * m, 30 * m)]
        );
    }

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
    fn assemble_sorts_series_by_label_set_as_prometheus_compares_them() {
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

    /// A matrix with one series holding a point at every minute of `span`.
    fn minutes(span: Span) -> Matrix {
        let mut points = Points::default();
        let mut t = span.from;
        while t <= span.to {
            points.push(t, "1");
            t += 60_000;
        }
        Matrix {
            series: vec![Series {
                metric: Arc::from("{}"),
                points,
            }],
            style: Default::default(),
        }
    }

    /// (what the chunks held, what was fetched, stable_to, expected chunks after);
    /// step 1 min, 1 h chunks, as Trickster's extent-list table tests do it.
    type UpdateCase = (Vec<(i64, Span)>, Vec<Span>, i64, Vec<(i64, Span)>);

    #[test]
    fn what_is_kept_of_a_fetch() {
        let g = Grid::new(0, 60_000);
        let m = 60_000;
        let cases: Vec<UpdateCase> = vec![
            // A first fetch across two chunks is cut at their edge.
            (
                vec![],
                vec![span(10 * m, H + 20 * m)],
                i64::MAX,
                vec![(0, span(10 * m, H - m)), (1, span(H, H + 20 * m))],
            ),
            // Merge: a fetch adjacent to what a chunk holds extends it.
            (
                vec![(0, span(0, 30 * m))],
                vec![span(31 * m, 50 * m)],
                i64::MAX,
                vec![(0, span(0, 50 * m))],
            ),
            // Merge across the edge: the older chunk grows to its end, the next
            // starts.
            (
                vec![(0, span(0, 50 * m))],
                vec![span(51 * m, H + 5 * m)],
                i64::MAX,
                vec![(0, span(0, H - m)), (1, span(H, H + 5 * m))],
            ),
            // A disjoint fetch replaces what the chunk held (no holes inside one).
            (
                vec![(0, span(0, 10 * m))],
                vec![span(40 * m, 50 * m)],
                i64::MAX,
                vec![(0, span(40 * m, 50 * m))],
            ),
            // The fresh window: nothing after stable_to is kept.
            (
                vec![],
                vec![span(0, H + 30 * m)],
                H + 10 * m,
                vec![(0, span(0, H - m)), (1, span(H, H + 10 * m))],
            ),
            // All of it fresh: nothing kept.
            (vec![], vec![span(H, H + 30 * m)], H - m, vec![]),
            // Two fetches into one chunk (a hole and the head) are both kept.
            (
                vec![(0, span(20 * m, 30 * m))],
                vec![span(0, 19 * m), span(31 * m, 40 * m)],
                i64::MAX,
                vec![(0, span(0, 40 * m))],
            ),
        ];
        for (held, fetched, stable_to, want) in cases {
            let held: Vec<(i64, Span, Matrix)> =
                held.into_iter().map(|(i, s)| (i, s, minutes(s))).collect();
            let fetched: Vec<(Span, Matrix)> =
                fetched.into_iter().map(|s| (s, minutes(s))).collect();
            let cached = |i: i64| {
                held.iter()
                    .find(|(j, _, _)| *j == i)
                    .map(|(_, s, m)| (*s, m))
            };
            let got = updated_chunks(&g, H, stable_to, cached, &fetched);
            let spans: Vec<(i64, Span)> = got.iter().map(|(i, s, _)| (*i, *s)).collect();
            assert_eq!(
                spans,
                want,
                "fetched {:?}",
                fetched.iter().map(|f| f.0).collect::<Vec<_>>()
            );
            for (_, s, m) in &got {
                assert_eq!(
                    m.point_count() as i64,
                    s.points(60_000),
                    "every point of {s:?}"
                );
            }
        }
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
}
