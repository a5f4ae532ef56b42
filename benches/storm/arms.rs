//! The four ways the storm meets the backends: directly, through nginx with
//! proxy_cache, through promguard in normal mode and in sale mode. Each arm gets a
//! freshly started proxy; the backends are shared.

use std::time::Duration;

use crate::backends::Backends;
use crate::harness::{Promguard, client, repo};
use crate::load::{Endpoints, GRAFANA_SECRET, GRAFANA_SECRET_HEADER};
use crate::nginx::Nginx;
use crate::procstat;

/// Prometheus holds 2 days; everything older is read from VictoriaMetrics.
pub const RECENT_WINDOW: Duration = Duration::from_secs(2 * 86_400);

/// promguard's per-backend in-flight caps in the storm (`admission:`): Prometheus
/// keeps both cores busy with 8 queries, and VictoriaMetrics limits itself to 4
/// concurrent selects on 2 cores (`-search.maxConcurrentRequests`), so 3 never
/// queue inside it. One slot in three is reserved for the curated dashboards.
pub const CAPS: [usize; 2] = [8, 3];
/// promguard's cache bound (`cache.max_bytes`), its default.
pub const CACHE_MIB: u64 = 512;
const ADMIN_TOKEN: &str = "storm-bench-admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Direct,
    Nginx,
    Normal,
    Sale,
}

impl Arm {
    pub const ALL: [Arm; 4] = [Arm::Direct, Arm::Nginx, Arm::Normal, Arm::Sale];

    pub fn name(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Nginx => "nginx",
            Arm::Normal => "promguard",
            Arm::Sale => "promguard sale mode",
        }
    }

    /// The name used in STORM_ARMS.
    pub fn key(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Nginx => "nginx",
            Arm::Normal => "normal",
            Arm::Sale => "sale",
        }
    }
}

/// What stands between the load and the backends during one arm.
pub enum Proxy {
    None,
    Nginx(Nginx),
    Promguard {
        process: Promguard,
        _state: tempfile::TempDir,
    },
}

impl Proxy {
    pub fn promguard_url(&self) -> Option<&str> {
        match self {
            Proxy::Promguard { process, .. } => Some(&process.url),
            _ => None,
        }
    }

    /// CPU seconds the proxy (with nginx's workers) has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Proxy::None => None,
            Proxy::Nginx(n) => Some(procstat::cpu_seconds_with_children(n.pid())),
            Proxy::Promguard { process, .. } => procstat::cpu_seconds(process.pid()),
        }
    }

    /// The proxy's peak resident memory (nginx: master and workers added up).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        match self {
            Proxy::None => None,
            Proxy::Nginx(n) => Some(procstat::peak_rss_bytes_with_children(n.pid())),
            Proxy::Promguard { process, .. } => procstat::peak_rss_bytes(process.pid()),
        }
    }
}

/// Start `arm`'s proxy in front of `backends`; nginx caches answers for `nginx_ttl`.
pub async fn start(arm: Arm, backends: &Backends, nginx_ttl: &str) -> (Proxy, Endpoints) {
    let recent_window_ms = RECENT_WINDOW.as_millis() as i64;
    let (proxy, urls) = match arm {
        Arm::Direct => (
            Proxy::None,
            [backends.prometheus.clone(), backends.victoria.clone()],
        ),
        Arm::Nginx => {
            let nginx = Nginx::start(
                &[
                    ("recent", &backends.prometheus),
                    ("long_term", &backends.victoria),
                ],
                nginx_ttl,
            );
            let urls = [nginx.urls[0].clone(), nginx.urls[1].clone()];
            (Proxy::Nginx(nginx), urls)
        }
        Arm::Normal | Arm::Sale => {
            let state = tempfile::tempdir().expect("a state directory");
            let process = Promguard::start(&config(backends, state.path()));
            set_sale_mode(&process.url, arm == Arm::Sale).await;
            let urls = [process.url.clone(), process.url.clone()];
            (
                Proxy::Promguard {
                    process,
                    _state: state,
                },
                urls,
            )
        }
    };
    (
        proxy,
        Endpoints {
            urls,
            recent_window_ms,
        },
    )
}

/// promguard's configuration for the storm; every limit is spelled out, so the
/// report states exactly what was measured.
fn config(backends: &Backends, state_dir: &std::path::Path) -> String {
    let [recent_cap, long_term_cap] = CAPS;
    format!(
        "\
backends:
  recent: {{url: {prometheus}, window: 2d}}
  long_term: {{url: {victoria}}}
identity:
  grafana: {{secret_header: {GRAFANA_SECRET_HEADER}, secret: {GRAFANA_SECRET}}}
priority:
  dashboards: [orders, sla, promguard]
admission:
  recent: {{max_in_flight: {recent_cap}, reserved: 3, max_queue: 64, max_wait: 2s, retry_after: 5s}}
  long_term: {{max_in_flight: {long_term_cap}, reserved: 1, max_queue: 32, max_wait: 2s, retry_after: 10s}}
cache:
  max_bytes: {CACHE_MIB}MiB
limits:
  requests: {{per_second: 20, burst: 100}}
  upstream: {{per_second: 5, burst: 50}}
  max_in_flight: 8
  in_flight_wait: 1s
policy:
  dir: {policies}
  state_file: {state}
  admin_token: {ADMIN_TOKEN}
  reload_interval: 1h
",
        prometheus = backends.prometheus,
        victoria = backends.victoria,
        policies = repo().join("policies").display(),
        state = state_dir.join("sale-mode.json").display(),
    )
}

/// Force the mode for the whole arm, so a scheduled sale window in the shipped
/// policy cannot change what an arm measures.
async fn set_sale_mode(url: &str, on: bool) {
    let response = client()
        .post(format!("{url}/admin/sale-mode"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "mode": if on { "on" } else { "off" },
            "for": "1h",
            "reason": "storm bench",
            "by": "storm",
        }))
        .send()
        .await
        .expect("promguard's admin API answers");
    assert!(
        response.status().is_success(),
        "setting sale mode failed: {}",
        response.text().await.unwrap_or_default()
    );
}
