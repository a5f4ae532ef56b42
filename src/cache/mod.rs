//! Stage 7, cache: identical queries cost the backend once; refreshes fetch only
//! what is new.
//!
//! [`plan`] decides, without I/O, how a request is cached: whole answers (instant
//! queries, metadata, range queries pinned with `@ start()`/`@ end()`) or range
//! extents. [`Cache::serve`] answers from the store, or runs one coalesced upstream
//! fetch per distinct answer, for range queries only of the missing spans, then
//! stitches, stores and answers; when the backend fails it falls back to a stale
//! answer with a warning.

pub mod coalesce;
pub mod extent;
pub mod key;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::watch;

use crate::admission::Priority;
use crate::analysis::QueryShape;
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::request::{ApiRequest, Endpoint, RequestKind};
use crate::routing::BackendId;
use crate::units::{Millis, millis};
use crate::upstream::UpstreamResponse;
use coalesce::{Coalescer, Outcome};
use extent::{Grid, Matrix, Span, assemble, chunk_interval, chunks_of, merge_chunk, missing};
use key::{CacheKey, SeriesKey, answer_key, series_key};
use store::{Chunk, Store};

/// How an answer was produced. Feeds the `X-Cache` header and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
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
    pub priority: Priority,
    pub budget: Option<Arc<str>>,
    pub limit: Duration,
}

/// How waiting on a shared fetch can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error(
        "the shared fetch this request waited on ended without an answer (a bug, logged); \
         retry"
    )]
    Lost,
    #[error("waited {} ms for the shared fetch of this answer, this request's limit", after.as_millis())]
    Waited { after: Duration },
}

/// An answer ready to send.
#[derive(Debug, Clone)]
pub struct Served {
    pub status: StatusCode,
    pub body: Bytes,
    pub cache: CacheStatus,
    /// The stored answer a hit came from, which can also be sent gzipped.
    pub stored: Option<Arc<store::Answer>>,
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
}

/// How one request uses the cache; decided by [`plan`] before any I/O.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Forward as is; with `refresh`, store the answer for later requests.
    Bypass {
        request: ApiRequest,
        refresh: Option<WholePlan>,
    },
    Whole(WholePlan),
    Range(RangePlan),
}

/// Decide how `req` (routed to `backend`) is cached. `no_cache` is the client's
/// `Cache-Control: no-cache`; `floor` is how old a stored answer this caller
/// accepts as a hit regardless of its freshness (zero: none); `unaligned_exact`
/// says the backend evaluates ranges on any grid asked for. Pure.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    config: &CacheConfig,
    req: &ApiRequest,
    shape: &QueryShape,
    backend: BackendId,
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
            let typed =
                |from: Millis, to: Millis| format!("{canonical}\u{0}{from}..{to};step={step_ms}");
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
                        series: series_key(req, backend, canonical, *step_ms, *start),
                        grid,
                        want,
                        stable_to,
                        request: req.clone(),
                        floor,
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
        },
        Some(Plan::Whole(w)) if no_cache => Plan::Bypass {
            request: w.request.clone(),
            refresh: Some(w),
        },
        Some(Plan::Range(r)) if no_cache => Plan::Bypass {
            request: r.request,
            refresh: None,
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
    flights: Coalescer<CacheKey, Result<Served, ProxyError>, Priority>,
    config: CacheConfig,
    metrics: CacheMetrics,
}

/// The result of one upstream fetch as the cache sees it.
type Fetched = Result<UpstreamResponse, ProxyError>;

impl Cache {
    pub fn new(config: CacheConfig, metrics: &Metrics) -> Self {
        Cache {
            store: Store::new(config.max_bytes.0, metrics.cache_evictions.clone()),
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

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Entries and bytes held, for the gauges.
    pub fn usage(&self) -> (u64, u64) {
        self.store.usage()
    }

    /// A stored answer `plan` can be served from as it is, counted as a hit.
    pub fn lookup(&self, plan: &Plan, endpoint: Endpoint) -> Option<Served> {
        let hit = match plan {
            Plan::Bypass { .. } => None,
            Plan::Whole(w) => self.fresh(&w.key, w.floor),
            Plan::Range(r) => self.fresh(&r.key, r.floor),
        }?;
        self.metrics
            .lookups
            .with_label_values(&[endpoint.as_str(), CacheStatus::Hit.label()])
            .inc();
        Some(hit)
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
        F: Fn(ApiRequest, watch::Receiver<Priority>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let fetch = Arc::new(fetch);
        let result = match plan {
            Plan::Bypass { request, refresh } => {
                let (_, priority) = watch::channel(waiter.priority);
                let response = fetch(request, priority).await;
                if let (Some(w), Ok(r)) = (&refresh, &response) {
                    self.keep(w, r);
                }
                response.map(|r| Served {
                    status: r.status,
                    body: r.body,
                    cache: CacheStatus::Bypass,
                    stored: None,
                })
            }
            Plan::Whole(w) => match self.fresh(&w.key, w.floor) {
                Some(hit) => Ok(hit),
                None => {
                    let key = w.key.clone();
                    let this = self.clone();
                    let work =
                        move |priority| this.clone().fill_whole(w.clone(), fetch.clone(), priority);
                    self.coalesced(key, endpoint, &waiter, work).await
                }
            },
            Plan::Range(r) => match self.fresh(&r.key, r.floor) {
                Some(hit) => Ok(hit),
                None => {
                    let key = r.key.clone();
                    let this = self.clone();
                    let work =
                        move |priority| this.clone().fill_range(r.clone(), fetch.clone(), priority);
                    self.coalesced(key, endpoint, &waiter, work).await
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

    /// A stored answer that is fresh, or younger than `floor`, as a hit.
    fn fresh(&self, key: &CacheKey, floor: Duration) -> Option<Served> {
        let answer = self.store.answer(key)?;
        (Instant::now() < answer.fresh_until || answer.stored.elapsed() < floor).then(|| {
            self.metrics.points_served.inc_by(answer.points);
            Served {
                status: StatusCode::OK,
                body: answer.body.clone(),
                cache: CacheStatus::Hit,
                stored: Some(answer.clone()),
            }
        })
    }

    /// Run `work` once for all concurrent callers of `key`, at the priority of all
    /// of them; if it fails, fall back to a stale answer. A waiter refused only
    /// because the caller who started the fetch was over *its* per-user budget
    /// runs the fetch again as its own, once: nobody is refused for someone
    /// else's budget.
    async fn coalesced<W, Fut>(
        &self,
        key: CacheKey,
        endpoint: Endpoint,
        waiter: &Waiter,
        work: W,
    ) -> Result<Served, ProxyError>
    where
        W: Fn(watch::Receiver<Priority>) -> Fut,
        Fut: Future<Output = Result<Served, ProxyError>> + Send + 'static,
    {
        let mut again = true;
        let result = loop {
            let outcome = self
                .flights
                .run(key.clone(), waiter.priority, waiter.limit, &work)
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
            Err(e) => self.stale(&key, &e.to_string()).ok_or(e),
            ok => ok,
        }
    }

    /// An older answer for `key`, within the stale limit, with a warning that says
    /// how old it is and why it is served. Grafana shows the warning on the panel.
    pub fn stale(&self, key: &CacheKey, reason: &str) -> Option<Served> {
        let answer = self.store.answer(key)?;
        let age = answer.stored.elapsed();
        if age > self.config.stale_max_age.0 {
            return None;
        }
        let warning = format!(
            "promguard served a cached answer {}s old because: {reason}",
            age.as_secs()
        );
        Some(Served {
            status: StatusCode::OK,
            body: with_warning(&answer.body, &warning),
            cache: CacheStatus::Stale,
            stored: None,
        })
    }

    fn keep_for(&self, fresh: Duration) -> Duration {
        fresh.max(self.config.stale_max_age.0)
    }

    /// Store a successful whole answer without warnings.
    fn keep(&self, w: &WholePlan, response: &UpstreamResponse) {
        if response.status.is_success() && !has_warnings(&response.body) {
            self.store.put_answer(
                w.key.clone(),
                response.body.clone(),
                0,
                w.fresh,
                self.keep_for(w.fresh),
            );
        }
    }

    async fn fill_whole<F, Fut>(
        self: Arc<Self>,
        w: WholePlan,
        fetch: Arc<F>,
        priority: watch::Receiver<Priority>,
    ) -> Result<Served, ProxyError>
    where
        F: Fn(ApiRequest, watch::Receiver<Priority>) -> Fut,
        Fut: Future<Output = Fetched>,
    {
        let response = fetch(w.request.clone(), priority).await?;
        self.keep(&w, &response);
        Ok(uncached(response))
    }

    /// Fetch the spans the extents lack, keep their immutable part, and stitch the
    /// answer from extents and fetched pieces.
    async fn fill_range<F, Fut>(
        self: Arc<Self>,
        r: RangePlan,
        fetch: Arc<F>,
        priority: watch::Receiver<Priority>,
    ) -> Result<Served, ProxyError>
    where
        F: Fn(ApiRequest, watch::Receiver<Priority>) -> Fut,
        Fut: Future<Output = Fetched>,
    {
        let step = r.grid.step;
        let interval = chunk_interval(step);
        let cached: Vec<(i64, Arc<Chunk>)> = chunks_of(r.want, interval)
            .filter_map(|i| self.store.chunk(&r.series, i).map(|c| (i, c)))
            .collect();
        let cached_chunk = |i: i64| cached.iter().find(|(j, _)| *j == i).map(|(_, c)| c);
        let gaps = missing(&r.grid, interval, r.want, |i| {
            cached_chunk(i).map(|c| c.span)
        });

        let mut fetched: Vec<(Span, Matrix)> = Vec::with_capacity(gaps.len());
        for gap in &gaps {
            let response = fetch(r.request.with_span(gap.from, gap.to), priority.clone()).await?;
            if !response.status.is_success() {
                return Ok(uncached(response));
            }
            match Matrix::parse(&response.body) {
                Ok(matrix) if matrix.on_grid(&r.grid, *gap) => fetched.push((*gap, matrix)),
                // Warnings, native histograms, or points off the grid asked for: the
                // whole range as the backend answers it, uncached.
                _ if *gap == r.want => return Ok(uncached(response)),
                _ => return fetch(r.request.clone(), priority).await.map(uncached),
            }
        }

        let mut updated: Vec<(i64, Span, Matrix)> = Vec::new();
        for (gap, matrix) in &fetched {
            let Some(stable) = (Span {
                from: gap.from,
                to: gap.to.min(r.stable_to),
            })
            .intersect(gap) else {
                continue;
            };
            for i in chunks_of(stable, interval) {
                let Some(part) = r.grid.chunk(i, interval).and_then(|c| c.intersect(&stable))
                else {
                    continue;
                };
                let merged = match updated.iter().position(|(j, _, _)| *j == i) {
                    Some(at) => {
                        let (_, span, old) = updated.swap_remove(at);
                        merge_chunk(step, Some((span, &old)), (part, matrix))
                    }
                    None => merge_chunk(
                        step,
                        cached_chunk(i).map(|c| (c.span, &c.matrix)),
                        (part, matrix),
                    ),
                };
                updated.push((i, merged.0, merged.1));
            }
        }
        for (i, span, matrix) in updated {
            self.store.put_chunk(
                r.series.clone(),
                i,
                Chunk { span, matrix },
                self.config.extent_ttl.0,
            );
        }

        let mut pieces: Vec<(Span, &Matrix)> = cached
            .iter()
            .filter_map(|(_, c)| c.span.intersect(&r.want).map(|s| (s, &c.matrix)))
            .collect();
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
        let fresh = if r.want.to > r.stable_to {
            self.config.fresh_ttl.0
        } else {
            self.config.extent_ttl.0
        };
        self.store
            .put_answer(r.key, body.clone(), points, fresh, self.keep_for(fresh));
        Ok(Served {
            status: StatusCode::OK,
            body,
            cache: match (gaps.is_empty(), cached.is_empty()) {
                (true, _) => CacheStatus::Hit,
                (false, true) => CacheStatus::Miss,
                (false, false) => CacheStatus::Partial,
            },
            stored: None,
        })
    }
}

/// An upstream answer passed on as it came, as a miss.
fn uncached(response: UpstreamResponse) -> Served {
    Served {
        status: response.status,
        body: response.body,
        cache: CacheStatus::Miss,
        stored: None,
    }
}

/// Whether a whole answer carries warnings; such answers are not worth keeping.
fn has_warnings(body: &[u8]) -> bool {
    body.windows(11).any(|w| w == b"\"warnings\":")
}

/// Add a Prometheus `warnings` entry to a success body (which has none: answers
/// with warnings are never stored).
fn with_warning(body: &Bytes, warning: &str) -> Bytes {
    let Some(rest) = body.strip_prefix(b"{") else {
        return body.clone();
    };
    let quoted = serde_json::to_string(warning).unwrap_or_else(|_| "\"stale\"".into());
    let mut out = Vec::with_capacity(body.len() + quoted.len() + 16);
    out.extend_from_slice(b"{\"warnings\":[");
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(b"],");
    out.extend_from_slice(rest);
    Bytes::from(out)
}
