//! The HTTP surface: routes, shared state and edge layers.
//!
//! promguard's own endpoints (`/metrics`, `/-/healthy`, `/-/ready`, `/-/status`)
//! are answered here; every other path goes to [`pipeline::handle`], wrapped with
//! the per-request log line and request metrics.

use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use prometheus::IntCounter;
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;

use crate::admission::{Class, Gate};
use crate::cache::Cache;
use crate::clock::MonotonicClock;
use crate::config::{Config, PriorityConfig, Secret, parse_human_duration};
use crate::error::error_response;
use crate::identity::Identifier;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::pipeline::{self, Incoming, RequestCtx};
use crate::policy::state::Mode;
use crate::policy::{Policies, Setting, SwitchError};
use crate::request::QueryParser;
use crate::routing::{BackendId, RoutingTable};
use crate::units::Millis;
use crate::upstream::Upstream;

/// Everything the handlers share, built once at startup.
pub struct AppState {
    pub identifier: Identifier,
    /// Remembers parsed PromQL: dashboards repeat the same queries.
    pub queries: QueryParser,
    /// Sale windows, rule sets, per-mode user quotas and the SRE switch.
    pub policies: Policies,
    /// Every user's budget state, kept across policy reloads and mode changes.
    pub limiter: Limiter,
    /// Token for `/admin/...`; `None` disables the admin API.
    pub admin_token: Option<Secret>,
    pub cache: Arc<Cache>,
    pub recent_gate: Arc<Gate>,
    pub long_term_gate: Arc<Gate>,
    pub priority: PriorityConfig,
    /// No Grafana trust is configured, so dashboard headers cannot be verified and
    /// are believed for priority.
    pub trust_dashboard_headers: bool,
    pub recent: Upstream,
    pub long_term: Option<Upstream>,
    pub routing: RoutingTable,
    pub metrics: Metrics,
    pub max_request_body: usize,
    pub lookback_delta: Duration,
}

impl AppState {
    /// Build the state from a validated configuration.
    ///
    /// # Errors
    ///
    /// When an HTTP client cannot be built, or the policy or its state file is invalid.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, String> {
        let long_term = config
            .backends
            .long_term
            .as_ref()
            .map(|b| Upstream::new(BackendId::LongTerm, b))
            .transpose()
            .map_err(|e| e.to_string())?;
        let policies = Policies::new(
            &config.policy,
            &config.limits,
            metrics.policy_reloads.clone(),
            &metrics.state_file_errors,
        )?;
        record_settings(config, &metrics);
        Ok(AppState {
            identifier: Identifier::new(&config.identity),
            queries: QueryParser::new(config.query.memo_bytes.0, config.query.limits()),
            policies,
            limiter: Limiter::default(),
            admin_token: config.policy.admin_token.clone().or_else(|| {
                std::env::var("PROMGUARD_ADMIN_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .map(Secret)
            }),
            cache: Arc::new(Cache::new(
                config.cache.clone(),
                &metrics,
                Arc::new(MonotonicClock),
            )),
            recent_gate: Gate::new(
                BackendId::Recent.as_str(),
                config.admission.recent.for_priority(&config.priority),
            ),
            long_term_gate: Gate::new(
                BackendId::LongTerm.as_str(),
                config.admission.long_term.for_priority(&config.priority),
            ),
            priority: config.priority.clone(),
            trust_dashboard_headers: config.identity.grafana.is_none(),
            recent: Upstream::new(BackendId::Recent, &config.backends.recent)
                .map_err(|e| e.to_string())?,
            routing: RoutingTable {
                recent_window: config.backends.recent.window.0,
                has_long_term: long_term.is_some(),
            },
            long_term,
            metrics,
            max_request_body: usize::try_from(config.max_request_body.0).unwrap_or(usize::MAX),
            lookback_delta: config.lookback_delta.0,
        })
    }

    /// The upstream for a routing decision. Routing only picks `LongTerm` when one
    /// is configured; falling back to `recent` keeps that invariant local.
    pub fn upstream(&self, id: BackendId) -> &Upstream {
        match id {
            BackendId::LongTerm => self.long_term.as_ref().unwrap_or(&self.recent),
            BackendId::Recent => &self.recent,
        }
    }

    /// How long a request may wait for an answer fetched from `backend`: its own
    /// `timeout` if lower than the backend's, plus the longest admission wait and
    /// a grace, so that the backend's own timeout error arrives first.
    pub fn wait_limit(&self, backend: BackendId, timeout: Option<Duration>) -> Duration {
        let call = self.upstream(backend).timeout();
        let call = timeout.map_or(call, |t| t.min(call));
        call + self.gate(backend).config().max_wait.0 + Duration::from_secs(2)
    }

    /// The admission gate for a routing decision.
    pub fn gate(&self, id: BackendId) -> &Arc<Gate> {
        match id {
            BackendId::Recent => &self.recent_gate,
            BackendId::LongTerm => &self.long_term_gate,
        }
    }

    /// Learn, in the background, how `backend` evaluates unaligned ranges (see
    /// [`Upstream::learn_unaligned_ranges`]), when that is not known yet and no
    /// probe ran lately. Asked when the first unaligned range arrives, so that
    /// backends that only ever see Grafana's aligned ranges are never probed;
    /// until it is known, unaligned ranges are cached whole.
    pub fn learn_unaligned_ranges(self: &Arc<Self>, backend: BackendId) {
        if !self.upstream(backend).claim_probe() {
            return;
        }
        let state = self.clone();
        tokio::spawn(async move {
            let upstream = state.upstream(backend);
            match upstream.learn_unaligned_ranges().await {
                Ok(found) => tracing::info!(
                    backend = upstream.id.as_str(),
                    unaligned_ranges = ?found,
                    "learned how the backend evaluates unaligned ranges"
                ),
                Err(e) => tracing::warn!(
                    backend = upstream.id.as_str(),
                    error = %e,
                    "could not learn how the backend evaluates unaligned ranges; they \
                     are cached as whole answers until it answers"
                ),
            }
        });
    }

    fn upstreams(&self) -> impl Iterator<Item = &Upstream> {
        std::iter::once(&self.recent).chain(self.long_term.as_ref())
    }
}

/// Export the configured limits as gauges, so dashboards draw them beside usage.
fn record_settings(config: &Config, metrics: &Metrics) {
    let set = |limit: &str, scope: &str, value: usize| {
        metrics
            .limit_settings
            .with_label_values(&[limit, scope])
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    };
    for (backend, gate) in [
        (BackendId::Recent, &config.admission.recent),
        (BackendId::LongTerm, &config.admission.long_term),
    ] {
        let gate = gate.for_priority(&config.priority);
        set("max_in_flight", backend.as_str(), gate.max_in_flight);
        set("reserved", backend.as_str(), gate.reserved);
        set("max_queue", backend.as_str(), gate.max_queue);
    }
    let limits = &config.limits;
    set("user_max_in_flight", "default", limits.max_in_flight);
    set(
        "user_requests_per_second",
        "default",
        limits.requests.per_second as usize,
    );
    set(
        "user_upstream_per_second",
        "default",
        limits.upstream.per_second as usize,
    );
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let panics = state.metrics.http_panics.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/status", get(status))
        .route("/admin/sale-mode", get(admin_status).post(admin_set_mode))
        .route("/admin/policies/reload", post(admin_reload))
        .fallback(api)
        .with_state(state)
        .layer(panic_guard(panics))
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

fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
    };
    let path = incoming.path.clone();
    let mut ctx = RequestCtx::new(now_millis());
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
        let (in_flight, queued) = state.gate(id).usage();
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
        .upstreams()
        .map(|u| async move { (u.id, u.probe().await) });
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
        .upstreams()
        .map(|u| json!({"name": u.id.as_str(), "url": u.base_url()}))
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

/// Admin calls need the configured token, compared in constant time; without a
/// configured token the admin API is off. Returns the refusal, if any.
fn unauthorized(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.admin_token else {
        return Some(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API is disabled: set policy.admin_token or PROMGUARD_ADMIN_TOKEN",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    (!bool::from(presented.as_bytes().ct_eq(token.0.as_bytes()))).then(|| {
        error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin calls need Authorization: Bearer <admin token>",
        )
    })
}

async fn admin_status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    Json(state.policies.status(chrono::Utc::now())).into_response()
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
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let bad = |message: String| error_response(StatusCode::BAD_REQUEST, "bad_data", &message);
    let request: SetMode = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid body: {e}")),
    };
    if request.reason.trim().is_empty() || request.by.trim().is_empty() {
        return bad("say who you are (by) and why (reason): both go to the audit trail".into());
    }
    let duration = match request
        .duration
        .as_deref()
        .map(parse_human_duration)
        .transpose()
    {
        Ok(d) => d.map(|d| d.0),
        Err(e) => return bad(format!("invalid \"for\": {e}")),
    };
    match state.policies.set(
        request.mode,
        duration,
        &request.reason,
        &request.by,
        chrono::Utc::now(),
    ) {
        Ok((effective, audit)) => Json(json!({"mode": effective, "audit": audit})).into_response(),
        Err(e @ SwitchError::Persist(_)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
        Err(e) => bad(e.to_string()),
    }
}

async fn admin_reload(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    match state.policies.reload() {
        Ok(()) => Json(json!({"status": "success"})).into_response(),
        Err(e) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_data",
            &format!("{e}; the previous policy stays in force"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_is_counted() {
        let panics = IntCounter::new("p", "p").unwrap();
        let router = Router::new()
            .route(
                "/boom",
                get(|| async {
                    let empty: Vec<u8> = Vec::new();
                    // An out-of-bounds index: a bug the guard must contain.
                    let at = empty.len() + 1;
                    format!("{}", empty[at])
                }),
            )
            .layer(panic_guard(panics.clone()));
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
}
