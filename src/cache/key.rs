//! Cache keys: which requests have the same answer.
//!
//! Input: a typed request and its backend. Output: a [`CacheKey`] built from the
//! typed request (canonical PromQL, parsed and printed back so formatting does not
//! matter, and its span or instant), the backend, the endpoint and every other
//! parameter (`timeout` is typed and changes no answer). Range requests also get a
//! [`SeriesKey`] shared by every range of the same query and step phase, under
//! which time extents are stored. Pure.

use std::sync::Arc;

use crate::request::ApiRequest;
use crate::routing::BackendId;
use crate::units::Millis;

/// Identifies one cacheable answer. Cheap to clone and compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(pub Arc<str>);

/// Identifies a range query independent of its start and end: the key under which
/// its time extents live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey(pub Arc<str>);

/// Backend (`None`: whichever each fetch was routed to), path, the request's typed
/// part as the caller of this function spells it, and the parameters promguard does
/// not interpret, in sorted order (their order does not change the answer). `timeout` is typed and never part of a key.
fn base(req: &ApiRequest, backend: Option<BackendId>, typed: &str) -> String {
    let mut other: Vec<_> = req.extra.iter().collect();
    other.sort();
    // Sized once: a key is built on every request, hits included.
    let extra: usize = other.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let path = req.path.as_str();
    let mut key = String::with_capacity(16 + path.len() + typed.len() + extra);
    key.push_str(backend.map_or("routed per fetch", BackendId::as_str));
    key.push('\u{0}');
    key.push_str(path);
    key.push('\u{0}');
    key.push_str(typed);
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
/// `backend` is `None` when each fetch is routed by what it reads
/// (`routing.split_fetches`): a chunk then comes from the backend that holds its
/// span, whichever backend the request that fetched it was routed to.
pub fn series_key(
    req: &ApiRequest,
    backend: Option<BackendId>,
    canonical: &str,
    step_ms: i64,
    start: i64,
) -> SeriesKey {
    let phase = start.rem_euclid(step_ms);
    let mut int = itoa::Buffer::new();
    let mut typed = String::with_capacity(canonical.len() + 48);
    typed.push_str(canonical);
    typed.push_str("\u{0}step=");
    typed.push_str(int.format(step_ms));
    typed.push_str(";phase=");
    typed.push_str(int.format(phase));
    SeriesKey(base(req, backend, &typed).into())
}

/// The typed part of a range answer's key: the canonical query over
/// `from..=to` at `step_ms`.
pub fn range_typed(canonical: &str, from: Millis, to: Millis, step_ms: i64) -> String {
    let mut int = itoa::Buffer::new();
    let mut typed = String::with_capacity(canonical.len() + 64);
    typed.push_str(canonical);
    typed.push('\u{0}');
    typed.push_str(int.format(from));
    typed.push_str("..");
    typed.push_str(int.format(to));
    typed.push_str(";step=");
    typed.push_str(int.format(step_ms));
    typed
}

/// Key of one whole answer: `typed` names what the typed request asks (the
/// canonical query and its span or instant, or a metadata call's matchers and span).
pub fn answer_key(req: &ApiRequest, backend: BackendId, typed: &str) -> CacheKey {
    CacheKey(base(req, Some(backend), typed).into())
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
        series_key(
            &r,
            Some(BackendId::Recent),
            &query.canonical,
            step_ms,
            start,
        )
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
