//! Server configuration: one YAML file, overridable by command-line flags.
//!
//! Loads and validates `promguard.yaml` (see `promguard.example.yaml` at the repo
//! root for every field). Errors name the field and, where the YAML parser knows it,
//! the line. Secrets may be given inline or as `{env: VAR}`. Reads files and the
//! environment; nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use url::Url;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port Grafana and other clients connect to; `--listen` overrides it.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How log lines are written; `--log-format` overrides it.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Largest accepted request body; Grafana's POSTed queries are a few KiB.
    #[serde(default = "default_max_request_body")]
    pub max_request_body: ByteSize,
    /// How long a SIGTERM waits for in-flight requests before exiting anyway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// The backends' `--query.lookback-delta`; instant selectors read this far back.
    #[serde(default = "default_lookback_delta")]
    pub lookback_delta: HumanDuration,
    /// Client connections: header and idle timeouts, and how many may be open.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where queries go: the recent Prometheus and, optionally, a long-term store.
    /// The one required section.
    pub backends: Backends,
    /// How each upstream call picks its backend.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// How callers prove who they are, and whether Grafana's `X-Grafana-User` is
    /// believed.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The shared result cache: whole answers and range extents.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Per-user budgets: the base that each mode's policy may override.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-backend caps on upstream calls, with their queues and shedding.
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// Curated dashboards and named users: served first, on reserved slots, when a
    /// backend is busy.
    #[serde(default)]
    pub priority: PriorityConfig,
    /// Sale-mode policies, the switch's state file and the admin API.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Bounds on query text, checked before any parser runs.
    #[serde(default)]
    pub query: QueryConfig,
    /// What replicas share through Redis: cache, caps, budgets, the sale-mode
    /// switch. Without it, every replica is on its own.
    #[serde(default)]
    pub shared: SharedConfig,
    /// Filling the cache before a sale window opens (a window's `warm_before`) or
    /// on demand (`promguard warm`).
    #[serde(default)]
    pub warm: WarmConfig,
}

/// What warming replays, and how much of the backends it may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmConfig {
    /// Grafana dashboard JSON files whose every panel is warmed before each window
    /// with a `warm_before` (the curated ones, the on-call team's favourites).
    pub dashboards: Vec<PathBuf>,
    /// The time range those dashboards are warmed over; each dashboard's own when
    /// unset.
    pub range: Option<HumanDuration>,
    /// The most used recorded range queries replayed too.
    pub top: usize,
    /// Range queries remembered (query, step, range, dashboard, how often); the
    /// least used is forgotten first.
    pub record: usize,
    /// Only ranges at least this long are remembered: short ones cost little cold.
    pub min_range: HumanDuration,
    /// The share of each backend's `max_in_flight` warming may use (at least one
    /// call); it pauses, then stops, while others queue for a backend.
    pub share: f64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            dashboards: Vec::new(),
            range: None,
            top: 50,
            record: 1000,
            min_range: HumanDuration(Duration::from_secs(6 * 3600)),
            share: 0.25,
        }
    }
}

/// The fleet's shared state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// The Redis every replica of the fleet uses; `--redis-url` sets its URL.
    pub redis: Option<RedisConfig>,
    /// Replicas to divide each cap by while Redis is unreachable, until a replica
    /// has seen the live ones (then it divides by those).
    pub expected_replicas: usize,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            redis: None,
            expected_replicas: 2,
        }
    }
}

/// How to reach the fleet's Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS (verified
    /// with the system's CA certificates, or `SSL_CERT_FILE`); a secret, since it
    /// may carry a password.
    pub url: Secret,
    /// Prepended to every key, so several fleets can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for one Redis call; past it the call counts as failed and the
    /// replica carries on alone.
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
    /// Largest cached value written to Redis (compressed); larger answers stay in
    /// the replica's own cache.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: ByteSize,
}

impl RedisConfig {
    /// Settings for `url` with every default.
    pub fn with_url(url: String) -> Self {
        RedisConfig {
            url: Secret(url),
            key_prefix: default_key_prefix(),
            timeout: default_redis_timeout(),
            max_value_bytes: default_max_value_bytes(),
        }
    }
}

fn default_key_prefix() -> String {
    "promguard:".into()
}

fn default_redis_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

fn default_max_value_bytes() -> ByteSize {
    ByteSize(8 << 20)
}

/// How upstream calls are routed between the backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Route each upstream call of a range query by what that call reads, not the
    /// whole request by its oldest sample: the refreshed tail of a 30-day panel
    /// comes from the recent Prometheus and only its old extents from the
    /// long-term store. The answer is then stitched from two query engines (see
    /// docs/ARCHITECTURE.md); `false` sends every call where the request goes.
    pub split_fetches: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            split_fetches: true,
        }
    }
}

/// Bounds on the PromQL text promguard reads, checked before any parser runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Longest query text accepted.
    pub max_length: ByteSize,
    /// Deepest nesting accepted: brackets opened plus operators chained, an upper
    /// bound on the depth of the query's syntax tree.
    pub max_depth: usize,
    /// Memory for remembered parses of recent query texts.
    pub memo_bytes: ByteSize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        let limits = crate::scan::ScanLimits::default();
        QueryConfig {
            max_length: ByteSize(limits.max_length as u64),
            max_depth: limits.max_depth,
            memo_bytes: ByteSize(32 << 20),
        }
    }
}

/// Client connections: how long a slow one may hold its place, and how many may
/// be open at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// A client must send its whole request head within this, counted from
    /// connecting or from its first byte after an idle spell; short, since a head
    /// is a few hundred bytes and slow-loris connections hold their place until it.
    pub header_read_timeout: HumanDuration,
    /// A kept-alive connection with no request in progress is closed after this.
    /// Longer than Grafana's 90 s pool idle timeout, so that Grafana is the side
    /// that closes: a POST sent on a connection promguard just closed fails.
    pub idle_timeout: HumanDuration,
    /// Client connections open at once; past it a new one gets an immediate 503.
    /// Lowered at start-up to what the file limit leaves after the descriptors
    /// promguard keeps for backends and files.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(120)),
            max_connections: 4096,
        }
    }
}

impl QueryConfig {
    /// The scan's limits from these settings.
    pub fn limits(&self) -> crate::scan::ScanLimits {
        crate::scan::ScanLimits {
            max_length: usize::try_from(self.max_length.0).unwrap_or(usize::MAX),
            max_depth: self.max_depth,
        }
    }
}

/// The deepest `query.max_depth` may be: promguard's runtime threads have stacks
/// sized for this, with room to spare, for the parser and every walk over a tree.
pub const MAX_QUERY_DEPTH: usize = 2048;

/// Sale-mode policies and the SRE switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Directory of policy files (`policies/`); without it no rules apply.
    pub dir: Option<PathBuf>,
    /// Where the manual override and its audit trail are kept across restarts.
    pub state_file: PathBuf,
    /// Bearer token for `/admin/...`; also read from PROMGUARD_ADMIN_TOKEN. Without
    /// one the admin API refuses every call.
    pub admin_token: Option<Secret>,
    /// How often the policy files are checked for changes.
    pub reload_interval: HumanDuration,
    /// The longest an SRE's manual switch may last before the schedule is back.
    pub max_override: HumanDuration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: None,
            state_file: PathBuf::from("promguard-state/sale-mode.json"),
            admin_token: None,
            reload_interval: HumanDuration(Duration::from_secs(5)),
            max_override: HumanDuration(Duration::from_secs(30 * 86_400)),
        }
    }
}

/// A token bucket: sustained rate and burst.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Sustained rate: how many per second the bucket refills; 0 counts as 1.
    pub per_second: u32,
    /// How many may be spent at once from a full bucket; 0 counts as 1.
    pub burst: u32,
}

/// Per-user budgets, keyed by the caller's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Every request that needs a backend (coalesced waiters included), and hits
    /// too with `count_hits`: generous, so a dashboard loads in one burst.
    pub requests: RateConfig,
    /// Each upstream call: the expensive part.
    pub upstream: RateConfig,
    /// Upstream calls in flight per user.
    pub max_in_flight: usize,
    /// How long a request may wait for one of its user's slots before a 429.
    pub in_flight_wait: HumanDuration,
    /// Users with their own budgets (on-call, alerting).
    pub users: BTreeMap<String, UserOverride>,
    /// Budgets of requests from a Grafana whose users promguard cannot tell apart
    /// (no `identity.grafana`, or Grafana without `send_user_header`).
    pub unverified: Unverified,
    /// Cache hits spend the request budget too. Usually off: a hit costs the
    /// backends nothing, and a refused hit is a blank panel for nothing.
    pub count_hits: bool,
}

/// What per-user budgets do for requests that stand for many people.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Unverified {
    /// No per-user budgets: one budget for everyone behind a Grafana would refuse
    /// the whole company at once. Backend admission (caps, reserved slots,
    /// priority classes, shedding) still protects the backends.
    #[default]
    Off,
    /// One budget per client address and dashboard (Explore: one per address),
    /// the closest to a person such a request allows.
    PerDashboard,
}

impl Unverified {
    /// The setting as written in YAML; shown in `/-/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unverified::Off => "off",
            Unverified::PerDashboard => "per_dashboard",
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            // A 20-panel dashboard with its variables loads in one burst.
            requests: RateConfig {
                per_second: 20,
                burst: 100,
            },
            upstream: RateConfig {
                per_second: 5,
                burst: 50,
            },
            max_in_flight: 8,
            in_flight_wait: HumanDuration(Duration::from_secs(1)),
            users: BTreeMap::new(),
            unverified: Unverified::default(),
            count_hits: false,
        }
    }
}

/// One user's own budgets under `limits.users`, keyed by user name as identified
/// (Grafana login, basic-auth or bearer user). Each budget left out is the one
/// everyone has in the mode in force.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UserOverride {
    /// Replaces `limits.requests` for this user.
    pub requests: Option<RateConfig>,
    /// Replaces `limits.upstream` for this user.
    pub upstream: Option<RateConfig>,
    /// Replaces `limits.max_in_flight` for this user.
    pub max_in_flight: Option<usize>,
}

/// Global in-flight caps per backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// The gate in front of `backends.recent`.
    pub recent: GateConfig,
    /// The gate in front of `backends.long_term`; unused without one.
    pub long_term: GateConfig,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            // Below Prometheus' default --query.max-concurrency of 20.
            recent: GateConfig {
                max_in_flight: 16,
                reserved: 4,
                ..GateConfig::default()
            },
            // Long-range reads are the expensive ones.
            long_term: GateConfig {
                max_in_flight: 6,
                reserved: 2,
                ..GateConfig::default()
            },
        }
    }
}

/// One backend's admission gate: the cap on its upstream calls, the slots held
/// back for the critical class, and the queue in front of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Upstream calls in flight on this backend, never exceeded.
    pub max_in_flight: usize,
    /// Of those, slots only the critical class may use.
    pub reserved: usize,
    /// Requests waiting for a slot; past this, the lowest class is shed.
    pub max_queue: usize,
    /// Longest wait for a slot before a 503; keep it well below client timeouts.
    pub max_wait: HumanDuration,
    /// Sent as `Retry-After` with a 503.
    pub retry_after: HumanDuration,
}

impl GateConfig {
    /// The gate as it runs with `priority`: with no curated dashboard and no named
    /// user configured nobody can be in the critical class, so no slot is held
    /// back for it (a first deployment would otherwise run a quarter short).
    pub fn for_priority(&self, priority: &PriorityConfig) -> GateConfig {
        let critical_possible = !priority.dashboards.is_empty() || !priority.users.is_empty();
        GateConfig {
            reserved: if critical_possible { self.reserved } else { 0 },
            ..self.clone()
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            max_in_flight: 16,
            reserved: 4,
            max_queue: 64,
            max_wait: HumanDuration(Duration::from_secs(1)),
            retry_after: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// Who goes first.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    /// Curated dashboards by uid: reserved capacity, served first.
    pub dashboards: Vec<String>,
    /// Named users (on-call, alerting): the same.
    pub users: Vec<String>,
}

/// The shared result cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off: every request is forwarded (`X-Cache: BYPASS`) and nothing is stored.
    pub enabled: bool,
    /// Bound on cached answers and extents (payload plus bookkeeping).
    pub max_bytes: ByteSize,
    /// Samples arrive late: points newer than this are never kept in extents.
    pub fresh_window: HumanDuration,
    /// How long an answer that includes such recent points is served as a hit.
    pub fresh_ttl: HumanDuration,
    /// Live instant queries (stat, gauge and table panels at "now") are evaluated
    /// at `time` rounded down to a multiple of this, so every viewer's panel within
    /// one interval is one answer. A value above `fresh_ttl` counts as `fresh_ttl`,
    /// so no shared answer is older than an answer may be.
    pub instant_step: HumanDuration,
    /// While a backend is saturated (a request found no slot there within this
    /// long), live panels of callers that are not curated refresh from it at most
    /// this often: a stored answer this young is a hit, and the panel's window moves
    /// back onto this clock, with a warning saying so. `0s` (or `off`): never.
    #[serde(deserialize_with = "duration_or_off")]
    pub busy_refresh: HumanDuration,
    /// How long immutable extents and answers over old data are kept.
    pub extent_ttl: HumanDuration,
    /// How long metadata answers (labels, series, metadata, rules, build info) are kept.
    pub metadata_ttl: HumanDuration,
    /// When the backend fails, answers up to this old are served with a warning.
    pub stale_max_age: HumanDuration,
}

impl CacheConfig {
    /// The instant step in force: `instant_step`, at most `fresh_ttl`.
    pub fn instant_step(&self) -> Duration {
        self.instant_step.0.min(self.fresh_ttl.0)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: ByteSize(512 << 20),
            fresh_window: HumanDuration(Duration::from_secs(300)),
            fresh_ttl: HumanDuration(Duration::from_secs(10)),
            instant_step: HumanDuration(Duration::from_secs(5)),
            busy_refresh: HumanDuration(Duration::from_secs(120)),
            extent_ttl: HumanDuration(Duration::from_secs(6 * 3600)),
            metadata_ttl: HumanDuration(Duration::from_secs(60)),
            stale_max_age: HumanDuration(Duration::from_secs(15 * 60)),
        }
    }
}

/// How log lines are written; the level filter is `PROMGUARD_LOG`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, fields flattened, for log pipelines.
    Json,
}

/// The backends promguard forwards to; routing picks one per request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    /// Prometheus with the most recent data at full resolution.
    pub recent: BackendConfig,
    /// Long-term store for everything older than `recent.window`.
    pub long_term: Option<BackendConfig>,
}

/// How to reach one backend, and how much of it one call may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL; a path prefix (Mimir's `/prometheus`) is kept.
    pub url: Url,
    /// How far back this backend holds data. Only meaningful for `recent`: queries
    /// reaching further go to `long_term`.
    #[serde(default = "default_recent_window")]
    pub window: HumanDuration,
    /// Longest wait to open a connection to the backend; past it the call fails as
    /// unavailable (503).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Upper bound on one upstream call; a client's `timeout` parameter can only lower it.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Responses larger than this (after decompression) are refused with a clear
    /// error instead of exhausting memory.
    #[serde(default = "default_max_response")]
    pub max_response: ByteSize,
    /// Idle pooled connections kept per backend.
    #[serde(default = "default_max_idle_connections")]
    pub max_idle_connections: usize,
    /// Path probed by `/-/ready`; must answer 2xx when the backend can serve queries.
    #[serde(default = "default_health_path")]
    pub health_path: String,
}

impl BackendConfig {
    /// A backend at `url` with every other setting at its default.
    pub fn new(url: Url) -> Self {
        BackendConfig {
            url,
            window: default_recent_window(),
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            max_response: default_max_response(),
            max_idle_connections: default_max_idle_connections(),
            health_path: default_health_path(),
        }
    }
}

/// Who may claim to be whom.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// How a request proves it came through the trusted Grafana; only then is its
    /// `X-Grafana-User` header believed.
    pub grafana: Option<GrafanaTrust>,
    /// Basic-auth users other than Grafana itself: name → password.
    #[serde(default)]
    pub users: BTreeMap<String, Secret>,
    /// Bearer tokens for scripts and alerting: user name → token.
    #[serde(default)]
    pub bearer_tokens: BTreeMap<String, Secret>,
}

/// How the trusted Grafana proves a request came through it: a secret header,
/// the data source's basic auth, or both (either one is enough).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrafanaTrust {
    /// A custom header set on the Grafana datasource, and its secret value.
    pub secret_header: Option<String>,
    /// The value `secret_header` must carry; compared in constant time.
    pub secret: Option<Secret>,
    /// Or the datasource's basic-auth credentials.
    pub basic_auth: Option<BasicAuth>,
}

/// Basic-auth credentials, as configured on the Grafana data source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// The user name the data source sends.
    pub username: String,
    /// Its password; compared in constant time.
    pub password: Secret,
}

/// A secret from the file itself or from an environment variable, resolved at load.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Inline(String),
            Env { env: String },
        }
        match Raw::deserialize(d)? {
            Raw::Inline(s) if s.is_empty() => Err(serde::de::Error::custom("secret is empty")),
            Raw::Inline(s) => Ok(Secret(s)),
            Raw::Env { env } => match std::env::var(&env) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ => Err(serde::de::Error::custom(format!(
                    "environment variable {env} is not set or empty: set it before \
                     starting promguard, or write the secret inline"
                ))),
            },
        }
    }
}

/// A duration written the Prometheus way (`30s`, `2d`, `1h30m`) or as seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration such as 30s, 2d or 1h30m, or seconds",
            from_int: |s| Ok(HumanDuration(Duration::from_secs(s))),
            from_str: parse_human_duration,
        })
    }
}

/// Accepts an unsigned integer or a string; a visitor rather than an untagged enum
/// so that errors keep the field path and line.
struct ScalarVisitor<T> {
    expecting: &'static str,
    from_int: fn(u64) -> Result<T, String>,
    from_str: fn(&str) -> Result<T, String>,
}

impl<T> serde::de::Visitor<'_> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_int)(v).map_err(E::custom)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v).map_err(E::custom)
    }
}

/// Parse `30s`, `2d`, `1h30m` (Prometheus duration syntax).
///
/// # Errors
///
/// A message naming the value when it is not a positive duration.
pub fn parse_human_duration(text: &str) -> Result<HumanDuration, String> {
    crate::units::parse_duration(text)
        .map(HumanDuration)
        .map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// A duration, or zero for a feature that is off: `0`, `0s` or `off`.
fn duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    d.deserialize_any(ScalarVisitor {
        expecting: "a duration such as 2m, or 0s (off)",
        from_int: |s| Ok(HumanDuration(Duration::from_secs(s))),
        from_str: |text| match text.trim() {
            "0" | "0s" | "off" => Ok(HumanDuration(Duration::ZERO)),
            text => parse_human_duration(text),
        },
    })
}

/// A byte count written as an integer or with a binary unit (`512MiB`, `1GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a size in bytes, or with a unit such as 512MiB",
            from_int: |b| Ok(ByteSize(b)),
            from_str: parse_byte_size,
        })
    }
}

fn parse_byte_size(text: &str) -> Result<ByteSize, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("invalid size {text:?}: use B, KiB, MiB or GiB")),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .map(ByteSize)
        .ok_or_else(|| format!("invalid size {text:?}"))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}
fn default_max_request_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_lookback_delta() -> HumanDuration {
    HumanDuration(crate::analysis::DEFAULT_LOOKBACK_DELTA)
}
/// Prometheus' default retention.
fn default_recent_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 24 * 3600))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
/// Prometheus' default `--query.timeout`.
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_max_response() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_idle_connections() -> usize {
    64
}
fn default_health_path() -> String {
    "/-/ready".into()
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read: missing, a directory, no permission.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file's path as given.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Not valid YAML, or a field unknown, missing or of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file's path as given.
        path: String,
        /// The YAML parser's message, with the field's path, line and column.
        message: String,
    },
    /// Fields that parse but cannot work (a zero bound, `reserved` not below
    /// `max_in_flight`, half of a Grafana trust), found by [`Config::validate`].
    #[error("{field}: {message}")]
    Invalid {
        /// The setting's path in the YAML, e.g. `admission.recent`.
        field: &'static str,
        /// What is wrong, and what is allowed.
        message: String,
    },
}

impl Config {
    /// A configuration with only the recent backend set, for running without a file.
    pub fn with_recent(url: Url) -> Self {
        Config {
            listen: default_listen(),
            log_format: LogFormat::default(),
            max_request_body: default_max_request_body(),
            shutdown_grace: default_shutdown_grace(),
            lookback_delta: default_lookback_delta(),
            server: ServerConfig::default(),
            backends: Backends {
                recent: BackendConfig::new(url),
                long_term: None,
            },
            routing: RoutingConfig::default(),
            identity: IdentityConfig::default(),
            cache: CacheConfig::default(),
            limits: LimitsConfig::default(),
            admission: AdmissionConfig::default(),
            priority: PriorityConfig::default(),
            policy: PolicyConfig::default(),
            query: QueryConfig::default(),
            shared: SharedConfig::default(),
            warm: WarmConfig::default(),
        }
    }

    /// Read and validate a YAML file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, the field and (for syntax and type errors)
    /// the line and column.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: display,
            message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parse YAML text; the error message carries field path and line.
    ///
    /// # Errors
    ///
    /// The YAML parser's message, e.g. `backends.recent: missing field `url` at line 3 column 5`.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    /// Check relations between fields that YAML types cannot express.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let backends = std::iter::once(("backends.recent", &self.backends.recent)).chain(
            self.backends
                .long_term
                .iter()
                .map(|b| ("backends.long_term", b)),
        );
        for (field, backend) in backends {
            if !matches!(backend.url.scheme(), "http" | "https") {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("url {} must be http or https", backend.url),
                });
            }
            if !backend.health_path.starts_with('/') {
                return Err(ConfigError::Invalid {
                    field,
                    message: "health_path must start with /".into(),
                });
            }
        }
        for (field, gate) in [
            ("admission.recent", &self.admission.recent),
            ("admission.long_term", &self.admission.long_term),
        ] {
            if gate.max_in_flight == 0 || gate.reserved >= gate.max_in_flight {
                return Err(ConfigError::Invalid {
                    field,
                    message: "max_in_flight must be positive and larger than reserved".into(),
                });
            }
        }
        if self.query.max_depth == 0 || self.query.max_depth > MAX_QUERY_DEPTH {
            return Err(ConfigError::Invalid {
                field: "query.max_depth",
                message: format!("must be between 1 and {MAX_QUERY_DEPTH}"),
            });
        }
        if self.query.max_length.0 == 0 {
            return Err(ConfigError::Invalid {
                field: "query.max_length",
                message: "must be positive".into(),
            });
        }
        for (field, timeout) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout", self.server.idle_timeout),
        ] {
            if timeout.0.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be positive".into(),
                });
            }
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::Invalid {
                field: "server.max_connections",
                message: "must be positive".into(),
            });
        }
        if self.limits.max_in_flight == 0 {
            return Err(ConfigError::Invalid {
                field: "limits.max_in_flight",
                message: "must be positive".into(),
            });
        }
        if let Some(redis) = &self.shared.redis {
            let scheme = redis.url.0.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
                return Err(ConfigError::Invalid {
                    field: "shared.redis.url",
                    message: "must be redis://host:port, rediss:// (TLS) or unix:///path".into(),
                });
            }
            if redis.timeout.0.is_zero() || redis.timeout.0 > Duration::from_secs(10) {
                return Err(ConfigError::Invalid {
                    field: "shared.redis.timeout",
                    message: "must be positive and at most 10s: every request may wait it once"
                        .into(),
                });
            }
        }
        if !(self.warm.share > 0.0 && self.warm.share <= 1.0) {
            return Err(ConfigError::Invalid {
                field: "warm.share",
                message: "must be above 0 and at most 1".into(),
            });
        }
        if self.shared.expected_replicas == 0 {
            return Err(ConfigError::Invalid {
                field: "shared.expected_replicas",
                message: "must be positive".into(),
            });
        }
        if let Some(grafana) = &self.identity.grafana {
            let header = grafana.secret_header.is_some() && grafana.secret.is_some();
            if grafana.secret_header.is_some() != grafana.secret.is_some() {
                return Err(ConfigError::Invalid {
                    field: "identity.grafana",
                    message: "secret_header and secret go together".into(),
                });
            }
            if !header && grafana.basic_auth.is_none() {
                return Err(ConfigError::Invalid {
                    field: "identity.grafana",
                    message: "set secret_header + secret, or basic_auth, or remove the section"
                        .into(),
                });
            }
            if let Some(h) = &grafana.secret_header
                && axum::http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                return Err(ConfigError::Invalid {
                    field: "identity.grafana.secret_header",
                    message: format!("{h:?} is not a valid header name"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_at_the_repo_root_is_valid() {
        // SAFETY: tests in this module are the only readers of these variables.
        unsafe {
            std::env::set_var("PROMGUARD_GRAFANA_SECRET", "s3cret");
            std::env::set_var("PROMGUARD_ADMIN_TOKEN", "t0ken");
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("promguard.example.yaml");
        let config = Config::load(&path).unwrap();
        assert!(config.backends.long_term.is_some());
        assert_eq!(
            config.backends.recent.window,
            HumanDuration(Duration::from_secs(2 * 24 * 3600))
        );
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let err = Config::parse("backends:\n  recent:\n    window: 2d\n").unwrap_err();
        assert!(err.contains("backends.recent"), "{err}");
        assert!(err.contains("url"), "{err}");
        assert!(err.contains("line 3"), "{err}");

        let err =
            Config::parse("backends:\n  recent:\n    url: http://p:9090\n    timeout: soon\n")
                .unwrap_err();
        assert!(err.contains("backends.recent.timeout"), "{err}");
        assert!(err.contains("line 4"), "{err}");

        let err = Config::parse("listen: 1.2.3.4:5\nbackend: {}\n").unwrap_err();
        assert!(err.contains("unknown field `backend`"), "{err}");
    }

    #[test]
    fn sizes_and_durations_accept_units() {
        assert_eq!(parse_byte_size("512MiB"), Ok(ByteSize(512 << 20)));
        assert_eq!(parse_byte_size("1024"), Ok(ByteSize(1024)));
        assert!(parse_byte_size("12MB").is_err());
        assert_eq!(
            parse_human_duration("1h30m"),
            Ok(HumanDuration(Duration::from_secs(5400)))
        );
        assert!(parse_human_duration("0").is_err());
    }

    #[test]
    fn the_busy_floor_can_be_turned_off() {
        let busy = |value: &str| {
            Config::parse(&format!(
                "backends: {{recent: {{url: 'http://p:9090'}}}}\ncache: {{busy_refresh: {value}}}\n"
            ))
            .map(|c| c.cache.busy_refresh.0)
        };
        for off in ["0s", "off", "0"] {
            assert_eq!(busy(off), Ok(Duration::ZERO), "{off}");
        }
        assert_eq!(busy("2m"), Ok(Duration::from_secs(120)));
        let err = busy("soon").unwrap_err();
        assert!(err.contains("cache.busy_refresh"), "{err}");
    }

    #[test]
    fn grafana_trust_needs_a_proof() {
        let mut config = Config::with_recent("http://127.0.0.1:9090".parse().unwrap());
        config.identity.grafana = Some(GrafanaTrust {
            secret_header: Some("X-Secret".into()),
            secret: None,
            basic_auth: None,
        });
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                field: "identity.grafana",
                ..
            })
        ));
    }

    #[test]
    fn server_section_is_optional_and_validated() {
        let defaults = ServerConfig::default();
        let config = Config::parse("backends:\n  recent:\n    url: http://p:9090\n").unwrap();
        assert_eq!(config.server.max_connections, defaults.max_connections);
        assert_eq!(config.server.idle_timeout, defaults.idle_timeout);

        let config = Config::parse(
            "server:\n  header_read_timeout: 2s\n  max_connections: 8\nbackends:\n  recent:\n    url: http://p:9090\n",
        )
        .unwrap();
        assert_eq!(config.server.header_read_timeout.0, Duration::from_secs(2));
        assert_eq!(config.server.idle_timeout, defaults.idle_timeout);
        config.validate().unwrap();

        let err = Config::parse("server:\n  read_timeout: 2s\nbackends: {}\n").unwrap_err();
        assert!(err.contains("unknown field `read_timeout`"), "{err}");

        let mut config = Config::with_recent("http://127.0.0.1:9090".parse().unwrap());
        config.server.idle_timeout = HumanDuration(Duration::ZERO);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                field: "server.idle_timeout",
                ..
            })
        ));
        config.server.idle_timeout = HumanDuration(Duration::from_secs(1));
        config.server.max_connections = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                field: "server.max_connections",
                ..
            })
        ));
    }

    #[test]
    fn reserved_slots_are_held_only_when_someone_can_use_them() {
        let gate = GateConfig::default();
        let none = PriorityConfig::default();
        assert_eq!(gate.for_priority(&none).reserved, 0);
        let curated = PriorityConfig {
            dashboards: vec!["orders".into()],
            users: vec![],
        };
        assert_eq!(gate.for_priority(&curated).reserved, gate.reserved);
        assert_eq!(
            gate.for_priority(&curated).max_in_flight,
            gate.max_in_flight
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(***)");
    }
}
