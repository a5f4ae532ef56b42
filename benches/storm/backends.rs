//! The storm's own real backends, and what they say about their work.
//!
//! Starts Prometheus (2 days at 30 s, with the curated dashboards' recording rules)
//! and VictoriaMetrics (3 years by default: 1 h steps, then the last 2 days at 30 s)
//! with scripts/backends.sh, like the testkit does for the tests but with the storm's data
//! span, and stops them when the bench ends, however it ends. Prometheus 2.42
//! exports no count of samples read, so its query log is switched on (a config
//! reload) and the `totalQueryableSamples` of every API query summed;
//! VictoriaMetrics exports `vm_rows_scanned_per_query` and `vm_rows_read_per_query`.
//! CPU comes from /proc for the backends' pids.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use promguard_testkit::{Scrape, get, procstat, repo, run_backends_script};

use crate::BINS;

/// Query endpoints, as Prometheus labels its handlers and VictoriaMetrics its paths.
const PROMETHEUS_HANDLERS: &[&str] = &[
    "/api/v1/query",
    "/api/v1/query_range",
    "/api/v1/series",
    "/api/v1/labels",
    "/api/v1/label/:name/values",
];
const VM_PATHS: &[&str] = &[
    "/api/v1/query",
    "/api/v1/query_range",
    "/api/v1/series",
    "/api/v1/labels",
    "/api/v1/label/{}/values",
];

pub struct Backends {
    pub prometheus: String,
    pub victoria: String,
    dir: PathBuf,
    query_log: PathBuf,
    prometheus_pid: u32,
    victoria_pid: u32,
}

/// The backends' cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub prometheus_queries: f64,
    pub victoria_queries: f64,
    /// Bytes of the query log written so far; samples are summed between offsets.
    pub query_log_len: u64,
    pub victoria_rows_scanned: f64,
    pub victoria_rows_read: f64,
    /// Selects that found VictoriaMetrics' concurrency limit reached and queued,
    /// and those that gave up in its queue.
    pub victoria_select_queued: f64,
    pub victoria_select_timeouts: f64,
    pub prometheus_cpu: f64,
    pub victoria_cpu: f64,
}

/// The backends' own gauges, sampled over time; `None` when a backend did not
/// answer its /metrics within [`SAMPLE_TIMEOUT`], which happens under overload.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub prometheus: Option<Gauge>,
    pub victoria: Option<Gauge>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Gauge {
    /// Prometheus: `prometheus_engine_queries`, queries executing or waiting in its
    /// engine. VictoriaMetrics: `vm_concurrent_select_current`, selects executing
    /// (it queues the rest without a gauge).
    pub in_flight: f64,
    /// Query and metadata requests served so far.
    pub queries: f64,
    /// Samples read so far, where the backend exports it: VictoriaMetrics' rows
    /// scanned. Prometheus 2.42 does not; its query log has them.
    pub samples: Option<f64>,
}

/// How long a sample waits for a backend's /metrics.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the counters at an arm's end may wait for an overloaded backend.
const COUNTERS_PATIENCE: Duration = Duration::from_secs(180);

impl Backends {
    /// Start both backends with `long_term` of history (`3y`) for `instances`
    /// instances per service; returns when they answer queries.
    ///
    /// # Panics
    ///
    /// When scripts/backends.sh fails; its log is on stderr.
    pub async fn start(long_term: &str, instances: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("promguard-storm-{}", std::process::id()));
        // Blocking the runtime is fine here: nothing else runs before the backends.
        let started = run_backends_script(
            BINS,
            &dir,
            &[
                "--instances",
                &instances.to_string(),
                "--long-term",
                long_term,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let var = |name: &str| started.var(name).unwrap_or_else(|e| panic!("{e}"));
        let pid = |name: &str| {
            std::fs::read_to_string(dir.join(format!("{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pid file for {name} in {}", dir.display()))
        };
        let backends = Backends {
            prometheus: var("PROMETHEUS_URL"),
            victoria: var("VM_URL"),
            query_log: dir.join("query.log"),
            prometheus_pid: pid("prometheus"),
            victoria_pid: pid("victoria-metrics"),
            dir,
        };
        backends.enable_query_log().await;
        backends
    }

    /// Switch on Prometheus' query log: add `query_log_file` to the config file it
    /// runs with (as it reports in its flags) and reload it (SIGHUP).
    async fn enable_query_log(&self) {
        let flags = get(&format!("{}/api/v1/status/flags", self.prometheus), &[])
            .await
            .2;
        let path = flags
            .pointer("/data/config.file")
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)
            .expect("Prometheus reports its config file");
        let config = std::fs::read_to_string(&path).expect("read the Prometheus config");
        assert!(
            config.starts_with("global:\n"),
            "{} does not start with a global section",
            path.display()
        );
        let config = config.replacen(
            "global:\n",
            &format!("global:\n  query_log_file: {}\n", self.query_log.display()),
            1,
        );
        std::fs::write(&path, config).expect("write the Prometheus config");
        let reloaded = Command::new("kill")
            .args(["-HUP", &self.prometheus_pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            reloaded,
            "cannot signal Prometheus (pid {})",
            self.prometheus_pid
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.query_log.exists()
            || patient_scrape(&self.prometheus)
                .await
                .sum("prometheus_engine_query_log_enabled")
                < 1.0
        {
            assert!(
                Instant::now() < deadline,
                "Prometheus did not enable its query log; see {}",
                self.dir.join("prometheus.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drop VictoriaMetrics' rollup result cache, so no arm inherits answers an
    /// earlier arm computed.
    pub async fn reset_caches(&self) {
        let http = promguard_testkit::client();
        http.get(format!("{}/internal/resetRollupResultCache", self.victoria))
            .send()
            .await
            .expect("reset VictoriaMetrics' result cache");
    }

    /// The counters now, waiting as long as an overloaded backend needs to answer.
    pub async fn counters(&self) -> Counters {
        let (prom, vm) = tokio::join!(
            patient_scrape(&self.prometheus),
            patient_scrape(&self.victoria)
        );
        Counters {
            prometheus_queries: prometheus_queries(&prom),
            victoria_queries: victoria_queries(&vm),
            query_log_len: self.query_log_len(),
            victoria_rows_scanned: vm.sum("vm_rows_scanned_per_query_sum"),
            victoria_rows_read: vm.sum("vm_rows_read_per_query_sum"),
            victoria_select_queued: vm.sum("vm_concurrent_select_limit_reached_total"),
            victoria_select_timeouts: vm.sum("vm_concurrent_select_limit_timeout_total"),
            prometheus_cpu: procstat::cpu_seconds(self.prometheus_pid).unwrap_or(0.0),
            victoria_cpu: procstat::cpu_seconds(self.victoria_pid).unwrap_or(0.0),
        }
    }

    pub async fn gauges(&self) -> Gauges {
        let (prom, vm) = tokio::join!(
            scrape_within(&self.prometheus, SAMPLE_TIMEOUT),
            scrape_within(&self.victoria, SAMPLE_TIMEOUT)
        );
        Gauges {
            prometheus: prom.map(|p| Gauge {
                in_flight: p.sum("prometheus_engine_queries "),
                queries: prometheus_queries(&p),
                samples: None,
            }),
            victoria: vm.map(|v| Gauge {
                in_flight: v.sum("vm_concurrent_select_current"),
                queries: victoria_queries(&v),
                samples: Some(v.sum("vm_rows_scanned_per_query_sum")),
            }),
        }
    }

    fn query_log_len(&self) -> u64 {
        std::fs::metadata(&self.query_log).map_or(0, |m| m.len())
    }

    /// The API queries Prometheus logged between two lengths of its query log, with
    /// times relative to `origin_unix_ms`. Rule evaluations are logged too, and
    /// left out; queries a client abandoned are logged when the engine stops them.
    pub fn prometheus_log(&self, from: u64, to: u64, origin_unix_ms: i64) -> Vec<Logged> {
        let mut file = std::fs::File::open(&self.query_log).expect("open the query log");
        file.seek(SeekFrom::Start(from))
            .expect("seek in the query log");
        let mut text = String::new();
        file.take(to.saturating_sub(from))
            .read_to_string(&mut text)
            .expect("read the query log");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("httpRequest").is_some())
            .filter_map(|v| {
                let finished = chrono::DateTime::parse_from_rfc3339(v["ts"].as_str()?).ok()?;
                let took_s = v
                    .pointer("/stats/timings/execTotalTime")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0);
                Some(Logged {
                    finished_ms: finished.timestamp_millis() - origin_unix_ms,
                    took_ms: (took_s * 1000.0) as i64,
                    samples: v
                        .pointer("/stats/samples/totalQueryableSamples")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0),
                })
            })
            .collect()
    }
}

/// One API query from Prometheus' query log.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    /// When it finished, in ms from the arm's start.
    pub finished_ms: i64,
    /// Its time in the engine, the engine's queue included (`execTotalTime`).
    pub took_ms: i64,
    /// Samples it read (`totalQueryableSamples`); 0 where not reported.
    pub samples: f64,
}

impl Logged {
    /// Whether it was in Prometheus' engine, running or queued, at `at_ms`.
    pub fn in_flight_at(&self, at_ms: i64) -> bool {
        (self.finished_ms - self.took_ms..self.finished_ms).contains(&at_ms)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/backends.sh"))
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A /metrics page, or `None` when it does not come within `timeout`.
pub async fn scrape_within(base: &str, timeout: Duration) -> Option<Scrape> {
    tokio::time::timeout(timeout, async {
        let response = promguard_testkit::client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?;
        Some(Scrape(response.text().await.ok()?))
    })
    .await
    .ok()
    .flatten()
}

/// A /metrics page, however long an overloaded backend takes, up to
/// [`COUNTERS_PATIENCE`].
async fn patient_scrape(base: &str) -> Scrape {
    let deadline = Instant::now() + COUNTERS_PATIENCE;
    loop {
        if let Some(page) = scrape_within(base, Duration::from_secs(10)).await {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{base} did not answer /metrics for {COUNTERS_PATIENCE:?}"
        );
    }
}

fn prometheus_queries(page: &Scrape) -> f64 {
    PROMETHEUS_HANDLERS
        .iter()
        .map(|h| labelled_sum(page, "prometheus_http_requests_total", "handler", h))
        .sum()
}

fn victoria_queries(page: &Scrape) -> f64 {
    VM_PATHS
        .iter()
        .map(|p| labelled_sum(page, "vm_http_requests_total", "path", p))
        .sum()
}

/// The sum of `metric`'s samples whose `label` is exactly `value`, wherever the
/// label sits among the others.
pub fn labelled_sum(page: &Scrape, metric: &str, label: &str, value: &str) -> f64 {
    let needle = format!("{label}=\"{value}\"");
    page.0
        .lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&needle))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
