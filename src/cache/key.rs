//! Cache keys: which requests have the same answer.
//!
//! Input: a typed request and its backend. Output: a [`CacheKey`] built from the
//! canonical PromQL (parsed and printed back, so formatting does not matter), the
//! backend, the endpoint and every parameter that changes the answer (`timeout`
//! does not). Range requests also get a [`SeriesKey`] shared by every range of the
//! same query and step phase, under which time extents are stored. Pure.

use std::sync::Arc;

use crate::request::ApiRequest;
use crate::routing::BackendId;

/// Identifies one cacheable answer. Cheap to clone and compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(pub Arc<str>);

/// Identifies a range query independent of its start and end: the key under which
/// its time extents live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey(pub Arc<str>);

/// Parameters that never change the answer.
const IGNORED: &[&str] = &["timeout"];
/// Parameters that are part of the key in their typed, normalised form instead.
const TYPED: &[&str] = &["query", "start", "end", "step", "time"];

/// Everything but start, end and time: backend, endpoint, PromQL, step and phase,
/// and the other answer-changing parameters in sorted order.
fn base(req: &ApiRequest, backend: BackendId, query: Option<&str>, extra: &str) -> String {
    let mut other: Vec<_> = req
        .params
        .iter()
        .filter(|(k, _)| !IGNORED.contains(&k.as_str()) && !TYPED.contains(&k.as_str()))
        .collect();
    other.sort();
    let mut key = format!("{}\u{0}{}\u{0}", backend.as_str(), req.path);
    if let Some(q) = query {
        key.push_str(q);
    }
    key.push('\u{0}');
    key.push_str(extra);
    for (k, v) in other {
        key.push('\u{0}');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

/// Key of a range query's extents: the same query at the same step and phase
/// (start modulo step) evaluates at the same timestamps, whatever its range.
pub fn series_key(
    req: &ApiRequest,
    backend: BackendId,
    canonical: &str,
    step_ms: i64,
    start: i64,
) -> SeriesKey {
    let phase = start.rem_euclid(step_ms);
    SeriesKey(
        base(
            req,
            backend,
            Some(canonical),
            &format!("step={step_ms};phase={phase}"),
        )
        .into(),
    )
}

/// Key of one whole answer: the series key (or its equivalent) plus the exact span.
pub fn answer_key(
    req: &ApiRequest,
    backend: BackendId,
    query: Option<&str>,
    span: &str,
) -> CacheKey {
    CacheKey(base(req, backend, query, span).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{QueryParser, RequestKind, parse};
    use axum::http::Method;

    fn req(pairs: &[(&str, &str)]) -> ApiRequest {
        parse(
            &Method::POST,
            "/api/v1/query_range",
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            0,
            &QueryParser::default(),
        )
        .unwrap()
    }

    fn range_key(pairs: &[(&str, &str)]) -> SeriesKey {
        let r = req(pairs);
        let RequestKind::Range {
            ref query,
            start,
            step_ms,
            ..
        } = r.kind
        else {
            panic!("range")
        };
        series_key(&r, BackendId::Recent, &query.canonical, step_ms, start)
    }

    #[test]
    fn formatting_differences_share_a_key() {
        let a = range_key(&[
            ("query", "sum by(region)(rate(x{a=\"1\"}[5m]))"),
            ("start", "0"),
            ("end", "600"),
            ("step", "60"),
        ]);
        let b = range_key(&[
            (
                "query",
                "sum  by (region) (\n  rate( x{ a = \"1\" } [5m] )\n)",
            ),
            ("start", "1200"),
            ("end", "3600"),
            ("step", "1m"),
            ("timeout", "30s"),
        ]);
        assert_eq!(a, b);
    }

    #[test]
    fn answer_changing_parameters_split_keys() {
        let base = [
            ("query", "up"),
            ("start", "0"),
            ("end", "600"),
            ("step", "60"),
        ];
        let k = range_key(&base);
        let mut other_step = base;
        other_step[3] = ("step", "30");
        assert_ne!(k, range_key(&other_step));
        let mut other_phase = base;
        other_phase[1] = ("start", "15");
        assert_ne!(k, range_key(&other_phase));
        let mut with_nocache = base.to_vec();
        with_nocache.push(("nocache", "1"));
        assert_ne!(k, range_key(&with_nocache));
        let mut other_query = base;
        other_query[0] = ("query", "up{job=\"a\"}");
        assert_ne!(k, range_key(&other_query));
    }
}
