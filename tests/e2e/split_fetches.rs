//! Fetch-level routing against the real backends: a long panel's old extents come
//! from VictoriaMetrics and its live tail from Prometheus, counted at each backend,
//! and `routing.split_fetches: false` keeps every call on the long-term store.

use serde_json::Value;

use promguard_testkit::{
    Promguard, assert_same_answer, backends, now_secs, points_where, range, scrape,
    sorted_by_metric,
};

use crate::BINS;

/// A rate over the curated orders series, as the SLA dashboards draw it.
const QUERY: &str = r#"sum by (region) (rate(shop_orders_total{status="created"}[5m]))"#;
/// Three years at a 3-hour step: 8,760 points, under Prometheus' 11,000.
const RANGE_S: i64 = 3 * 365 * 86_400;
const STEP_S: i64 = 3 * 3600;

/// The 3-year panel ending at `end`, through promguard at `base`: (X-Cache,
/// X-Promguard-Backend, body).
async fn panel(base: &str, end: i64) -> (String, String, Value) {
    range(base, QUERY, end - RANGE_S, end, STEP_S, &[]).await
}

/// Upstream calls promguard made to `backend`, from its own metrics.
async fn calls(pg: &Promguard, backend: &str) -> f64 {
    scrape(&pg.url).await.sum(&format!(
        "promguard_upstream_request_duration_seconds_count{{backend=\"{backend}\""
    ))
}

/// VictoriaMetrics' count of queries once it has settled.
async fn vm_settled() -> f64 {
    backends(BINS).vm_query_count_settled().await
}

/// Query-range calls Prometheus has answered, from its own metrics.
async fn prometheus_calls() -> f64 {
    scrape(&backends(BINS).prometheus)
        .await
        .sum(r#"prometheus_http_requests_total{code="200",handler="/api/v1/query_range""#)
}

#[tokio::test]
async fn a_three_year_panels_refresh_fetches_its_tail_from_prometheus() {
    let _vm = promguard_testkit::VM_COUNTERS.write().await;
    let b = backends(BINS);
    let pg = Promguard::in_front_of_backends(BINS, "");
    // Grafana floors start and end to the step; the panel was opened one step ago.
    let end = now_secs() / STEP_S * STEP_S;
    let (opened_at, refreshed_at) = (end - STEP_S, end);

    let vm_before = vm_settled().await;
    let (cache, backend, first) = panel(&pg.url, opened_at).await;
    assert_eq!(cache, "MISS");
    assert_eq!(
        backend, "long_term, recent",
        "cut where the recent data starts"
    );
    assert_eq!(calls(&pg, "long_term").await, 1.0);
    assert_eq!(calls(&pg, "recent").await, 1.0);
    assert!(vm_settled().await > vm_before);

    // The stitched answer is VictoriaMetrics' before the cut and Prometheus' from it
    // (the recent window is 2 days; each step reads 5 minutes back).
    let cut = (now_secs() - 2 * 86_400 + 300 + STEP_S - 1) / STEP_S * STEP_S;
    let (span, nocache) = (opened_at - RANGE_S, [("nocache", "1")]);
    let (_, _, from_vm) = range(&b.victoria, QUERY, span, opened_at, STEP_S, &nocache).await;
    let (_, _, from_prom) = range(&b.prometheus, QUERY, span, opened_at, STEP_S, &[]).await;
    // One step either side of the cut is left out: it moved while the test ran.
    let old = |t: f64| t < (cut - STEP_S) as f64;
    let new = |t: f64| t > (cut + STEP_S) as f64;
    assert_same_answer(
        &sorted_by_metric(points_where(&first, old)),
        &sorted_by_metric(points_where(&from_vm, old)),
        1e-9,
        "before the cut",
    );
    assert_same_answer(
        &points_where(&first, new),
        &points_where(&from_prom, new),
        0.0,
        "after the cut",
    );

    // A refresh one step later fetches only the new step, from Prometheus.
    let vm_before = vm_settled().await;
    let prom_before = prometheus_calls().await;
    let (cache, backend, refreshed) = panel(&pg.url, refreshed_at).await;
    assert_eq!(cache, "PARTIAL");
    assert_eq!(backend, "long_term, recent");
    assert_eq!(
        calls(&pg, "long_term").await,
        1.0,
        "nothing new asked of VM"
    );
    assert_eq!(calls(&pg, "recent").await, 2.0);
    assert_eq!(vm_settled().await, vm_before, "VictoriaMetrics' own count");
    assert!(
        prometheus_calls().await > prom_before,
        "Prometheus' own count"
    );
    let last = |answer: &Value| {
        answer["data"]["result"][0]["values"]
            .as_array()
            .and_then(|v| v.last())
            .and_then(|p| p[0].as_i64())
    };
    assert_eq!(last(&refreshed), Some(refreshed_at), "{refreshed}");

    // With split_fetches off the same refresh goes to the long-term store.
    let whole = Promguard::in_front_of_backends(BINS, "routing:\n  split_fetches: false\n");
    let (_, backend, _) = panel(&whole.url, opened_at).await;
    assert_eq!(backend, "long_term");
    let vm_before = vm_settled().await;
    let (cache, backend, _) = panel(&whole.url, refreshed_at).await;
    assert_eq!((cache.as_str(), backend.as_str()), ("PARTIAL", "long_term"));
    assert_eq!(calls(&whole, "recent").await, 0.0);
    assert_eq!(calls(&whole, "long_term").await, 2.0);
    assert!(vm_settled().await > vm_before);
}
