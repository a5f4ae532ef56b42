//! The HTTP surface: routes and edge layers.
//!
//! promguard's own endpoints (`/metrics`, `/-/healthy`, `/-/ready`, `/-/status`,
//! `/admin/...`) are answered here; every other path goes to [`pipeline::handle`],
//! wrapped with the per-request log line and request metrics. The shared state is
//! [`crate::state::AppState`].

use std::any::Any;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use prometheus::IntCounter;
use serde_json::json;
use subtle::ConstantTimeEq;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::admission::Class;
use crate::config::parse_human_duration;
use crate::error::{ProxyError, error_response};
use crate::pipeline::{self, Incoming, RequestCtx};
use crate::policy::state::Mode;
use crate::policy::{Setting, SwitchError};
use crate::routing::BackendId;
use crate::state::AppState;
use crate::units;

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let panics = state.metrics.http_panics.clone();
    let routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/status", get(status))
        .route("/admin/sale-mode", get(admin_status).post(admin_set_mode))
        .route("/admin/policies/reload", post(admin_reload))
        .route("/admin/warm", get(admin_warm_status).post(admin_warm))
        .fallback(api)
        .with_state(state);
    edge(routes, panics)
}

/// The edge layers, outermost first: a request id, set and sent back, the
/// request's span, and the panic guard. They wrap the whole router once:
/// `Router::layer` would box every route once per layer, and every request would
/// clone and drop those boxes.
fn edge(routes: Router, panics: IntCounter) -> Router {
    let layered = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(RequestIds::new()))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(request_span())
        .layer(panic_guard(panics))
        .service(routes);
    Router::new().fallback_service(layered)
}

/// Request ids unique across a fleet without a random draw per request: a random
/// prefix per process and a counter. (A v4 UUID costs a `getrandom` system call
/// on every request, a tenth of a whole cache hit.)
#[derive(Clone)]
struct RequestIds {
    /// Sixteen hex digits and a dash.
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        // std's hasher keys are drawn at random per process.
        let random = RandomState::new().hash_one(std::process::id());
        RequestIds {
            prefix: format!("{random:016x}-").into(),
            next: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.prefix.len() + 20);
        id.push_str(&self.prefix);
        id.push_str(itoa::Buffer::new().format(n));
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// A tracing span per request carrying its id (`X-Request-Id`: the caller's, or
/// one promguard makes), so every log line of one request can be found together;
/// the id also goes back on the answer. The request log line itself is the
/// pipeline's, so the layer's own request and response events stay quiet.
fn request_span() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&Request) -> tracing::Span + Clone,
    (),
    (),
> {
    TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            let id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", id)
        })
        .on_request(())
        .on_response(())
}

/// Known bad input never reaches a panic (every stage refuses it first); this keeps
/// a bug from closing the connection without an answer: the request gets a 500
/// Prometheus-style error, and the panic is logged and counted in `panics`.
fn panic_guard(
    panics: IntCounter,
) -> CatchPanicLayer<impl Fn(Box<dyn Any + Send>) -> Response + Clone> {
    CatchPanicLayer::custom(move |panic: Box<dyn Any + Send>| {
        panics.inc();
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %message, "a request handler panicked; answered 500");
        error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "promguard failed while handling this request (a bug, logged and counted in \
             promguard_http_panics_total); other requests are not affected",
        )
    })
}

/// Every Prometheus API request: run the pipeline, then log and count the outcome.
async fn api(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let (parts, body) = request.into_parts();
    let incoming = Incoming {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
        client,
        warm: false,
    };
    let path = incoming.path.clone();
    let mut ctx = RequestCtx::new(units::now_millis());
    let result = pipeline::handle(&state, &mut ctx, incoming).await;
    let (response, failure) = match result {
        Ok(response) => (response, None),
        Err(e) => {
            let origin = e.origin().as_str();
            let message = e.to_string();
            (e.into_response(), Some((origin, message)))
        }
    };
    let status = response.status().as_u16();
    let endpoint = ctx.request.as_ref().map_or("none", |r| r.endpoint.as_str());
    let backend = ctx.backend.map_or("none", BackendId::as_str);
    let elapsed = ctx.started.elapsed();
    state
        .metrics
        .observe_request(endpoint, status, backend, elapsed);
    let caller = ctx.caller.as_ref();
    tracing::info!(
        user = caller.map_or("", |c| &*c.user),
        source = caller.map_or("", |c| c.source.as_str()),
        client = %client,
        org = caller.and_then(|c| c.org.as_deref()),
        dashboard = caller.and_then(|c| c.dashboard.as_deref()),
        class = ctx.class.map(|c| c.as_str()),
        cache = ctx.cache.map(|c| c.as_str()),
        panel = caller.and_then(|c| c.panel.as_deref()),
        path,
        endpoint,
        backend,
        status,
        ms = elapsed.as_secs_f64() * 1000.0,
        error_origin = failure.as_ref().map(|f| f.0),
        error = failure.as_ref().map(|f| f.1.as_str()),
        "request"
    );
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    for id in BackendId::ALL {
        let (in_flight, queued) = state.backend(id).gate.usage();
        for class in Class::ALL {
            state
                .metrics
                .admission_in_flight
                .with_label_values(&[id.as_str(), class.as_str()])
                .set(i64::try_from(in_flight[class as usize]).unwrap_or(i64::MAX));
        }
        state
            .metrics
            .admission_queue
            .with_label_values(&[id.as_str()])
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
        let busy = state
            .backend(id)
            .gate
            .pressed_within(state.cache.config().busy_refresh.0);
        state
            .metrics
            .backend_busy
            .with_label_values(&[id.as_str()])
            .set(i64::from(busy));
    }
    let mode = state.policies.mode(chrono::Utc::now());
    state.metrics.sale_mode.reset();
    state
        .metrics
        .sale_mode
        .with_label_values(&[mode.source.as_str(), mode.window.as_deref().unwrap_or("")])
        .set(i64::from(mode.mode == Mode::Sale));
    let (entries, bytes) = state.cache.usage();
    state
        .metrics
        .cache_entries
        .set(i64::try_from(entries).unwrap_or(i64::MAX));
    state
        .metrics
        .cache_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthy() -> &'static str {
    "promguard is healthy.\n"
}

/// Ready when every configured backend answers its health path.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let probes = state
        .backends()
        .map(|b| async move { (b.upstream.id, b.upstream.probe().await) });
    let results = futures_util::future::join_all(probes).await;
    let all_ok = results.iter().all(|(_, r)| r.is_ok());
    let backends: serde_json::Map<_, _> = results
        .into_iter()
        .map(|(id, r)| {
            let value = match r {
                Ok(()) => json!({"ready": true}),
                Err(reason) => json!({"ready": false, "error": reason}),
            };
            (id.as_str().to_string(), value)
        })
        .collect();
    let (code, body) = if all_ok {
        (
            StatusCode::OK,
            json!({"status": "ready", "backends": backends}),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "status": "error",
                "errorType": "unavailable",
                "error": "a backend is not ready",
                "backends": backends,
            }),
        )
    };
    (code, Json(body)).into_response()
}

/// JSON status: version, backends and exact latency percentiles per endpoint.
async fn status(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let backends: Vec<_> = state
        .backends()
        .map(|b| {
            json!({
                "name": b.upstream.id.as_str(),
                "url": b.upstream.base_url(),
                "busy": b.gate.pressed_within(state.cache.config().busy_refresh.0),
            })
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backends": backends,
        "recent_window_seconds": state.routing.recent_window.as_secs(),
        "identity": identity_status(&state),
        "latency": state.metrics.latency_report(),
    }))
}

/// The identity mode in force, how requests were identified so far, and what to
/// configure when Grafana's users cannot be told apart.
fn identity_status(state: &AppState) -> serde_json::Value {
    let mode = state.identifier.mode();
    let seen = |label: &str| {
        state
            .metrics
            .identity_requests
            .with_label_values(&[label])
            .get()
    };
    let by_source: serde_json::Map<_, _> = crate::identity::Source::LABELS
        .iter()
        .map(|label| (label.to_string(), json!(seen(label))))
        .collect();
    let mut advice = Vec::new();
    if seen("grafana_unproven") > 0 {
        advice.push(
            "requests from a Grafana carry no proof of where they came from: set \
             identity.grafana (a secret header or basic auth on the data source) and \
             [dataproxy] send_user_header = true in grafana.ini",
        );
    }
    if seen("grafana") > 0 {
        advice.push(
            "the trusted Grafana sends no X-Grafana-User: set [dataproxy] send_user_header = \
             true in grafana.ini",
        );
    }
    json!({
        "mode": mode.as_str(),
        "description": mode.describe(),
        "unverified_budgets": state.policies.active().limits(Mode::Normal).unverified().as_str(),
        "requests_by_source": by_source,
        "advice": advice,
    })
}

/// Why an admin call was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    /// No admin token is configured, so the admin API is off (403).
    #[error("the admin API is disabled: set policy.admin_token or PROMGUARD_ADMIN_TOKEN")]
    Disabled,
    /// The `Authorization: Bearer` token is missing or not the admin token (401).
    #[error("admin calls need Authorization: Bearer <admin token>")]
    Unauthorized,
    /// The body of `POST /admin/sale-mode` is not the expected JSON; serde's message.
    #[error("invalid body: {0}")]
    Body(String),
    /// `by` or `reason` is empty: every switch must be attributable in the audit trail.
    #[error("say who you are (by) and why (reason): both go to the audit trail")]
    Unaudited,
    /// `for` is not a duration promguard can read; the parser's message.
    #[error("invalid \"for\": {0}")]
    Duration(String),
    /// The policy runtime refused the switch (no duration, too long, or not saved).
    #[error(transparent)]
    Switch(#[from] SwitchError),
    /// `POST /admin/policies/reload` could not load the policy directory (422): a
    /// file unreadable or invalid, named with its line; the old policy stays.
    #[error("{0}; the previous policy stays in force")]
    Reload(String),
    /// `POST /admin/warm` while a run is going on or in sale mode (409).
    #[error(transparent)]
    Warm(#[from] crate::warm::Refusal),
}

/// Admin calls need the configured token, compared in constant time; without a
/// configured token the admin API is off.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), AdminError> {
    let token = state.admin_token.as_ref().ok_or(AdminError::Disabled)?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    if bool::from(presented.as_bytes().ct_eq(token.0.as_bytes())) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

async fn admin_status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ProxyError> {
    authorize(&state, &headers)?;
    let mut status = state.policies.status(chrono::Utc::now());
    if let (Some(shared), Some(fields)) = (&state.shared, status.as_object_mut()) {
        fields.insert("fleet".into(), shared.status().await);
    }
    Ok(Json(status))
}

/// `{"mode": "on"|"off"|"auto", "for": "6h", "reason": "...", "by": "alice"}`
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMode {
    mode: Setting,
    #[serde(rename = "for")]
    duration: Option<String>,
    reason: String,
    by: String,
}

async fn admin_set_mode(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ProxyError> {
    authorize(&state, &headers)?;
    let request: SetMode =
        serde_json::from_slice(&body).map_err(|e| AdminError::Body(e.to_string()))?;
    if request.reason.trim().is_empty() || request.by.trim().is_empty() {
        return Err(AdminError::Unaudited.into());
    }
    let duration = request
        .duration
        .as_deref()
        .map(parse_human_duration)
        .transpose()
        .map_err(AdminError::Duration)?
        .map(|d| d.0);
    let now = chrono::Utc::now();
    let Some(shared) = &state.shared else {
        let (effective, audit) = state
            .policies
            .set(request.mode, duration, &request.reason, &request.by, now)
            .map_err(AdminError::from)?;
        return Ok(Json(json!({"mode": effective, "audit": audit})));
    };
    // In a fleet the switch is written to Redis, which every replica follows; if
    // Redis cannot be reached it still holds here, and the answer says so.
    let switch = state
        .policies
        .plan_switch(request.mode, duration, &request.reason, &request.by, now)
        .map_err(AdminError::from)?;
    let reach = match shared.switch(&state.policies, &switch).await {
        Ok(()) => "every replica".to_string(),
        Err(e) => {
            state
                .policies
                .apply(switch.state.clone())
                .map_err(AdminError::from)?;
            shared.hold(switch.clone());
            tracing::error!(error = %e, "sale mode switched on this replica only: redis is unreachable");
            format!(
                "this replica only for now: {e}; it becomes the fleet's when redis answers \
                 again, unless the fleet is switched again before that"
            )
        }
    };
    Ok(Json(
        json!({"mode": switch.after, "audit": switch.entry, "applies_to": reach}),
    ))
}

async fn admin_reload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ProxyError> {
    authorize(&state, &headers)?;
    state
        .policies
        .reload()
        .map_err(|e| AdminError::Reload(e.to_string()))?;
    Ok(Json(json!({"status": "success"})))
}

async fn admin_warm_status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<crate::warm::Run>, ProxyError> {
    authorize(&state, &headers)?;
    Ok(Json(state.warmer.status()))
}

/// `{"dashboards": [<Grafana dashboard JSON>, …], "range": "30d"}`; without
/// `range`, each dashboard's own.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Warm {
    dashboards: Vec<serde_json::Value>,
    range: Option<String>,
}

async fn admin_warm(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::warm::Run>), ProxyError> {
    authorize(&state, &headers)?;
    let request: Warm =
        serde_json::from_slice(&body).map_err(|e| AdminError::Body(e.to_string()))?;
    let range_ms = request
        .range
        .as_deref()
        .map(parse_human_duration)
        .transpose()
        .map_err(AdminError::Duration)?
        .map(|d| units::millis(d.0));
    let dashboards = request
        .dashboards
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            crate::grafana::Dashboard::from_value(d)
                .map_err(|e| AdminError::Body(format!("dashboards[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let run = state.warmer.start_dashboards(
        &state,
        &dashboards,
        range_ms,
        "on demand (POST /admin/warm)".into(),
    );
    Ok((StatusCode::ACCEPTED, Json(run.map_err(AdminError::from)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_answer_carries_a_request_id_and_a_callers_own_is_kept() {
        let panics = IntCounter::new("p", "p").unwrap();
        let router = edge(Router::new().route("/", get(|| async { "ok" })), panics);
        let id = |response: &Response| response.headers()["x-request-id"].clone();
        let get = || Request::get("/").body(Body::empty()).unwrap();
        let first = id(&router.clone().oneshot(get()).await.unwrap());
        let second = id(&router.clone().oneshot(get()).await.unwrap());
        let (prefix, n) = first.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(prefix.len(), 16, "a per-process prefix: {first:?}");
        assert!(u64::from_str_radix(prefix, 16).is_ok(), "{first:?}");
        assert_eq!(
            second.to_str().unwrap(),
            format!("{prefix}-{}", n.parse::<u64>().unwrap() + 1),
            "one counter for the process"
        );
        let kept = router
            .oneshot(
                Request::get("/")
                    .header("x-request-id", "grafana-42")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(kept.headers()["x-request-id"], "grafana-42");
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_is_counted() {
        let panics = IntCounter::new("p", "p").unwrap();
        let router = edge(
            Router::new().route(
                "/boom",
                get(|| async {
                    let empty: Vec<u8> = Vec::new();
                    // An out-of-bounds index: a bug the guard must contain.
                    let at = empty.len() + 1;
                    format!("{}", empty[at])
                }),
            ),
            panics.clone(),
        );
        let response = router
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], "error");
        assert_eq!(json["errorType"], "internal");
        assert_eq!(panics.get(), 1);
    }

    /// A stand-in backend on loopback that answers every call with an empty
    /// vector and counts them: enough to see what reaches a backend.
    async fn fake_backend() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let backend = Router::new().fallback(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, backend).await });
        (url, calls)
    }

    /// The assembled app in front of the fake backend, with `extra` top-level
    /// configuration and `policy` lines under `policy:`.
    async fn proxy(
        extra: &str,
        policy: &str,
    ) -> (
        Router,
        Arc<std::sync::atomic::AtomicUsize>,
        tempfile::TempDir,
    ) {
        let (url, calls) = fake_backend().await;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let config = crate::config::Config::parse(&format!(
            "backends:\n  recent:\n    url: {url}\npolicy:\n  state_file: {}\n{policy}{extra}",
            state.join("sale-mode.json").display()
        ))
        .unwrap();
        config.validate().unwrap();
        let state = AppState::new(&config, crate::metrics::Metrics::new()).unwrap();
        (app(Arc::new(state)), calls, dir)
    }

    async fn send(app: &Router, request: Request) -> (StatusCode, HeaderMap, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    fn get_request(uri: &str) -> Request {
        Request::get(uri).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn refusals_are_json_errors_and_reach_no_backend() {
        let (app, calls, _dir) = proxy("max_request_body: 1KiB\n", "").await;
        let cases: Vec<(Request, StatusCode, &str)> = vec![
            (
                get_request("/api/v1/admin/tsdb/snapshot"),
                StatusCode::FORBIDDEN,
                "forbidden",
            ),
            (get_request("/-/quit"), StatusCode::FORBIDDEN, "forbidden"),
            (
                get_request("/api/v1/%2e%2e/-/quit"),
                StatusCode::BAD_REQUEST,
                "bad_data",
            ),
            (get_request("/graph"), StatusCode::NOT_FOUND, "not_found"),
            (
                get_request("/api/v1/query?query=sum(x"),
                StatusCode::BAD_REQUEST,
                "bad_data",
            ),
            (
                get_request("/api/v1/query_range?query=up&start=2&end=1&step=1"),
                StatusCode::BAD_REQUEST,
                "bad_data",
            ),
            (
                get_request("/api/v1/query?query=up[1e300]"),
                StatusCode::BAD_REQUEST,
                "bad_data",
            ),
            (
                Request::post("/api/v1/query")
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from(format!("query={}", "x".repeat(4096))))
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "bad_data",
            ),
            (
                Request::delete("/api/v1/query?query=up")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::METHOD_NOT_ALLOWED,
                "bad_data",
            ),
            (
                Request::get("/api/v1/query?query=up")
                    .header(header::AUTHORIZATION, "Basic !!!")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
        ];
        for (request, status, error_type) in cases {
            let what = request.uri().to_string();
            let (got, headers, body) = send(&app, request).await;
            assert_eq!(got, status, "{what}: {body}");
            assert_eq!(body["status"], "error", "{what}");
            assert_eq!(body["errorType"], error_type, "{what}");
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}"
            );
            if status == StatusCode::UNAUTHORIZED {
                assert!(headers.contains_key(header::WWW_AUTHENTICATE), "{what}");
            }
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_query_is_forwarded_once_then_served_from_the_cache() {
        let (app, calls, _dir) = proxy("", "").await;
        let uri = "/api/v1/query?query=up&time=1700000000";
        let (status, headers, _) = send(&app, get_request(uri)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(headers["x-promguard-backend"], "recent");
        let (_, headers, _) = send(&app, get_request(uri)).await;
        assert_eq!(headers["x-cache"], "HIT");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_admin_api_needs_its_token_and_checks_what_it_is_given() {
        let (closed, _, _closed_dir) = proxy("", "").await;
        let (status, _, body) = send(&closed, get_request("/admin/sale-mode")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

        let (app, _, _dir) = proxy("", "  admin_token: t0ken\n").await;
        let (status, headers, _) = send(&app, get_request("/admin/sale-mode")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        let admin = |body: &'static str| {
            Request::post("/admin/sale-mode")
                .header(header::AUTHORIZATION, "bearer t0ken")
                .body(Body::from(body))
                .unwrap()
        };
        let (status, _, body) = send(
            &app,
            admin(r#"{"mode":"on","for":"-1","reason":"r","by":"sre"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, _, body) = send(
            &app,
            admin(r#"{"mode":"on","for":"6h","reason":"","by":"sre"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, _, body) = send(
            &app,
            admin(r#"{"mode":"on","for":"6h","reason":"drill","by":"sre"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["mode"]["mode"], "sale");
    }
}
