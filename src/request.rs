//! Stage 2, parse: raw HTTP request → typed [`ApiRequest`].
//!
//! Decides which Prometheus API endpoint is asked for, checks every parameter the
//! way Prometheus would (times, steps, resolution, PromQL, matchers) and refuses
//! writes and admin calls. Pure: no I/O, the body has already been read.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use chrono::DateTime;
use promql_parser::parser::{self, Expr};

/// Milliseconds since the Unix epoch, the unit of every timestamp in promguard.
pub type Millis = i64;

/// Prometheus' own cap on points per series in a range query.
pub const MAX_POINTS_PER_SERIES: i64 = 11_000;

/// The Prometheus API endpoints promguard knows. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Query,
    QueryRange,
    Series,
    Labels,
    LabelValues,
    Metadata,
    QueryExemplars,
    Rules,
    BuildInfo,
    /// Any other read-only `GET /api/v1/...`, forwarded as is.
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 10] = [
        Endpoint::Query,
        Endpoint::QueryRange,
        Endpoint::Series,
        Endpoint::Labels,
        Endpoint::LabelValues,
        Endpoint::Metadata,
        Endpoint::QueryExemplars,
        Endpoint::Rules,
        Endpoint::BuildInfo,
        Endpoint::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Query => "query",
            Endpoint::QueryRange => "query_range",
            Endpoint::Series => "series",
            Endpoint::Labels => "labels",
            Endpoint::LabelValues => "label_values",
            Endpoint::Metadata => "metadata",
            Endpoint::QueryExemplars => "query_exemplars",
            Endpoint::Rules => "rules",
            Endpoint::BuildInfo => "buildinfo",
            Endpoint::Other => "other",
        }
    }
}

/// A parsed PromQL expression together with the text the caller sent.
#[derive(Debug, Clone)]
pub struct Query {
    pub text: String,
    pub expr: Arc<Expr>,
    /// The expression printed back by the parser, when that round-trips; the text
    /// otherwise. Equal for queries that differ only in formatting.
    pub canonical: Arc<str>,
}

type Parsed = std::result::Result<(Arc<Expr>, Arc<str>), String>;

/// Parses PromQL and remembers recent results. Dashboards send the same few
/// hundred queries again and again, and parsing one costs tens of microseconds
/// (plus as much again to check the canonical form), far more than a cache hit.
pub struct QueryParser {
    memo: moka::sync::Cache<String, Parsed>,
}

impl QueryParser {
    /// Remember up to `capacity` distinct query texts.
    pub fn new(capacity: u64) -> Self {
        QueryParser {
            memo: moka::sync::Cache::new(capacity),
        }
    }

    /// Parse `text`, or return the remembered result.
    ///
    /// # Errors
    ///
    /// The parser's message for invalid PromQL.
    pub fn parse(&self, text: &str) -> Parsed {
        if let Some(hit) = self.memo.get(text) {
            return hit;
        }
        let parsed = parser::parse(text).map(|expr| {
            let canonical: Arc<str> = canonical_form(&expr, text).into();
            (Arc::new(expr), canonical)
        });
        self.memo.insert(text.to_string(), parsed.clone());
        parsed
    }
}

impl Default for QueryParser {
    fn default() -> Self {
        Self::new(10_000)
    }
}

/// The expression as the parser prints it, when that parses back to the same AST;
/// otherwise the caller's text, so two different queries never share a form.
fn canonical_form(expr: &Expr, text: &str) -> String {
    let printed = expr.to_string();
    match parser::parse(&printed) {
        Ok(reparsed) if reparsed == *expr => printed,
        _ => text.to_string(),
    }
}

/// What the caller asks for, with every parameter checked.
#[derive(Debug, Clone)]
pub enum RequestKind {
    Instant {
        query: Query,
        time: Millis,
    },
    Range {
        query: Query,
        start: Millis,
        end: Millis,
        step_ms: i64,
    },
    /// `/series`, `/labels`, `/label/<name>/values`: selectors over a time span.
    Metadata {
        matchers: Vec<Arc<Expr>>,
        start: Option<Millis>,
        end: Option<Millis>,
    },
    Exemplars {
        query: Query,
        start: Option<Millis>,
        end: Option<Millis>,
    },
    /// Endpoints whose answer does not depend on stored samples (metadata, rules,
    /// build info, other read-only status pages).
    Static,
}

/// One typed request: endpoint, kind, and the parameters to forward upstream.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// Path under the backend's base URL, e.g. `/api/v1/query_range`.
    pub path: String,
    pub kind: RequestKind,
    /// The caller's parameters in order, with `time` filled in when the caller left
    /// it to default to "now", so the backend evaluates the instant we routed for.
    pub params: Vec<(String, String)>,
    /// The caller's `timeout` parameter, which bounds the upstream call too.
    pub timeout: Option<Duration>,
}

/// Why a request was refused before any backend was contacted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("invalid parameter \"{param}\": {reason}")]
    InvalidParam { param: &'static str, reason: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    Body(String),
    #[error("{method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error(
        "{path} is a write or admin endpoint of the backend; promguard only forwards read queries"
    )]
    Forbidden { path: String },
    #[error("{path} is not a Prometheus query API endpoint")]
    NotFound { path: String },
}

type Result<T> = std::result::Result<T, RequestError>;

/// Path fragments under `/api/v1/` that write data or administer the backend.
/// They are refused even by GET: a proxy that guards a backend must not be a way
/// around the backend's own access control.
const FORBIDDEN_API_PREFIXES: &[&str] = &[
    "admin", "write", "import", "otlp", "push", "delete", "export",
];

/// Parse a request already split into method, path and decoded parameters
/// (URL query string first, then a form body, as Prometheus merges them).
///
/// `now` fills in `time` for instant queries and is the default `end`.
///
/// # Errors
///
/// Any [`RequestError`]: the caller gets it as a 400/403/404/405 JSON error.
pub fn parse(
    method: &Method,
    path: &str,
    params: Vec<(String, String)>,
    now: Millis,
    queries: &QueryParser,
) -> Result<ApiRequest> {
    let Some(api_path) = path.strip_prefix("/api/v1/") else {
        return Err(if is_backend_admin_path(path) {
            RequestError::Forbidden { path: path.into() }
        } else {
            RequestError::NotFound { path: path.into() }
        });
    };
    let first = api_path.split('/').next().unwrap_or_default();
    if FORBIDDEN_API_PREFIXES.contains(&first) {
        return Err(RequestError::Forbidden { path: path.into() });
    }
    let endpoint = match api_path {
        "query" => Endpoint::Query,
        "query_range" => Endpoint::QueryRange,
        "series" => Endpoint::Series,
        "labels" => Endpoint::Labels,
        "metadata" => Endpoint::Metadata,
        "query_exemplars" => Endpoint::QueryExemplars,
        "rules" => Endpoint::Rules,
        "status/buildinfo" => Endpoint::BuildInfo,
        p if label_values_name(p).is_some() => Endpoint::LabelValues,
        _ => Endpoint::Other,
    };
    check_method(method, path, endpoint)?;

    let mut req = ApiRequest {
        endpoint,
        path: path.to_string(),
        kind: RequestKind::Static,
        timeout: optional(&params, "timeout")
            .map(|t| parse_duration("timeout", t))
            .transpose()?,
        params,
    };
    req.kind = match endpoint {
        Endpoint::Query => {
            let query = parse_query(&req.params, queries)?;
            let time = match optional(&req.params, "time") {
                Some(t) => parse_time("time", t)?,
                None => {
                    req.params.push(("time".into(), format_time(now)));
                    now
                }
            };
            RequestKind::Instant { query, time }
        }
        Endpoint::QueryRange => parse_range(&req.params, queries)?,
        Endpoint::Series | Endpoint::Labels | Endpoint::LabelValues => {
            if let Some(name) = label_values_name(api_path) {
                check_label_name(name)?;
            }
            let matchers = parse_matchers(&req.params, endpoint == Endpoint::Series, queries)?;
            let (start, end) = parse_span(&req.params)?;
            check_limit(&req.params)?;
            RequestKind::Metadata {
                matchers,
                start,
                end,
            }
        }
        Endpoint::QueryExemplars => {
            let query = parse_query(&req.params, queries)?;
            let (start, end) = parse_span(&req.params)?;
            RequestKind::Exemplars { query, start, end }
        }
        Endpoint::Metadata => {
            check_limit(&req.params)?;
            RequestKind::Static
        }
        Endpoint::Rules | Endpoint::BuildInfo | Endpoint::Other => RequestKind::Static,
    };
    Ok(req)
}

/// Lifecycle and admin paths of Prometheus, Thanos, Mimir and VictoriaMetrics.
fn is_backend_admin_path(path: &str) -> bool {
    path.starts_with("/-/")
        || path.starts_with("/internal/")
        || path.starts_with("/admin/")
        || path.starts_with("/snapshot/")
        || path.starts_with("/write")
        || path.starts_with("/insert/")
}

fn label_values_name(api_path: &str) -> Option<&str> {
    api_path
        .strip_prefix("label/")?
        .strip_suffix("/values")
        .filter(|name| !name.contains('/'))
}

fn check_method(method: &Method, path: &str, endpoint: Endpoint) -> Result<()> {
    // Prometheus accepts POST (form-encoded) on the query and selector endpoints and
    // GET only on the rest; mirror that so behaviour does not change behind us.
    let post_ok = matches!(
        endpoint,
        Endpoint::Query
            | Endpoint::QueryRange
            | Endpoint::Series
            | Endpoint::Labels
            | Endpoint::QueryExemplars
    );
    let allowed = if post_ok { "GET or POST" } else { "GET" };
    if *method == Method::GET || (post_ok && *method == Method::POST) {
        Ok(())
    } else {
        Err(RequestError::MethodNotAllowed {
            method: method.to_string(),
            path: path.into(),
            allowed,
        })
    }
}

/// The first value of `name`: Prometheus reads forms with `FormValue`, which does the same.
pub fn optional<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn required<'a>(params: &'a [(String, String)], name: &'static str) -> Result<&'a str> {
    match optional(params, name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(RequestError::InvalidParam {
            param: name,
            reason: "missing".into(),
        }),
    }
}

fn parse_query(params: &[(String, String)], queries: &QueryParser) -> Result<Query> {
    let text = required(params, "query")?;
    let (expr, canonical) = queries
        .parse(text)
        .map_err(|reason| RequestError::InvalidParam {
            param: "query",
            reason,
        })?;
    Ok(Query {
        text: text.to_string(),
        expr,
        canonical,
    })
}

fn parse_range(params: &[(String, String)], queries: &QueryParser) -> Result<RequestKind> {
    let query = parse_query(params, queries)?;
    let start = parse_time("start", required(params, "start")?)?;
    let end = parse_time("end", required(params, "end")?)?;
    if end < start {
        return Err(RequestError::InvalidParam {
            param: "end",
            reason: "end timestamp must not be before start time".into(),
        });
    }
    let step = parse_duration("step", required(params, "step")?)?;
    let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
    if step_ms <= 0 {
        return Err(RequestError::InvalidParam {
            param: "step",
            reason: "zero or negative query resolution step widths are not accepted; \
                     try a positive integer"
                .into(),
        });
    }
    if (end - start) / step_ms > MAX_POINTS_PER_SERIES {
        return Err(RequestError::InvalidParam {
            param: "step",
            reason: format!(
                "exceeded maximum resolution of 11,000 points per timeseries; \
                 try decreasing the query resolution (?step={})",
                suggest_step(start, end)
            ),
        });
    }
    Ok(RequestKind::Range {
        query,
        start,
        end,
        step_ms,
    })
}

/// The smallest whole-second step that keeps the range under the point limit.
fn suggest_step(start: Millis, end: Millis) -> i64 {
    let secs = (end - start) / 1000;
    secs / MAX_POINTS_PER_SERIES + 1
}

fn parse_span(params: &[(String, String)]) -> Result<(Option<Millis>, Option<Millis>)> {
    let start = optional(params, "start")
        .map(|v| parse_time("start", v))
        .transpose()?;
    let end = optional(params, "end")
        .map(|v| parse_time("end", v))
        .transpose()?;
    if let (Some(s), Some(e)) = (start, end)
        && e < s
    {
        return Err(RequestError::InvalidParam {
            param: "end",
            reason: "end timestamp must not be before start time".into(),
        });
    }
    Ok((start, end))
}

fn parse_matchers(
    params: &[(String, String)],
    at_least_one: bool,
    queries: &QueryParser,
) -> Result<Vec<Arc<Expr>>> {
    let matchers = params
        .iter()
        .filter(|(k, _)| k == "match[]")
        .map(|(_, v)| match queries.parse(v) {
            Ok((expr, _)) if matches!(*expr, Expr::VectorSelector(_)) => Ok(expr),
            Ok(_) => Err(RequestError::InvalidParam {
                param: "match[]",
                reason: format!("{v:?} is not a series selector"),
            }),
            Err(reason) => Err(RequestError::InvalidParam {
                param: "match[]",
                reason,
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    if at_least_one && matchers.is_empty() {
        return Err(RequestError::InvalidParam {
            param: "match[]",
            reason: "no match[] parameter provided".into(),
        });
    }
    Ok(matchers)
}

fn check_label_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(RequestError::InvalidParam {
            param: "name",
            reason: format!("invalid label name {name:?}"),
        })
    }
}

fn check_limit(params: &[(String, String)]) -> Result<()> {
    for param in ["limit", "limit_per_metric"] {
        if let Some(v) = optional(params, param) {
            v.parse::<i64>().map_err(|_| RequestError::InvalidParam {
                param: if param == "limit" {
                    "limit"
                } else {
                    "limit_per_metric"
                },
                reason: format!("{v:?} is not an integer"),
            })?;
        }
    }
    Ok(())
}

/// Prometheus' spellings of the smallest and largest representable times, which its
/// own clients send for "unbounded".
const MIN_TIME_FORMATTED: &str = "-292273086-05-16T16:47:06Z";
const MAX_TIME_FORMATTED: &str = "292277025-08-18T07:12:54.999999999Z";

/// Parse a Prometheus timestamp: Unix seconds (fractional allowed) or RFC 3339.
///
/// # Errors
///
/// [`RequestError::InvalidParam`] naming `param` when the value is neither, or is
/// outside the range of millisecond timestamps.
pub fn parse_time(param: &'static str, value: &str) -> Result<Millis> {
    if let Ok(secs) = value.parse::<f64>() {
        // i64 milliseconds cover about ±292 million years; beyond that is nonsense.
        let ms = (secs * 1000.0).round();
        if ms.is_finite() && ms.abs() < 9.2e18 {
            return Ok(ms as Millis);
        }
    } else if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.timestamp_millis());
    } else if value == MIN_TIME_FORMATTED {
        return Ok(Millis::MIN);
    } else if value == MAX_TIME_FORMATTED {
        return Ok(Millis::MAX);
    }
    Err(RequestError::InvalidParam {
        param,
        reason: format!("cannot parse {value:?} to a valid timestamp"),
    })
}

/// Parse a Prometheus duration: float seconds or `1h30m` style.
///
/// # Errors
///
/// [`RequestError::InvalidParam`] naming `param`.
pub fn parse_duration(param: &'static str, value: &str) -> Result<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| secs.is_finite() && *d <= Duration::from_secs(1 << 40))
            .ok_or_else(|| RequestError::InvalidParam {
                param,
                reason: format!(
                    "cannot parse {value:?} to a valid duration: must be positive and finite"
                ),
            });
    }
    promql_parser::util::parse_duration(value).map_err(|e| RequestError::InvalidParam {
        param,
        reason: format!("cannot parse {value:?} to a valid duration: {e}"),
    })
}

/// Format milliseconds as Unix seconds with millisecond precision, as Prometheus parses them.
/// `params` with each of `values` set: a parameter of that name is dropped and the
/// new value appended, so the result holds it exactly once.
pub fn with_params(
    params: &[(String, String)],
    values: &[(&str, String)],
) -> Vec<(String, String)> {
    params
        .iter()
        .filter(|(k, _)| !values.iter().any(|(name, _)| k == name))
        .cloned()
        .chain(values.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .collect()
}

pub fn format_time(ms: Millis) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get(path: &str, pairs: &[(&str, &str)]) -> Result<ApiRequest> {
        parse(
            &Method::GET,
            path,
            params(pairs),
            1_700_000_000_000,
            &QueryParser::default(),
        )
    }

    fn param_error(result: Result<ApiRequest>) -> &'static str {
        match result {
            Err(RequestError::InvalidParam { param, .. }) => param,
            other => panic!("expected an invalid parameter, got {other:?}"),
        }
    }

    #[test]
    fn grafana_save_and_test_is_an_instant_query_at_time_4() {
        let req = get("/api/v1/query", &[("query", "1+1"), ("time", "4")]).unwrap();
        assert_eq!(req.endpoint, Endpoint::Query);
        assert!(matches!(req.kind, RequestKind::Instant { time: 4000, .. }));
    }

    #[test]
    fn instant_query_without_time_is_pinned_to_now() {
        let req = get("/api/v1/query", &[("query", "up")]).unwrap();
        assert!(matches!(
            req.kind,
            RequestKind::Instant {
                time: 1_700_000_000_000,
                ..
            }
        ));
        assert_eq!(optional(&req.params, "time"), Some("1700000000.000"));
    }

    #[test]
    fn range_query_parses_rfc3339_and_duration_steps() {
        let req = get(
            "/api/v1/query_range",
            &[
                ("query", "rate(x[5m])"),
                ("start", "2024-11-11T00:00:00Z"),
                ("end", "2024-11-11T01:00:00.5+00:00"),
                ("step", "1m"),
            ],
        )
        .unwrap();
        match req.kind {
            RequestKind::Range {
                start,
                end,
                step_ms,
                ..
            } => {
                assert_eq!(start, 1_731_283_200_000);
                assert_eq!(end, 1_731_286_800_500);
                assert_eq!(step_ms, 60_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_range_parameters_name_the_parameter() {
        let base = [("query", "up"), ("start", "100"), ("end", "200")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut p = base.to_vec();
            p.extend_from_slice(extra);
            get("/api/v1/query_range", &p)
        };
        assert_eq!(param_error(with(&[("step", "0")])), "step");
        assert_eq!(param_error(with(&[("step", "-15")])), "step");
        assert_eq!(param_error(with(&[("step", "abc")])), "step");
        assert_eq!(param_error(with(&[])), "step");
        assert_eq!(param_error(with(&[("step", "NaN")])), "step");
        assert_eq!(
            param_error(get(
                "/api/v1/query_range",
                &[
                    ("query", "up"),
                    ("start", "yesterday"),
                    ("end", "200"),
                    ("step", "1")
                ]
            )),
            "start"
        );
        assert_eq!(
            param_error(get(
                "/api/v1/query_range",
                &[
                    ("query", "up"),
                    ("start", "300"),
                    ("end", "200"),
                    ("step", "1")
                ]
            )),
            "end"
        );
        assert_eq!(
            param_error(get(
                "/api/v1/query_range",
                &[
                    ("query", "up"),
                    ("start", "1e300"),
                    ("end", "2e300"),
                    ("step", "1")
                ]
            )),
            "start"
        );
    }

    #[test]
    fn more_than_11000_points_is_refused_with_a_suggested_step() {
        let ok = get(
            "/api/v1/query_range",
            &[
                ("query", "up"),
                ("start", "0"),
                ("end", "11000"),
                ("step", "1"),
            ],
        );
        assert!(ok.is_ok());
        let err = get(
            "/api/v1/query_range",
            &[
                ("query", "up"),
                ("start", "0"),
                ("end", "11001"),
                ("step", "1"),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("11,000 points"), "{err}");
        assert!(err.to_string().contains("step=2"), "{err}");
    }

    #[test]
    fn unparsable_promql_is_refused() {
        assert_eq!(
            param_error(get("/api/v1/query", &[("query", "sum(rate(x[5m])")])),
            "query"
        );
        assert_eq!(param_error(get("/api/v1/query", &[])), "query");
        assert_eq!(
            param_error(get("/api/v1/query", &[("query", "up"), ("timeout", "x")])),
            "timeout"
        );
    }

    #[test]
    fn series_needs_a_valid_selector() {
        assert_eq!(param_error(get("/api/v1/series", &[])), "match[]");
        assert_eq!(
            param_error(get("/api/v1/series", &[("match[]", "rate(x[5m])")])),
            "match[]"
        );
        let req = get(
            "/api/v1/series",
            &[
                ("match[]", "up"),
                ("match[]", "{job=\"a\"}"),
                ("start", "10"),
            ],
        )
        .unwrap();
        assert!(matches!(
            req.kind,
            RequestKind::Metadata { ref matchers, start: Some(10_000), end: None } if matchers.len() == 2
        ));
    }

    #[test]
    fn label_values_checks_the_name_and_is_get_only() {
        let req = get("/api/v1/label/__name__/values", &[]).unwrap();
        assert_eq!(req.endpoint, Endpoint::LabelValues);
        assert_eq!(param_error(get("/api/v1/label/1bad/values", &[])), "name");
        let post = parse(
            &Method::POST,
            "/api/v1/label/job/values",
            vec![],
            0,
            &QueryParser::default(),
        );
        assert!(matches!(post, Err(RequestError::MethodNotAllowed { .. })));
    }

    #[test]
    fn writes_and_admin_endpoints_are_forbidden() {
        for path in [
            "/api/v1/admin/tsdb/delete_series",
            "/api/v1/admin/tsdb/snapshot",
            "/api/v1/write",
            "/api/v1/import",
            "/api/v1/import/prometheus",
            "/api/v1/otlp/v1/metrics",
            "/-/reload",
            "/-/quit",
            "/internal/force_flush",
        ] {
            assert!(
                matches!(get(path, &[]), Err(RequestError::Forbidden { .. })),
                "{path}"
            );
        }
        assert!(matches!(
            get("/graph", &[]),
            Err(RequestError::NotFound { .. })
        ));
    }

    #[test]
    fn other_read_only_endpoints_pass_through_by_get_only() {
        let req = get("/api/v1/status/flags", &[]).unwrap();
        assert_eq!(req.endpoint, Endpoint::Other);
        assert!(matches!(
            parse(
                &Method::POST,
                "/api/v1/targets",
                vec![],
                0,
                &QueryParser::default()
            ),
            Err(RequestError::MethodNotAllowed { .. })
        ));
    }

    #[test]
    fn the_memo_gives_the_same_canonical_form_for_reformatted_queries() {
        let p = QueryParser::default();
        let (_, a) = p.parse("sum by(region)(rate(x{a=\"1\"}[5m]))").unwrap();
        let (_, b) = p
            .parse("sum  by (region) (\n rate( x{ a = \"1\" } [5m] )\n)")
            .unwrap();
        assert_eq!(a, b);
        assert!(p.parse("sum(").is_err());
        assert!(p.parse("sum(").is_err(), "errors are remembered too");
    }

    #[test]
    fn times_round_trip_through_format() {
        assert_eq!(format_time(1_700_000_000_123), "1700000000.123");
        assert_eq!(format_time(-1_500), "-1.500");
        assert_eq!(
            parse_time("t", "1700000000.123").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(parse_time("t", MIN_TIME_FORMATTED).unwrap(), Millis::MIN);
    }
}
