//! The storm's own real backends, and what they say about their work.
//!
//! Starts Prometheus (2 days at 30 s) and VictoriaMetrics (the long-term range at
//! 1 h, 3 years by default) with scripts/backends.sh, like the test harness does but
//! with the storm's data span, and stops them when the bench ends, however it ends.
//! Prometheus 2.42 exports no count of samples read, so its query log is switched on
//! (a config reload) and the `totalQueryableSamples` of every query summed;
//! VictoriaMetrics exports `vm_rows_scanned_per_query` and `vm_rows_read_per_query`.
//! CPU comes from /proc for the backends' pids.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Scrape, free_port, repo, scrape};
use crate::procstat;

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
    /// Whether the curated dashboards' recording rules have history, or only
    /// evaluate from this run's start.
    pub rules_backfilled: bool,
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

/// The backends' own in-flight gauges and request counters, sampled over time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// `prometheus_engine_queries`: queries executing or waiting in its engine.
    pub prometheus_in_flight: f64,
    /// `vm_concurrent_select_current`: selects executing (VictoriaMetrics queues the
    /// rest without a gauge).
    pub victoria_in_flight: f64,
    pub prometheus_queries: f64,
    pub victoria_queries: f64,
}

impl Backends {
    /// Start both backends with `long_term` of history (`3y`) for `instances`
    /// instances per service; returns when they answer queries.
    ///
    /// # Panics
    ///
    /// When scripts/backends.sh fails; its log is on stderr.
    pub async fn start(long_term: &str, instances: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("promguard-storm-{}", std::process::id()));
        let script = repo().join("scripts/backends.sh");
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_demo-data"))
            .parent()
            .expect("binary has a directory")
            .to_path_buf();
        // Stop the backends when this process exits, however it exits (a panic, a
        // Ctrl-C). The watchdog outlives us on purpose, so it is never waited for.
        #[allow(clippy::zombie_processes)]
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash {script} stop --dir {dir}; rm -rf {dir}",
                pid = std::process::id(),
                script = script.display(),
                dir = dir.display(),
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the backend watchdog");
        // Blocking the runtime is fine here: nothing else runs before the backends.
        let output = Command::new("bash")
            .arg(&script)
            .args(["start", "--dir"])
            .arg(&dir)
            .args(["--prom-port", &free_port().to_string()])
            .args(["--vm-port", &free_port().to_string()])
            .args(["--exporter-port", &free_port().to_string()])
            .args(["--instances", &instances.to_string()])
            .args(["--long-term", long_term])
            .arg("--bin-dir")
            .arg(&bin_dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/backends.sh");
        assert!(
            output.status.success(),
            "scripts/backends.sh start failed ({}); its log is above",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let var = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("backends.sh printed no {name}: {stdout}"))
        };
        let pid = |name: &str| {
            std::fs::read_to_string(dir.join(format!("{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pid file for {name} in {}", dir.display()))
        };
        let mut backends = Backends {
            prometheus: var("PROMETHEUS_URL"),
            victoria: var("VM_URL"),
            query_log: dir.join("query.log"),
            prometheus_pid: pid("prometheus"),
            victoria_pid: pid("victoria-metrics"),
            dir,
            rules_backfilled: false,
        };
        backends.rules_backfilled = backends.has_recorded_history().await;
        backends.reconfigure_prometheus().await;
        backends
    }

    /// Switch on Prometheus' query log and, when scripts/backends.sh did not load
    /// them, the curated dashboards' recording rules, by editing the config it
    /// wrote and reloading (SIGHUP). VictoriaMetrics reads the same file for its
    /// scrape config but only at start, so it is unaffected.
    async fn reconfigure_prometheus(&self) {
        let path = self.dir.join("scrape.yml");
        let config = std::fs::read_to_string(&path).expect("read the Prometheus config");
        let mut config = config.replacen(
            "global:\n",
            &format!("global:\n  query_log_file: {}\n", self.query_log.display()),
            1,
        );
        if !config.contains("rule_files:") {
            let rules = repo().join("dashboards/rules");
            config.push_str(&format!("rule_files:\n  - {}/*.yml\n", rules.display()));
        }
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
            || scrape(&self.prometheus)
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

    /// Whether the orders dashboard's recorded series reach back 6 hours.
    async fn has_recorded_history(&self) -> bool {
        let at = crate::harness::now_secs() - 6 * 3600 + 600;
        let answer = crate::harness::get(
            &format!("{}/api/v1/query", self.prometheus),
            &[
                (
                    "query",
                    "count(region_channel_status:shop_orders:rate1m)".into(),
                ),
                ("time", at.to_string()),
            ],
        )
        .await;
        answer
            .2
            .pointer("/data/result")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|r| !r.is_empty())
    }

    /// Drop VictoriaMetrics' rollup result cache, so no arm inherits answers an
    /// earlier arm computed.
    pub async fn reset_caches(&self) {
        let http = crate::harness::client();
        http.get(format!("{}/internal/resetRollupResultCache", self.victoria))
            .send()
            .await
            .expect("reset VictoriaMetrics' result cache");
    }

    pub async fn counters(&self) -> Counters {
        let (prom, vm) = tokio::join!(scrape(&self.prometheus), scrape(&self.victoria));
        Counters {
            prometheus_queries: prometheus_queries(&prom),
            victoria_queries: victoria_queries(&vm),
            query_log_len: std::fs::metadata(&self.query_log).map_or(0, |m| m.len()),
            victoria_rows_scanned: vm.sum("vm_rows_scanned_per_query_sum"),
            victoria_rows_read: vm.sum("vm_rows_read_per_query_sum"),
            victoria_select_queued: vm.sum("vm_concurrent_select_limit_reached_total"),
            victoria_select_timeouts: vm.sum("vm_concurrent_select_limit_timeout_total"),
            prometheus_cpu: procstat::cpu_seconds(self.prometheus_pid).unwrap_or(0.0),
            victoria_cpu: procstat::cpu_seconds(self.victoria_pid).unwrap_or(0.0),
        }
    }

    pub async fn gauges(&self) -> Gauges {
        let (prom, vm) = tokio::join!(scrape(&self.prometheus), scrape(&self.victoria));
        Gauges {
            prometheus_in_flight: prom.sum("prometheus_engine_queries "),
            victoria_in_flight: vm.sum("vm_concurrent_select_current"),
            prometheus_queries: prometheus_queries(&prom),
            victoria_queries: victoria_queries(&vm),
        }
    }

    /// Samples Prometheus read for the API queries logged between two snapshots.
    pub fn prometheus_samples(&self, from: &Counters, to: &Counters) -> f64 {
        let mut file = std::fs::File::open(&self.query_log).expect("open the query log");
        file.seek(SeekFrom::Start(from.query_log_len))
            .expect("seek in the query log");
        let mut text = String::new();
        file.take(to.query_log_len - from.query_log_len)
            .read_to_string(&mut text)
            .expect("read the query log");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            // Rule evaluations are logged too; only API queries count.
            .filter(|v| v.get("httpRequest").is_some())
            .filter_map(|v| v.pointer("/stats/samples/totalQueryableSamples")?.as_f64())
            .sum()
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
