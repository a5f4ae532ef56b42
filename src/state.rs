//! The state every request shares, built once at start-up from the configuration:
//! each stage's runtime part (identity, the parse memo, policies, the limiter, the
//! cache, the backends with their admission gates) and the background tasks that
//! keep it (forgetting idle budgets, reloading policies). Below both the pipeline
//! and the HTTP surface, which read it.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Gate;
use crate::cache::Cache;
use crate::clock::MonotonicClock;
use crate::config::{Config, PriorityConfig, Secret};
use crate::identity::Identifier;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::request::QueryParser;
use crate::routing::{BackendId, RoutingTable};
use crate::shared::Shared;
use crate::upstream::Upstream;
use crate::warm::Warmer;

/// One configured backend: its client and the gate in front of it.
pub struct Backend {
    /// The HTTP client that forwards to it, and what it learnt about the backend
    /// (how it evaluates unaligned ranges).
    pub upstream: Upstream,
    /// Its admission gate; shared, since every [`crate::admission::Permit`] holds it.
    pub gate: Arc<Gate>,
}

/// Everything the handlers share.
pub struct AppState {
    /// Decides who a request is from (Grafana trust, basic auth, bearer tokens).
    pub identifier: Identifier,
    /// Remembers parsed PromQL: dashboards repeat the same queries.
    pub queries: QueryParser,
    /// Sale windows, rule sets, per-mode user quotas and the SRE switch.
    pub policies: Policies,
    /// Every user's budget state, kept across policy reloads and mode changes.
    pub limiter: Limiter,
    /// Token for `/admin/...`; `None` disables the admin API.
    pub admin_token: Option<Secret>,
    /// Whole answers and range extents, with the in-flight fetches they coalesce onto.
    pub cache: Arc<Cache>,
    /// The backends by [`BackendId`]: `recent` always, `long_term` when configured.
    backends: Vec<Backend>,
    /// Curated dashboards and named users: admission's critical class; curated
    /// dashboards also spend no per-user budget.
    pub priority: PriorityConfig,
    /// No Grafana trust is configured, so dashboard headers cannot be verified and
    /// are believed for priority.
    pub trust_dashboard_headers: bool,
    /// Where routing sends a query: the recent window and whether a long-term store
    /// exists.
    pub routing: RoutingTable,
    /// Self-metrics, served at `/metrics`; tests build their own.
    pub metrics: Metrics,
    /// `max_request_body` in bytes: a longer form body is refused (400) before
    /// it is parsed.
    pub max_request_body: usize,
    /// The backends' lookback delta: how far back an instant selector reads, which
    /// analysis adds to a query's oldest sample.
    pub lookback_delta: Duration,
    /// What this replica shares with the fleet through Redis; `None` without
    /// `shared.redis`.
    pub shared: Option<Arc<Shared>>,
    /// Fills the cache before sale windows, and on demand; keeps the record of
    /// long ranges served.
    pub warmer: Arc<Warmer>,
}

/// How often the maintenance looks for a window to warm before.
pub const WARM_TICK: Duration = Duration::from_secs(5);

impl AppState {
    /// Build the state from a validated configuration.
    ///
    /// # Errors
    ///
    /// When an HTTP client cannot be built, or the policy is invalid.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, String> {
        let mut backends = Vec::with_capacity(2);
        for (id, backend, gate) in [
            (
                BackendId::Recent,
                Some(&config.backends.recent),
                &config.admission.recent,
            ),
            (
                BackendId::LongTerm,
                config.backends.long_term.as_ref(),
                &config.admission.long_term,
            ),
        ] {
            let Some(backend) = backend else { continue };
            backends.push(Backend {
                upstream: Upstream::new(id, backend).map_err(|e| e.to_string())?,
                gate: Gate::new(id.as_str(), gate.for_priority(&config.priority)),
            });
        }
        let policies = Policies::new(
            &config.policy,
            &config.limits,
            metrics.policy_reloads.clone(),
            &metrics.state_file_errors,
        )?;
        record_settings(config, &metrics);
        let shared = Shared::new(config, &metrics.registry)?;
        let warmer = Arc::new(Warmer::new(&config.warm, &metrics.registry)?);
        Ok(AppState {
            warmer,
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
                shared.as_ref().map(|s| s.l2.clone()),
            )),
            routing: RoutingTable {
                recent_window: config.backends.recent.window.0,
                has_long_term: backends.len() > 1,
                split_fetches: config.routing.split_fetches,
            },
            backends,
            priority: config.priority.clone(),
            trust_dashboard_headers: config.identity.grafana.is_none(),
            metrics,
            max_request_body: usize::try_from(config.max_request_body.0).unwrap_or(usize::MAX),
            lookback_delta: config.lookback_delta.0,
            shared,
        })
    }

    /// The backend for a routing decision. Routing only picks `LongTerm` when one
    /// is configured; falling back to `recent` keeps that invariant local.
    pub fn backend(&self, id: BackendId) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.upstream.id == id)
            .unwrap_or(&self.backends[0])
    }

    /// The busy refresh floor for a request routed to `backend`: `cache.busy_refresh`
    /// while that backend, or the recent one that takes the live tails of split
    /// fetches, found a request no slot within that long; zero otherwise.
    pub fn busy_floor(&self, backend: BackendId) -> Duration {
        let floor = self.cache.config().busy_refresh.0;
        let pressed = |id| self.backend(id).gate.pressed_within(floor);
        if pressed(backend) || (self.routing.split_fetches && pressed(BackendId::Recent)) {
            floor
        } else {
            Duration::ZERO
        }
    }

    /// Every configured backend, `recent` first.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter()
    }

    /// How long a request may wait for an answer fetched from `backend`: its own
    /// `timeout` if lower than the backend's, plus the longest admission wait and
    /// a grace, so that the backend's own timeout error arrives first.
    pub fn wait_limit(&self, backend: BackendId, timeout: Option<Duration>) -> Duration {
        let b = self.backend(backend);
        let call = b.upstream.timeout();
        let call = timeout.map_or(call, |t| t.min(call));
        call + b.gate.config().max_wait.0 + Duration::from_secs(2)
    }

    /// Learn, in the background, how `backend` evaluates unaligned ranges (see
    /// [`Upstream::learn_unaligned_ranges`]), when that is not known yet and no
    /// probe ran lately. Asked when the first unaligned range arrives, so that
    /// backends that only ever see Grafana's aligned ranges are never probed;
    /// until it is known, unaligned ranges are cached whole.
    pub fn learn_unaligned_ranges(self: &Arc<Self>, backend: BackendId) {
        if !self.backend(backend).upstream.claim_probe() {
            return;
        }
        let state = self.clone();
        tokio::spawn(async move {
            let upstream = &state.backend(backend).upstream;
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

    /// Say in the log, once at start-up, whether each backend answers its health
    /// path. promguard starts either way (a backend may come up later, and
    /// `/-/ready` keeps telling), but a wrong URL should be seen in the first lines
    /// of the log, not at the first dashboard.
    pub fn spawn_startup_probe(self: &Arc<Self>) {
        let state = self.clone();
        tokio::spawn(async move {
            for backend in state.backends() {
                let upstream = &backend.upstream;
                match upstream.probe().await {
                    Ok(()) => tracing::info!(
                        backend = upstream.id.as_str(),
                        url = upstream.base_url(),
                        "backend answers"
                    ),
                    Err(e) => tracing::warn!(
                        backend = upstream.id.as_str(),
                        url = upstream.base_url(),
                        error = %e,
                        "backend is not reachable; queries routed to it fail until it \
                         answers (check the URL; /-/ready reports it too)"
                    ),
                }
            }
        });
    }

    /// Start the tasks that keep the state: forgetting the budgets of users who
    /// went quiet (every minute), reloading policies when their files change
    /// (every `reload_interval`) or on SIGHUP, warming before a window with
    /// `warm_before` (looked for every [`WARM_TICK`]), and, in a fleet, the
    /// heartbeat and the sale-mode sync.
    pub fn spawn_maintenance(self: &Arc<Self>, reload_interval: Duration) {
        if let Some(shared) = &self.shared {
            let heart = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::shared::HEARTBEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    heart.heartbeat().await;
                }
            });
            let (sync, state) = (shared.clone(), self.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::shared::MODE_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    sync.sync_mode(&state.policies).await;
                }
            });
        }
        let warming = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WARM_TICK);
            loop {
                tick.tick().await;
                warming.warmer.tick(&warming, chrono::Utc::now());
            }
        });
        let janitor = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                janitor.limiter.forget_idle();
            }
        });
        let reloader = self.clone();
        tokio::spawn(async move {
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(reload_interval);
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => reloader.policies.reload_if_changed(),
                    Some(()) = hup => {
                        tracing::info!("SIGHUP: reloading policies");
                        let _ = reloader.policies.reload();
                    }
                }
            }
        });
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
