//! promguard's own metrics: a registry passed in at startup, never global.
//!
//! Prometheus counters, gauges and histograms for `/metrics`, plus hdrhistogram
//! latency recorders per endpoint and backend for the JSON status page's exact
//! percentiles. Label values come from enums' `as_str()`, so cardinality is bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;

use crate::request::Endpoint;
use crate::routing::BackendId;

/// Buckets from 1 ms to 2 min: cache hits sit at the bottom, LTS scans at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Every metric promguard exports.
pub struct Metrics {
    /// The `promguard_`-prefixed registry all of these are in; `/metrics` renders it.
    pub registry: Registry,
    /// Upstream calls in flight, by backend and endpoint.
    pub upstream_in_flight: IntGaugeVec,
    /// Client requests by endpoint, final status and backend (`none` when answered locally).
    pub requests: IntCounterVec,
    /// Client's view of each request, by endpoint
    /// (`promguard_http_request_duration_seconds`).
    pub request_duration: HistogramVec,
    /// Each backend call including reading its body, by backend and endpoint
    /// (`promguard_upstream_request_duration_seconds`).
    pub upstream_duration: HistogramVec,
    /// Upstream failures by backend and kind (`connect`, `timeout`, `too_large`, …).
    pub upstream_errors: IntCounterVec,
    /// Requests whose `X-Grafana-User` was ignored because they did not prove they
    /// came through the trusted Grafana.
    pub untrusted_user_header: IntCounter,
    /// Cache lookups by endpoint and outcome (hit, miss, partial, stale, bypass).
    pub cache_lookups: IntCounterVec,
    /// Requests that waited on an identical request's upstream call instead of making their own.
    pub cache_coalesced: IntCounterVec,
    /// Answers and extents held; set from the store at each scrape.
    pub cache_entries: IntGauge,
    /// Bytes the cache's bound counts (payload plus bookkeeping); set at each scrape.
    pub cache_bytes: IntGauge,
    /// Entries dropped, by cause: `size` (room for new ones) or `expired` (their
    /// time to live ran out).
    pub cache_evictions: IntCounterVec,
    /// Range-query points fetched from backends, against points served to clients.
    pub cache_points_fetched: IntCounter,
    /// Range-query points sent to clients, from cache or not; against
    /// `cache_points_fetched`, what the cache saves the backends.
    pub cache_points_served: IntCounter,
    /// Refusals by per-user limits and admission, by reason and class.
    pub rejections: IntCounterVec,
    /// Admitted upstream calls running, by backend and class; set at each scrape.
    pub admission_in_flight: IntGaugeVec,
    /// Requests waiting for a backend slot, by backend; set at each scrape.
    pub admission_queue: IntGaugeVec,
    /// 1 while a backend is busy: a request found no slot there within
    /// `cache.busy_refresh`, so live panels that are not curated refresh at most
    /// that often; set at each scrape.
    pub backend_busy: IntGaugeVec,
    /// Requests moved back onto the busy refresh floor (each carries its warning).
    pub busy_floored: IntCounter,
    /// How long admitted calls waited for their slot, by backend; the shed ones are
    /// counted in `rejections`.
    pub admission_wait: HistogramVec,
    /// The configured limits, so dashboards can draw them next to usage.
    pub limit_settings: IntGaugeVec,
    /// 1 for the mode in force, labelled with its source and window.
    pub sale_mode: IntGaugeVec,
    /// Queries refused by an enforcing rule, by mode, rule and limit.
    pub policy_rejections: IntCounterVec,
    /// Queries a dry-run rule let through but would have refused, by mode, rule
    /// and limit: what a rule would do before it is enforced.
    pub policy_dry_run: IntCounterVec,
    /// Upstream calls a rule held back, by mode, rule and limit: the answer came
    /// from the cache with a warning, or the request was refused when the cache
    /// held nothing of it.
    pub policy_held: IntCounterVec,
    /// Policy reloads by result: `success`, or `error` when the old policy stays.
    pub policy_reloads: IntCounterVec,
    /// Requests whose handler panicked (a bug), answered with a 500.
    pub http_panics: IntCounter,
    /// Requests by how their caller was identified (`grafana_unproven`: Grafana's
    /// headers without proof).
    pub identity_requests: IntCounterVec,
    /// State files that could not be read at start-up and were set aside.
    pub state_file_errors: IntCounter,
    /// Client connections open now; the bound is `limit_settings{limit="max_connections"}`.
    pub server_open_connections: IntGauge,
    /// New connections answered with a 503 because the bound was reached.
    pub server_refused_connections: IntCounter,
    /// Failed accepts other than a client leaving early: mostly out of descriptors.
    pub server_accept_errors: IntCounter,
    latency: LatencyRecorders,
}

impl Metrics {
    /// Create and register every metric in a fresh `promguard_`-prefixed registry.
    ///
    /// # Panics
    ///
    /// Only if metric definitions are invalid or registered twice, a programming
    /// error caught by the unit tests.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("promguard".into()), None)
            .expect("static prefix is a valid metric name");
        let upstream_in_flight = IntGaugeVec::new(
            Opts::new(
                "upstream_in_flight_requests",
                "Upstream queries currently in flight.",
            ),
            &["backend", "endpoint"],
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "Client requests by final status."),
            &["endpoint", "status", "backend"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from request to response, as the client sees it.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "upstream_request_duration_seconds",
                "Time a backend took to answer, including reading its body.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["backend", "endpoint"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new("upstream_errors_total", "Failed upstream calls by kind."),
            &["backend", "kind"],
        )
        .expect("valid metric");
        let untrusted_user_header = IntCounter::new(
            "identity_untrusted_user_header_total",
            "Requests whose X-Grafana-User header was ignored as unproven.",
        )
        .expect("valid metric");
        let cache_lookups = IntCounterVec::new(
            Opts::new("cache_lookups_total", "Cache lookups by outcome."),
            &["endpoint", "outcome"],
        )
        .expect("valid metric");
        let cache_coalesced = IntCounterVec::new(
            Opts::new(
                "cache_coalesced_waiters_total",
                "Requests served by another identical request's upstream call.",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let cache_entries =
            IntGauge::new("cache_entries", "Answers and extents held.").expect("valid metric");
        let cache_bytes = IntGauge::new(
            "cache_bytes",
            "Bytes held by the cache (payload plus bookkeeping).",
        )
        .expect("valid metric");
        let cache_evictions = IntCounterVec::new(
            Opts::new("cache_evictions_total", "Entries removed by size or age."),
            &["cause"],
        )
        .expect("valid metric");
        let cache_points_fetched = IntCounter::new(
            "cache_points_fetched_total",
            "Range-query points fetched from backends.",
        )
        .expect("valid metric");
        let cache_points_served = IntCounter::new(
            "cache_points_served_total",
            "Range-query points served to clients.",
        )
        .expect("valid metric");
        let rejections = IntCounterVec::new(
            Opts::new(
                "limit_rejections_total",
                "Requests refused by limits or shed, by reason and class.",
            ),
            &["reason", "class"],
        )
        .expect("valid metric");
        let admission_in_flight = IntGaugeVec::new(
            Opts::new(
                "admission_in_flight",
                "Admitted upstream calls in flight, by backend and class.",
            ),
            &["backend", "class"],
        )
        .expect("valid metric");
        let admission_queue = IntGaugeVec::new(
            Opts::new(
                "admission_queue_length",
                "Requests waiting for a backend slot.",
            ),
            &["backend"],
        )
        .expect("valid metric");
        let admission_wait = HistogramVec::new(
            HistogramOpts::new(
                "admission_wait_seconds",
                "Time admitted requests waited for a backend slot.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["backend"],
        )
        .expect("valid metric");
        let limit_settings = IntGaugeVec::new(
            Opts::new("limit_settings", "Configured limits, by name and scope."),
            &["limit", "scope"],
        )
        .expect("valid metric");
        let sale_mode = IntGaugeVec::new(
            Opts::new(
                "sale_mode",
                "1 while sale mode is on, with why (schedule or manual) and the window.",
            ),
            &["source", "window"],
        )
        .expect("valid metric");
        let policy_rejections = IntCounterVec::new(
            Opts::new(
                "policy_rejections_total",
                "Queries refused by a policy rule.",
            ),
            &["mode", "rule", "limit"],
        )
        .expect("valid metric");
        let policy_dry_run = IntCounterVec::new(
            Opts::new(
                "policy_dry_run_would_reject_total",
                "Queries a dry-run rule would have refused.",
            ),
            &["mode", "rule", "limit"],
        )
        .expect("valid metric");
        let policy_held = IntCounterVec::new(
            Opts::new(
                "policy_held_fetches_total",
                "Upstream calls a rule held back; the cache answered what it held.",
            ),
            &["mode", "rule", "limit"],
        )
        .expect("valid metric");
        let backend_busy = IntGaugeVec::new(
            Opts::new(
                "backend_busy",
                "1 while live panels that are not curated refresh from this backend at most \
                 every cache.busy_refresh, because a request found no slot there.",
            ),
            &["backend"],
        )
        .expect("valid metric");
        let busy_floored = IntCounter::new(
            "busy_floored_requests_total",
            "Live requests moved back onto the busy refresh floor.",
        )
        .expect("valid metric");
        let policy_reloads = IntCounterVec::new(
            Opts::new("policy_reloads_total", "Policy reloads by result."),
            &["result"],
        )
        .expect("valid metric");
        let identity_requests = IntCounterVec::new(
            Opts::new(
                "identity_requests_total",
                "Requests by how promguard knows who sent them.",
            ),
            &["source"],
        )
        .expect("valid metric");
        for source in crate::identity::Source::LABELS {
            identity_requests.with_label_values(&[source]);
        }
        let http_panics = IntCounter::new(
            "http_panics_total",
            "Requests whose handling panicked (a bug); each was answered with a 500.",
        )
        .expect("valid metric");
        let state_file_errors = IntCounter::new(
            "policy_state_file_errors_total",
            "Sale-mode state files that were unreadable at start-up and set aside.",
        )
        .expect("valid metric");
        let server_open_connections =
            IntGauge::new("server_open_connections", "Client connections open now.")
                .expect("valid metric");
        let server_refused_connections = IntCounter::new(
            "server_refused_connections_total",
            "New connections refused with a 503 because max_connections were open.",
        )
        .expect("valid metric");
        let server_accept_errors = IntCounter::new(
            "server_accept_errors_total",
            "Failed accepts, such as running out of file descriptors.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(upstream_in_flight.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_panics.clone()),
            Box::new(identity_requests.clone()),
            Box::new(state_file_errors.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(untrusted_user_header.clone()),
            Box::new(cache_lookups.clone()),
            Box::new(cache_coalesced.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_points_fetched.clone()),
            Box::new(cache_points_served.clone()),
            Box::new(rejections.clone()),
            Box::new(admission_in_flight.clone()),
            Box::new(admission_queue.clone()),
            Box::new(admission_wait.clone()),
            Box::new(backend_busy.clone()),
            Box::new(busy_floored.clone()),
            Box::new(limit_settings.clone()),
            Box::new(sale_mode.clone()),
            Box::new(policy_rejections.clone()),
            Box::new(policy_dry_run.clone()),
            Box::new(policy_held.clone()),
            Box::new(policy_reloads.clone()),
            Box::new(server_open_connections.clone()),
            Box::new(server_refused_connections.clone()),
            Box::new(server_accept_errors.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        // Export zeros for every backend/endpoint pair so dashboards and alerts see
        // the series before the first request.
        for backend in BackendId::ALL {
            for endpoint in Endpoint::ALL {
                upstream_in_flight
                    .with_label_values(&[backend.as_str(), endpoint.as_str()])
                    .set(0);
            }
        }
        Metrics {
            registry,
            upstream_in_flight,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            untrusted_user_header,
            cache_lookups,
            cache_coalesced,
            cache_entries,
            cache_bytes,
            cache_evictions,
            cache_points_fetched,
            cache_points_served,
            rejections,
            admission_in_flight,
            admission_queue,
            admission_wait,
            backend_busy,
            busy_floored,
            limit_settings,
            sale_mode,
            policy_rejections,
            policy_dry_run,
            policy_held,
            policy_reloads,
            http_panics,
            identity_requests,
            state_file_errors,
            server_open_connections,
            server_refused_connections,
            server_accept_errors,
            latency: LatencyRecorders::default(),
        }
    }

    /// Record a finished client request.
    pub fn observe_request(
        &self,
        endpoint: &'static str,
        status: u16,
        backend: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .with_label_values(&[endpoint, status_label(status), backend])
            .inc();
        self.request_duration
            .with_label_values(&[endpoint])
            .observe(elapsed.as_secs_f64());
        self.latency.record(("request", endpoint), elapsed);
    }

    /// Record a finished upstream call (successful or not).
    pub fn observe_upstream(&self, backend: BackendId, endpoint: Endpoint, elapsed: Duration) {
        self.upstream_duration
            .with_label_values(&[backend.as_str(), endpoint.as_str()])
            .observe(elapsed.as_secs_f64());
        self.latency
            .record((backend.as_str(), endpoint.as_str()), elapsed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Latency percentiles for the status page.
    pub fn latency_report(&self) -> Vec<LatencySummary> {
        self.latency.report()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Status codes promguard can produce, as static label values.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// Exact latency percentiles per (scope, endpoint), where scope is `request` for the
/// client's view or a backend name for upstream calls.
#[derive(Default)]
struct LatencyRecorders {
    /// One lock over a handful of histograms: recording is a few nanoseconds of
    /// arithmetic, far below the cost of contention on two cores.
    histograms: Mutex<HashMap<(&'static str, &'static str), Histogram<u64>>>,
}

/// One row of the status page.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    /// `request` for what clients saw, or a backend's name for its upstream calls.
    pub scope: &'static str,
    /// The API endpoint's label (`query_range`, `labels`, …).
    pub endpoint: &'static str,
    /// Observations since start-up; the recorders are never reset.
    pub count: u64,
    /// Median, in milliseconds (three significant digits, like the others).
    pub p50_ms: f64,
    /// 90th percentile, in milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile, in milliseconds.
    pub p999_ms: f64,
    /// The slowest, in milliseconds.
    pub max_ms: f64,
}

impl LatencyRecorders {
    fn record(&self, key: (&'static str, &'static str), elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let Ok(mut map) = self.histograms.lock() else {
            return;
        };
        let histogram = map.entry(key).or_insert_with(|| {
            // 1 µs to 1 h at 3 significant digits: a few tens of KiB per histogram.
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid")
        });
        histogram.saturating_record(micros);
    }

    fn report(&self) -> Vec<LatencySummary> {
        let Ok(map) = self.histograms.lock() else {
            return Vec::new();
        };
        let ms = |micros: u64| micros as f64 / 1000.0;
        let mut rows: Vec<_> = map
            .iter()
            .map(|(&(scope, endpoint), h)| LatencySummary {
                scope,
                endpoint,
                count: h.len(),
                p50_ms: ms(h.value_at_quantile(0.5)),
                p90_ms: ms(h.value_at_quantile(0.9)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                p999_ms: ms(h.value_at_quantile(0.999)),
                max_ms: ms(h.max()),
            })
            .collect();
        rows.sort_by_key(|r| (r.scope, r.endpoint));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_with_zeroed_in_flight() {
        let m = Metrics::new();
        m.observe_request("query_range", 200, "recent", Duration::from_millis(12));
        let text = m.render();
        assert!(text.contains(
            "promguard_upstream_in_flight_requests{backend=\"long_term\",endpoint=\"query_range\"} 0"
        ));
        assert!(text.contains(
            "promguard_http_requests_total{backend=\"recent\",endpoint=\"query_range\",status=\"200\"} 1"
        ));
    }

    #[test]
    fn latency_report_has_percentiles() {
        let m = Metrics::new();
        for ms in 1..=100 {
            m.observe_request("query", 200, "recent", Duration::from_millis(ms));
        }
        let report = m.latency_report();
        let row = report.iter().find(|r| r.scope == "request").unwrap();
        assert_eq!(row.count, 100);
        assert!((49.0..=51.0).contains(&row.p50_ms), "{}", row.p50_ms);
        assert!((98.0..=100.5).contains(&row.p99_ms), "{}", row.p99_ms);
    }
}
