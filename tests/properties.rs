//! Property tests over everything that reads input a client or a backend controls:
//! the request parser (paths, forms, parameters), the PromQL scan, parse and
//! analysis (tree and tolerant), the time and duration codecs, the extent planner
//! and the matrix codec. For any input: no panic, work bounded by the input's size,
//! and the invariants the cache relies on.
//!
//! `cargo test` runs proptest's default number of cases per property; for a longer
//! run set `PROPTEST_CASES`, e.g. `PROPTEST_CASES=200000 cargo test --release --test
//! properties`.

use std::time::Duration;

use axum::http::Method;
use proptest::prelude::*;

use promguard::analysis::{DEFAULT_LOOKBACK_DELTA, analyse_query};
use promguard::cache::extent::{Grid, Span, assemble, chunk_interval, chunks_of, missing};
use promguard::cache::matrix::Matrix;
use promguard::request::{Expression, QueryParser, RequestKind, decode_form, parse};
use promguard::scan::{ScanLimits, scan};
use promguard::units::{
    MAX_TIME, MIN_TIME, format_duration, format_time, parse_api_duration, parse_duration,
    parse_time,
};

/// Pieces of PromQL and MetricsQL, good and bad, that a query is made of.
const TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "@",
    "up",
    "x",
    "rate",
    "sum",
    "by",
    "without",
    "offset",
    "-",
    "+",
    "*",
    "/",
    "^",
    "==",
    "!=",
    "=~",
    "and",
    "or",
    "unless",
    "bool",
    "on",
    "5m",
    "1h30m",
    "1e300",
    "1e-3",
    "0x1f",
    "NaN",
    "Inf",
    "-Inf",
    "1i",
    "1.5h",
    "292y",
    "300y",
    "start()",
    "end()",
    "\"a\"",
    "'b'",
    "`c`",
    "\"unterminated",
    "job=\"a\"",
    "__name__=~\"x.*\"",
    "histogram_quantile",
    "holt_winters",
    "keep_metric_names",
    "default",
    "WITH",
    "#",
    "\n",
    " ",
    "é",
    "\\",
    "level:metric:rate5m",
    "max_over_time",
    "[5m:1m]",
];

fn query_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|t| t.join(" ")),
        prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|t| t.concat()),
        ".{0,200}",
        // Deep nestings and long chains, around the depth bound.
        (
            1usize..600,
            prop::sample::select(&["(", "abs(", "sum(", "-"][..])
        )
            .prop_map(|(n, open)| {
                let close = if open == "-" { "" } else { ")" };
                format!("{}up{}", open.repeat(n), close.repeat(n))
            }),
        (1usize..600).prop_map(|n| vec!["1"; n].join("+")),
    ]
}

const SEGMENTS: &[&str] = &[
    "api",
    "v1",
    "query",
    "query_range",
    "series",
    "labels",
    "label",
    "values",
    "job",
    "status",
    "buildinfo",
    "admin",
    "tsdb",
    "snapshot",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2F",
    "%61dmin",
    "-",
    "quit",
    "federate",
    "é",
    "a b",
    "metadata",
    "rules",
];

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(SEGMENTS), 0..8)
            .prop_map(|s| format!("/{}", s.join("/"))),
        Just("/api/v1/query".to_string()),
        Just("/api/v1/query_range".to_string()),
        ".{0,60}",
    ]
}

const NAMES: &[&str] = &[
    "query", "time", "start", "end", "step", "timeout", "match[]", "limit", "nocache", "x",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        query_text(),
        (-1e20f64..1e20).prop_map(|v| v.to_string()),
        (-70_000_000_000i64..260_000_000_000).prop_map(|v| v.to_string()),
        prop::sample::select(
            &[
                "0",
                "-1",
                "NaN",
                "inf",
                "1e300",
                "15",
                "1m",
                "2024-11-11T00:00:00Z",
                "-292273086-05-16T16:47:06Z",
                "292277025-08-18T07:12:54.999999999Z",
                "",
            ][..]
        )
        .prop_map(str::to_string),
    ]
}

fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            prop::sample::select(NAMES).prop_map(str::to_string),
            value(),
        ),
        0..8,
    )
}

const NOW: i64 = 1_796_000_000_000;

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any request: parsed or refused with an error, never a panic; what is
    /// accepted is canonical and analysable.
    #[test]
    fn any_request_parses_or_is_refused(
        post in any::<bool>(),
        path in path(),
        params in params(),
    ) {
        let method = if post { Method::POST } else { Method::GET };
        let queries = QueryParser::default();
        if let Ok(req) = parse(&method, &path, params, NOW, &queries) {
            let upstream = req.path.as_str();
            prop_assert!(upstream.starts_with("/api/v1/"));
            prop_assert!(!upstream.contains("..") && !upstream.contains("//") && !upstream.contains('%'));
            match &req.kind {
                RequestKind::Instant { query, time } => {
                    analyse_query(query, *time, *time, 300_000, DEFAULT_LOOKBACK_DELTA);
                    prop_assert!((MIN_TIME..=MAX_TIME).contains(time));
                }
                RequestKind::Range { query, start, end, step_ms } => {
                    let shape = analyse_query(query, *start, *end, *step_ms, DEFAULT_LOOKBACK_DELTA);
                    prop_assert!(*step_ms > 0 && start <= end);
                    prop_assert!((end - start) / step_ms <= 11_000);
                    if let Some(oldest) = shape.oldest {
                        prop_assert!(oldest <= *start || shape.uses_range_bounds || matches!(query.expr, Expression::Parsed(_)));
                    }
                    // Planning extents touches a bounded number of chunks.
                    let grid = Grid::new(*start, *step_ms);
                    if let Some(want) = grid.span_within(*start, *end) {
                        prop_assert!(chunks_of(want, chunk_interval(*step_ms)).count() <= 11_000 / 60 + 2);
                    }
                }
                _ => {}
            }
        }
    }

    /// Any form body or query string: decoded or refused, and what decodes is UTF-8.
    #[test]
    fn any_form_decodes_or_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_form(&bytes);
    }

    /// Any query text: the scan bounds it, the parse never panics, and the
    /// tolerant analysis reads at least as far back as the tree's.
    #[test]
    fn any_query_is_bounded_and_analysed_conservatively(text in query_text()) {
        let limits = ScanLimits::default();
        let scanned = scan(&text, limits);
        let parsed = QueryParser::default().parse(&text);
        prop_assert_eq!(scanned.is_ok(), parsed.is_ok(), "the scan decides what is refused");
        if let Ok(s) = &scanned {
            prop_assert!(s.depth <= limits.max_depth);
            let tolerant = promguard::analysis::analyse_scanned(s, NOW - 3_600_000, NOW, 60_000, DEFAULT_LOOKBACK_DELTA);
            if let Ok((Expression::Parsed(expr), _)) = &parsed {
                let tree = promguard::analysis::analyse(expr, NOW - 3_600_000, NOW, DEFAULT_LOOKBACK_DELTA);
                if let (Some(t), Some(s)) = (tree.oldest, tolerant.oldest) {
                    prop_assert!(s <= t, "{text}: scan {s} after tree {t}");
                }
            }
        }
    }

    /// Times and durations: parsed within their bounds or refused; printed forms
    /// parse back to the same value.
    #[test]
    fn times_and_durations_round_trip_or_are_refused(text in ".{0,40}", ms in MIN_TIME..=MAX_TIME, d in 1u64..9_000_000_000_000) {
        if let Ok(t) = parse_time(&text) {
            prop_assert!((MIN_TIME..=MAX_TIME).contains(&t));
        }
        let _ = parse_api_duration(&text);
        if let Ok(d) = parse_duration(&text) {
            prop_assert!(d > Duration::ZERO);
        }
        prop_assert_eq!(parse_time(&format_time(ms)), Ok(ms));
        let d = Duration::from_millis(d);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    /// The planner: whatever is cached, the spans to fetch lie on the grid, inside
    /// what is wanted, in order and apart, and with the cached spans cover it all.
    #[test]
    fn missing_spans_cover_exactly_what_the_cache_lacks(
        step in prop::sample::select(&[1_000i64, 15_000, 60_000, 300_000, 3_600_000, 86_400_000, 1_000_000_000][..]),
        phase_frac in 0.0f64..1.0,
        first in -1_000i64..1_000,
        points in 1i64..11_000,
        holes in prop::collection::vec((any::<bool>(), 0.0f64..1.0, 0.0f64..1.0), 0..40),
    ) {
        let phase = (phase_frac * step as f64) as i64;
        let grid = Grid { step, phase };
        let from = grid.at_or_after(first * step * 7 + phase);
        let want = Span { from, to: from + (points - 1) * step };
        let interval = chunk_interval(step);
        let chunks: Vec<i64> = chunks_of(want, interval).collect();
        prop_assert!(chunks.len() as i64 <= points / 60 + 2);
        // Each chunk is cached fully, partly (a sub-span of its grid points) or not.
        let cached = |index: i64| -> Option<Span> {
            let at = chunks.iter().position(|c| *c == index)?;
            let (present, a, b) = *holes.get(at % holes.len().max(1))?;
            let whole = grid.chunk(index, interval)?;
            if !present { return None; }
            let n = whole.points(step);
            let (lo, hi) = ((a * n as f64) as i64, (b * n as f64) as i64);
            let (lo, hi) = (lo.min(hi), lo.max(hi).min(n - 1));
            Some(Span { from: whole.from + lo * step, to: whole.from + hi * step })
        };
        let gaps = missing(&grid, interval, want, cached);
        let mut last_to = i64::MIN;
        for gap in &gaps {
            prop_assert!(gap.from <= gap.to);
            prop_assert!(want.from <= gap.from && gap.to <= want.to);
            prop_assert_eq!((gap.from - phase).rem_euclid(step), 0);
            prop_assert_eq!((gap.to - phase).rem_euclid(step), 0);
            prop_assert!(gap.from > last_to.saturating_add(step), "apart and in order");
            last_to = gap.to;
        }
        // Every wanted point is in a gap or in a cached span of its chunk.
        let mut t = want.from;
        let mut checked = 0;
        while t <= want.to && checked < 2_000 {
            let in_gap = gaps.iter().any(|g| g.from <= t && t <= g.to);
            let in_cache = cached(t.div_euclid(interval)).is_some_and(|c| c.from <= t && t <= c.to);
            prop_assert!(in_gap != in_cache, "point {t}: gap {in_gap}, cache {in_cache}");
            t += step * (1 + points / 2_000);
            checked += 1;
        }
    }

    /// The matrix codec: any bytes are parsed or refused; a valid matrix prints
    /// back to the same text and survives being cut and stitched.
    #[test]
    fn matrices_round_trip_and_stitch(
        garbage in prop::collection::vec(any::<u8>(), 0..200),
        series in prop::collection::vec(
            ("[a-z]{1,3}", prop::collection::btree_set(0i64..400, 0..30), prop::sample::select(&["1", "0.5", "NaN", "+Inf", "-2e-9"][..])),
            0..6,
        ),
        cut in 0i64..400,
    ) {
        let _ = Matrix::parse(&garbage);
        let mut seen = std::collections::BTreeSet::new();
        let result: Vec<String> = series
            .iter()
            .filter(|(name, _, _)| seen.insert(name.clone()))
            .map(|(name, ts, v)| {
                let values: Vec<String> = ts.iter().map(|t| format!("[{},\"{v}\"]", t * 60)).collect();
                format!("{{\"metric\":{{\"job\":\"{name}\"}},\"values\":[{}]}}", values.join(","))
            })
            .collect();
        let body = format!(
            "{{\"status\":\"success\",\"data\":{{\"resultType\":\"matrix\",\"result\":[{}]}}}}",
            result.join(",")
        );
        let matrix = Matrix::parse(body.as_bytes()).expect("a valid matrix");
        let whole = Span { from: 0, to: 399 * 60_000 };
        let at = cut * 60_000;
        let pieces = [
            (Span { from: 0, to: at }, &matrix),
            (Span { from: at + 60_000, to: whole.to }, &matrix),
        ];
        let stitched = assemble(if at < whole.to { &pieces[..] } else { &pieces[..1] });
        prop_assert_eq!(stitched.point_count(), matrix.point_count());
        let reparsed = Matrix::parse(stitched.to_json().as_bytes()).expect("printed JSON parses");
        prop_assert_eq!(reparsed.to_json(), stitched.to_json());
    }
}
