//! The request pipeline: every stage, in order, for one Prometheus API request.
//!
//! identify → limit → parse → analyse → route → policy → refresh floor → cache →
//! (judge, limit, admit, forward per upstream call). Each stage is a call into its own
//! module; this file only orders them and carries the per-request [`RequestCtx`].
//! Early exits are errors that `error.rs` turns into Prometheus-style responses.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;

use crate::admission::{self, Class, Priority, Wanted};
use crate::analysis::QueryShape;
use crate::cache::{self, CacheStatus, Judge, Waiter};
use crate::error::ProxyError;
use crate::identity::{Caller, Source};
use crate::limits::{LimitError, Quotas, UserSlot};
use crate::policy::Compiled;
use crate::policy::rules::{Decision, Refusal, RuleSet, human};
use crate::policy::state::{Effective, Mode};
use crate::policy::verdict::{Asker, Refused, Verdict, judge_fetch, shape_of, verdict};
use crate::refresh;
use crate::request::{self, ApiRequest, RequestError, RequestKind};
use crate::routing::{self, BackendId, Fetches};
use crate::shared::fleet::Lease;
use crate::state::AppState;
use crate::units::Millis;
use crate::upstream::{UnalignedRanges, UpstreamResponse};

/// Everything known about one request as it moves through the stages.
pub struct RequestCtx {
    /// When the request arrived, for the duration metric and the log line.
    pub started: Instant,
    /// "Now" for this request, fixed once so every stage agrees on it.
    pub now: Millis,
    /// Set once identified; `None` when identification failed.
    pub caller: Option<Caller>,
    /// The admission class, set right after identification.
    pub class: Option<Class>,
    /// The parsed request (a live instant already moved onto its shared instant);
    /// `None` when parsing refused it, so the endpoint label is `none`.
    pub request: Option<Arc<ApiRequest>>,
    /// How the answer was produced, once the cache stage answered; the log's `cache`.
    pub cache: Option<CacheStatus>,
    /// Where routing sent the request, hits included; `none` in the metrics and log
    /// when it ended before routing.
    pub backend: Option<BackendId>,
}

impl RequestCtx {
    /// A context for a request that arrived at `now` (Unix milliseconds).
    pub fn new(now: Millis) -> Self {
        RequestCtx {
            started: Instant::now(),
            now,
            caller: None,
            class: None,
            request: None,
            cache: None,
            backend: None,
        }
    }
}

/// The raw pieces of an HTTP request the pipeline reads.
pub struct Incoming {
    /// The method; forms are read from POST bodies only.
    pub method: Method,
    /// The URL path, checked for canonical form by the parser.
    pub path: String,
    /// The raw URL query string, decoded by the pipeline.
    pub query: Option<String>,
    /// The request headers: credentials, Grafana's headers, `Cache-Control`,
    /// `Accept-Encoding`.
    pub headers: HeaderMap,
    /// Read only for form POSTs, up to `max_request_body`.
    pub body: Body,
    /// The TCP peer's address, for anonymous callers' keys.
    pub client: IpAddr,
    /// Sent by promguard's own warming ([`crate::warm`]): from Explore's class, on
    /// no per-user budget, and not recorded as a query engineers use.
    pub warm: bool,
}

/// Run one request through every stage.
///
/// # Errors
///
/// The first stage that refuses or fails; the caller maps it to a response.
pub async fn handle(
    state: &Arc<AppState>,
    ctx: &mut RequestCtx,
    incoming: Incoming,
) -> Result<Response, ProxyError> {
    let Incoming {
        method,
        path,
        query,
        headers,
        body,
        client,
        warm,
    } = incoming;

    // identify: who is asking
    let caller = if warm {
        Caller::warming(client)
    } else {
        let identified = state.identifier.identify(&headers, client)?;
        if identified.ignored_user_header {
            state.metrics.untrusted_user_header.inc();
        }
        state
            .metrics
            .identity_requests
            .with_label_values(&[identified.caller.identity_label()])
            .inc();
        identified.caller
    };
    let class = admission::classify(&caller, &state.priority, state.trust_dashboard_headers);
    let curated = admission::curated(&caller, &state.priority, state.trust_dashboard_headers);
    ctx.caller = Some(caller);
    ctx.class = Some(class);

    // parse: a typed request, or a local 4xx
    let params = read_params(
        &method,
        query.as_deref(),
        &headers,
        body,
        state.max_request_body,
    )
    .await?;
    let req = request::parse(&method, &path, params, ctx.now, &state.queries)?;
    // Stat, gauge and table panels ask at "now" to the millisecond: every viewer's
    // panel within one instant step becomes one question.
    let live_after = cache::live_after(state.cache.config(), ctx.now);
    let req = Arc::new(
        refresh::share_instant(&req, state.cache.config().instant_step(), live_after)
            .unwrap_or(req),
    );
    ctx.request = Some(req.clone());

    // the mode in force (sale or normal) picks the rules and the user limits
    let mode = state.policies.mode(utc(ctx.now));
    let policy = state.policies.active();

    // analyse, route, decide: which samples it touches, recent Prometheus or the
    // long-term store, and what the rules of the mode in force that judge requests
    // say; the others judge each upstream call, after the cache
    let Verdict {
        shape,
        backend,
        decision,
    } = verdict(
        req.endpoint,
        &req.kind,
        policy.rules(mode.mode),
        &state.routing,
        state.lookback_delta,
        asker(state, ctx),
        ctx.now,
    );
    ctx.backend = Some(backend);
    // refused with a reason, or allowed; exempt callers (curated dashboards,
    // on-call) keep the normal-mode budgets
    let exempt = enforce(state, &policy, &mode, decision)? == Subject::Exempt;
    let budgets = if exempt { Mode::Normal } else { mode.mode };
    let limits = policy.limits(budgets);
    let budget = ctx
        .caller
        .as_ref()
        .filter(|_| !warm)
        .and_then(|c| limits.budget_key(c, curated));

    // refresh floor: live queries of callers who are not exempt move onto the
    // mode's min_refresh clock, so refreshes within one interval share an answer;
    // and while the backend is saturated, onto cache.busy_refresh unless curated
    let floor = policy
        .min_refresh(mode.mode)
        .filter(|_| !exempt)
        .unwrap_or_default();
    let busy = if exempt || warm || class == Class::Critical {
        Duration::ZERO
    } else {
        state.busy_floor(backend)
    };
    let busy_won = busy > floor;
    let floor = floor.max(busy);
    let (req, shape, floored) = on_refresh_floor(state, req, shape, backend, floor, ctx.now);

    // cache: a stored answer is served at once; per-user budgets are spent only by
    // requests that need the backend (and by hits when limits.count_hits is set)
    let no_cache = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("no-cache")));
    // a long range's calls each go to the backend holding what they read
    let fetches = match req.kind {
        RequestKind::Range { start, .. } => {
            routing::fetches(&state.routing, backend, &shape, start, ctx.now)
        }
        _ => Fetches::AsRequest,
    };
    let exact = |id: BackendId| match state.backend(id).upstream.unaligned_ranges() {
        UnalignedRanges::AsAsked => true,
        UnalignedRanges::Realigned => false,
        UnalignedRanges::Unknown => {
            if matches!(req.kind, RequestKind::Range { start, step_ms, .. } if start % step_ms != 0)
            {
                state.learn_unaligned_ranges(id);
            }
            false
        }
    };
    let unaligned_exact = exact(backend)
        && (backend == BackendId::Recent
            || fetches == Fetches::AsRequest
            || exact(BackendId::Recent));
    let mut plan = cache::plan(
        state.cache.config(),
        &req,
        &shape,
        backend,
        fetches,
        no_cache,
        ctx.now,
        floor,
        unaligned_exact,
    );
    if floored {
        let why = if busy_won {
            state.metrics.busy_floored.inc();
            "the metrics backends are busy:".to_string()
        } else {
            format!("in {} mode", mode.mode.as_str())
        };
        plan = plan.noted(&format!(
            "promguard: {why} this panel refreshes at most every {}, so its newest point \
             may be that old",
            human(floor)
        ));
    }
    if !exempt && policy.rules(mode.mode).judges_fetches() {
        plan = plan.judged(fetch_judge(state, ctx, &policy, &mode, backend));
    }
    let spend_request_budget = || match &budget {
        Some(key) => state
            .limiter
            .check_request(limits, key)
            .inspect_err(|e| count_refusal(state, e.reason(), class)),
        None => Ok(()),
    };
    if limits.counts_hits() {
        spend_request_budget()?;
    }
    let gzip = accepts_gzip(&headers);
    let cached = match state.cache.lookup(&plan, req.endpoint) {
        Some(hit) => Some(hit),
        // the fleet's cache, when replicas share one
        // Boxed here and below: the futures of the fleet and of a fetch are large,
        // and held inline they would be moved with every hit's future.
        None => Box::pin(state.cache.lookup_fleet(&plan, req.endpoint, gzip)).await,
    };
    let served = match cached {
        Some(hit) => hit,
        None => {
            if !limits.counts_hits() {
                spend_request_budget()?;
            }
            // limit, admit, forward: once for all identical requests, only what is missing
            let fetch = forwarder(
                state,
                policy.clone(),
                budgets,
                (backend, ctx.now),
                budget.clone(),
            );
            let waiter = Waiter {
                priority: Priority::of(class),
                budget: budget.clone(),
                limit: state.wait_limit(backend, req.timeout),
            };
            // refused after all when the rules hold back calls the cache cannot
            // answer without
            Box::pin(state.cache.serve(plan, req.endpoint, waiter, fetch))
                .await
                .inspect_err(|e| {
                    if let ProxyError::Policy(r) = e {
                        count_rule(
                            &state.metrics.policy_rejections,
                            mode.mode,
                            &r.rule,
                            r.limit,
                        );
                    }
                })?
        }
    };
    ctx.cache = Some(served.cache);
    // the long ranges engineers open, for warming before the next window
    if !warm && let Some(asked) = &ctx.request {
        let dashboard = ctx.caller.as_ref().and_then(|c| c.dashboard.as_deref());
        state.warmer.note(asked, dashboard, ctx.now);
    }

    // A hit is sent gzipped when the client accepts it (Grafana's does): the copy
    // is made once per stored answer, and a tenth of the bytes goes out. A hit in
    // the fleet's cache may come gzipped already, only for such a client.
    let (body, compressed) = match served.body {
        cache::Body::Gzip(gzipped) => (gzipped, true),
        cache::Body::Plain(body) => match served
            .stored
            .as_ref()
            .filter(|_| gzip)
            .and_then(|answer| answer.gzipped().cloned())
        {
            Some(gzipped) => (gzipped, true),
            None => (body, false),
        },
    };
    let mut response = (served.status, body).into_response();
    let headers = response.headers_mut();
    if compressed {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-promguard-backend",
        HeaderValue::from_static(served.sources.as_str()),
    );
    headers.insert("x-cache", HeaderValue::from_static(served.cache.as_str()));
    Ok(response)
}

/// Whether the client takes gzip (`Accept-Encoding: gzip`, not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Whether the mode's rules bind a caller they allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// Exempt from the rules (curated dashboards, on-call users).
    Exempt,
    /// Allowed under the rules.
    Bound,
}

/// Carry out the rules' decision on the request: refuse (counted as a rejection),
/// or allow and count the dry-run rules that would have refused.
fn enforce(
    state: &AppState,
    policy: &Compiled,
    mode: &Effective,
    decision: Decision,
) -> Result<Subject, ProxyError> {
    Ok(carry_out(
        state,
        policy,
        mode,
        decision,
        &state.metrics.policy_rejections,
    )?)
}

/// Carry out a decision of the rules: a refusal counted in `refusals`, or the
/// dry-run rules that would have refused counted and logged.
fn carry_out(
    state: &AppState,
    policy: &Compiled,
    mode: &Effective,
    decision: Decision,
    refusals: &prometheus::IntCounterVec,
) -> Result<Subject, Refused> {
    match decision {
        Decision::Refuse(refusal) => {
            count_rule(refusals, mode.mode, &refusal.rule, refusal.limit);
            Err(refused(policy, mode, refusal))
        }
        Decision::Allow { would_refuse } => {
            for refusal in would_refuse {
                count_rule(
                    &state.metrics.policy_dry_run,
                    mode.mode,
                    &refusal.rule,
                    refusal.limit,
                );
                tracing::warn!(
                    mode = mode.mode.as_str(),
                    rule = refusal.rule,
                    "dry run: {}",
                    refusal.message
                );
            }
            Ok(Subject::Bound)
        }
        Decision::Exempt => Ok(Subject::Exempt),
    }
}

fn count_rule(counter: &prometheus::IntCounterVec, mode: Mode, rule: &str, limit: &str) {
    counter
        .with_label_values(&[mode.as_str(), rule, limit])
        .inc();
}

/// The refusal of `refusal`'s rule in `mode`, as the caller is told it.
fn refused(policy: &Compiled, mode: &Effective, refusal: Refusal) -> Refused {
    Refused {
        mode: mode.describe(),
        message: refusal.message,
        advice: advice(policy.rules(mode.mode)),
        rule: refusal.rule,
        limit: refusal.limit,
    }
}

/// The rules of `mode` that judge upstream calls, for a request routed to
/// `backend`: asked by the cache before each call it would make, counting what
/// they hold back and what their dry runs would.
fn fetch_judge(
    state: &Arc<AppState>,
    ctx: &RequestCtx,
    policy: &Arc<Compiled>,
    mode: &Effective,
    backend: BackendId,
) -> Judge {
    let (state, policy, mode) = (state.clone(), policy.clone(), mode.clone());
    let asker = asker(&state, ctx);
    let (user, dashboard) = (asker.user.to_string(), asker.dashboard.map(str::to_string));
    let now = ctx.now;
    Judge::new(move |call| {
        let asker = Asker {
            user: &user,
            dashboard: dashboard.as_deref(),
        };
        let (_, decision) = judge_fetch(
            call.endpoint,
            &call.kind,
            backend,
            policy.rules(mode.mode),
            &state.routing,
            state.lookback_delta,
            asker,
            now,
        );
        carry_out(&state, &policy, &mode, decision, &state.metrics.policy_held).map(drop)
    })
}

/// What the cache runs for each piece it must fetch: the caller's upstream budget
/// and in-flight slot (limit), a slot on the backend that holds what the piece
/// reads (`routed`: where the request, as of its `now`, was routed; admit), then
/// the call (forward). Each refusal ends the fetch; the cache may still cover it
/// with a stale answer.
fn forwarder(
    state: &Arc<AppState>,
    policy: Arc<Compiled>,
    mode: Mode,
    routed: (BackendId, Millis),
    budget: Option<Arc<str>>,
) -> impl Fn(ApiRequest, Wanted) -> BoxFuture<'static, Result<UpstreamResponse, ProxyError>>
+ Send
+ Sync
+ 'static {
    let state = state.clone();
    move |req, priority| {
        let state = state.clone();
        let policy = policy.clone();
        let budget = budget.clone();
        Box::pin(async move {
            let class = || priority.now().class;
            let quotas = policy.limits(mode);
            let _user_slots = match &budget {
                Some(key) => Some(
                    user_slots(&state, quotas, key)
                        .await
                        .inspect_err(|e| count_refusal(&state, e.reason(), class()))?,
                ),
                None => None,
            };
            let (request, now) = routed;
            let reads = || shape_of(&req.kind, state.lookback_delta);
            let target = routing::route_fetch(&state.routing, request, req.endpoint, reads, now);
            let backend = state.backend(target);
            let slot = backend
                .gate
                .admit(priority.clone())
                .await
                .inspect_err(|e| count_refusal(&state, e.why.as_str(), e.class))?;
            // the fleet's cap on the backend, when replicas share one
            let _fleet_slot = match &state.shared {
                Some(shared) => Some(
                    shared
                        .fleet
                        .admit(backend.upstream.id, class(), slot.deadline, || {
                            backend.gate.press();
                        })
                        .await
                        .map_err(|_| backend.gate.fleet_full(class()))
                        .inspect_err(|e| count_refusal(&state, e.why.as_str(), e.class))?,
                ),
                None => None,
            };
            state
                .metrics
                .admission_wait
                .with_label_values(&[backend.upstream.id.as_str()])
                .observe(slot.waited.as_secs_f64());
            Ok(backend.upstream.forward(&req, &state.metrics).await?)
        })
    }
}

/// The caller's per-user limits for one upstream call: its upstream budget and one
/// of its in-flight slots, on this replica and, in a fleet, across it.
async fn user_slots(
    state: &AppState,
    quotas: &Quotas,
    key: &Arc<str>,
) -> Result<(UserSlot, Option<Lease>), LimitError> {
    state.limiter.check_upstream(quotas, key)?;
    if let Some(shared) = &state.shared {
        shared
            .fleet
            .spend_upstream(key, quotas.upstream_rate(key))
            .await?;
    }
    let local = state.limiter.acquire(quotas, key).await?;
    let fleet = match &state.shared {
        Some(shared) => {
            shared
                .fleet
                .user_slot(key, quotas.max_in_flight(key), quotas.in_flight_wait())
                .await?
        }
        None => None,
    };
    Ok((local, fleet))
}

/// Who asks, as the rules may believe it: the dashboard only from the trusted
/// Grafana, or from anyone when no Grafana trust is configured.
fn asker<'a>(state: &AppState, ctx: &'a RequestCtx) -> Asker<'a> {
    let caller = ctx.caller.as_ref();
    let trusted = caller.is_some_and(|c| {
        state.trust_dashboard_headers || matches!(c.source, Source::GrafanaUser | Source::Grafana)
    });
    Asker {
        user: caller.map_or("", |c| &*c.user),
        dashboard: caller
            .filter(|_| trusted)
            .and_then(|c| c.dashboard.as_deref()),
    }
}

/// `req` snapped to the refresh floor, with its shape and `true`, when the floor
/// moves it and it still goes to the backend the policy decided on; as it was
/// otherwise.
fn on_refresh_floor(
    state: &AppState,
    req: Arc<ApiRequest>,
    shape: QueryShape,
    backend: BackendId,
    floor: Duration,
    now: Millis,
) -> (Arc<ApiRequest>, QueryShape, bool) {
    let live_after = cache::live_after(state.cache.config(), now);
    let Some(snapped) = refresh::snap(&req, floor, live_after) else {
        return (req, shape, false);
    };
    let snapped_shape = shape_of(&snapped.kind, state.lookback_delta);
    if routing::route(&state.routing, snapped.endpoint, &snapped_shape, now) != backend {
        return (req, shape, false);
    }
    (Arc::new(snapped), snapped_shape, true)
}

/// What to do instead of a refused query.
fn advice(rules: &RuleSet) -> String {
    let mut text =
        "Narrow the panel's time range or its selectors' [ranges] and offsets".to_string();
    if !rules.exempt_dashboards.is_empty() {
        text.push_str(&format!(
            ", or use the curated dashboards ({})",
            rules.exempt_dashboards.join(", ")
        ));
    }
    text
}

fn utc(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn count_refusal(state: &AppState, reason: &str, class: Class) {
    state
        .metrics
        .rejections
        .with_label_values(&[reason, class.as_str()])
        .inc();
}

/// Decode the URL query and, for form POSTs, the body. Body values come first, as
/// in Prometheus (Go's `ParseForm`), so they win when a name appears in both.
async fn read_params(
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<(String, String)>, RequestError> {
    let mut params = Vec::new();
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if *method == Method::POST && is_form {
        let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
            if is_length_limit(&e) {
                RequestError::BodyTooLarge { limit }
            } else {
                RequestError::Body(e.to_string())
            }
        })?;
        params.extend(request::decode_form(&body)?);
    }
    if let Some(q) = query {
        params.extend(request::decode_form(q.as_bytes())?);
    }
    Ok(params)
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_sent_only_to_clients_that_accept_it() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(with("gzip"), "Grafana's Go client");
        assert!(with("deflate, gzip;q=0.5, br"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("gzip; q=0.000"));
        assert!(!with("br, deflate"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
