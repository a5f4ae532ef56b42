//! The accept loop: client connections, bounded in number and in how long a slow
//! or idle one may keep its place.
//!
//! Accepts TCP connections and serves HTTP/1.1 and HTTP/2 on them with the app,
//! adding each request's `ConnectInfo`. Closes connections that take too long to
//! send a request head or sit idle too long, answers connections past the bound
//! with a 503, backs off when accepting fails (out of descriptors), and drains on
//! shutdown. Socket I/O; the decisions in it are pure functions tested below.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus::IntGauge;
use rlimit::Resource;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tower::ServiceExt;

use crate::config::Config;
use crate::metrics::Metrics;

/// Descriptors promguard uses besides client and backend connections: stdio, the
/// listener, the runtime's epoll and wake-up descriptors, signal handling, policy
/// and state files, DNS look-ups, readiness probes. About a dozen at rest; the
/// rest is headroom.
const BASE_RESERVE: u64 = 32;
/// Refusals being written at once; each holds its connection for up to three
/// [`REFUSAL_STEP`]s. Past this a refusal is written without waiting.
const MAX_REFUSING: usize = 32;
/// Each step of a refusal: waiting for the request head, writing the 503,
/// waiting for the client to close.
const REFUSAL_STEP: Duration = Duration::from_secs(1);
/// Connections free up within seconds once slow clients are cut off.
const REFUSAL_RETRY_AFTER_SECS: u64 = 1;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Out of descriptors, accept fails at every back-off step; one line a minute says
/// it, the counter counts it.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// HTTP/2 pings find a client that vanished without closing (a dropped NAT entry,
/// a killed VM) within this plus hyper's 20 s ack timeout, instead of when TCP
/// gives up many minutes later.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// What the accept loop enforces, resolved at start-up by [`prepare`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `server.header_read_timeout`: how long a connection may take to send a whole
    /// request head, counted from connecting or from its first byte after an idle
    /// spell.
    pub header_read_timeout: Duration,
    /// `server.idle_timeout`: how long a kept-alive connection may wait with no
    /// request in progress before promguard closes it.
    pub idle_timeout: Duration,
    /// `server.max_connections`, lowered to fit the file limit.
    pub max_connections: usize,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `getrlimit(RLIMIT_NOFILE)` failed, so the connection bound cannot be sized.
    #[error("cannot read the file limit (RLIMIT_NOFILE): {0}")]
    FileLimit(#[source] io::Error),
    /// The file limit is not above what promguard reserves, so no client could
    /// connect: start-up fails rather than refusing everyone.
    #[error(
        "the file limit (RLIMIT_NOFILE) is {limit} and promguard keeps {reserve} descriptors \
         for backend connections and its own files: none are left for clients; raise it \
         (ulimit -n, systemd LimitNOFILE=) or lower backends' max_idle_connections and \
         admission max_in_flight"
    )]
    FileLimitTooLow {
        /// The soft limit after raising it as far as allowed (to the hard one).
        limit: u64,
        /// Descriptors kept for promguard's own files, refusals being written and,
        /// per backend, admission `max_in_flight` plus `max_idle_connections`.
        reserve: u64,
    },
}

/// Raise the soft file limit to the hard one, and size the connection bound by it.
///
/// # Errors
///
/// [`ServerError`] when the limit cannot be read, or leaves no descriptors for
/// client connections.
pub fn prepare(config: &Config) -> Result<Settings, ServerError> {
    let file_limit = raise_file_limit()?;
    let reserve = reserved_descriptors(config);
    let configured = config.server.max_connections;
    let max_connections = connection_bound(configured, file_limit, reserve)?;
    if max_connections < configured {
        tracing::warn!(
            file_limit,
            reserve,
            configured,
            max_connections,
            "server.max_connections lowered to fit the file limit"
        );
    }
    Ok(Settings {
        header_read_timeout: config.server.header_read_timeout.0,
        idle_timeout: config.server.idle_timeout.0,
        max_connections,
    })
}

/// Every connection is a descriptor, and the soft limit is often 1024 where the
/// hard one is far higher; raising it is what Go programs such as Prometheus do.
fn raise_file_limit() -> Result<u64, ServerError> {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).map_err(ServerError::FileLimit)?;
    if soft < hard {
        match rlimit::setrlimit(Resource::NOFILE, hard, hard) {
            Ok(()) => return Ok(hard),
            // An unlimited hard limit is above what the kernel lets a process have.
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the file limit"),
        }
    }
    Ok(soft)
}

/// Descriptors kept back from clients: the base, refusals, and per backend its
/// admitted calls and pooled idle connections.
fn reserved_descriptors(config: &Config) -> u64 {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let recent = (&config.backends.recent, &config.admission.recent);
    let long_term = config
        .backends
        .long_term
        .as_ref()
        .map(|b| (b, &config.admission.long_term));
    std::iter::once(recent).chain(long_term).fold(
        BASE_RESERVE.saturating_add(as_u64(MAX_REFUSING)),
        |sum, (backend, gate)| {
            sum.saturating_add(as_u64(gate.max_in_flight))
                .saturating_add(as_u64(backend.max_idle_connections))
        },
    )
}

/// The configured bound, lowered to what the file limit leaves after the reserve.
fn connection_bound(
    configured: usize,
    file_limit: u64,
    reserve: u64,
) -> Result<usize, ServerError> {
    let available = file_limit.saturating_sub(reserve);
    if available == 0 {
        return Err(ServerError::FileLimitTooLow {
            limit: file_limit,
            reserve,
        });
    }
    let fits = usize::try_from(available).map_or(configured, |a| a.min(configured));
    Ok(fits.min(Semaphore::MAX_PERMITS))
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting and
/// return once every open connection has finished its requests (the caller
/// bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: Settings,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
) {
    metrics
        .limit_settings
        .with_label_values(&["max_connections", "server"])
        .set(i64::try_from(settings.max_connections).unwrap_or(i64::MAX));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer runs from the end of one response to the next head, so
    // it would also cut idle keep-alive connections at the header timeout; the
    // watchdog below times the two separately.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_PING_INTERVAL);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refusal = refusal(settings.max_connections);
    let graceful = GracefulShutdown::new();
    let mut backoff = Backoff::default();
    let mut error_log = AcceptErrorLog::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics.server_refused_connections.inc();
                    match refusing.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(refuse(stream, refusal.clone(), permit));
                        }
                        // Too many refusals lingering: answer without waiting, so
                        // a flood cannot take the descriptors kept for backends.
                        Err(_) => refuse_now(&stream, &refusal),
                    }
                    continue;
                };
                let open = Open::new(slot, metrics.server_open_connections.clone());
                tokio::spawn(connection(
                    stream,
                    peer,
                    builder.clone(),
                    app.clone(),
                    settings,
                    graceful.watcher(),
                    open,
                ));
            }
            // The client left before its connection was accepted.
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                metrics.server_accept_errors.inc();
                let pause = backoff.failed();
                if let Some(unreported) = error_log.record(Instant::now()) {
                    tracing::warn!(
                        error = %e,
                        unreported,
                        pause_ms = pause.as_millis(),
                        "accept failed; backing off (logged at most once a minute, counted in \
                         promguard_server_accept_errors_total)"
                    );
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = sleep(pause) => {}
                }
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serve one connection until it ends, times out, or drains on shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    settings: Settings,
    watcher: Watcher,
    _open: Open,
) {
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request| {
            handle(app.clone(), activity.clone(), peer, request)
        })
    };
    let served = watcher.watch(builder.serve_connection(io, service));
    tokio::select! {
        result = served => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        expired = watchdog(&activity, &settings) => {
            tracing::debug!(%peer, timeout = expired.as_str(), "closing connection");
        }
    }
}

/// One request: the app, with the client's address where it expects it.
async fn handle(
    app: Router,
    activity: Arc<Activity>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Tracked>, Infallible> {
    let in_flight = InFlight::start(activity, request.version() == Version::HTTP_2);
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(response) = app.oneshot(request).await;
    Ok(response.map(|body| Tracked {
        body,
        _in_flight: in_flight,
    }))
}

/// Resolves when the connection has waited too long for a request head or sat
/// idle too long; never while a request is in progress.
///
/// Nothing tells it about activity, so a request costs no wake-up of this task:
/// it sleeps until the deadline it saw, or for the shorter timeout at most, and
/// looks again. Every deadline lies at least the shorter timeout after the event
/// that set it, so a look that often sees each one before it passes and then
/// sleeps until exactly then.
async fn watchdog(activity: &Activity, settings: &Settings) -> Expiry {
    let longest_nap = settings.header_read_timeout.min(settings.idle_timeout);
    loop {
        let now = Instant::now();
        let nap_until = now + longest_nap;
        let next = activity.state().deadline(settings);
        match next {
            Some((deadline, expiry)) if deadline <= now => return expiry,
            Some((deadline, _)) => sleep_until(deadline.min(nap_until)).await,
            None => sleep_until(nap_until).await,
        }
    }
}

/// Which timeout closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    HeaderRead,
    Idle,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Expiry::HeaderRead => "header_read",
            Expiry::Idle => "idle",
        }
    }
}

/// Where a connection stands between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a whole request head, since connecting or since the first
    /// byte after an idle spell.
    Head { since: Instant },
    /// Kept alive with no request in progress, since the last one ended.
    Idle { since: Instant },
    /// Serving this many requests (more than one only on HTTP/2).
    Busy { requests: usize },
}

#[derive(Debug, Clone, Copy)]
struct ConnState {
    phase: Phase,
    /// HTTP/2: bytes between requests are pings and window updates, not the
    /// start of a head, so only requests move the phase.
    multiplexed: bool,
}

impl ConnState {
    fn new(now: Instant) -> Self {
        ConnState {
            phase: Phase::Head { since: now },
            multiplexed: false,
        }
    }

    /// Bytes arrived: after an idle spell, a new head begins.
    fn bytes_read(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle { .. }) && !self.multiplexed {
            self.phase = Phase::Head { since: now };
        }
    }

    fn request_started(&mut self, multiplexed: bool) {
        self.multiplexed |= multiplexed;
        let requests = match self.phase {
            Phase::Busy { requests } => requests + 1,
            Phase::Head { .. } | Phase::Idle { .. } => 1,
        };
        self.phase = Phase::Busy { requests };
    }

    fn request_finished(&mut self, now: Instant) {
        self.phase = match self.phase {
            Phase::Busy { requests } if requests > 1 => Phase::Busy {
                requests: requests - 1,
            },
            _ => Phase::Idle { since: now },
        };
    }

    fn deadline(&self, settings: &Settings) -> Option<(Instant, Expiry)> {
        match self.phase {
            Phase::Head { since } => {
                Some((since + settings.header_read_timeout, Expiry::HeaderRead))
            }
            Phase::Idle { since } => Some((since + settings.idle_timeout, Expiry::Idle)),
            Phase::Busy { .. } => None,
        }
    }
}

/// One connection's state, shared by its socket, its requests and its watchdog.
struct Activity {
    /// Uncontended: one connection's reads and requests; held for a few instructions.
    state: Mutex<ConnState>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Activity {
            state: Mutex::new(ConnState::new(now)),
        }
    }

    /// Nothing panics while the lock is held, so a poisoned lock still holds a
    /// valid state.
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_read(&self) {
        self.state().bytes_read(Instant::now());
    }
}

/// A request in progress on its connection, from its head to the end (or
/// abandonment) of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>, multiplexed: bool) -> Self {
        activity.state().request_started(multiplexed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state().request_finished(Instant::now());
    }
}

/// A response body that ends its request's [`InFlight`] when hyper drops it.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, telling its [`Activity`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An open client connection: its slot under the bound, and the gauge.
struct Open {
    _slot: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit, gauge: IntGauge) -> Self {
        gauge.inc();
        Open { _slot: slot, gauge }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The 503 for a connection past the bound, in Prometheus' error shape.
fn refusal(max_connections: usize) -> Bytes {
    let body = crate::error::error_body(
        "unavailable",
        &format!("promguard has {max_connections} connections open, its limit; retry shortly"),
    );
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         Retry-After: {REFUSAL_RETRY_AFTER_SECS}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    Bytes::from(response)
}

/// Answer a connection past the bound and close it, within three
/// [`REFUSAL_STEP`]s whatever the client does.
async fn refuse(mut stream: TcpStream, refusal: Bytes, _permit: OwnedSemaphorePermit) {
    // Some clients (Go's, so Grafana) drop a response that arrives before they
    // sent their request; wait for it, briefly.
    let _ = timeout(REFUSAL_STEP, read_head(&mut stream)).await;
    if !matches!(
        timeout(REFUSAL_STEP, stream.write_all(&refusal)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = stream.shutdown().await;
    // Closing with unread bytes sends a reset, which can destroy the 503 before
    // the client reads it; read until the client closes instead.
    let _ = timeout(REFUSAL_STEP, drain(&mut stream)).await;
}

/// Answer and close without waiting: whatever of the request has arrived is read
/// first, since closing with unread bytes sends a reset instead of the answer.
fn refuse_now(stream: &TcpStream, refusal: &[u8]) {
    let mut scratch = [0u8; 4096];
    let _ = stream.try_read(&mut scratch);
    let _ = stream.try_write(refusal);
}

/// Read until the end of a request head, the end of the stream or 16 KiB.
async fn read_head(stream: &mut TcpStream) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while head.len() < 16 << 10 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
    }
}

async fn drain(stream: &mut TcpStream) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            return;
        }
    }
}

/// Errors about one connection, not the listener: that client is gone.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The pause after each failed accept: 10 ms doubling to 1 s, from the start
/// again after a success. Without it, a listener out of descriptors spins: the
/// pending connection keeps it readable.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        let pause = ACCEPT_BACKOFF_MIN
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(ACCEPT_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        pause
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Logs the first accept error, then at most one every [`ACCEPT_ERROR_LOG_EVERY`].
#[derive(Debug, Default)]
struct AcceptErrorLog {
    last: Option<Instant>,
    unreported: u64,
}

impl AcceptErrorLog {
    /// Count one error; `Some(errors not logged since the last line)` when this
    /// one should be logged.
    fn record(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < ACCEPT_ERROR_LOG_EVERY => {
                self.unreported += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unreported))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Settings {
        Settings {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 8,
        }
    }

    #[test]
    fn the_bound_fits_the_file_limit() {
        assert_eq!(connection_bound(4096, 1 << 20, 214).unwrap(), 4096);
        assert_eq!(connection_bound(4096, 1024, 214).unwrap(), 810);
        assert_eq!(connection_bound(4096, u64::MAX, 214).unwrap(), 4096);
        assert_eq!(
            connection_bound(usize::MAX, u64::MAX, 214).unwrap(),
            Semaphore::MAX_PERMITS
        );
        assert!(matches!(
            connection_bound(4096, 200, 214),
            Err(ServerError::FileLimitTooLow {
                limit: 200,
                reserve: 214
            })
        ));
        assert!(connection_bound(4096, 214, 214).is_err());
        assert_eq!(connection_bound(4096, 215, 214).unwrap(), 1);
    }

    #[test]
    fn the_reserve_counts_each_configured_backend() {
        let mut config = Config::with_recent("http://127.0.0.1:9090".parse().unwrap());
        config.admission.recent.max_in_flight = 3;
        config.backends.recent.max_idle_connections = 5;
        config.admission.long_term.max_in_flight = 7;
        let own = BASE_RESERVE + MAX_REFUSING as u64;
        assert_eq!(reserved_descriptors(&config), own + 3 + 5);
        let mut long_term =
            crate::config::BackendConfig::new("http://127.0.0.1:8428".parse().unwrap());
        long_term.max_idle_connections = 11;
        config.backends.long_term = Some(long_term);
        assert_eq!(reserved_descriptors(&config), own + 3 + 5 + 7 + 11);
    }

    #[test]
    fn accept_back_off_doubles_to_a_second_and_resets() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        for _ in 0..100 {
            backoff.failed();
        }
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn accept_errors_are_logged_once_a_minute_with_a_count() {
        let start = Instant::now();
        let mut log = AcceptErrorLog::default();
        assert_eq!(log.record(start), Some(0));
        assert_eq!(log.record(start + Duration::from_secs(1)), None);
        assert_eq!(log.record(start + Duration::from_secs(59)), None);
        assert_eq!(log.record(start + Duration::from_secs(60)), Some(2));
        assert_eq!(log.record(start + Duration::from_secs(61)), None);
    }

    #[test]
    fn a_new_connection_must_send_its_head_within_the_header_timeout() {
        let s = timeouts();
        let start = Instant::now();
        let state = ConnState::new(start);
        assert_eq!(
            state.deadline(&s),
            Some((start + s.header_read_timeout, Expiry::HeaderRead))
        );
    }

    #[test]
    fn a_kept_alive_connection_idles_then_times_its_next_head() {
        let s = timeouts();
        let start = Instant::now();
        let mut state = ConnState::new(start);
        state.request_started(false);
        assert_eq!(state.deadline(&s), None, "never cut a request in progress");
        let done = start + Duration::from_secs(3);
        state.request_finished(done);
        assert_eq!(
            state.deadline(&s),
            Some((done + s.idle_timeout, Expiry::Idle))
        );
        let first_byte = done + Duration::from_secs(100);
        state.bytes_read(first_byte);
        assert_eq!(
            state.deadline(&s),
            Some((first_byte + s.header_read_timeout, Expiry::HeaderRead))
        );
        // More bytes of the same head do not extend it.
        state.bytes_read(first_byte + Duration::from_secs(5));
        assert_eq!(
            state.deadline(&s),
            Some((first_byte + s.header_read_timeout, Expiry::HeaderRead))
        );
    }

    /// Told nothing, the watchdog naps through a long request and still cuts a
    /// head begun while it slept at the head's own deadline, not at the idle
    /// deadline it last saw (virtual time).
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_keeps_each_deadline_without_being_woken() {
        let s = timeouts();
        let activity = Arc::new(Activity::new(Instant::now()));
        let request = InFlight::start(activity.clone(), false);
        let watching = tokio::spawn({
            let activity = activity.clone();
            async move {
                let expiry = watchdog(&activity, &s).await;
                (expiry, Instant::now())
            }
        });
        // A long request: the watchdog naps through it.
        tokio::time::sleep(s.idle_timeout * 3).await;
        drop(request);
        let idle_from = Instant::now();
        // Just before the idle deadline, the next head begins and stalls.
        tokio::time::sleep(s.idle_timeout - Duration::from_millis(1)).await;
        activity.bytes_read();
        let head_from = Instant::now();
        let (expiry, at) = watching.await.unwrap();
        assert_eq!(expiry, Expiry::HeaderRead);
        assert_eq!(at, head_from + s.header_read_timeout);
        assert!(at > idle_from + s.idle_timeout);
    }

    #[test]
    fn http2_connections_idle_until_their_last_stream_ends() {
        let s = timeouts();
        let start = Instant::now();
        let mut state = ConnState::new(start);
        state.request_started(true);
        state.request_started(true);
        state.request_finished(start);
        assert_eq!(state.deadline(&s), None, "one stream is still open");
        let done = start + Duration::from_secs(1);
        state.request_finished(done);
        assert_eq!(
            state.deadline(&s),
            Some((done + s.idle_timeout, Expiry::Idle))
        );
        // A ping is not the start of a request.
        state.bytes_read(done + Duration::from_secs(30));
        assert_eq!(
            state.deadline(&s),
            Some((done + s.idle_timeout, Expiry::Idle))
        );
    }

    #[test]
    fn the_refusal_is_a_complete_prometheus_error_answer() {
        let bytes = refusal(8);
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 503 Service Unavailable"));
        let headers: Vec<&str> = lines.collect();
        assert!(headers.contains(&"Content-Type: application/json"));
        assert!(headers.contains(&"Retry-After: 1"));
        assert!(headers.contains(&"Connection: close"));
        assert!(headers.contains(&format!("Content-Length: {}", body.len()).as_str()));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "status": "error",
                "errorType": "unavailable",
                "error": "promguard has 8 connections open, its limit; retry shortly"
            })
        );
    }
}
