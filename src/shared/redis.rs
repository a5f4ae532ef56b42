//! The one connection to Redis every replica-shared feature goes through: a
//! multiplexed, self-reconnecting connection (the `redis` crate's
//! `ConnectionManager`), a short timeout on every call, and a breaker, so that a
//! Redis that is down, slow or unreachable costs a request at most one timeout and
//! then nothing until Redis answers again.
//!
//! Every call is timed and counted by operation; the first failure after a
//! success is logged once (and the recovery once), and `promguard_redis_up` says
//! which state the replica is in.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::lock;
use redis::{FromRedisValue, Pipeline, ScriptInvocation};

/// After a failure, calls on the request path skip Redis for this long; the
/// replica's heartbeat keeps probing, and closes the breaker when Redis answers.
const BREAKER: Duration = Duration::from_secs(1);
/// How long the heartbeat gives a new connection, the TLS handshake included; off
/// the request path, so longer than a call's timeout.
const CONNECT: Duration = Duration::from_secs(1);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Redis could not be used for a call: down, slow, refused, or skipped because it
/// failed a moment ago. Callers fall back to the replica's own behaviour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis: {0}")]
pub struct Unavailable(pub String);

/// Redis call metrics, registered with promguard's own.
struct CallMetrics {
    duration: HistogramVec,
    errors: IntCounterVec,
    up: IntGauge,
}

/// The shared connection.
pub struct Redis {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    timeout: Duration,
    /// Calls on the request path are skipped until then.
    open_until: Mutex<Option<Instant>>,
    /// [`UNKNOWN`] until the first call, then [`UP`] or [`DOWN`].
    state: AtomicU8,
    /// Whether the heartbeat's last probe reached Redis.
    reachable: AtomicBool,
    metrics: CallMetrics,
    /// Where the URL points, without credentials, for the log.
    target: String,
}

impl Redis {
    /// A client for `url` whose calls each time out after `timeout`; it connects
    /// at the first [`Redis::probe`], not here.
    ///
    /// # Errors
    ///
    /// A URL the client cannot use.
    pub fn new(url: &str, timeout: Duration, registry: &Registry) -> Result<Self, String> {
        if url.starts_with("rediss://") {
            // rustls needs one process-wide crypto provider; an error only means one
            // is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url).map_err(|e| format!("shared.redis.url: {e}"))?;
        let target = url::Url::parse(url).map_or_else(
            |_| "redis".to_string(),
            |u| {
                format!(
                    "{}://{}:{}",
                    u.scheme(),
                    u.host_str().unwrap_or(""),
                    u.port().unwrap_or(6379)
                )
            },
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "redis_request_duration_seconds",
                "Redis calls by operation, including failed ones.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
            &["op"],
        )
        .map_err(|e| e.to_string())?;
        let errors = IntCounterVec::new(
            Opts::new(
                "redis_errors_total",
                "Redis calls that failed or timed out, or were skipped while Redis was \
                 failing, by operation.",
            ),
            &["op"],
        )
        .map_err(|e| e.to_string())?;
        let up = IntGauge::new(
            "redis_up",
            "1 while Redis answers; 0 while this replica runs on its own.",
        )
        .map_err(|e| e.to_string())?;
        for collector in [
            Box::new(duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(up.clone()),
        ] {
            registry.register(collector).map_err(|e| e.to_string())?;
        }
        Ok(Redis {
            client,
            connection: Mutex::new(None),
            timeout,
            open_until: Mutex::new(None),
            state: AtomicU8::new(UNKNOWN),
            reachable: AtomicBool::new(false),
            metrics: CallMetrics {
                duration,
                errors,
                up,
            },
            target,
        })
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Whether the heartbeat's last probe reached Redis. One slow or failed call
    /// says little about the others; the probe says whether the fleet can be
    /// reached at all.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Where Redis is, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Connect if not connected yet, and check Redis answers, whatever the
    /// breaker says. The heartbeat calls it every second, so a replica started
    /// while Redis was down joins when it comes up.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn probe(&self) -> Result<(), Unavailable> {
        let started = Instant::now();
        let result = async {
            let mut connection = self.connect().await?;
            let ping = redis::cmd("PING");
            self.bounded(ping.query_async::<String>(&mut connection))
                .await
                .map(drop)
        }
        .await;
        self.record("ping", started, result.as_ref().err());
        self.reachable.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    /// The connection, connecting first if need be: only the heartbeat's probe
    /// connects, with [`CONNECT`] to do it in, so no request ever waits for a
    /// connection to be made. Once made, the manager reconnects by itself.
    async fn connect(&self) -> Result<ConnectionManager, Unavailable> {
        if let Some(c) = lock(&self.connection).as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = match tokio::time::timeout(
            CONNECT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(manager)) => manager,
            Ok(Err(e)) => return Err(Unavailable(e.to_string())),
            Err(_) => {
                return Err(Unavailable(format!(
                    "not connected within {} ms",
                    CONNECT.as_millis()
                )));
            }
        };
        *lock(&self.connection) = Some(manager.clone());
        Ok(manager)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
            Err(_) => Err(Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Run one command, named `op` in the metrics.
    ///
    /// # Errors
    ///
    /// [`Unavailable`]: Redis failed, timed out, or failed a moment ago.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.call(op, async |c| cmd.query_async(c).await).await
    }

    /// Run a pipeline (atomic when built so), named `op` in the metrics.
    ///
    /// # Errors
    ///
    /// As [`Redis::query`].
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &Pipeline,
    ) -> Result<T, Unavailable> {
        self.call(op, async |c| pipe.query_async(c).await).await
    }

    /// Run a Lua script with its keys and arguments, named `op` in the metrics.
    ///
    /// # Errors
    ///
    /// As [`Redis::query`].
    pub async fn script<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        self.call(op, async |c| invocation.invoke_async(c).await)
            .await
    }

    async fn call<T>(
        &self,
        op: &'static str,
        run: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, Unavailable> {
        if lock(&self.open_until).is_some_and(|until| Instant::now() < until) {
            self.metrics.errors.with_label_values(&[op]).inc();
            return Err(Unavailable("skipped: redis failed a moment ago".into()));
        }
        // Before the heartbeat's first connection: counted, but the probe alone
        // says whether Redis is up.
        let Some(mut connection) = lock(&self.connection).clone() else {
            self.metrics.errors.with_label_values(&[op]).inc();
            return Err(Unavailable("not connected yet".into()));
        };
        let started = Instant::now();
        let result = self.bounded(run(&mut connection)).await;
        self.record(op, started, result.as_ref().err());
        result
    }

    fn record(&self, op: &'static str, started: Instant, error: Option<&Unavailable>) {
        self.metrics
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        match error {
            None => {
                *lock(&self.open_until) = None;
                if self.state.swap(UP, Ordering::Relaxed) != UP {
                    self.metrics.up.set(1);
                    tracing::info!(redis = %self.target, "redis answers: cache, caps, budgets and the sale-mode switch are shared with the fleet");
                }
            }
            Some(e) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                *lock(&self.open_until) = Some(Instant::now() + BREAKER);
                if self.state.swap(DOWN, Ordering::Relaxed) != DOWN {
                    self.metrics.up.set(0);
                    tracing::warn!(
                        redis = %self.target,
                        op,
                        error = %e,
                        "redis is unreachable: this replica runs on its own (its own cache, \
                         its share of the caps, the last sale-mode state it saw) until redis \
                         answers again"
                    );
                }
            }
        }
    }
}
