//! Never refuse what a backend would accept: Prometheus 3 and MetricsQL queries
//! that promguard's parser cannot read are forwarded, routed and limited from the
//! tolerant scan, and answered exactly as VictoriaMetrics answers them; a query the
//! backend refuses gets the backend's own error.

use promguard_testkit::{Promguard, assert_same_answer, backends, get, now_secs, sorted_by_metric};

use crate::BINS;

/// Queries people type into Grafana's Prometheus data source in front of
/// VictoriaMetrics, most of which promql-parser does not know.
const QUERIES: &[&str] = &[
    // MetricsQL: rollups without a window, WITH templates, keep_metric_names,
    // default, step-relative windows, MetricsQL-only functions.
    "sum(rate(shop_orders_total)) by (region)",
    "WITH (r = rate(shop_orders_total{status=\"created\"}[5m])) sum(r) by (channel)",
    "rate(http_requests_total{service=\"cart\"}[5m]) keep_metric_names",
    "sum(rate(http_requests_total{code=~\"5..\"}[5m])) by (service) default 0",
    "sum(rate(shop_orders_total[10i]))",
    "topk_max(3, sum(rate(http_requests_total[5m])) by (service))",
    "quantiles(\"phi\", 0.5, 0.9, sum(rate(http_requests_total[5m])) by (service))",
    "range_median(sum(rate(shop_orders_total[5m])))",
    "label_set(vector(1), \"source\", \"promguard\")",
    "sum(rate(shop_orders_total[5m])) by (region) if sum(rate(shop_orders_total[5m])) by (region) > 0",
    // Prometheus 2.x functions promql-parser no longer knows.
    "holt_winters(sum(shop_orders_stuck)[1h:5m], 0.5, 0.5)",
    // And plain PromQL, which must keep working the same way.
    "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))",
    "sort_by_label(sum by (region) (rate(shop_orders_total[5m])), \"region\")",
];

#[tokio::test]
async fn metricsql_and_newer_promql_are_answered_as_victoria_metrics_answers_them() {
    let _vm = promguard_testkit::VM_COUNTERS.read().await;
    let vm = &backends(BINS).victoria;
    // VictoriaMetrics as the only backend, as many run it.
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {vm}\n    window: 60d\n"),
    );
    // Settled data, well inside what VictoriaMetrics holds at scrape resolution.
    let end = (now_secs() - 6 * 3600) / 60 * 60;
    let start = end - 3 * 3600;
    for query in QUERIES {
        for (path, params) in [
            (
                "/api/v1/query",
                vec![("query", query.to_string()), ("time", end.to_string())],
            ),
            (
                "/api/v1/query_range",
                vec![
                    ("query", query.to_string()),
                    ("start", start.to_string()),
                    ("end", end.to_string()),
                    ("step", "60".to_string()),
                ],
            ),
        ] {
            let (status, _, got) = get(&format!("{}{path}", pg.url), &params).await;
            let (want_status, _, want) = get(&format!("{vm}{path}"), &params).await;
            assert_eq!(status, want_status, "{path} {query}: {got}");
            assert_eq!(
                status, 200,
                "{path} {query}: VictoriaMetrics answers it: {want}"
            );
            assert_same_answer(
                &sorted_by_metric(got),
                &sorted_by_metric(want),
                1e-9,
                &format!("{path} {query}"),
            );
        }
    }
}

#[tokio::test]
async fn what_the_backend_refuses_is_refused_with_the_backends_own_error() {
    let pg = Promguard::in_front_of_backends(BINS, "");
    let prom = &backends(BINS).prometheus;
    let time = (now_secs() - 3600).to_string();
    // Valid MetricsQL, but Prometheus does not speak it; nor does it know
    // holt_winters any more in version 3 (this is 2.x, which does).
    for query in [
        "rate(shop_orders_total)",
        "sum(shop_orders_stuck) default 0",
    ] {
        let params = [("query", query.to_string()), ("time", time.clone())];
        let (status, backend, got) = get(&format!("{}/api/v1/query", pg.url), &params).await;
        let (want_status, _, want) = get(&format!("{prom}/api/v1/query"), &params).await;
        assert_eq!(backend.as_deref(), Some("recent"), "{query}");
        assert_eq!((status, want_status), (400, 400), "{query}: {got}");
        assert_eq!(got, want, "{query}: Prometheus' own error, unchanged");
    }
    // What no backend could accept is still refused by promguard, locally.
    let params = [("query", "sum(rate(x[5m])".to_string())];
    let (status, backend, body) = get(&format!("{}/api/v1/query", pg.url), &params).await;
    assert_eq!((status, backend), (400, None));
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("unbalanced")),
        "{body}"
    );
}
