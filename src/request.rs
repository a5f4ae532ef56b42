//! Stage 2, parse: raw HTTP request → typed [`ApiRequest`].
//!
//! Decides which Prometheus API endpoint is asked for from one canonical form of the
//! path (anything else is refused, never normalised), checks every parameter the
//! way Prometheus would (times, steps, resolution, matchers), bounds and analyses
//! the PromQL, and refuses writes and admin calls. Pure: no I/O, the body has
//! already been read.

use std::hash::BuildHasher;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use promql_parser::parser::{self, Expr};

use crate::scan::{ScanError, ScanLimits, Scanned, scan};
use crate::units::{self, Millis};

/// Prometheus' own cap on points per series in a range query.
pub const MAX_POINTS_PER_SERIES: i64 = 11_000;

/// The Prometheus API endpoints promguard knows. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/api/v1/query`: instant queries (stat, gauge and table panels).
    Query,
    /// `/api/v1/query_range`: graph panels; cached as extents.
    QueryRange,
    /// `/api/v1/series`: the series matching selectors over a span.
    Series,
    /// `/api/v1/labels`: label names, for the query editor and variables.
    Labels,
    /// `/api/v1/label/<name>/values`: a label's values, for variables.
    LabelValues,
    /// `/api/v1/metadata`: metric types and help, for the query editor.
    Metadata,
    /// `/api/v1/query_exemplars`: exemplars of a query's selectors; never cached.
    QueryExemplars,
    /// `/api/v1/rules`: the backend's alerting and recording rules.
    Rules,
    /// `/api/v1/status/buildinfo`: Grafana's probe of the backend's flavour and
    /// version.
    BuildInfo,
    /// Any other read-only `GET /api/v1/...`, forwarded as is.
    Other,
}

impl Endpoint {
    /// Every endpoint, for series registered up front.
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

    /// The `endpoint` label value.
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

    /// The endpoints Prometheus (and its compatible stores) accept form POSTs on;
    /// promguard forwards these as POSTs, which keeps long PromQL out of URLs.
    pub fn takes_form(self) -> bool {
        matches!(
            self,
            Endpoint::Query
                | Endpoint::QueryRange
                | Endpoint::Series
                | Endpoint::Labels
                | Endpoint::QueryExemplars
        )
    }
}

/// A path under a backend's base URL, in canonical form: `/api/v1/` and segments
/// of letters, digits, `_` and `-` only. It can only be built by [`parse`], so the
/// path promguard forwards is exactly the one it checked: nothing a URL library
/// could normalise (`..`, `%2e`, `//`) can reach a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiPath(String);

impl ApiPath {
    /// The path, e.g. `/api/v1/query_range`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ApiPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the scan or the parser made of a query text.
#[derive(Debug, Clone)]
pub enum Expression {
    /// promql-parser understood it: the full syntax tree.
    Parsed(Arc<Expr>),
    /// promql-parser could not (MetricsQL, functions newer than the parser, or a
    /// query the backend will refuse): the tolerant scan's facts. The backend
    /// answers it, or gives its own error.
    Scanned(Arc<Scanned>),
}

/// A PromQL expression together with the text the caller sent.
#[derive(Debug, Clone)]
pub struct Query {
    /// The text as sent: forwarded unchanged, so the backend evaluates exactly what
    /// the caller wrote.
    pub text: String,
    /// What the parser, or failing it the scan, made of the text, for analysis.
    pub expr: Expression,
    /// The expression printed back by the parser, when that round-trips; the
    /// normalised token text for scanned queries; the text otherwise. Equal for
    /// queries that differ only in formatting.
    pub canonical: Arc<str>,
}

/// What is remembered per query text: the result and the text it is for, since
/// entries are found by a hash of the text.
struct Memo {
    text: Box<str>,
    parsed: std::result::Result<(Expression, Arc<str>), ScanError>,
}

/// Parses PromQL and remembers recent results. Dashboards send the same few
/// hundred queries again and again, and parsing one costs tens of microseconds
/// (plus as much again to check the canonical form), far more than a cache hit.
pub struct QueryParser {
    /// Keyed by a hash of the text (so the map does not hold a second copy of every
    /// query) and bounded by the bytes its entries hold.
    memo: moka::sync::Cache<u64, Arc<Memo>>,
    hasher: std::collections::hash_map::RandomState,
    limits: ScanLimits,
}

/// Refusals are remembered only for short texts: a flood of large invalid queries
/// must not fill the memo, and scanning one again is cheap.
const MEMO_ERRORS_UP_TO: usize = 1024;
/// A parsed tree takes a few times its text in memory.
const MEMO_BYTES_PER_TEXT_BYTE: usize = 6;

impl QueryParser {
    /// Remember up to `max_bytes` of parsed queries; refuse texts beyond `limits`.
    pub fn new(max_bytes: u64, limits: ScanLimits) -> Self {
        QueryParser {
            memo: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, m: &Arc<Memo>| {
                    u32::try_from(m.text.len() * MEMO_BYTES_PER_TEXT_BYTE + 256).unwrap_or(u32::MAX)
                })
                .build(),
            hasher: std::collections::hash_map::RandomState::new(),
            limits,
        }
    }

    /// Parse `text`, or return the remembered result.
    ///
    /// # Errors
    ///
    /// [`ScanError`] for text no backend could accept or beyond the limits. Text
    /// promql-parser cannot parse is not an error: it is analysed by the scan.
    pub fn parse(&self, text: &str) -> std::result::Result<(Expression, Arc<str>), ScanError> {
        let hash = self.hasher.hash_one(text);
        if let Some(hit) = self.memo.get(&hash).filter(|m| &*m.text == text) {
            return hit.parsed.clone();
        }
        let parsed = self.parse_uncached(text);
        if parsed.is_ok() || text.len() <= MEMO_ERRORS_UP_TO {
            self.memo.insert(
                hash,
                Arc::new(Memo {
                    text: text.into(),
                    parsed: parsed.clone(),
                }),
            );
        }
        parsed
    }

    fn parse_uncached(&self, text: &str) -> std::result::Result<(Expression, Arc<str>), ScanError> {
        // The scan bounds what the parser and every recursive walk over its tree
        // will meet; a panic inside the parser (it has some for inputs the scan
        // does not foresee) makes the query one the parser does not understand.
        let scanned = scan(text, self.limits)?;
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            parser::parse(text).map(|expr| {
                let canonical: Arc<str> = canonical_form(&expr, text).into();
                (expr, canonical)
            })
        }));
        Ok(match parsed {
            Ok(Ok((expr, canonical))) => (Expression::Parsed(Arc::new(expr)), canonical),
            Ok(Err(reason)) => {
                tracing::debug!(%reason, "promql-parser cannot parse a query; analysing it tolerantly");
                scanned_expression(scanned)
            }
            Err(_) => {
                tracing::warn!(
                    query_bytes = text.len(),
                    "promql-parser panicked on a query; analysing it tolerantly"
                );
                scanned_expression(scanned)
            }
        })
    }
}

fn scanned_expression(scanned: Scanned) -> (Expression, Arc<str>) {
    let canonical: Arc<str> = scanned.normalized.as_str().into();
    (Expression::Scanned(Arc::new(scanned)), canonical)
}

impl Default for QueryParser {
    fn default() -> Self {
        Self::new(32 << 20, ScanLimits::default())
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
    /// An instant query: one evaluation at `time`.
    Instant {
        /// The expression evaluated at `time`.
        query: Query,
        /// Evaluation time, Unix milliseconds; "now" when the caller sent none.
        time: Millis,
    },
    /// A range query: evaluations at `start + k·step_ms` up to `end`.
    Range {
        /// The expression evaluated at every step.
        query: Query,
        /// First evaluation, Unix milliseconds.
        start: Millis,
        /// Upper bound of the evaluations, at or after `start`.
        end: Millis,
        /// Milliseconds between evaluations: positive, and at most
        /// [`MAX_POINTS_PER_SERIES`] points in the range.
        step_ms: i64,
    },
    /// `/series`, `/labels`, `/label/<name>/values`: selectors over a time span.
    Metadata {
        /// The `match[]` selectors as sent, in order.
        matchers: Vec<String>,
        /// Start of the span as sent; `Millis::MIN` for Prometheus' "unbounded".
        start: Option<Millis>,
        /// End of the span as sent; `Millis::MAX` for Prometheus' "unbounded".
        end: Option<Millis>,
    },
    /// `/query_exemplars`: the exemplars of a query's selectors over a span.
    Exemplars {
        /// The PromQL whose selectors pick the exemplars.
        query: Query,
        /// Start of the span as sent; `Millis::MIN` for Prometheus' "unbounded".
        start: Option<Millis>,
        /// End of the span as sent; `Millis::MAX` for Prometheus' "unbounded".
        end: Option<Millis>,
    },
    /// Endpoints whose answer does not depend on stored samples (metadata, rules,
    /// build info, other read-only status pages).
    Static,
}

/// One typed request: the only representation of what a caller asked, from which
/// every upstream call is encoded ([`ApiRequest::encode`]) and every cache key
/// built. Moving a span or an instant works on the typed fields.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// Which endpoint it is: decides parsing, caching, routing and the `endpoint`
    /// label.
    pub endpoint: Endpoint,
    /// Path under the backend's base URL, e.g. `/api/v1/query_range`.
    pub path: ApiPath,
    /// The typed parameters.
    pub kind: RequestKind,
    /// Parameters promguard does not interpret (`nocache`, `limit`, `dedup`,
    /// `partial_response`, …), forwarded and keyed as sent, in order.
    pub extra: Vec<(String, String)>,
    /// The caller's `timeout` parameter, which bounds the upstream call too.
    pub timeout: Option<Duration>,
}

impl ApiRequest {
    /// The parameters of the upstream call: the typed fields in the backend's
    /// syntax, then the `timeout`, then the caller's other parameters.
    pub fn encode(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(self.extra.len() + 5);
        let mut put = |name: &str, value: String| out.push((name.to_string(), value));
        let bound = |t: Millis| match t {
            Millis::MIN => units::MIN_TIME_FORMATTED.to_string(),
            Millis::MAX => units::MAX_TIME_FORMATTED.to_string(),
            t => units::format_time(t),
        };
        match &self.kind {
            RequestKind::Instant { query, time } => {
                put("query", query.text.clone());
                put("time", units::format_time(*time));
            }
            RequestKind::Range {
                query,
                start,
                end,
                step_ms,
            } => {
                put("query", query.text.clone());
                put("start", units::format_time(*start));
                put("end", units::format_time(*end));
                put("step", units::format_time(*step_ms));
            }
            RequestKind::Metadata {
                matchers,
                start,
                end,
            } => {
                for m in matchers {
                    put("match[]", m.clone());
                }
                if let Some(s) = start {
                    put("start", bound(*s));
                }
                if let Some(e) = end {
                    put("end", bound(*e));
                }
            }
            RequestKind::Exemplars { query, start, end } => {
                put("query", query.text.clone());
                if let Some(s) = start {
                    put("start", bound(*s));
                }
                if let Some(e) = end {
                    put("end", bound(*e));
                }
            }
            RequestKind::Static => {}
        }
        if let Some(t) = self.timeout {
            put("timeout", units::format_time(units::millis(t)));
        }
        out.extend(self.extra.iter().cloned());
        out
    }

    /// The same range query over `start..=end`; other kinds are returned as they
    /// are.
    pub fn with_span(&self, start: Millis, end: Millis) -> ApiRequest {
        let kind = match &self.kind {
            RequestKind::Range { query, step_ms, .. } => RequestKind::Range {
                query: query.clone(),
                start,
                end,
                step_ms: *step_ms,
            },
            other => other.clone(),
        };
        ApiRequest {
            kind,
            ..self.clone()
        }
    }

    /// The same instant query at `time`; other kinds are returned as they are.
    pub fn at(&self, time: Millis) -> ApiRequest {
        let kind = match &self.kind {
            RequestKind::Instant { query, .. } => RequestKind::Instant {
                query: query.clone(),
                time,
            },
            other => other.clone(),
        };
        ApiRequest {
            kind,
            ..self.clone()
        }
    }
}

/// Why a request was refused before any backend was contacted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    /// A parameter missing or not what Prometheus accepts: a time, step, point
    /// count, matcher, label name, or a query the scan refuses.
    #[error("invalid parameter \"{param}\": {reason}")]
    InvalidParam {
        /// The parameter's name (`query`, `step`, `match[]`, …).
        param: &'static str,
        /// What is wrong, and often what would be accepted.
        reason: String,
    },
    /// A parameter's name or value is not UTF-8 once percent-decoded; refused
    /// rather than forwarded with replacement characters.
    #[error("parameter {param:?} is not valid UTF-8 once percent-decoded")]
    Encoding {
        /// The parameter's name (lossily decoded, cut to 64 characters).
        param: String,
    },
    /// A form body longer than `max_request_body`.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// `max_request_body`, in bytes.
        limit: usize,
    },
    /// The body could not be read (the client went away, a broken transfer).
    #[error("could not read the request body: {0}")]
    Body(String),
    /// The method is not one Prometheus accepts on this endpoint (405).
    #[error("{method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        /// The method sent.
        method: String,
        /// The path asked for.
        path: String,
        /// What the endpoint takes: `GET`, or `GET or POST`.
        allowed: &'static str,
    },
    /// A write, delete or admin path of the backend, or one of its lifecycle
    /// endpoints (`/-/quit`): refused (403) so promguard is no way around the
    /// backend's own access control.
    #[error(
        "{path} is a write or admin endpoint of the backend; promguard only forwards read queries"
    )]
    Forbidden {
        /// The path asked for.
        path: String,
    },
    /// A path outside `/api/v1/` that is not a backend's admin path (404).
    #[error("{path} is not a Prometheus query API endpoint")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// A path promguard would not forward as it is (percent-encoding, empty or dot
    /// segments, other characters): refused, never normalised, since the HTTP
    /// client would normalise it into a path promguard never checked.
    #[error(
        "the path {path:?} is not in canonical form ({why}); promguard only forwards paths \
         of plain segments"
    )]
    NonCanonicalPath {
        /// The path asked for, cut to 200 characters.
        path: String,
        /// Which rule it breaks (a dot segment, percent-encoding, …).
        why: &'static str,
    },
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
    let segments = canonical_segments(path)?;
    let api = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => rest,
        _ => {
            return Err(if is_backend_admin_path(&segments) {
                RequestError::Forbidden { path: path.into() }
            } else {
                RequestError::NotFound { path: path.into() }
            });
        }
    };
    if FORBIDDEN_API_PREFIXES.contains(&api[0]) {
        return Err(RequestError::Forbidden { path: path.into() });
    }
    let endpoint = match api {
        ["query"] => Endpoint::Query,
        ["query_range"] => Endpoint::QueryRange,
        ["series"] => Endpoint::Series,
        ["labels"] => Endpoint::Labels,
        ["metadata"] => Endpoint::Metadata,
        ["query_exemplars"] => Endpoint::QueryExemplars,
        ["rules"] => Endpoint::Rules,
        ["status", "buildinfo"] => Endpoint::BuildInfo,
        ["label", name, "values"] => {
            check_label_name(name)?;
            Endpoint::LabelValues
        }
        _ => Endpoint::Other,
    };
    check_method(method, path, endpoint)?;

    let timeout = optional(&params, "timeout")
        .map(|t| duration_param("timeout", t))
        .transpose()?;
    let kind = match endpoint {
        Endpoint::Query => {
            let query = parse_query(&params, queries)?;
            let time = match optional(&params, "time") {
                Some(t) => time_param("time", t)?,
                // "now", filled in so the backend evaluates the instant promguard
                // routed for.
                None => now,
            };
            RequestKind::Instant { query, time }
        }
        Endpoint::QueryRange => parse_range(&params, queries)?,
        Endpoint::Series | Endpoint::Labels | Endpoint::LabelValues => {
            let matchers = check_matchers(&params, endpoint == Endpoint::Series, queries)?;
            let (start, end) = parse_span(&params)?;
            check_limit(&params)?;
            RequestKind::Metadata {
                matchers,
                start,
                end,
            }
        }
        Endpoint::QueryExemplars => {
            let query = parse_query(&params, queries)?;
            let (start, end) = parse_span(&params)?;
            RequestKind::Exemplars { query, start, end }
        }
        Endpoint::Metadata => {
            check_limit(&params)?;
            RequestKind::Static
        }
        Endpoint::Rules | Endpoint::BuildInfo | Endpoint::Other => RequestKind::Static,
    };
    let typed = typed_names(&kind);
    Ok(ApiRequest {
        endpoint,
        // Canonical: the path is its segments joined, as sent.
        path: ApiPath(path.to_owned()),
        kind,
        extra: params
            .into_iter()
            .filter(|(name, _)| name != "timeout" && !typed.contains(&name.as_str()))
            .collect(),
        timeout,
    })
}

/// The parameters a request kind holds typed; every other one is forwarded as sent.
fn typed_names(kind: &RequestKind) -> &'static [&'static str] {
    match kind {
        RequestKind::Instant { .. } => &["query", "time"],
        RequestKind::Range { .. } => &["query", "start", "end", "step"],
        RequestKind::Metadata { .. } => &["match[]", "start", "end"],
        RequestKind::Exemplars { .. } => &["query", "start", "end"],
        RequestKind::Static => &[],
    }
}

/// The path's segments, when it is canonical: it starts with `/`, has no empty,
/// `.` or `..` segments and no percent-encoding, and uses only letters, digits,
/// `_`, `-` and `.` inside segments. Anything else is refused rather than
/// normalised, because the HTTP client would normalise it differently on the way
/// to the backend.
fn canonical_segments(path: &str) -> Result<Vec<&str>> {
    let refuse = |why| {
        Err(RequestError::NonCanonicalPath {
            path: path.chars().take(200).collect(),
            why,
        })
    };
    let Some(rest) = path.strip_prefix('/') else {
        return refuse("it does not start with /");
    };
    if path.contains('%') {
        return refuse("percent-encoded characters");
    }
    let mut segments = Vec::new();
    for segment in rest.split('/') {
        match segment {
            "" => return refuse("an empty segment"),
            "." | ".." => return refuse("a dot segment"),
            s if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
            {
                return refuse("characters other than letters, digits, _, - and .");
            }
            s => segments.push(s),
        }
    }
    Ok(segments)
}

/// Lifecycle and admin paths of Prometheus, Thanos, Mimir and VictoriaMetrics.
fn is_backend_admin_path(segments: &[&str]) -> bool {
    matches!(
        segments.first(),
        Some(&("-" | "internal" | "admin" | "snapshot" | "write" | "insert" | "federate"))
    )
}

fn check_method(method: &Method, path: &str, endpoint: Endpoint) -> Result<()> {
    // Prometheus accepts POST (form-encoded) on the query and selector endpoints and
    // GET only on the rest; mirror that so behaviour does not change behind us.
    let post_ok = endpoint.takes_form();
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

/// Decode `application/x-www-form-urlencoded` bytes (a body or a URL query string)
/// strictly: a name or value that is not UTF-8 once decoded is refused, where a
/// lossy decoder would forward replacement characters the caller never sent.
///
/// # Errors
///
/// [`RequestError::Encoding`] naming the parameter.
pub fn decode_form(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    bytes
        .split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &pair[..0]),
            };
            let name = percent_decode(name).map_err(|raw| RequestError::Encoding {
                param: String::from_utf8_lossy(&raw).chars().take(64).collect(),
            })?;
            let value = percent_decode(value).map_err(|_| RequestError::Encoding {
                param: name.chars().take(64).collect(),
            })?;
            Ok((name, value))
        })
        .collect()
}

/// `+` is a space and `%XX` a byte; a `%` not followed by two hex digits stays as
/// it is, as Go's form parser leaves it to fail later. Err carries the raw bytes.
fn percent_decode(input: &[u8]) -> std::result::Result<String, Vec<u8>> {
    if !input.iter().any(|b| matches!(b, b'%' | b'+')) {
        // Nothing to decode, as most names and many values.
        return std::str::from_utf8(input)
            .map(str::to_owned)
            .map_err(|_| input.to_vec());
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                input.get(i + 1).copied().and_then(hex),
                input.get(i + 2).copied().and_then(hex),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|e| e.into_bytes())
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

fn time_param(param: &'static str, value: &str) -> Result<Millis> {
    units::parse_time(value).map_err(|reason| RequestError::InvalidParam { param, reason })
}

fn duration_param(param: &'static str, value: &str) -> Result<Duration> {
    units::parse_api_duration(value).map_err(|reason| RequestError::InvalidParam { param, reason })
}

fn parse_query(params: &[(String, String)], queries: &QueryParser) -> Result<Query> {
    let text = required(params, "query")?;
    let (expr, canonical) = queries
        .parse(text)
        .map_err(|e| RequestError::InvalidParam {
            param: "query",
            reason: e.to_string(),
        })?;
    Ok(Query {
        text: text.to_string(),
        expr,
        canonical,
    })
}

fn parse_range(params: &[(String, String)], queries: &QueryParser) -> Result<RequestKind> {
    let query = parse_query(params, queries)?;
    let start = time_param("start", required(params, "start")?)?;
    let end = time_param("end", required(params, "end")?)?;
    if end < start {
        return Err(RequestError::InvalidParam {
            param: "end",
            reason: "end timestamp must not be before start time".into(),
        });
    }
    let step = duration_param("step", required(params, "step")?)?;
    let step_ms = units::millis(step);
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
    let time = |param: &'static str| {
        optional(params, param)
            .map(|v| {
                units::parse_time_or_unbounded(v)
                    .map_err(|reason| RequestError::InvalidParam { param, reason })
            })
            .transpose()
    };
    let (start, end) = (time("start")?, time("end")?);
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

/// Every `match[]` must be a series selector. One promql-parser cannot parse
/// (MetricsQL's extensions) is left for the backend to judge, as long as the scan
/// accepts it.
fn check_matchers(
    params: &[(String, String)],
    at_least_one: bool,
    queries: &QueryParser,
) -> Result<Vec<String>> {
    let mut matchers = Vec::new();
    for (_, v) in params.iter().filter(|(k, _)| k == "match[]") {
        match queries.parse(v) {
            Ok((Expression::Parsed(expr), _)) if !matches!(*expr, Expr::VectorSelector(_)) => {
                return Err(RequestError::InvalidParam {
                    param: "match[]",
                    reason: format!("{v:?} is not a series selector"),
                });
            }
            Ok(_) => matchers.push(v.clone()),
            Err(e) => {
                return Err(RequestError::InvalidParam {
                    param: "match[]",
                    reason: e.to_string(),
                });
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIN_TIME_FORMATTED;

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
        assert_eq!(optional(&req.encode(), "time"), Some("1700000000.000"));
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
            RequestKind::Metadata {
                ref matchers,
                start: Some(10_000),
                end: None
            } if matchers.len() == 2
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
    fn queries_the_parser_does_not_know_are_scanned_not_refused() {
        let p = QueryParser::default();
        for q in [
            "holt_winters(x[5m], 0.5, 0.5)",
            "rate(x)",
            "rate(x[5m]) keep_metric_names",
            "x default 0",
            "WITH (a = up) a",
            "quantiles(\"phi\", 0.5, 0.9, rate(x[5m]))",
        ] {
            let (expr, canonical) = p.parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert!(matches!(expr, Expression::Scanned(_)), "{q}");
            assert!(!canonical.is_empty());
        }
        let (_, a) = p.parse("rate( x )").unwrap();
        let (_, b) = p.parse("rate(x)").unwrap();
        assert_eq!(a, b, "scanned queries share their normalised text");
        assert!(matches!(p.parse("up").unwrap().0, Expression::Parsed(_)));
    }

    #[test]
    fn inputs_that_would_crash_the_parser_are_refused_first() {
        for q in [
            "up[1e300]",
            "up offset 1e300",
            "up[1e300:1m]",
            "up[5m:1e300]",
        ] {
            let err = get("/api/v1/query", &[("query", q)]).unwrap_err();
            assert!(err.to_string().contains("292 years"), "{q}: {err}");
        }
        let deep = format!("{}up{}", "(".repeat(7_500), ")".repeat(7_500));
        let err = get("/api/v1/query", &[("query", &deep)]).unwrap_err();
        assert!(err.to_string().contains("query.max_depth"), "{err}");
    }

    #[test]
    fn only_canonical_paths_are_accepted() {
        for path in [
            "/api/v1/../../-/quit",
            "/api/v1/%2e%2e/%2e%2e/-/quit",
            "/api/v1/status/../admin/tsdb/snapshot",
            "/api/v1/labels/../../../federate",
            "/api/v1/%61dmin/tsdb/snapshot",
            "/api/v1/admin%2Ftsdb%2Fsnapshot",
            "/api/v1//admin/tsdb/snapshot",
            "/api/v1/status/../query_range",
            "/api/v1/./query",
            "/api/v1/query/",
            "api/v1/query",
            "/api/v1/label/a b/values",
        ] {
            assert!(
                matches!(get(path, &[]), Err(RequestError::NonCanonicalPath { .. })),
                "{path}: {:?}",
                get(path, &[]).map(|r| r.path)
            );
        }
        let req = get("/api/v1/status/flags", &[]).unwrap();
        assert_eq!(req.path.as_str(), "/api/v1/status/flags");
        let req = get("/api/v1/label/job/values", &[]).unwrap();
        assert_eq!(req.path.as_str(), "/api/v1/label/job/values");
    }

    #[test]
    fn the_typed_request_is_what_is_forwarded() {
        let req = get(
            "/api/v1/query_range",
            &[
                ("query", "up"),
                ("start", "100"),
                ("end", "200"),
                ("step", "1m"),
                ("timeout", "30s"),
                ("nocache", "1"),
                ("start", "999"),
                ("dedup", "true"),
            ],
        )
        .unwrap();
        assert_eq!(
            req.extra,
            vec![
                ("nocache".to_string(), "1".to_string()),
                ("dedup".to_string(), "true".to_string())
            ],
            "typed names and their duplicates are not forwarded twice"
        );
        let moved = req.with_span(160_000, 220_000);
        let encoded = moved.encode();
        assert_eq!(
            encoded,
            [
                ("query", "up"),
                ("start", "160.000"),
                ("end", "220.000"),
                ("step", "60.000"),
                ("timeout", "30.000"),
                ("nocache", "1"),
                ("dedup", "true"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let series = get(
            "/api/v1/series",
            &[
                ("match[]", "up"),
                ("match[]", "{job=\"a\"}"),
                ("start", MIN_TIME_FORMATTED),
                ("limit", "5"),
            ],
        )
        .unwrap();
        assert_eq!(
            series.encode(),
            [
                ("match[]", "up"),
                ("match[]", "{job=\"a\"}"),
                ("start", MIN_TIME_FORMATTED),
                ("limit", "5"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn forms_decode_strictly() {
        assert_eq!(
            decode_form(b"query=sum(rate(x%5B5m%5D))+%2B+1&time=4&flag").unwrap(),
            vec![
                ("query".to_string(), "sum(rate(x[5m])) + 1".to_string()),
                ("time".to_string(), "4".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
        assert_eq!(
            decode_form(b"query=%FF%FE"),
            Err(RequestError::Encoding {
                param: "query".into()
            })
        );
        assert_eq!(decode_form(b"a=100%").unwrap()[0].1, "100%");
        assert_eq!(decode_form(b"a=%4").unwrap()[0].1, "%4");
    }
}
