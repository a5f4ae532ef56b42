//! Stage 7, cache: identical queries cost the backend once; refreshes fetch only
//! what is new.
//!
//! [`plan`] decides, without I/O, how a request is cached: whole answers (instant
//! queries, metadata, range queries pinned with `@ start()`/`@ end()`) or range
//! extents. [`Cache::serve`] answers from the store, or runs one coalesced upstream
//! fetch per distinct answer, for range queries only of the missing spans, then
//! stitches, stores and answers; when the backend fails it falls back to a stale
//! answer with a warning. A [`Judge`] may hold back calls the caller's rules
//! refuse: the answer then comes from what the cache holds, with a warning that
//! says what is missing and why, and only a request it holds nothing for is
//! refused.

pub mod coalesce;
pub mod extent;
pub mod key;
pub mod matrix;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec};

use crate::admission::{Priority, Wanted};
use crate::analysis::QueryShape;
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::policy::verdict::Refused;
use crate::request::{ApiRequest, Endpoint, RequestKind};
use crate::routing::{BackendId, Fetches, Sources};
use crate::shared::envelope::Payload;
use crate::shared::l2::{FetchLock, L2, Lead, SharedAnswer};
use crate::units::{Millis, millis};
use crate::upstream::UpstreamResponse;
use coalesce::{Coalescer, Outcome};
use extent::{
    Grid, Span, assemble, chunk_interval, chunks_of, cut_at, missing, short_of, updated_chunks,
};
use key::{CacheKey, SeriesKey, answer_key, range_typed, series_key};
use matrix::Matrix;
use store::{Chunk, Store};

/// How an answer was produced. Feeds the `X-Cache` header and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from the store without asking the backend: a fresh answer (or one
    /// younger than the caller's refresh floor), or a range wholly in extents.
    Hit,
    /// Fetched from the backend in full; requests that joined the same fetch see
    /// the same status.
    Miss,
    /// Part from cache, part fetched.
    Partial,
    /// The backend failed; an older answer was served with a warning.
    Stale,
    /// Not cached: the endpoint is never cached, or the client sent `no-cache`.
    Bypass,
}

impl CacheStatus {
    /// The metric label: the header value in lower case.
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Partial => "partial",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }

    /// The `X-Cache` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Partial => "PARTIAL",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// Who waits on an answer the cache must fetch: how urgent, whose per-user
/// budget they spend, and how long they may wait for a fetch shared with others.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// How urgent the request is; joins the fetch's priority when it waits on one.
    pub priority: Priority,
    /// The per-user budget it spends ([`crate::limits::Quotas::budget_key`]);
    /// `None` spends none. A waiter refused for another caller's budget fetches again
    /// as itself.
    pub budget: Option<Arc<str>>,
    /// How long it may wait for a shared fetch
    /// ([`crate::state::AppState::wait_limit`]), so a stuck fetch cannot hold it forever.
    pub limit: Duration,
}

/// How waiting on a shared fetch can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The flight it waited on ended without a result; a bug (500).
    #[error(
        "the shared fetch this request waited on ended without an answer (a bug, logged); \
         retry"
    )]
    Lost,
    /// The shared fetch did not finish within the waiter's limit (504); it goes
    /// on for any others still waiting on it.
    #[error("waited {} ms for the shared fetch of this answer, this request's limit", after.as_millis())]
    Waited {
        /// How long it waited: its [`Waiter::limit`].
        after: Duration,
    },
}

/// An answer's bytes as they go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// As the backend, the stitching or the cache has them; sent gzipped when the
    /// stored answer has a gzip copy and the client takes gzip.
    Plain(Bytes),
    /// Gzipped already: a hit in the fleet's cache, only for a client that takes
    /// gzip.
    Gzip(Bytes),
}

/// An answer ready to send.
#[derive(Debug, Clone)]
pub struct Served {
    /// The backend's status when fetched; `200` for hits, stale answers and stitched
    /// ranges.
    pub status: StatusCode,
    /// The exact bytes to send: the backend's, stitched extents, or a stale answer
    /// with its warning.
    pub body: Body,
    /// How the answer was produced, for `X-Cache` and the lookup metrics.
    pub cache: CacheStatus,
    /// The stored answer a hit came from, which can also be sent gzipped.
    pub stored: Option<Arc<store::Answer>>,
    /// The backends the answer came from: `X-Promguard-Backend`.
    pub sources: Sources,
}

/// Whether the caller's rules let one upstream call be made: `Err` holds it
/// back, and the cache answers from what it holds instead.
#[derive(Clone)]
pub struct Judge(Arc<Rules>);

/// The rules behind a [`Judge`]: `Err` for a call they refuse.
type Rules = dyn Fn(&ApiRequest) -> Result<(), Refused> + Send + Sync;

impl Judge {
    /// A judge that asks `rules` about every call.
    pub fn new(rules: impl Fn(&ApiRequest) -> Result<(), Refused> + Send + Sync + 'static) -> Self {
        Judge(Arc::new(rules))
    }

    fn allows(&self, call: &ApiRequest) -> Result<(), Refused> {
        (self.0)(call)
    }
}

impl std::fmt::Debug for Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Judge")
    }
}

/// What only some callers' answers carry: their rules' judgement of each call,
/// and a warning that says why their answer differs from a plain one. Each gives
/// the answer a key of its own, so nobody else is served it.
#[derive(Debug, Clone, Default)]
struct Terms {
    judge: Option<Judge>,
    /// Stored with the answer, so a hit sends it without re-encoding.
    note: Option<Arc<str>>,
}

/// A whole answer's key, what to send upstream, and how long it stays fresh.
#[derive(Debug, Clone)]
pub struct WholePlan {
    key: CacheKey,
    request: ApiRequest,
    fresh: Duration,
    /// A stored answer younger than this is a hit for this caller however fresh
    /// it is for others (the policy's `min_refresh`).
    floor: Duration,
    terms: Terms,
}

/// A range query cached as extents.
#[derive(Debug, Clone)]
pub struct RangePlan {
    key: CacheKey,
    series: SeriesKey,
    grid: Grid,
    want: Span,
    /// Grid points at or before this are immutable and go into extents; later ones
    /// may still change as late samples arrive.
    stable_to: Millis,
    request: ApiRequest,
    floor: Duration,
    /// Where its fetches are cut so that each part goes to the backend holding it
    /// (on the grid; see [`Fetches::Split`]).
    recent_from: Option<Millis>,
    terms: Terms,
}

/// How one request uses the cache; decided by [`plan`] before any I/O.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Forward as is; with `refresh`, store the answer for later requests.
    Bypass {
        /// What to send upstream: the request, snapped like a whole answer's when one
        /// is refreshed.
        request: ApiRequest,
        /// Set when the client's `no-cache` skipped a cacheable whole answer: the fresh
        /// answer still replaces the stored one.
        refresh: Option<WholePlan>,
        /// The caller's rules, which may refuse the call.
        judge: Option<Judge>,
    },
    /// Cached as one answer: instant queries, metadata, ranges that cannot be split.
    Whole(WholePlan),
    /// Cached as extents, fetching only the spans the store lacks.
    Range(RangePlan),
}

impl Plan {
    /// The plan for a caller whose rules judge each upstream call: a call they
    /// refuse is not made, and the answer comes from what the cache holds, kept
    /// (with its warning) under a key of its own.
    #[must_use]
    pub fn judged(mut self, judge: Judge) -> Plan {
        match &mut self {
            Plan::Bypass { judge: j, .. } => *j = Some(judge),
            Plan::Whole(w) => w.terms.judge = Some(judge),
            Plan::Range(r) => r.terms.judge = Some(judge),
        }
        self
    }

    /// The plan for an answer that carries `note` as its Prometheus warning,
    /// stored with it under a key of its own.
    #[must_use]
    pub fn noted(mut self, note: &str) -> Plan {
        let (key, terms) = match &mut self {
            Plan::Bypass { .. } => return self,
            Plan::Whole(w) => (&mut w.key, &mut w.terms),
            Plan::Range(r) => (&mut r.key, &mut r.terms),
        };
        *key = CacheKey(format!("{}\u{0}note={note}", key.0).into());
        terms.note = Some(note.into());
        self
    }
}

/// Where an answer served past held-back calls is kept: beside the plain answer,
/// which callers whose rules refuse nothing must never be served.
fn held_key(key: &CacheKey) -> CacheKey {
    CacheKey(format!("{}\u{0}held", key.0).into())
}

/// Decide how `req` (routed to `backend`, its range's calls as `fetches` says) is
/// cached. `no_cache` is the client's `Cache-Control: no-cache`; `floor` is how old
/// a stored answer this caller accepts as a hit regardless of its freshness (zero:
/// none); `unaligned_exact` says the backends evaluate ranges on any grid asked
/// for. Pure.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    config: &CacheConfig,
    req: &ApiRequest,
    shape: &QueryShape,
    backend: BackendId,
    fetches: Fetches,
    no_cache: bool,
    now: Millis,
    floor: Duration,
    unaligned_exact: bool,
) -> Plan {
    let volatile_after = live_after(config, now);
    let fresh_for = |newest: Option<Millis>| match newest {
        Some(n) if n > volatile_after => config.fresh_ttl.0,
        _ => config.extent_ttl.0,
    };
    let whole = |request: ApiRequest, typed: &str, fresh: Duration| WholePlan {
        key: answer_key(&request, backend, typed),
        request,
        fresh,
        floor,
        terms: Terms::default(),
    };
    let planned = match &req.kind {
        _ if !config.enabled => None,
        RequestKind::Range {
            query,
            start,
            end,
            step_ms,
        } => {
            let canonical = &query.canonical;
            let typed = |from: Millis, to: Millis| range_typed(canonical, from, to, *step_ms);
            let grid = Grid::new(*start, *step_ms);
            // Extents need every step evaluated on the grid asked for. Prometheus
            // does that for any grid; other stores may move an unaligned range onto
            // multiples of the step (VictoriaMetrics does from 50 points on), so
            // for them unaligned ranges are cached as whole answers, exactly as the
            // store gave them.
            let extents_exact = grid.phase == 0 || unaligned_exact;
            match grid.span_within(*start, *end) {
                Some(want) if !shape.uses_range_bounds && extents_exact => {
                    // A negative offset reads samples after the evaluation time.
                    let ahead = shape.newest.map_or(0, |n| (n - end).max(0));
                    let stable_to = grid.at_or_before(volatile_after.saturating_sub(ahead));
                    Some(Plan::Range(RangePlan {
                        // The answer is its grid points, so ends that fall between
                        // the same two steps (a script asking at "now") share it.
                        key: answer_key(req, backend, &typed(want.from, want.to)),
                        series: series_key(
                            req,
                            (fetches == Fetches::AsRequest).then_some(backend),
                            canonical,
                            *step_ms,
                            *start,
                        ),
                        grid,
                        want,
                        stable_to,
                        request: req.clone(),
                        floor,
                        recent_from: match fetches {
                            Fetches::Split {
                                recent_from: Some(at),
                            } if at > want.from => Some(grid.at_or_after(at)),
                            _ => None,
                        },
                        terms: Terms::default(),
                    }))
                }
                _ => Some(Plan::Whole(whole(
                    req.clone(),
                    &typed(*start, *end),
                    fresh_for(shape.newest),
                ))),
            }
        }
        RequestKind::Instant { query, time } => Some(Plan::Whole(whole(
            req.clone(),
            &format!("{}\u{0}@{time}", query.canonical),
            fresh_for(shape.newest),
        ))),
        RequestKind::Metadata {
            matchers,
            start,
            end,
        } => {
            // Snapped to the minute (unbounded spans stay unbounded) so the metric
            // browser's storms share answers.
            let start = start.map(|s| if s > Millis::MIN { floor_minute(s) } else { s });
            let end = end.map(|e| if e < Millis::MAX { ceil_minute(e) } else { e });
            let typed = format!("{}\u{0}{start:?}..{end:?}", matchers.join("\u{0}"));
            let snapped = ApiRequest {
                kind: RequestKind::Metadata {
                    matchers: matchers.clone(),
                    start,
                    end,
                },
                ..req.clone()
            };
            Some(Plan::Whole(whole(snapped, &typed, config.metadata_ttl.0)))
        }
        RequestKind::Static
            if matches!(
                req.endpoint,
                Endpoint::Metadata | Endpoint::Rules | Endpoint::BuildInfo
            ) =>
        {
            Some(Plan::Whole(whole(req.clone(), "", config.metadata_ttl.0)))
        }
        RequestKind::Static | RequestKind::Exemplars { .. } => None,
    };
    match planned {
        None => Plan::Bypass {
            request: req.clone(),
            refresh: None,
            judge: None,
        },
        Some(Plan::Whole(w)) if no_cache => Plan::Bypass {
            request: w.request.clone(),
            refresh: Some(w),
            judge: None,
        },
        Some(Plan::Range(r)) if no_cache => Plan::Bypass {
            request: r.request,
            refresh: None,
            judge: None,
        },
        Some(p) => p,
    }
}

/// Where the live window starts at `now`: points after it may still change as
/// late samples arrive (`cache.fresh_window`).
pub fn live_after(config: &CacheConfig, now: Millis) -> Millis {
    now.saturating_sub(millis(config.fresh_window.0))
}

fn floor_minute(t: Millis) -> Millis {
    t.div_euclid(60_000).saturating_mul(60_000)
}

fn ceil_minute(t: Millis) -> Millis {
    floor_minute(t.saturating_add(59_999))
}

/// Cache metrics, cloned out of [`Metrics`].
struct CacheMetrics {
    lookups: IntCounterVec,
    coalesced: IntCounterVec,
    points_fetched: IntCounter,
    points_served: IntCounter,
}

/// The cache stage: store, in-flight fetches and settings.
pub struct Cache {
    store: Store,
    clock: Arc<dyn Clock>,
    flights: Coalescer<CacheKey, Result<Served, ProxyError>, Priority>,
    config: CacheConfig,
    metrics: CacheMetrics,
    /// The fleet's cache behind this one, when replicas share Redis.
    fleet: Option<Arc<L2>>,
}

/// The result of one upstream fetch as the cache sees it.
type Fetched = Result<UpstreamResponse, ProxyError>;

impl Cache {
    /// A cache judging freshness and age on `clock`, in front of the fleet's cache
    /// `fleet` when there is one.
    pub fn new(
        config: CacheConfig,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
        fleet: Option<Arc<L2>>,
    ) -> Self {
        Cache {
            fleet,
            store: Store::new(config.max_bytes.0, metrics.cache_evictions.clone()),
            clock,
            flights: Coalescer::default(),
            metrics: CacheMetrics {
                lookups: metrics.cache_lookups.clone(),
                coalesced: metrics.cache_coalesced.clone(),
                points_fetched: metrics.cache_points_fetched.clone(),
                points_served: metrics.cache_points_served.clone(),
            },
            config,
        }
    }

    /// The cache settings, which the pipeline also reads (live window, instant step).
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Entries and bytes held, for the gauges.
    pub fn usage(&self) -> (u64, u64) {
        self.store.usage()
    }

    /// A stored answer `plan` can be served from as it is, counted as a hit: the
    /// plain answer, or for a judged plan the one served past held-back calls.
    pub fn lookup(&self, plan: &Plan, endpoint: Endpoint) -> Option<Served> {
        let hit = match plan {
            Plan::Bypass { .. } => None,
            Plan::Whole(w) => self.fresh_for(&w.key, w.floor, &w.terms),
            Plan::Range(r) => self.fresh_for(&r.key, r.floor, &r.terms),
        }?;
        self.metrics
            .lookups
            .with_label_values(&[endpoint.as_str(), CacheStatus::Hit.label()])
            .inc();
        if let Some(fleet) = &self.fleet {
            fleet.count_l1_hit();
        }
        Some(hit)
    }

    /// After [`Cache::lookup`] missed: an answer another replica stored in the
    /// fleet's cache, fresh for this caller, kept here too and counted as a hit.
    /// A gzipped one goes out as it came to a client that takes gzip (`gzip`), and
    /// is inflated for this replica's cache after the answer. Nothing without a
    /// fleet, or when Redis does not answer in time.
    pub async fn lookup_fleet(
        self: &Arc<Self>,
        plan: &Plan,
        endpoint: Endpoint,
        gzip: bool,
    ) -> Option<Served> {
        let fleet = self.fleet.as_ref()?;
        let (key, floor) = match plan {
            Plan::Bypass { .. } => return None,
            Plan::Whole(w) => (&w.key, w.floor),
            Plan::Range(r) => (&r.key, r.floor),
        };
        let shared = fleet.answer(key).await.filter(|a| a.is_fresh(floor))?;
        let served = match (&shared.body, gzip) {
            (Payload::Gzip(gzipped), true) => {
                let body = Body::Gzip(gzipped.clone());
                let sources = shared.sources;
                let (this, fleet, key) = (self.clone(), fleet.clone(), key.clone());
                tokio::spawn(async move {
                    if let Some(plain) = fleet.plain(&shared).await {
                        this.adopt(&key, &shared, plain);
                    }
                });
                Served {
                    status: StatusCode::OK,
                    body,
                    cache: CacheStatus::Hit,
                    stored: None,
                    sources,
                }
            }
            _ => {
                let plain = fleet.plain(&shared).await?;
                self.adopted_hit(key, &shared, plain)
            }
        };
        self.metrics
            .lookups
            .with_label_values(&[endpoint.as_str(), CacheStatus::Hit.label()])
            .inc();
        fleet.count_l2_hit();
        Some(served)
    }

    /// Keep an answer from the fleet's cache here (its bytes `plain`, and its
    /// gzip copy if it came gzipped), with the age it has there.
    fn adopt(&self, key: &CacheKey, shared: &SharedAnswer, plain: Bytes) -> Arc<store::Answer> {
        let now = self.clock.now();
        let stored = now.checked_sub(shared.age).unwrap_or(now);
        let left = shared.fresh.saturating_sub(shared.age);
        self.metrics.points_served.inc_by(shared.points);
        let answer = self.store.put_answer(
            key.clone(),
            plain,
            shared.points,
            shared.sources,
            stored,
            shared.fresh,
            self.keep_for(left),
        );
        if let Payload::Gzip(gzipped) = &shared.body {
            answer.offer_gzipped(gzipped.clone());
        }
        answer
    }

    /// [`Cache::adopt`], served as a hit.
    fn adopted_hit(&self, key: &CacheKey, shared: &SharedAnswer, plain: Bytes) -> Served {
        let answer = self.adopt(key, shared, plain);
        Served {
            status: StatusCode::OK,
            body: Body::Plain(answer.body.clone()),
            cache: CacheStatus::Hit,
            sources: answer.sources,
            stored: Some(answer),
        }
    }

    /// Store an answer here and, in the background, in the fleet's cache; the
    /// fleet's write, if any.
    fn put_answer(
        &self,
        key: &CacheKey,
        body: &Bytes,
        points: u64,
        sources: Sources,
        fresh: Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let keep = self.keep_for(fresh);
        let answer = self.store.put_answer(
            key.clone(),
            body.clone(),
            points,
            sources,
            self.clock.now(),
            fresh,
            keep,
        );
        self.fleet
            .as_ref()
            .map(|fleet| fleet.put_answer(key, answer, fresh, keep))
    }

    /// Who fetches `key` across the fleet: this replica (with the lock, or alone
    /// when there is no fleet or Redis fails), or another one whose answer arrived
    /// within `wait`.
    async fn lead(&self, key: &CacheKey, wait: Duration) -> Result<Option<FetchLock>, Served> {
        match &self.fleet {
            None => Ok(None),
            Some(fleet) => match fleet.lead(key, wait).await {
                Lead::Fetch(lock) => Ok(lock),
                Lead::Answer(shared) => match fleet.plain(&shared).await {
                    Some(plain) => {
                        fleet.count_l2_hit();
                        Err(self.adopted_hit(key, &shared, plain))
                    }
                    None => Ok(None),
                },
            },
        }
    }

    /// Answer per `plan`, calling `fetch(params)` for whatever must come from the
    /// backend.
    ///
    /// # Errors
    ///
    /// The fetch's error (upstream failure, limit, shed), when no stale answer can
    /// cover it.
    pub async fn serve<F, Fut>(
        self: &Arc<Self>,
        plan: Plan,
        endpoint: Endpoint,
        waiter: Waiter,
        fetch: F,
    ) -> Result<Served, ProxyError>
    where
        F: Fn(ApiRequest, Wanted) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let fetch = Arc::new(fetch);
        let result = match plan {
            Plan::Bypass {
                request,
                refresh,
                judge,
            } => {
                if let Some(refused) = judge.and_then(|j| j.allows(&request).err()) {
                    return Err(refused.into());
                }
                let response = fetch(request, Wanted::Fixed(waiter.priority)).await;
                if let (Some(w), Ok(r)) = (&refresh, &response) {
                    let _ = self.keep(w, r);
                }
                response.map(|r| Served {
                    status: r.status,
                    body: Body::Plain(r.body),
                    cache: CacheStatus::Bypass,
                    stored: None,
                    sources: Sources::of(r.backend),
                })
            }
            Plan::Whole(w) => match self.fresh_for(&w.key, w.floor, &w.terms) {
                Some(hit) => Ok(hit),
                None => {
                    let (flight, answer) = flight_keys(&w.key, &w.terms);
                    let this = self.clone();
                    let limit = waiter.limit;
                    let work = move |priority| {
                        this.clone()
                            .fill_whole(w.clone(), fetch.clone(), priority, limit)
                    };
                    self.coalesced(flight, &answer, endpoint, &waiter, work)
                        .await
                }
            },
            Plan::Range(r) => match self.fresh_for(&r.key, r.floor, &r.terms) {
                Some(hit) => Ok(hit),
                None => {
                    let (flight, answer) = flight_keys(&r.key, &r.terms);
                    let this = self.clone();
                    let limit = waiter.limit;
                    let work = move |priority| {
                        this.clone()
                            .fill_range(r.clone(), fetch.clone(), priority, limit)
                    };
                    self.coalesced(flight, &answer, endpoint, &waiter, work)
                        .await
                }
            },
        };
        if let Ok(served) = &result {
            self.metrics
                .lookups
                .with_label_values(&[endpoint.as_str(), served.cache.label()])
                .inc();
        }
        result
    }

    /// [`Cache::fresh`], and for a judged plan also the answer served past
    /// held-back calls.
    fn fresh_for(&self, key: &CacheKey, floor: Duration, terms: &Terms) -> Option<Served> {
        self.fresh(key, floor).or_else(|| {
            terms
                .judge
                .as_ref()
                .and_then(|_| self.fresh(&held_key(key), floor))
        })
    }

    /// A stored answer that is fresh, or younger than `floor`, as a hit.
    fn fresh(&self, key: &CacheKey, floor: Duration) -> Option<Served> {
        let answer = self.store.answer(key)?;
        let now = self.clock.now();
        (now < answer.fresh_until || now.duration_since(answer.stored) < floor).then(|| {
            self.metrics.points_served.inc_by(answer.points);
            Served {
                status: StatusCode::OK,
                body: Body::Plain(answer.body.clone()),
                cache: CacheStatus::Hit,
                stored: Some(answer.clone()),
                sources: answer.sources,
            }
        })
    }

    /// Run `work` once for all concurrent callers of `key`, at the priority of all
    /// of them; if it fails, fall back to a stale answer stored under `answer`. A
    /// waiter refused only
    /// because the caller who started the fetch was over *its* per-user budget
    /// runs the fetch again as its own, once: nobody is refused for someone
    /// else's budget.
    async fn coalesced<W, Fut>(
        &self,
        key: CacheKey,
        answer: &CacheKey,
        endpoint: Endpoint,
        waiter: &Waiter,
        work: W,
    ) -> Result<Served, ProxyError>
    where
        W: Fn(Wanted) -> Fut,
        Fut: Future<Output = Result<Served, ProxyError>> + Send + 'static,
    {
        let mut again = true;
        let result = loop {
            let outcome = self
                .flights
                .run(key.clone(), waiter.priority, waiter.limit, |rises| {
                    work(Wanted::Rising(rises))
                })
                .await;
            let (result, joined) = match outcome {
                Outcome::Led(v) => (v, false),
                Outcome::Joined(v) => (v, true),
                Outcome::Lost => (Err(CacheError::Lost.into()), false),
                Outcome::TimedOut(after) => (Err(CacheError::Waited { after }.into()), false),
            };
            if joined {
                self.metrics
                    .coalesced
                    .with_label_values(&[endpoint.as_str()])
                    .inc();
            }
            match &result {
                Err(ProxyError::Limit(e))
                    if joined && again && Some(e.user()) != waiter.budget.as_deref() =>
                {
                    again = false;
                }
                _ => break result,
            }
        };
        match result {
            Err(e) => match self.stale(answer, &e.to_string()) {
                Some(stale) => Ok(stale),
                None => self.fleet_stale(answer, &e.to_string()).await.ok_or(e),
            },
            ok => ok,
        }
    }

    /// [`Cache::stale`] from the fleet's cache: another replica's answer, within
    /// the stale limit.
    async fn fleet_stale(&self, key: &CacheKey, reason: &str) -> Option<Served> {
        let fleet = self.fleet.as_ref()?;
        let shared = fleet
            .answer(key)
            .await
            .filter(|shared| shared.age <= self.config.stale_max_age.0)?;
        let plain = fleet.plain(&shared).await?;
        let warning = format!(
            "promguard served a cached answer {}s old because: {reason}",
            shared.age.as_secs()
        );
        Some(Served {
            status: StatusCode::OK,
            body: Body::Plain(with_warning(&plain, &warning)),
            cache: CacheStatus::Stale,
            stored: None,
            sources: shared.sources,
        })
    }

    /// An older answer for `key`, within the stale limit, with a warning that says
    /// how old it is and why it is served. Grafana shows the warning on the panel.
    pub fn stale(&self, key: &CacheKey, reason: &str) -> Option<Served> {
        let answer = self.store.answer(key)?;
        let age = self.clock.now().duration_since(answer.stored);
        if age > self.config.stale_max_age.0 {
            return None;
        }
        let warning = format!(
            "promguard served a cached answer {}s old because: {reason}",
            age.as_secs()
        );
        Some(Served {
            status: StatusCode::OK,
            body: Body::Plain(with_warning(&answer.body, &warning)),
            cache: CacheStatus::Stale,
            stored: None,
            sources: answer.sources,
        })
    }

    fn keep_for(&self, fresh: Duration) -> Duration {
        fresh.max(self.config.stale_max_age.0)
    }

    /// Store a successful whole answer without warnings (with the plan's note, as
    /// `response` carries it now); the fleet's write, if any.
    fn keep(
        &self,
        w: &WholePlan,
        response: &UpstreamResponse,
    ) -> Option<tokio::task::JoinHandle<()>> {
        (response.status.is_success() && !has_warnings(&response.body))
            .then(|| {
                self.put_answer(
                    &w.key,
                    &noted(response.body.clone(), &w.terms),
                    0,
                    Sources::of(response.backend),
                    w.fresh,
                )
            })
            .flatten()
    }

    /// Fetch a whole answer, unless another replica of the fleet fetches it
    /// meanwhile (then its answer, within `wait`).
    async fn fill_whole<F, Fut>(
        self: Arc<Self>,
        w: WholePlan,
        fetch: Arc<F>,
        priority: Wanted,
        wait: Duration,
    ) -> Result<Served, ProxyError>
    where
        F: Fn(ApiRequest, Wanted) -> Fut,
        Fut: Future<Output = Fetched>,
    {
        if let Some(refused) = w
            .terms
            .judge
            .as_ref()
            .and_then(|j| j.allows(&w.request).err())
        {
            return Err(refused.into());
        }
        let mut fleet_lock = match self.lead(&w.key, wait).await {
            Ok(lock) => lock,
            Err(served) => return Ok(served),
        };
        let response = fetch(w.request.clone(), priority).await?;
        if let (Some(lock), Some(write)) = (fleet_lock.as_mut(), self.keep(&w, &response)) {
            lock.after(write);
        }
        let mut served = uncached(response);
        if served.status.is_success()
            && let Body::Plain(body) = served.body
        {
            served.body = Body::Plain(noted(body, &w.terms));
        }
        Ok(served)
    }

    /// Fetch the spans the extents (here, or in the fleet's cache) lack, keep their
    /// immutable part, and stitch the answer from extents and fetched pieces; or,
    /// when another replica of the fleet answers the same range meanwhile, its
    /// answer, within `wait`.
    async fn fill_range<F, Fut>(
        self: Arc<Self>,
        r: RangePlan,
        fetch: Arc<F>,
        priority: Wanted,
        wait: Duration,
    ) -> Result<Served, ProxyError>
    where
        F: Fn(ApiRequest, Wanted) -> Fut,
        Fut: Future<Output = Fetched>,
    {
        let mut fleet_lock = match self.lead(&r.key, wait).await {
            Ok(lock) => lock,
            Err(served) => return Ok(served),
        };
        let step = r.grid.step;
        let interval = chunk_interval(step);
        let mut cached: Vec<(i64, Arc<Chunk>)> = Vec::new();
        // Chunks to ask the fleet for: those not held here, and those held here
        // short of the immutable points wanted (the chunk still growing), which
        // another replica serving the same panel may have extended since.
        let mut ask = Vec::new();
        let stable = r.want.intersect(&Span {
            from: r.want.from,
            to: r.stable_to,
        });
        for i in chunks_of(r.want, interval) {
            match self.store.chunk(&r.series, i) {
                Some(c) => {
                    if self.fleet.is_some() && short_of(&r.grid, interval, stable, i, &c.span) {
                        ask.push(i);
                    }
                    cached.push((i, c));
                }
                None => ask.push(i),
            }
        }
        if let Some(fleet) = &self.fleet {
            for shared in fleet.chunks(&r.series, &ask).await {
                let local = cached.iter().position(|(i, _)| *i == shared.index);
                if let Some(at) = local
                    && !shared.span.covers(&cached[at].1.span)
                {
                    continue;
                }
                let chunk = Chunk {
                    span: shared.span,
                    matrix: shared.matrix,
                    sources: shared.sources,
                };
                self.store
                    .put_chunk(r.series.clone(), shared.index, chunk, shared.left);
                if let Some(c) = self.store.chunk(&r.series, shared.index) {
                    match local {
                        Some(at) => cached[at] = (shared.index, c),
                        None => cached.push((shared.index, c)),
                    }
                }
            }
        }
        let cached_chunk = |i: i64| cached.iter().find(|(j, _)| *j == i).map(|(_, c)| c);
        let gaps = missing(&r.grid, interval, r.want, |i| {
            cached_chunk(i).map(|c| c.span)
        });
        let mut gaps = match r.recent_from {
            Some(at) => cut_at(&r.grid, gaps, at),
            None => gaps,
        };
        // The calls the caller's rules refuse are not made: the answer then shows
        // what the cache holds, unless it holds nothing of the range.
        let mut held: Option<(Refused, Span)> = None;
        if let Some(judge) = &r.terms.judge {
            gaps.retain(
                |gap| match judge.allows(&r.request.with_span(gap.from, gap.to)) {
                    Ok(()) => true,
                    Err(refused) => {
                        held = Some(match held.take() {
                            None => (refused, *gap),
                            Some((first, span)) => (first, Span { to: gap.to, ..span }),
                        });
                        false
                    }
                },
            );
            if let Some((refused, _)) = &held
                && !cached
                    .iter()
                    .any(|(_, c)| c.span.intersect(&r.want).is_some())
            {
                return Err(refused.clone().into());
            }
        }
        // Whatever cannot be stitched is asked for whole, if the rules allow it.
        let whole = |response: Option<UpstreamResponse>| {
            let refused = held.as_ref().map(|(refused, _)| refused.clone());
            let request = r.request.clone();
            let (fetch, priority) = (fetch.clone(), priority.clone());
            async move {
                match (response, refused) {
                    (Some(response), None) => Ok(uncached(response)),
                    (_, Some(refused)) => Err(refused.into()),
                    (None, None) => fetch(request, priority).await.map(uncached),
                }
            }
        };

        let mut fetched: Vec<(Span, Matrix)> = Vec::with_capacity(gaps.len());
        let mut fetched_from = Vec::with_capacity(gaps.len());
        for gap in &gaps {
            let response = fetch(r.request.with_span(gap.from, gap.to), priority.clone()).await?;
            if !response.status.is_success() {
                return Ok(uncached(response));
            }
            match Matrix::parse(&response.body) {
                Ok(matrix) if matrix.on_grid(&r.grid, *gap) => {
                    fetched.push((*gap, matrix));
                    fetched_from.push(Sources::of(response.backend));
                }
                // Warnings, native histograms, or points off the grid asked for: the
                // whole range as the backend answers it, uncached.
                _ if *gap == r.want => return whole(Some(response)).await,
                _ => return whole(None).await,
            }
        }

        let mut updated = updated_chunks(
            &r.grid,
            interval,
            r.stable_to,
            |i| cached_chunk(i).map(|c| (c.span, &c.matrix)),
            &fetched,
        );
        // Which backends a span's points came from: its cached chunk's and those of
        // the fetched pieces it overlaps.
        let fetched_within = |span: &Span| {
            fetched
                .iter()
                .zip(&fetched_from)
                .filter(|((s, _), _)| s.intersect(span).is_some())
                .fold(Sources::default(), |all, (_, from)| all.and(*from))
        };
        // A chunk a held-back span runs through keeps what it holds: merged with a
        // piece it does not touch, it would be replaced by it.
        if let Some((_, span)) = &held {
            updated.retain(|(i, _, _)| !chunks_of(*span, interval).contains(i));
        }
        for (i, span, matrix) in updated {
            let sources = cached_chunk(i)
                .map_or(Sources::default(), |c| c.sources)
                .and(fetched_within(&span));
            let chunk = Chunk {
                span,
                matrix,
                sources,
            };
            if let Some(fleet) = &self.fleet {
                fleet.put_chunk(&r.series, i, &chunk, self.config.extent_ttl.0);
            }
            self.store
                .put_chunk(r.series.clone(), i, chunk, self.config.extent_ttl.0);
        }

        let mut sources = fetched_within(&r.want);
        let mut pieces: Vec<(Span, &Matrix)> = Vec::with_capacity(cached.len() + fetched.len());
        for (_, c) in &cached {
            if let Some(s) = c.span.intersect(&r.want) {
                sources = sources.and(c.sources);
                pieces.push((s, &c.matrix));
            }
        }
        pieces.extend(fetched.iter().map(|(s, m)| (*s, m)));
        let answer = assemble(&pieces);
        let points = answer.point_count() as u64;
        let mut json = answer.to_json();
        // Kept in the cache, which counts its length, not the room it grew into.
        json.shrink_to_fit();
        let body = Bytes::from(json);
        self.metrics.points_served.inc_by(points);
        self.metrics
            .points_fetched
            .inc_by(fetched.iter().map(|(_, m)| m.point_count() as u64).sum());
        let cache = match (gaps.is_empty(), cached.is_empty()) {
            (true, _) => CacheStatus::Hit,
            (false, true) => CacheStatus::Miss,
            (false, false) => CacheStatus::Partial,
        };
        let body = match &held {
            // Kept beside the plain answer, briefly: the rules may allow the
            // calls again soon (the window closes, the switch flips).
            Some((refused, span)) => {
                let body = with_warning(&body, &refused.held(span.from, span.to));
                self.store.put_answer(
                    held_key(&r.key),
                    body.clone(),
                    points,
                    sources,
                    self.clock.now(),
                    self.config.fresh_ttl.0,
                    self.config.fresh_ttl.0,
                );
                body
            }
            None => {
                let body = noted(body, &r.terms);
                let fresh = if r.want.to > r.stable_to {
                    self.config.fresh_ttl.0
                } else {
                    self.config.extent_ttl.0
                };
                if let (Some(lock), Some(write)) = (
                    fleet_lock.as_mut(),
                    self.put_answer(&r.key, &body, points, sources, fresh),
                ) {
                    lock.after(write);
                }
                body
            }
        };
        Ok(Served {
            status: StatusCode::OK,
            body: Body::Plain(body),
            cache,
            stored: None,
            sources,
        })
    }
}

/// The keys of a plan's shared fetch and of the answer it falls back on: a judged
/// plan's fetch is its own, so callers whose rules refuse nothing never wait on
/// one that holds calls back.
fn flight_keys(key: &CacheKey, terms: &Terms) -> (CacheKey, CacheKey) {
    match terms.judge {
        Some(_) => (held_key(key), key.clone()),
        None => (key.clone(), key.clone()),
    }
}

/// `body` with the plan's note as its warning, when it has one and the backend
/// gave none of its own (they stay as the backend wrote them).
fn noted(body: Bytes, terms: &Terms) -> Bytes {
    match &terms.note {
        Some(note) if !has_warnings(&body) => with_warning(&body, note),
        _ => body,
    }
}

/// An upstream answer passed on as it came, as a miss.
fn uncached(response: UpstreamResponse) -> Served {
    Served {
        status: response.status,
        body: Body::Plain(response.body),
        cache: CacheStatus::Miss,
        stored: None,
        sources: Sources::of(response.backend),
    }
}

/// Whether a whole answer carries warnings; such answers are not worth keeping.
fn has_warnings(body: &[u8]) -> bool {
    body.windows(11).any(|w| w == b"\"warnings\":")
}

/// Add a Prometheus `warnings` entry to a success body without parsing it: first
/// in the list promguard put first (a stored answer's note), or as a new list.
/// Answers from a backend with warnings of their own are never stored.
fn with_warning(body: &Bytes, warning: &str) -> Bytes {
    const LIST: &[u8] = b"{\"warnings\":[";
    let (rest, more) = match body.strip_prefix(LIST) {
        Some(rest) => (rest, &b","[..]),
        None => match body.strip_prefix(b"{") {
            Some(rest) => (rest, &b"],"[..]),
            None => return body.clone(),
        },
    };
    let quoted = serde_json::to_string(warning).unwrap_or_else(|_| "\"stale\"".into());
    let mut out = Vec::with_capacity(body.len() + quoted.len() + 16);
    out.extend_from_slice(LIST);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(more);
    out.extend_from_slice(rest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Class;
    use crate::analysis::analyse_query;
    use crate::clock::ManualClock;
    use crate::request::{QueryParser, parse};
    use axum::http::Method;
    use std::sync::Mutex;

    /// 2026-11-27T09:00:00Z, a whole hour.
    const NOW: Millis = 1_795_770_000_000;
    const MIN: i64 = 60_000;

    /// What the fake backend was asked, and how it answers.
    #[derive(Default)]
    struct Backend {
        asked: Mutex<Vec<(Millis, Millis)>>,
        /// Answer on the grid of multiples of the step, as VictoriaMetrics does
        /// for unaligned ranges, instead of the grid asked for.
        realign: bool,
        fail: std::sync::atomic::AtomicBool,
        /// Requests are routed to the long-term store, and their calls split at
        /// this evaluation time: the calls from it on answered by `recent`.
        split_at: Option<Millis>,
    }

    impl Backend {
        /// A matrix (or a vector for instants) with one series whose value at t is t/1000.
        fn answer(&self, req: &ApiRequest) -> Fetched {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ProxyError::Upstream(
                    crate::upstream::UpstreamError::Timeout {
                        backend: "recent",
                        after_ms: 1,
                    },
                ));
            }
            let body = match req.kind {
                RequestKind::Range {
                    start,
                    end,
                    step_ms,
                    ..
                } => {
                    self.asked.lock().unwrap().push((start, end));
                    let first = if self.realign {
                        start - start % step_ms
                    } else {
                        start
                    };
                    let mut values = Vec::new();
                    let mut t = first;
                    while t <= end {
                        values.push(format!("[{},\"{}\"]", t / 1000, t / 1000));
                        t += step_ms;
                    }
                    format!(
                        r#"{{"status":"success","data":{{"resultType":"matrix","result":[{{"metric":{{"job":"a"}},"values":[{}]}}]}}}}"#,
                        values.join(",")
                    )
                }
                RequestKind::Instant { time, .. } => {
                    self.asked.lock().unwrap().push((time, time));
                    format!(
                        r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[{},"1"]}}]}}}}"#,
                        time / 1000
                    )
                }
                _ => r#"{"status":"success","data":[]}"#.to_string(),
            };
            let from = match req.kind {
                RequestKind::Range { start, .. } => start,
                _ => Millis::MIN,
            };
            Ok(UpstreamResponse {
                status: StatusCode::OK,
                body: Bytes::from(body),
                backend: match self.split_at {
                    Some(at) if from < at => BackendId::LongTerm,
                    _ => BackendId::Recent,
                },
            })
        }

        fn asked(&self) -> Vec<(Millis, Millis)> {
            std::mem::take(&mut *self.asked.lock().unwrap())
        }
    }

    struct Setup {
        cache: Arc<Cache>,
        clock: ManualClock,
        backend: Arc<Backend>,
        queries: QueryParser,
        /// The caller's rules, judging each call, from the next request on.
        judge: Mutex<Option<Judge>>,
        /// The warning the caller's answers carry, from the next request on.
        note: Mutex<Option<&'static str>>,
    }

    fn setup(backend: Backend) -> Setup {
        let clock = ManualClock::new();
        let config = CacheConfig::default();
        Setup {
            cache: Arc::new(Cache::new(
                config,
                &Metrics::new(),
                Arc::new(clock.clone()),
                None,
            )),
            clock,
            backend: Arc::new(backend),
            queries: QueryParser::default(),
            judge: Mutex::new(None),
            note: Mutex::new(None),
        }
    }

    /// Rules that hold back every call evaluating before `at`.
    fn holding_before(at: Millis) -> Judge {
        Judge::new(move |call| match call.kind {
            RequestKind::Range { start, .. } | RequestKind::Instant { time: start, .. }
                if start < at =>
            {
                Err(Refused {
                    mode: "sale mode".into(),
                    message: "refused by rule 'recent-data-only': too old".into(),
                    advice: "narrow it".into(),
                    rule: "recent-data-only".into(),
                    limit: "long_term",
                })
            }
            _ => Ok(()),
        })
    }

    fn body(served: &Served) -> String {
        match &served.body {
            Body::Plain(b) => String::from_utf8(b.to_vec()).unwrap(),
            Body::Gzip(_) => panic!("plain in these tests"),
        }
    }

    impl Setup {
        async fn ask(&self, params: &[(&str, String)], path: &str, now: Millis) -> Served {
            self.try_ask(params, path, now).await.unwrap()
        }

        async fn try_ask(
            &self,
            params: &[(&str, String)],
            path: &str,
            now: Millis,
        ) -> Result<Served, ProxyError> {
            let params = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let req = parse(&Method::POST, path, params, now, &self.queries).unwrap();
            let (start, end, step) = match &req.kind {
                RequestKind::Range {
                    start,
                    end,
                    step_ms,
                    ..
                } => (*start, *end, *step_ms),
                RequestKind::Instant { time, .. } => (*time, *time, 300_000),
                _ => (now, now, 60_000),
            };
            let shape = match &req.kind {
                RequestKind::Range { query, .. } | RequestKind::Instant { query, .. } => {
                    analyse_query(query, start, end, step, Duration::from_secs(300))
                }
                _ => QueryShape::default(),
            };
            let (backend, fetches) = match self.backend.split_at {
                Some(at) => (
                    BackendId::LongTerm,
                    Fetches::Split {
                        recent_from: Some(at),
                    },
                ),
                None => (BackendId::Recent, Fetches::AsRequest),
            };
            let mut plan = plan(
                self.cache.config(),
                &req,
                &shape,
                backend,
                fetches,
                false,
                now,
                Duration::ZERO,
                false,
            );
            if let Some(note) = *self.note.lock().unwrap() {
                plan = plan.noted(note);
            }
            if let Some(judge) = self.judge.lock().unwrap().clone() {
                plan = plan.judged(judge);
            }
            if let Some(hit) = self.cache.lookup(&plan, req.endpoint) {
                return Ok(hit);
            }
            let backend = self.backend.clone();
            let waiter = Waiter {
                priority: Priority::of(Class::Dashboard),
                budget: None,
                limit: Duration::from_secs(10),
            };
            self.cache
                .serve(plan, req.endpoint, waiter, move |req, _| {
                    let backend = backend.clone();
                    async move { backend.answer(&req) }
                })
                .await
        }

        async fn range(&self, start: Millis, end: Millis, now: Millis) -> Served {
            let params = [
                ("query", "sum(rate(x[5m]))".to_string()),
                ("start", crate::units::format_time(start)),
                ("end", crate::units::format_time(end)),
                ("step", "60".to_string()),
            ];
            self.ask(&params, "/api/v1/query_range", now).await
        }
    }

    fn points(served: &Served) -> Vec<i64> {
        let Body::Plain(body) = &served.body else {
            panic!("a range answer is plain");
        };
        // Matrix::parse refuses answers with warnings; promguard puts its own first.
        let body = match body.windows(10).position(|w| w == b"\"status\":\"") {
            Some(at) => [&b"{"[..], &body[at..]].concat(),
            None => body.to_vec(),
        };
        let m = Matrix::parse(&body).expect("a matrix");
        (0..m.series[0].points.len())
            .map(|i| m.series[0].points.get(i).0)
            .collect()
    }

    #[tokio::test]
    async fn a_refreshing_range_fetches_only_its_new_tail() {
        let s = setup(Backend::default());
        let first = s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        assert_eq!(first.cache, CacheStatus::Miss);
        assert_eq!(s.backend.asked(), [(NOW - 60 * MIN, NOW - 10 * MIN)]);
        // A minute later the window moved by a step: only the new point is fetched.
        let later = s.range(NOW - 59 * MIN, NOW - 9 * MIN, NOW + MIN).await;
        assert_eq!(later.cache, CacheStatus::Partial);
        assert_eq!(s.backend.asked(), [(NOW - 9 * MIN, NOW - 9 * MIN)]);
        assert_eq!(points(&later).len(), 51);
        assert_eq!(points(&later)[0], NOW - 59 * MIN);
        // The same window again: every point from the cache.
        let again = s.range(NOW - 59 * MIN, NOW - 9 * MIN, NOW + MIN).await;
        assert_eq!(again.cache, CacheStatus::Hit);
        assert!(s.backend.asked().is_empty());
    }

    #[tokio::test]
    async fn a_long_range_is_fetched_in_two_calls_cut_where_recent_data_starts() {
        let cut = NOW - 30 * MIN - 30_000;
        let s = setup(Backend {
            split_at: Some(cut),
            ..Backend::default()
        });
        let first = s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        assert_eq!(first.cache, CacheStatus::Miss);
        // On the grid: the cut moves up to the next step.
        assert_eq!(
            s.backend.asked(),
            [
                (NOW - 60 * MIN, NOW - 31 * MIN),
                (NOW - 30 * MIN, NOW - 10 * MIN)
            ]
        );
        assert_eq!(points(&first).len(), 51, "stitched whole");
        assert_eq!(first.sources.as_str(), "long_term, recent");
        // The refresh's tail is one call, answered by the recent backend, and the
        // answer still names both: its extents came from the long-term store too.
        let later = s.range(NOW - 59 * MIN, NOW - 9 * MIN, NOW + MIN).await;
        assert_eq!(s.backend.asked(), [(NOW - 9 * MIN, NOW - 9 * MIN)]);
        assert_eq!(later.sources.as_str(), "long_term, recent");
        let hit = s.range(NOW - 59 * MIN, NOW - 9 * MIN, NOW + MIN).await;
        assert_eq!(hit.cache, CacheStatus::Hit);
        assert_eq!(hit.sources.as_str(), "long_term, recent");
        // Unsplit, one call and one backend.
        let whole = setup(Backend::default());
        let first = whole.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        assert_eq!(whole.backend.asked(), [(NOW - 60 * MIN, NOW - 10 * MIN)]);
        assert_eq!(first.sources.as_str(), "recent");
    }

    #[tokio::test]
    async fn a_judged_range_is_served_from_its_extents_past_a_held_call_with_a_warning() {
        let s = setup(Backend::default());
        s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        s.backend.asked();
        // Zoomed out to two hours under rules that hold back the older hour: no
        // call, the cached hour, and a warning naming the span held back.
        *s.judge.lock().unwrap() = Some(holding_before(NOW - 60 * MIN));
        let zoomed = s.range(NOW - 120 * MIN, NOW - 10 * MIN, NOW).await;
        assert!(s.backend.asked().is_empty());
        assert_eq!(zoomed.cache, CacheStatus::Hit);
        assert_eq!(points(&zoomed).len(), 51);
        assert_eq!(points(&zoomed)[0], NOW - 60 * MIN);
        let warning = r#"{"warnings":["promguard: no data from 2026-11-27T07:00:00Z to 2026-11-27T07:59:00Z: refused by rule 'recent-data-only': too old in sale mode"],"status":"success""#;
        assert!(body(&zoomed).starts_with(warning), "{}", body(&zoomed));
        // Kept: the next such caller is a hit on it, with its warning.
        let again = s.range(NOW - 120 * MIN, NOW - 10 * MIN, NOW).await;
        assert!(again.stored.is_some(), "a stored answer, gzipped once");
        assert!(body(&again).starts_with(warning));
        // A caller whose rules allow the call never sees it: it fetches the hour.
        *s.judge.lock().unwrap() = None;
        let plain = s.range(NOW - 120 * MIN, NOW - 10 * MIN, NOW).await;
        assert_eq!(plain.cache, CacheStatus::Partial);
        assert_eq!(s.backend.asked(), [(NOW - 120 * MIN, NOW - 61 * MIN)]);
        assert_eq!(points(&plain).len(), 111);
        assert!(!body(&plain).contains("warnings"));
    }

    #[tokio::test]
    async fn a_judged_range_the_cache_holds_nothing_of_is_refused_without_a_call() {
        let cut = NOW - 30 * MIN;
        let s = setup(Backend {
            split_at: Some(cut),
            ..Backend::default()
        });
        // The recent half would be allowed; a panel showing only it is not the
        // panel asked for, so nothing is fetched and the refusal is the answer.
        *s.judge.lock().unwrap() = Some(holding_before(cut));
        let params = [
            ("query", "sum(rate(x[5m]))".to_string()),
            ("start", crate::units::format_time(NOW - 60 * MIN)),
            ("end", crate::units::format_time(NOW - 10 * MIN)),
            ("step", "60".to_string()),
        ];
        let refused = s.try_ask(&params, "/api/v1/query_range", NOW).await;
        assert!(
            matches!(&refused, Err(ProxyError::Policy(r)) if r.message.contains("too old")),
            "{refused:?}"
        );
        assert!(s.backend.asked().is_empty());
        // A range whose calls all pass is served as ever.
        let recent = s.range(cut, NOW - 10 * MIN, NOW).await;
        assert_eq!(recent.cache, CacheStatus::Miss);
        assert_eq!(s.backend.asked(), [(cut, NOW - 10 * MIN)]);
    }

    #[tokio::test]
    async fn a_judged_whole_answer_falls_back_on_the_stored_one_with_the_refusal() {
        let s = setup(Backend::default());
        let params = [
            ("query", "sum(increase(x[30d]))".to_string()),
            ("time", crate::units::format_time(NOW - 30_000)),
        ];
        s.ask(&params, "/api/v1/query", NOW).await;
        s.backend.asked();
        s.clock.advance(Duration::from_secs(60));
        *s.judge.lock().unwrap() = Some(holding_before(NOW));
        let held = s.ask(&params, "/api/v1/query", NOW + 60_000).await;
        assert_eq!(held.cache, CacheStatus::Stale);
        assert!(s.backend.asked().is_empty());
        assert!(body(&held).contains("60s old because: sale mode: refused by rule"));
        let fresh = [
            ("query", "sum(increase(y[30d]))".to_string()),
            params[1].clone(),
        ];
        assert!(matches!(
            s.try_ask(&fresh, "/api/v1/query", NOW + 60_000).await,
            Err(ProxyError::Policy(_))
        ));
    }

    #[tokio::test]
    async fn a_noted_answer_is_stored_with_its_warning_under_its_own_key() {
        let s = setup(Backend::default());
        *s.note.lock().unwrap() =
            Some("promguard: in sale mode this panel refreshes at most every 1 minute");
        let first = s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        let warning = r#"{"warnings":["promguard: in sale mode this panel refreshes at most every 1 minute"],"status":"success""#;
        assert!(body(&first).starts_with(warning), "{}", body(&first));
        let hit = s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        assert_eq!(hit.cache, CacheStatus::Hit);
        assert!(hit.stored.is_some());
        assert!(body(&hit).starts_with(warning));
        // Without the note the same range is another answer, stitched from the
        // same extents.
        *s.note.lock().unwrap() = None;
        let plain = s.range(NOW - 60 * MIN, NOW - 10 * MIN, NOW).await;
        assert!(plain.stored.is_none());
        assert_eq!(s.backend.asked().len(), 1, "only the first fetched");
        assert!(!body(&plain).contains("warnings"));
        // A stale fallback adds its own warning in front, still one list.
        let stale = with_warning(&Bytes::from(warning.to_string() + "}"), "stale");
        assert!(stale.starts_with(br#"{"warnings":["stale","promguard: in sale mode"#));
    }

    #[tokio::test]
    async fn the_live_window_is_fetched_again_once_its_answer_is_old() {
        let s = setup(Backend::default());
        // Ends now: the last 5 minutes are not kept in extents.
        let first = s.range(NOW - 60 * MIN, NOW, NOW).await;
        assert_eq!(first.cache, CacheStatus::Miss);
        s.backend.asked();
        // Within fresh_ttl it is a hit; after it, only the live part is fetched.
        assert_eq!(
            s.range(NOW - 60 * MIN, NOW, NOW).await.cache,
            CacheStatus::Hit
        );
        s.clock.advance(Duration::from_secs(11));
        let refreshed = s.range(NOW - 60 * MIN, NOW, NOW + 11_000).await;
        assert_eq!(refreshed.cache, CacheStatus::Partial);
        assert_eq!(s.backend.asked(), [(NOW - 4 * MIN, NOW)]);
    }

    #[tokio::test]
    async fn a_failing_backend_is_covered_by_a_stale_answer_with_a_warning() {
        let s = setup(Backend::default());
        let params = [
            ("query", "up".to_string()),
            ("time", crate::units::format_time(NOW - 30_000)),
        ];
        assert_eq!(
            s.ask(&params, "/api/v1/query", NOW).await.cache,
            CacheStatus::Miss
        );
        s.clock.advance(Duration::from_secs(11));
        s.backend
            .fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let stale = s.ask(&params, "/api/v1/query", NOW).await;
        assert_eq!(stale.cache, CacheStatus::Stale);
        let Body::Plain(body) = &stale.body else {
            panic!("a stale answer is plain");
        };
        assert!(String::from_utf8_lossy(body).contains("11s old"));
        // Past stale_max_age there is nothing to serve.
        s.clock.advance(Duration::from_secs(15 * 60));
        let outcome = s.try_ask(&params, "/api/v1/query", NOW).await;
        assert!(
            matches!(outcome, Err(ProxyError::Upstream(_))),
            "the fetch's error, not an old answer"
        );
    }

    #[tokio::test]
    async fn an_answer_off_the_asked_grid_is_passed_through_and_never_kept() {
        let s = setup(Backend {
            realign: true,
            ..Backend::default()
        });
        let start = NOW - 60 * MIN + 17_000;
        let first = s.range(start, start + 50 * MIN, NOW).await;
        assert_eq!(first.cache, CacheStatus::Miss);
        assert_eq!(points(&first)[0], start - 17_000, "as the backend answered");
        s.backend.asked();
        // Nothing was kept: the same window is fetched again, whole.
        s.clock.advance(Duration::from_secs(7 * 3600));
        let again = s.range(start, start + 50 * MIN, NOW).await;
        assert_eq!(again.cache, CacheStatus::Miss);
        assert_eq!(s.backend.asked(), [(start, start + 50 * MIN)]);
    }
}
