//! Warming: the cache filled with what engineers will open, before a sale window
//! opens, so their panels' old extents are cached when the long-term store closes.
//!
//! A window's `warm_before` starts a run at its start minus that long: every range
//! panel of the dashboards in `warm.dashboards` ([`calls::dashboard`], as Grafana
//! will send them) and the most used long ranges of the [`record::Record`]
//! ([`calls::recorded`]). `POST /admin/warm` (`promguard warm`) runs the same on
//! demand for dashboards it is given. Each call goes through the pipeline like a
//! request from Explore (the lowest class, shed first), outside every per-user
//! budget, at most `warm.share` of the smallest backend cap at a time; before each
//! one, a run pauses while anyone queues for a backend or the backends are nearly
//! full, stops when that lasts, and stops when sale mode is on. One run at a time;
//! its progress is `GET /admin/warm`, `promguard_warm_*` and a log line per
//! dashboard.

pub mod calls;
pub mod record;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::Serialize;

use crate::config::WarmConfig;
use crate::grafana::Dashboard;
use crate::pipeline::{self, Incoming, RequestCtx};
use crate::policy::state::Mode;
use crate::request::{ApiRequest, RequestKind};
use crate::state::AppState;
use crate::units::{Millis, millis};
use calls::{Job, WarmCall};
use record::{Record, Seen};

/// How long a run waits for the backends to calm down before it gives up.
const PATIENCE: Duration = Duration::from_secs(5);
const PAUSE: Duration = Duration::from_millis(250);
/// How many problems per dashboard the status keeps.
const KEPT_PROBLEMS: usize = 10;

/// Why a run cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another run is going on (409).
    #[error("a warming run is going on; see GET /admin/warm")]
    Busy,
    /// Sale mode is on: warming now would read what the rules keep closed (409).
    #[error("sale mode is on: warming runs before a window, not in it")]
    SaleMode,
}

/// One dashboard's progress.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    /// The dashboard's title, or `recorded queries`.
    pub name: String,
    /// Calls it has.
    pub calls: usize,
    /// Fetched (in part or whole) and now cached.
    pub warmed: usize,
    /// Already in the cache.
    pub cached: usize,
    /// Failed or refused; the first few say why.
    pub failed: usize,
    /// Bytes of the answers warmed.
    pub bytes: u64,
    /// Targets that could not be turned into calls, and failures.
    pub problems: Vec<String>,
}

/// The current or last run, as `GET /admin/warm` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `idle` (none yet), `running`, `finished` or `stopped`.
    pub state: &'static str,
    /// What started it.
    pub why: String,
    /// When it started and ended, RFC 3339.
    pub started: Option<String>,
    /// When it ended.
    pub ended: Option<String>,
    /// Why it stopped before the end.
    pub stopped: Option<String>,
    /// At most this many calls at once.
    pub concurrency: usize,
    /// Each dashboard's progress, in order.
    pub dashboards: Vec<Progress>,
}

struct WarmMetrics {
    queries: IntCounterVec,
    bytes: IntCounter,
    runs: IntCounterVec,
}

/// The warming runner and the record it replays.
pub struct Warmer {
    config: WarmConfig,
    min_range_ms: i64,
    /// The record of served long ranges.
    pub record: Record,
    run: Mutex<Run>,
    busy: AtomicBool,
    /// Windows already warmed, by name and start.
    warmed: Mutex<HashSet<(String, i64)>>,
    metrics: WarmMetrics,
}

impl Warmer {
    /// A runner for `config`, its metrics in `registry`.
    ///
    /// # Errors
    ///
    /// A metric that cannot be registered.
    pub fn new(config: &WarmConfig, registry: &Registry) -> Result<Self, String> {
        let queries = IntCounterVec::new(
            Opts::new(
                "warm_queries_total",
                "Warming calls by result: warmed, cached (already), failed.",
            ),
            &["result"],
        )
        .map_err(|e| e.to_string())?;
        let bytes = IntCounter::new("warm_bytes_total", "Bytes of the answers warming fetched.")
            .map_err(|e| e.to_string())?;
        let runs = IntCounterVec::new(
            Opts::new("warm_runs_total", "Warming runs by how they ended."),
            &["end"],
        )
        .map_err(|e| e.to_string())?;
        for result in ["warmed", "cached", "failed"] {
            queries.with_label_values(&[result]);
        }
        for collector in [
            Box::new(queries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
            Box::new(runs.clone()),
        ] {
            registry.register(collector).map_err(|e| e.to_string())?;
        }
        Ok(Warmer {
            min_range_ms: millis(config.min_range.0),
            record: Record::new(config.record),
            config: config.clone(),
            run: Mutex::new(Run {
                state: "idle",
                why: String::new(),
                started: None,
                ended: None,
                stopped: None,
                concurrency: 0,
                dashboards: Vec::new(),
            }),
            busy: AtomicBool::new(false),
            warmed: Mutex::new(HashSet::new()),
            metrics: WarmMetrics {
                queries,
                bytes,
                runs,
            },
        })
    }

    /// The current or last run.
    pub fn status(&self) -> Run {
        lock(&self.run).clone()
    }

    /// Count a range request served to a caller, if it is long enough to be
    /// worth warming.
    pub fn note(&self, req: &ApiRequest, dashboard: Option<&str>, now: Millis) {
        if let RequestKind::Range {
            query,
            start,
            end,
            step_ms,
        } = &req.kind
            && end - start >= self.min_range_ms
        {
            self.record.note(
                Seen {
                    query: query.text.as_str().into(),
                    step_ms: *step_ms,
                    range_ms: end - start,
                    dashboard: dashboard.map(Into::into),
                },
                now,
            );
        }
    }

    /// Start a run of `dashboards` (over `range_ms` or each one's own range) on
    /// demand.
    ///
    /// # Errors
    ///
    /// [`Refusal`]: a run is going on, or sale mode is on.
    pub fn start_dashboards(
        self: &Arc<Self>,
        state: &Arc<AppState>,
        dashboards: &[Dashboard],
        range_ms: Option<i64>,
        why: String,
    ) -> Result<Run, Refusal> {
        let now = Utc::now().timestamp_millis();
        let jobs = dashboards
            .iter()
            .map(|d| calls::dashboard(d, range_ms, now))
            .collect();
        self.start(state, jobs, why)
    }

    /// Start a run for the window that opens next, when one with `warm_before`
    /// is that close and was not warmed yet: the configured dashboards and the
    /// most used recorded ranges. Called every few seconds.
    pub fn tick(self: &Arc<Self>, state: &Arc<AppState>, now: DateTime<Utc>) {
        let policy = state.policies.active();
        let due = policy.policy.windows.iter().find(|w| {
            let Some(lead) = w
                .warm_before
                .and_then(|d| chrono::Duration::from_std(d).ok())
            else {
                return false;
            };
            now < w.start
                && now >= w.start - lead
                && !lock(&self.warmed).contains(&(w.name.clone(), w.start.timestamp()))
        });
        let Some(window) = due else { return };
        if state.policies.mode(now).mode == Mode::Sale {
            return;
        }
        let ms = now.timestamp_millis();
        let range_ms = self.config.range.map(|r| millis(r.0));
        let mut jobs = Vec::new();
        for path in &self.config.dashboards {
            match Dashboard::load(path) {
                Ok(board) => jobs.push(calls::dashboard(&board, range_ms, ms)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot warm a dashboard of warm.dashboards");
                    jobs.push(Job {
                        name: path.display().to_string(),
                        calls: Vec::new(),
                        problems: vec![e],
                    });
                }
            }
        }
        let top = self.record.top(self.config.top);
        if !top.is_empty() {
            jobs.push(calls::recorded(&top, ms));
        }
        let why = format!(
            "window '{}' opens at {}",
            window.name,
            window.start.to_rfc3339()
        );
        match self.start(state, jobs, why) {
            Ok(_) => {
                lock(&self.warmed).insert((window.name.clone(), window.start.timestamp()));
            }
            Err(e) => tracing::warn!(window = window.name, error = %e, "warming not started"),
        }
    }

    fn start(
        self: &Arc<Self>,
        state: &Arc<AppState>,
        jobs: Vec<Job>,
        why: String,
    ) -> Result<Run, Refusal> {
        if state.policies.mode(Utc::now()).mode == Mode::Sale {
            return Err(Refusal::SaleMode);
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Refusal::Busy);
        }
        let cap = state
            .backends()
            .map(|b| b.gate.config().max_in_flight)
            .min()
            .unwrap_or(1);
        let concurrency = ((cap as f64 * self.config.share).floor() as usize).max(1);
        let run = Run {
            state: "running",
            why: why.clone(),
            started: Some(Utc::now().to_rfc3339()),
            ended: None,
            stopped: None,
            concurrency,
            dashboards: jobs
                .iter()
                .map(|j| Progress {
                    name: j.name.clone(),
                    calls: j.calls.len(),
                    problems: j.problems.iter().take(KEPT_PROBLEMS).cloned().collect(),
                    ..Progress::default()
                })
                .collect(),
        };
        *lock(&self.run) = run.clone();
        tracing::info!(why, concurrency, dashboards = jobs.len(), "warming started");
        let (this, state) = (self.clone(), state.clone());
        tokio::spawn(async move {
            let stopped = this.work(&state, jobs, concurrency).await;
            this.metrics
                .runs
                .with_label_values(&[if stopped.is_some() {
                    "stopped"
                } else {
                    "finished"
                }])
                .inc();
            {
                let mut run = lock(&this.run);
                run.state = if stopped.is_some() {
                    "stopped"
                } else {
                    "finished"
                };
                run.ended = Some(Utc::now().to_rfc3339());
                if let Some(why) = &stopped {
                    tracing::warn!(why, "warming stopped");
                }
                run.stopped = stopped;
            }
            this.busy.store(false, Ordering::SeqCst);
        });
        Ok(run)
    }

    /// Run every job's calls, `concurrency` at a time; why it stopped early, if it
    /// did.
    async fn work(
        &self,
        state: &Arc<AppState>,
        jobs: Vec<Job>,
        concurrency: usize,
    ) -> Option<String> {
        let stop: Mutex<Option<String>> = Mutex::new(None);
        let own = AtomicUsize::new(0);
        for (index, job) in jobs.into_iter().enumerate() {
            futures_util::stream::iter(job.calls)
                .for_each_concurrent(concurrency, |call| {
                    let (stop, own) = (&stop, &own);
                    async move {
                        if lock(stop).is_some() {
                            return;
                        }
                        if let Err(why) = calm(state, own.load(Ordering::SeqCst), concurrency).await
                        {
                            lock(stop).get_or_insert(why);
                            return;
                        }
                        own.fetch_add(1, Ordering::SeqCst);
                        let result = warm_one(state, &call).await;
                        own.fetch_sub(1, Ordering::SeqCst);
                        self.count(index, &call, result);
                    }
                })
                .await;
            let progress = lock(&self.run).dashboards.get(index).cloned();
            if let Some(p) = progress {
                tracing::info!(
                    dashboard = p.name,
                    calls = p.calls,
                    warmed = p.warmed,
                    cached = p.cached,
                    failed = p.failed,
                    bytes = p.bytes,
                    "warmed dashboard"
                );
            }
            if let Some(why) = lock(&stop).clone() {
                return Some(why);
            }
        }
        None
    }

    fn count(&self, index: usize, call: &WarmCall, result: Result<Warmed, String>) {
        let mut run = lock(&self.run);
        let Some(progress) = run.dashboards.get_mut(index) else {
            return;
        };
        match result {
            Ok(Warmed::Cached) => {
                progress.cached += 1;
                self.metrics.queries.with_label_values(&["cached"]).inc();
            }
            Ok(Warmed::Fetched(bytes)) => {
                progress.warmed += 1;
                progress.bytes += bytes;
                self.metrics.queries.with_label_values(&["warmed"]).inc();
                self.metrics.bytes.inc_by(bytes);
            }
            Err(why) => {
                progress.failed += 1;
                if progress.problems.len() < KEPT_PROBLEMS {
                    progress.problems.push(format!("{}: {why}", call.panel));
                }
                self.metrics.queries.with_label_values(&["failed"]).inc();
            }
        }
    }
}

/// What one warming call found.
enum Warmed {
    /// The answer was in the cache already.
    Cached,
    /// Fetched, this many bytes.
    Fetched(u64),
}

/// Wait until no one queues for a backend and the backends have room beyond what
/// warming itself holds (`own`), for at most [`PATIENCE`]; sale mode ends the run.
async fn calm(state: &AppState, own: usize, concurrency: usize) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if state.policies.mode(Utc::now()).mode == Mode::Sale {
            return Err("sale mode is on".into());
        }
        let busy = state.backends().find_map(|b| {
            let (in_flight, queued) = b.gate.usage();
            let others = in_flight.iter().sum::<usize>().saturating_sub(own);
            let cap = b.gate.config().max_in_flight;
            (queued > 0 || others + concurrency > cap).then(|| {
                format!(
                    "load rose: backend {} has {others} other calls in flight and {queued} \
                     queued (cap {cap})",
                    b.upstream.id.as_str()
                )
            })
        });
        match busy {
            None => return Ok(()),
            Some(why) if tokio::time::Instant::now() >= deadline => return Err(why),
            Some(_) => tokio::time::sleep(PAUSE).await,
        }
    }
}

/// Send `call` through the pipeline as warming: the lowest class, no per-user
/// budget.
async fn warm_one(state: &Arc<AppState>, call: &WarmCall) -> Result<Warmed, String> {
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(call.form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let incoming = Incoming {
        method: Method::POST,
        path: "/api/v1/query_range".into(),
        query: None,
        headers,
        body: Body::from(form),
        client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        warm: true,
    };
    let mut ctx = RequestCtx::new(Utc::now().timestamp_millis());
    let response = pipeline::handle(state, &mut ctx, incoming)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let hit = response
        .headers()
        .get("x-cache")
        .is_some_and(|v| v.as_bytes() == b"HIT");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    Ok(if hit {
        Warmed::Cached
    } else {
        Warmed::Fetched(body.len() as u64)
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
