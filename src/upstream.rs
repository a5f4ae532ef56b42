//! Stage 9, forward: one call to one backend, done carefully.
//!
//! Input: the typed request and the chosen backend. Output: the backend's status and
//! body, bounded in size and checked to be a Prometheus API envelope, or an
//! [`UpstreamError`] naming the backend. Pooled clients, connect and request
//! timeouts, gzip; dropping the future (client gone) closes the upstream connection.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use prometheus::IntGauge;
use serde::Deserialize;
use url::Url;

use crate::config::BackendConfig;
use crate::metrics::Metrics;
use crate::request::{ApiPath, ApiRequest, Endpoint};
use crate::routing::BackendId;

/// Extra time granted past a client's own `timeout` so the backend's timeout error,
/// which says what timed out, arrives before ours.
const CLIENT_TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// Readiness probes must answer quickly; a backend that takes longer is not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an upstream call failed. `Clone` because coalesced waiters share one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, DNS, connect timeout): 503, the
    /// backend is down or unreachable.
    #[error("backend {backend} ({url}) is unavailable: {reason}")]
    Unavailable {
        /// The backend's name (`recent`, `long_term`).
        backend: &'static str,
        /// The backend's base URL, so the operator sees which address failed.
        url: String,
        /// The client's error chain.
        reason: String,
    },
    /// No full answer within the call's timeout: `backends.*.timeout`, or the
    /// client's own `timeout` plus a grace if lower (504).
    #[error("backend {backend} did not answer within {after_ms} ms")]
    Timeout {
        /// The backend's name (`recent`, `long_term`).
        backend: &'static str,
        /// The timeout that ran out, in milliseconds.
        after_ms: u128,
    },
    /// The answer, decompressed, is over the backend's `max_response`: the query
    /// asks for too much, so it counts as the client's fault (422).
    #[error(
        "the answer from backend {backend} exceeds the {limit}-byte response limit; \
         narrow the time range, raise the step, or aggregate more (sum by ...)"
    )]
    TooLarge {
        /// The backend's name (`recent`, `long_term`).
        backend: &'static str,
        /// `max_response` of the backend, in bytes.
        limit: u64,
    },
    /// The body is not a Prometheus API envelope (`status` `success` or `error`):
    /// a proxy's error page, a wrong URL (502).
    #[error("backend {backend} answered HTTP {status} with an invalid body: {reason}")]
    InvalidResponse {
        /// The backend's name (`recent`, `long_term`).
        backend: &'static str,
        /// The HTTP status it answered with.
        status: u16,
        /// What is wrong with the body.
        reason: String,
    },
    /// The connection failed once made: reset, closed early, a broken body (502).
    #[error("backend {backend} failed mid-response: {reason}")]
    Transport {
        /// The backend's name (`recent`, `long_term`).
        backend: &'static str,
        /// The client's error chain.
        reason: String,
    },
}

impl UpstreamError {
    /// The metric label for this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unavailable { .. } => "connect",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::InvalidResponse { .. } => "invalid_response",
            UpstreamError::Transport { .. } => "transport",
        }
    }

    /// A response too large for the limit is the query's fault, not the backend's.
    pub fn is_client_fault(&self) -> bool {
        matches!(self, UpstreamError::TooLarge { .. })
    }
}

/// What a backend answered: a Prometheus API envelope, success or error.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// The backend's status, passed on to the client (its 4xx and 5xx errors too).
    pub status: StatusCode,
    /// The whole body, decompressed, at most `max_response` bytes.
    pub body: Bytes,
    /// The backend that answered: a range's calls may go to different ones.
    pub backend: BackendId,
}

/// How a backend evaluates a range query whose start is not a multiple of its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnalignedRanges {
    /// Not known yet (the backend has not answered the probe).
    Unknown,
    /// On the grid asked for, every step on its own (Prometheus).
    AsAsked,
    /// Moved onto multiples of the step (VictoriaMetrics from 50 points on, and
    /// query frontends that align to the step).
    Realigned,
}

/// One configured backend with its own connection pool.
#[derive(Debug)]
pub struct Upstream {
    /// Which backend this is; its name in labels, logs and errors.
    pub id: BackendId,
    base: Url,
    client: reqwest::Client,
    timeout: Duration,
    max_response: u64,
    health_path: String,
    /// What [`Upstream::learn_unaligned_ranges`] found: 0 unknown, 1 as asked,
    /// 2 realigned.
    unaligned: AtomicU8,
    /// When the last probe started (milliseconds since `created`), or 0: a probe
    /// is claimed at most once per [`PROBE_EVERY`] while the answer is unknown.
    probed_at: AtomicU64,
    created: Instant,
}

/// How often an unknown backend's grid behaviour may be probed.
const PROBE_EVERY: Duration = Duration::from_secs(30);

/// The minimum every Prometheus API answer has; anything else is garbage.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    status: &'a str,
}

impl Upstream {
    /// Build the pooled client for one backend.
    ///
    /// # Errors
    ///
    /// When the TLS backend cannot be initialised.
    pub fn new(id: BackendId, config: &BackendConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout.0)
            .pool_max_idle_per_host(config.max_idle_connections)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("promguard/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            id,
            base: config.url.clone(),
            client,
            timeout: config.timeout.0,
            max_response: config.max_response.0,
            health_path: config.health_path.clone(),
            unaligned: AtomicU8::new(0),
            probed_at: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// Whether the caller may probe how this backend evaluates unaligned ranges
    /// now: the answer is unknown and no probe started within `PROBE_EVERY`. The
    /// first caller to get `true` owns the probe.
    pub fn claim_probe(&self) -> bool {
        if self.unaligned_ranges() != UnalignedRanges::Unknown {
            return false;
        }
        let now = u64::try_from(self.created.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.probed_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= PROBE_EVERY.as_millis() as u64;
        due && self
            .probed_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// How this backend evaluates unaligned ranges, as far as known.
    pub fn unaligned_ranges(&self) -> UnalignedRanges {
        match self.unaligned.load(Ordering::Relaxed) {
            1 => UnalignedRanges::AsAsked,
            2 => UnalignedRanges::Realigned,
            _ => UnalignedRanges::Unknown,
        }
    }

    /// Ask the backend how it evaluates an unaligned range: `vector(1)` over 60
    /// steps of a minute starting one second past a whole minute. Prometheus
    /// answers on that grid; VictoriaMetrics moves it onto whole minutes. The
    /// answer decides whether unaligned ranges can be cached as extents.
    ///
    /// # Errors
    ///
    /// When the backend does not answer the probe with a matrix; the behaviour
    /// then stays unknown, which caches unaligned ranges as whole answers.
    pub async fn learn_unaligned_ranges(&self) -> Result<UnalignedRanges, String> {
        const START: i64 = 1_700_000_041;
        let params = [
            ("query", "vector(1)".to_string()),
            ("start", START.to_string()),
            ("end", (START + 59 * 60).to_string()),
            ("step", "60".to_string()),
        ];
        let response = self
            .client
            .post(self.url("/api/v1/query_range"))
            .form(&params)
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let bytes = response.bytes().await.map_err(|e| error_chain(&e))?;
        let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let first = body
            .pointer("/data/result/0/values/0/0")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| {
                format!(
                    "no matrix in the answer: {}",
                    snippet(body.to_string().as_bytes())
                )
            })?;
        let found = if first == START as f64 {
            UnalignedRanges::AsAsked
        } else {
            UnalignedRanges::Realigned
        };
        self.unaligned.store(
            if found == UnalignedRanges::AsAsked {
                1
            } else {
                2
            },
            Ordering::Relaxed,
        );
        Ok(found)
    }

    /// The upper bound on one call to this backend (`backends.*.timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The configured base URL, for `/-/status`.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.as_str().trim_end_matches('/'), path)
    }

    /// Send `req`, encoded from its typed fields (as earlier stages adjusted them).
    ///
    /// # Errors
    ///
    /// [`UpstreamError`] for every way a backend can fail; never panics on its answer.
    pub async fn forward(
        &self,
        req: &ApiRequest,
        metrics: &Metrics,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let params = req.encode();
        let backend = self.id.as_str();
        let endpoint = req.endpoint.as_str();
        let gauge = metrics
            .upstream_in_flight
            .with_label_values(&[backend, endpoint]);
        let _in_flight = InFlight::enter(gauge);
        let started = Instant::now();
        let timeout = match req.timeout {
            Some(client) => self.timeout.min(client + CLIENT_TIMEOUT_GRACE),
            None => self.timeout,
        };
        let result = self.call(req.endpoint, &req.path, &params, timeout).await;
        metrics.observe_upstream(self.id, req.endpoint, started.elapsed());
        if let Err(e) = &result {
            metrics
                .upstream_errors
                .with_label_values(&[backend, e.kind()])
                .inc();
        }
        result
    }

    async fn call(
        &self,
        endpoint: Endpoint,
        path: &ApiPath,
        params: &[(String, String)],
        timeout: Duration,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // Only a canonical path can be an ApiPath, so nothing here is normalised
        // into a different path on the way out.
        let url = self.url(path.as_str());
        let builder = if endpoint.takes_form() {
            self.client.post(&url).form(params)
        } else {
            self.client.get(&url).query(params)
        };
        let response = builder
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.send_error(&e, timeout))?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|len| len > self.max_response)
        {
            return Err(self.too_large());
        }
        let mut body = BytesMut::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.send_error(&e, timeout))?;
            if (body.len() + chunk.len()) as u64 > self.max_response {
                return Err(self.too_large());
            }
            body.extend_from_slice(&chunk);
        }
        // Answers are kept in the cache, which counts their length: a buffer grown
        // by doubling would hold up to twice that, so a loose one is copied tight.
        let body = if body.capacity() > body.len() + body.len() / 8 {
            Bytes::copy_from_slice(&body)
        } else {
            body.freeze()
        };
        let reason = match serde_json::from_slice::<Envelope>(&body) {
            Ok(Envelope {
                status: "success" | "error",
            }) => {
                return Ok(UpstreamResponse {
                    status,
                    body,
                    backend: self.id,
                });
            }
            Ok(Envelope { status: other }) => format!("unknown status {other:?}"),
            Err(e) => format!("{e}; body starts with {:?}", snippet(&body)),
        };
        Err(UpstreamError::InvalidResponse {
            backend: self.id.as_str(),
            status: status.as_u16(),
            reason,
        })
    }

    fn send_error(&self, e: &reqwest::Error, timeout: Duration) -> UpstreamError {
        let backend = self.id.as_str();
        if e.is_connect() {
            UpstreamError::Unavailable {
                backend,
                url: self.base.to_string(),
                reason: error_chain(e),
            }
        } else if e.is_timeout() {
            UpstreamError::Timeout {
                backend,
                after_ms: timeout.as_millis(),
            }
        } else {
            UpstreamError::Transport {
                backend,
                reason: error_chain(e),
            }
        }
    }

    fn too_large(&self) -> UpstreamError {
        UpstreamError::TooLarge {
            backend: self.id.as_str(),
            limit: self.max_response,
        }
    }

    /// Check the backend answers its health path with 2xx.
    ///
    /// # Errors
    ///
    /// A human-readable reason, shown on `/-/ready`.
    pub async fn probe(&self) -> Result<(), String> {
        let response = self
            .client
            .get(self.url(&self.health_path))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "{} answered HTTP {}",
                self.health_path,
                response.status()
            ))
        }
    }
}

/// Keeps the in-flight gauge raised while an upstream call runs, including when the
/// call's future is dropped because the client went away.
struct InFlight(IntGauge);

impl InFlight {
    fn enter(gauge: IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// reqwest's top-level message is often just "error sending request"; the cause
/// ("connection refused") is what an SRE needs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned()
}
