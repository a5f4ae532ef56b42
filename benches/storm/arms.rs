//! The ways the storm meets the backends: directly; through nginx with proxy_cache;
//! through promguard as a first deployment has it (the README's flags-only command
//! behind a Grafana with default settings), with only Grafana identity and the
//! curated dashboards' priority configured, tuned for this machine (and with
//! `routing.split_fetches` off, as before fetch-level routing, and with that and
//! `cache.busy_refresh` off, as the release before both), tuned in sale
//! mode, the same after a warm afternoon in normal mode, and as a fleet of three
//! tuned replicas sharing one real redis-server (Debian package redis-server)
//! behind a round-robin nginx. Each arm decides what
//! its Grafana sends and gets a freshly started proxy (and Redis); the backends are
//! shared.

use promguard::config::{AdmissionConfig, CacheConfig, parse_human_duration};
use std::time::{Duration, Instant};

use promguard_testkit::nginx::Nginx;
use promguard_testkit::redis::RedisServer;
use promguard_testkit::{Promguard, admin_get, client, procstat, repo};

use crate::BINS;
use crate::backends::Backends;
use crate::load::{Endpoints, GRAFANA_SECRET, GRAFANA_SECRET_HEADER, Grafana};

/// Prometheus holds 2 days; everything older is read from VictoriaMetrics.
const RECENT_WINDOW: &str = "2d";

/// The tuned arms' per-backend in-flight caps (`admission:`): Prometheus keeps both
/// cores busy with 8 queries, and VictoriaMetrics limits itself to 4 concurrent
/// selects on 2 cores (`-search.maxConcurrentRequests`), so 3 never queue inside
/// it. One slot in three is reserved for the curated dashboards.
const TUNED_CAPS: [usize; 2] = [8, 3];
const ADMIN_TOKEN: &str = "storm-bench-admin";
/// The fleet arm's replicas.
pub const FLEET_REPLICAS: usize = 3;
/// Longest wait for every replica to reach Redis, and to agree on the sale-mode
/// switch, before the fleet arm's load starts.
const FLEET_READY: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Direct,
    Nginx,
    /// `promguard serve --listen … --recent-url … --recent-window 2d
    /// --long-term-url …`: no file, so default limits and caps, no identity, no
    /// priority, no policies; behind a Grafana with its default settings.
    Quickstart,
    /// Only `identity.grafana` and `priority.dashboards` configured, everything else
    /// at its default; behind a Grafana that sends the user and the secret.
    Identity,
    /// Every limit spelled out for this machine ([`config`]), policies loaded, sale
    /// mode off.
    Tuned,
    /// The tuned configuration with `routing.split_fetches: false`: every call of a
    /// request goes where the request was routed, as before fetch-level routing.
    Unsplit,
    /// The tuned configuration as the release before fetch-level routing and the
    /// busy refresh floor ran it: `routing.split_fetches: false` and
    /// `cache.busy_refresh: 0s`.
    Before,
    /// The tuned configuration with sale mode switched on.
    Sale,
    /// The tuned configuration after a warm-up in normal mode (the same engineers
    /// on the same dashboards for [`crate::Settings::warm_up`]), then sale mode
    /// switched on for the measured run: the window opening on an afternoon's cache.
    Warmed,
    /// [`FLEET_REPLICAS`] replicas of the tuned configuration (sale mode off) sharing
    /// one redis-server (`shared:`), so cache, caps, budgets and the switch are the
    /// fleet's; behind one nginx balancing round-robin without a cache.
    Fleet,
}

impl Arm {
    /// Every arm, in the order a default run measures them.
    pub const ALL: [Arm; 10] = [
        Arm::Direct,
        Arm::Nginx,
        Arm::Quickstart,
        Arm::Identity,
        Arm::Tuned,
        Arm::Unsplit,
        Arm::Before,
        Arm::Sale,
        Arm::Warmed,
        Arm::Fleet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Nginx => "nginx",
            Arm::Quickstart => "promguard quick start",
            Arm::Identity => "promguard identity only",
            Arm::Tuned => "promguard tuned",
            Arm::Unsplit => "promguard tuned, split_fetches off",
            Arm::Before => "promguard tuned, split_fetches and busy_refresh off",
            Arm::Sale => "promguard tuned, sale mode",
            Arm::Warmed => "promguard tuned, sale mode after a warm afternoon",
            Arm::Fleet => "promguard tuned, fleet of 3",
        }
    }

    /// The name used in STORM_ARMS.
    pub fn key(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Nginx => "nginx",
            Arm::Quickstart => "quickstart",
            Arm::Identity => "identity",
            Arm::Tuned => "tuned",
            Arm::Unsplit => "unsplit",
            Arm::Before => "before",
            Arm::Sale => "sale",
            Arm::Warmed => "warmed",
            Arm::Fleet => "fleet",
        }
    }

    /// The arm a STORM_ARMS key names; `normal` is the tuned arm's earlier key.
    pub fn from_key(key: &str) -> Option<Arm> {
        match key {
            "normal" => Some(Arm::Tuned),
            _ => Arm::ALL.into_iter().find(|a| a.key() == key),
        }
    }

    /// What the Grafana in front of this arm sends. The direct and nginx arms ignore
    /// the headers; they get those of a Grafana set up as the README asks.
    pub fn grafana(self) -> Grafana {
        match self {
            Arm::Quickstart => Grafana::Defaults,
            Arm::Direct
            | Arm::Nginx
            | Arm::Identity
            | Arm::Tuned
            | Arm::Unsplit
            | Arm::Before
            | Arm::Sale
            | Arm::Warmed
            | Arm::Fleet => Grafana::SendsUser,
        }
    }

    /// promguard's in-flight caps per backend (recent, long-term) in this arm; none
    /// without promguard. The fleet's are the tuned caps for the whole fleet, which
    /// its replicas share through Redis.
    pub fn caps(self) -> Option<[usize; 2]> {
        match self {
            Arm::Direct | Arm::Nginx => None,
            Arm::Quickstart | Arm::Identity => {
                let defaults = AdmissionConfig::default();
                Some([
                    defaults.recent.max_in_flight,
                    defaults.long_term.max_in_flight,
                ])
            }
            Arm::Tuned | Arm::Unsplit | Arm::Before | Arm::Sale | Arm::Warmed | Arm::Fleet => {
                Some(TUNED_CAPS)
            }
        }
    }
}

/// promguard's cache bound (`cache.max_bytes`) in MiB: its default, in every arm.
pub fn cache_mib() -> u64 {
    CacheConfig::default().max_bytes.0 >> 20
}

/// What stands between the load and the backends during one arm.
pub enum Proxy {
    None,
    Nginx(Nginx),
    Promguard {
        process: Promguard,
        /// The sale-mode state file's directory, where the arm configures one.
        _state: Option<tempfile::TempDir>,
    },
    /// The fleet arm's processes, stopped in this order: the balancer first, so no
    /// request reaches a replica that is going, Redis after the replicas.
    Fleet {
        balancer: Nginx,
        replicas: Vec<Promguard>,
        redis: RedisServer,
        /// Each replica's sale-mode state file's directory.
        _states: Vec<tempfile::TempDir>,
    },
}

impl Proxy {
    /// The promguard processes' URLs, for their /metrics; none without promguard.
    pub fn promguard_urls(&self) -> Vec<String> {
        match self {
            Proxy::None | Proxy::Nginx(_) => Vec::new(),
            Proxy::Promguard { process, .. } => vec![process.url.clone()],
            Proxy::Fleet { replicas, .. } => replicas.iter().map(|p| p.url.clone()).collect(),
        }
    }

    /// CPU seconds the proxy (with nginx's workers; a fleet's replicas added up,
    /// without its balancer and Redis) has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Proxy::None => None,
            Proxy::Nginx(n) => Some(procstat::cpu_seconds_with_children(n.pid())),
            Proxy::Promguard { process, .. } => procstat::cpu_seconds(process.pid()),
            Proxy::Fleet { replicas, .. } => replicas
                .iter()
                .map(|p| procstat::cpu_seconds(p.pid()))
                .sum(),
        }
    }

    /// The proxy's peak resident memory (nginx: master and workers added up; a
    /// fleet: its replicas' peaks added up).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        match self {
            Proxy::None => None,
            Proxy::Nginx(n) => Some(procstat::peak_rss_bytes_with_children(n.pid())),
            Proxy::Promguard { process, .. } => procstat::peak_rss_bytes(process.pid()),
            Proxy::Fleet { replicas, .. } => replicas
                .iter()
                .map(|p| procstat::peak_rss_bytes(p.pid()))
                .sum(),
        }
    }

    /// CPU seconds so far of a fleet's balancer (nginx with its workers) and of its
    /// redis-server; `None` for other proxies.
    pub fn fleet_cpu_seconds(&self) -> Option<[f64; 2]> {
        match self {
            Proxy::Fleet {
                balancer, redis, ..
            } => Some([
                procstat::cpu_seconds_with_children(balancer.pid()),
                redis.pid().and_then(procstat::cpu_seconds)?,
            ]),
            _ => None,
        }
    }
}

/// Start `arm`'s proxy in front of `backends`; nginx caches answers for `nginx_ttl`.
pub async fn start(arm: Arm, backends: &Backends, nginx_ttl: &str) -> (Proxy, Endpoints) {
    let recent_window_ms = parse_human_duration(RECENT_WINDOW)
        .expect("a valid window")
        .0
        .as_millis() as i64;
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
        // The README's flags-only command.
        Arm::Quickstart => promguard(
            Promguard::with_flags(
                BINS,
                &[
                    "--recent-url",
                    &backends.prometheus,
                    "--recent-window",
                    RECENT_WINDOW,
                    "--long-term-url",
                    &backends.victoria,
                ],
            ),
            None,
        ),
        Arm::Identity => promguard(Promguard::start(BINS, &identity_config(backends)), None),
        Arm::Tuned | Arm::Unsplit | Arm::Before | Arm::Sale | Arm::Warmed => {
            let state = tempfile::tempdir().expect("a state directory");
            let mut config = config(
                backends,
                state.path(),
                if arm == Arm::Before { "0s" } else { "2m" },
            );
            if matches!(arm, Arm::Unsplit | Arm::Before) {
                config.push_str("routing: {split_fetches: false}\n");
            }
            let process = Promguard::start(BINS, &config);
            set_sale_mode(&process.url, arm == Arm::Sale).await;
            promguard(process, Some(state))
        }
        Arm::Fleet => fleet(backends).await,
    };
    (
        proxy,
        Endpoints {
            urls,
            recent_window_ms,
        },
    )
}

/// A promguard arm: every request goes to the one process.
fn promguard(process: Promguard, state: Option<tempfile::TempDir>) -> (Proxy, [String; 2]) {
    let urls = [process.url.clone(), process.url.clone()];
    (
        Proxy::Promguard {
            process,
            _state: state,
        },
        urls,
    )
}

/// The fleet arm: [`FLEET_REPLICAS`] tuned replicas on a fresh redis-server, all
/// connected to it and in normal mode, behind a round-robin nginx.
///
/// # Panics
///
/// When a replica does not reach Redis, or the fleet does not agree on the
/// sale-mode switch, within [`FLEET_READY`].
async fn fleet(backends: &Backends) -> (Proxy, [String; 2]) {
    let redis = RedisServer::start();
    let shared = format!(
        "\
shared:
  redis: {{url: '{url}', key_prefix: 'storm:'}}
  expected_replicas: {FLEET_REPLICAS}
",
        url = redis.url(),
    );
    let (replicas, states): (Vec<Promguard>, Vec<tempfile::TempDir>) = (0..FLEET_REPLICAS)
        .map(|_| {
            let state = tempfile::tempdir().expect("a state directory");
            let config = format!("{}{shared}", config(backends, state.path(), "2m"));
            (Promguard::start(BINS, &config), state)
        })
        .unzip();
    let deadline = Instant::now() + FLEET_READY;
    for replica in &replicas {
        replica
            .until_redis_up(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
    // The switch is the fleet's: made through one replica, followed by the others.
    let answer = set_sale_mode(&replicas[0].url, false).await;
    assert_eq!(
        answer["applies_to"], "every replica",
        "the fleet's sale-mode switch did not reach Redis: {answer}"
    );
    let wanted =
        admin_get(&replicas[0].url, "/admin/sale-mode", ADMIN_TOKEN).await["override"].clone();
    for replica in &replicas[1..] {
        while admin_get(&replica.url, "/admin/sale-mode", ADMIN_TOKEN).await["override"] != wanted {
            assert!(
                Instant::now() < deadline,
                "fleet replica {} did not follow the sale-mode switch within {FLEET_READY:?}",
                replica.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let members: Vec<&str> = replicas.iter().map(|p| p.url.as_str()).collect();
    let balancer = Nginx::balance("fleet", &members);
    let url = balancer.urls[0].clone();
    (
        Proxy::Fleet {
            balancer,
            replicas,
            redis,
            _states: states,
        },
        [url.clone(), url],
    )
}

/// The identity arm's configuration: who asks, and which dashboards go first.
fn identity_config(backends: &Backends) -> String {
    format!(
        "\
backends:
  recent: {{url: {prometheus}, window: {RECENT_WINDOW}}}
  long_term: {{url: {victoria}}}
identity:
  grafana: {{secret_header: {GRAFANA_SECRET_HEADER}, secret: {GRAFANA_SECRET}}}
priority:
  dashboards: [orders, sla, promguard]
",
        prometheus = backends.prometheus,
        victoria = backends.victoria,
    )
}

/// The tuned arms' configuration; every limit is spelled out, so the report states
/// exactly what was measured.
fn config(backends: &Backends, state_dir: &std::path::Path, busy_refresh: &str) -> String {
    let [recent_cap, long_term_cap] = TUNED_CAPS;
    format!(
        "\
backends:
  recent: {{url: {prometheus}, window: {RECENT_WINDOW}}}
  long_term: {{url: {victoria}}}
identity:
  grafana: {{secret_header: {GRAFANA_SECRET_HEADER}, secret: {GRAFANA_SECRET}}}
priority:
  dashboards: [orders, sla, promguard]
admission:
  recent: {{max_in_flight: {recent_cap}, reserved: 3, max_queue: 64, max_wait: 2s, retry_after: 5s}}
  long_term: {{max_in_flight: {long_term_cap}, reserved: 1, max_queue: 32, max_wait: 2s, retry_after: 10s}}
cache:
  max_bytes: {cache_mib}MiB
  busy_refresh: {busy_refresh}
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
        cache_mib = cache_mib(),
    )
}

/// Switch sale mode on at every promguard of `proxy`: the warmed arm's window
/// opens.
pub async fn open_window(proxy: &Proxy) {
    for url in proxy.promguard_urls() {
        set_sale_mode(&url, true).await;
    }
}

/// Force the mode for the whole arm, so a scheduled sale window in the shipped
/// policy cannot change what an arm measures; promguard's answer.
async fn set_sale_mode(url: &str, on: bool) -> serde_json::Value {
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
    response
        .json()
        .await
        .expect("promguard's admin API answers JSON")
}
