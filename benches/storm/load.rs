//! Plays the population against one arm: every engineer opens their dashboards at
//! their join time, refreshes each on its interval, and browses in Explore.
//!
//! Grafana's behaviour that matters under overload is kept: all targets of a
//! dashboard are sent at once, with one "now" for the refresh; a panel whose query is
//! still running when the next refresh fires drops it (the request is cancelled,
//! "superseded"); otherwise the client gives up after the data proxy timeout (30 s by
//! default, "timeout"). The headers are those of the arm's Grafana configuration.
//! Every request is recorded with its start time, kind, latency and outcome;
//! requests that never answered are recorded at the time they were abandoned, so
//! percentiles do not flatter an arm that drops requests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio::time::Instant;

use promguard::grafana::{Call, HttpCall};

use crate::population::{Dashboard, Engineer, Kind, Target};

/// The shared secret promguard's identity stage expects from Grafana (set on the
/// data source as a custom header), so that `X-Grafana-User` is believed.
pub const GRAFANA_SECRET_HEADER: &str = "X-Promguard-Grafana-Secret";
pub const GRAFANA_SECRET: &str = "storm-bench-secret";

/// How the Grafana in front of an arm is set up, which decides what its data proxy
/// adds to each query besides `User-Agent`, `X-Grafana-Org-Id`, `X-Datasource-Uid`
/// and, on dashboard panels, `X-Dashboard-Uid` and `X-Panel-Id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grafana {
    /// Grafana's defaults: no `X-Grafana-User`, no custom header, so every engineer's
    /// queries look alike, from Grafana's one address.
    Defaults,
    /// `[dataproxy] send_user_header = true` and the shared secret as a custom header
    /// on the data source, as the README asks.
    SendsUser,
}

/// The backend a request is for: index into [`Endpoints::urls`] and gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Recent = 0,
    LongTerm = 1,
}

/// Where an arm sends requests for each backend. The direct and nginx arms route
/// like promguard would (a query whose oldest sample is older than the recent
/// window goes to the long-term store); promguard gets everything.
#[derive(Clone)]
pub struct Endpoints {
    pub urls: [String; 2],
    pub recent_window_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// An answer with this HTTP status.
    Status(u16),
    /// Abandoned after the client timeout.
    Timeout,
    /// Abandoned when the panel's next refresh started.
    Superseded,
    /// The connection failed.
    Failed,
}

impl Outcome {
    pub fn ok(self) -> bool {
        matches!(self, Outcome::Status(s) if (200..300).contains(&s))
    }

    pub fn label(self) -> String {
        match self {
            Outcome::Status(s) => s.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Superseded => "superseded".into(),
            Outcome::Failed => "connection failed".into(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// When the request was sent, from the start of the run.
    pub at_ms: u64,
    pub kind: Kind,
    pub latency_us: u64,
    pub outcome: Outcome,
    /// The proxy's `X-Cache` header: how promguard or nginx produced the answer.
    pub cache: Option<&'static str>,
    /// An instant query (stat, gauge, bar gauge, table panels; Explore).
    pub instant: bool,
    /// Served from promguard's cache past calls the sale rules held back: the
    /// answer's warning says what is missing.
    pub held: bool,
    /// Moved back by the busy refresh floor: the warning says the backends are busy.
    pub busy: bool,
}

/// One arm's run in progress.
pub struct Load {
    http: reqwest::Client,
    endpoints: Endpoints,
    grafana: Grafana,
    started: Instant,
    started_unix_ms: i64,
    ends: Instant,
    timeout: Duration,
    records: Mutex<Vec<Record>>,
    /// Requests this client has open per backend, and the most at once.
    open: [AtomicI64; 2],
    peak_open: [AtomicI64; 2],
}

impl Load {
    pub fn new(
        endpoints: Endpoints,
        grafana: Grafana,
        duration: Duration,
        timeout: Duration,
    ) -> Arc<Self> {
        let started = Instant::now();
        Arc::new(Load {
            // No client-wide timeout: each request carries its own deadline.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(90))
                .build()
                .expect("build the load client"),
            endpoints,
            grafana,
            started,
            started_unix_ms: unix_ms(),
            ends: started + duration,
            timeout,
            records: Mutex::new(Vec::new()),
            open: Default::default(),
            peak_open: Default::default(),
        })
    }

    /// The wall-clock time the run started, for matching backend logs.
    pub fn started_unix_ms(&self) -> i64 {
        self.started_unix_ms
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn peak_open(&self) -> [i64; 2] {
        [0, 1].map(|i| self.peak_open[i].load(Ordering::Relaxed))
    }

    /// Run everyone's tabs until the run's end; requests still open then finish or
    /// reach their deadline (at most the client timeout) before this returns.
    pub async fn run(self: &Arc<Self>, population: &Arc<Vec<Engineer>>) -> Vec<Record> {
        let mut tasks = Vec::new();
        for (e, engineer) in population.iter().enumerate() {
            for d in 0..engineer.dashboards.len() {
                let (load, population) = (self.clone(), population.clone());
                tasks.push(tokio::spawn(async move {
                    let engineer = &population[e];
                    load.dashboard(engineer, &engineer.dashboards[d]).await;
                }));
            }
            if engineer.explore.is_some() {
                let (load, population) = (self.clone(), population.clone());
                tasks.push(tokio::spawn(async move {
                    load.explore(&population[e]).await;
                }));
            }
        }
        for task in tasks {
            task.await.expect("a tab's task panicked");
        }
        std::mem::take(&mut *self.records.lock().expect("records lock"))
    }

    async fn dashboard(&self, engineer: &Engineer, dashboard: &Dashboard) {
        let opened = self.started + Duration::from_millis(engineer.joins_ms);
        if opened >= self.ends {
            return;
        }
        tokio::time::sleep_until(opened).await;
        let refresh = Duration::from_millis(dashboard.refresh_ms);
        // Variables resolve first; panels wait for them, as in Grafana.
        let deadline = opened + self.timeout;
        let now_ms = unix_ms();
        join_all(dashboard.on_load.iter().map(|t| {
            self.send(
                engineer,
                Some(dashboard),
                t,
                now_ms,
                deadline,
                Outcome::Timeout,
            )
        }))
        .await;
        let mut tick = Instant::now();
        while tick < self.ends {
            let next = tick + refresh;
            let (deadline, expiry) = if next < self.ends && next < tick + self.timeout {
                (next, Outcome::Superseded)
            } else {
                (tick + self.timeout, Outcome::Timeout)
            };
            let now_ms = unix_ms();
            join_all(
                dashboard
                    .panels
                    .iter()
                    .map(|t| self.send(engineer, Some(dashboard), t, now_ms, deadline, expiry)),
            )
            .await;
            // Grafana's timer keeps its rhythm from when the dashboard opened.
            let elapsed = tick.duration_since(opened).as_millis() as u64;
            tick = opened
                + Duration::from_millis(
                    (elapsed / dashboard.refresh_ms + 1) * dashboard.refresh_ms,
                );
            if tick >= self.ends {
                return;
            }
            tokio::time::sleep_until(tick).await;
        }
    }

    async fn explore(&self, engineer: &Engineer) {
        let Some(explore) = &engineer.explore else {
            return;
        };
        let mut at = self.started + Duration::from_millis(engineer.joins_ms);
        for visit in explore.visits.iter().cycle() {
            if at >= self.ends {
                return;
            }
            tokio::time::sleep_until(at).await;
            let deadline = at + self.timeout;
            let now_ms = unix_ms();
            join_all(
                visit
                    .iter()
                    .map(|t| self.send(engineer, None, t, now_ms, deadline, Outcome::Timeout)),
            )
            .await;
            at += Duration::from_millis(explore.every_ms);
        }
    }

    /// Send one target the way Grafana would at `now_ms`, and record how it ended.
    async fn send(
        &self,
        engineer: &Engineer,
        dashboard: Option<&Dashboard>,
        target: &Target,
        now_ms: i64,
        deadline: Instant,
        expiry: Outcome,
    ) {
        let HttpCall { post, path, params } = target.call.http(now_ms);
        let backend = if target.call.oldest(now_ms, target.reach_ms)
            < now_ms - self.endpoints.recent_window_ms
        {
            Backend::LongTerm
        } else {
            Backend::Recent
        };
        let url = format!("{}{path}", self.endpoints.urls[backend as usize]);
        let request = if post {
            self.http.post(url).form(&params)
        } else {
            self.http.get(url).query(&params)
        };
        let mut request = request
            .header("User-Agent", "Grafana/11.3.0")
            .header("X-Grafana-Org-Id", "1")
            .header("X-Datasource-Uid", "promguard");
        if self.grafana == Grafana::SendsUser {
            request = request
                .header("X-Grafana-User", &*engineer.login)
                .header(GRAFANA_SECRET_HEADER, GRAFANA_SECRET);
        }
        if let Some(d) = dashboard {
            request = request
                .header("X-Dashboard-Uid", &*d.uid)
                .header("X-Panel-Id", target.panel_id.to_string());
        }
        let kind = dashboard.map_or(Kind::Explore, |d| d.kind);
        let sent = Instant::now();
        let open = &self.open[backend as usize];
        let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open[backend as usize].fetch_max(now_open, Ordering::Relaxed);
        let answer = tokio::time::timeout_at(deadline, async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let cache = response
                .headers()
                .get("x-cache")
                .and_then(|v| cache_tag(v.as_bytes()));
            // The whole body, as Grafana reads it before drawing.
            let body = response.bytes().await?;
            // promguard puts its own warning first.
            let head = body.get(..64).unwrap_or(&body);
            let says = |text: &[u8]| head.windows(text.len()).any(|w| w == text);
            let notes = Notes {
                held: says(b"promguard: no data fro"),
                busy: says(b"promguard: the metrics backends are busy"),
            };
            Ok::<_, reqwest::Error>((status, cache, notes))
        })
        .await;
        open.fetch_sub(1, Ordering::Relaxed);
        let (outcome, cache, notes) = match answer {
            Ok(Ok((status, cache, notes))) => (Outcome::Status(status), cache, notes),
            Ok(Err(_)) => (Outcome::Failed, None, Notes::default()),
            Err(_) => (expiry, None, Notes::default()),
        };
        let record = Record {
            at_ms: sent.duration_since(self.started).as_millis() as u64,
            kind,
            latency_us: sent.elapsed().as_micros() as u64,
            outcome,
            cache,
            instant: matches!(target.call, Call::Instant { .. }),
            held: notes.held,
            busy: notes.busy,
        };
        self.records.lock().expect("records lock").push(record);
    }
}

/// What promguard's own warning on an answer says, if it has one.
#[derive(Default)]
struct Notes {
    held: bool,
    busy: bool,
}

/// promguard's and nginx's `X-Cache` values, kept without allocating per request.
fn cache_tag(value: &[u8]) -> Option<&'static str> {
    const TAGS: &[&str] = &[
        "HIT",
        "MISS",
        "PARTIAL",
        "STALE",
        "BYPASS",
        "EXPIRED",
        "UPDATING",
        "REVALIDATED",
    ];
    TAGS.iter().copied().find(|t| t.as_bytes() == value)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
