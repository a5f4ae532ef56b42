//! A Grafana-shaped session through promguard returns what the backend that should
//! serve it returns directly: panel queries (POST, dashboard headers, through a
//! promguard started from flags alone), instant queries, Save & test, build info, and
//! Explore's metric browser.

use serde_json::Value;

use promguard_testkit::{
    Promguard, assert_same_answer, backends, eventually, get, now_secs, points_where, post_form,
    sorted_by_metric,
};

use crate::BINS;

const GRAFANA_HEADERS: &[(&str, &str)] = &[
    ("X-Dashboard-Uid", "orders"),
    ("X-Panel-Id", "2"),
    ("X-Datasource-Uid", "promguard"),
    ("X-Grafana-Org-Id", "1"),
    ("User-Agent", "Grafana/11.3.0"),
];

/// A time well behind the live edge, aligned the way Grafana aligns to `step`.
fn aligned_end(step: i64) -> i64 {
    (now_secs() - 120) / step * step
}

fn result_len(v: &Value) -> usize {
    v.pointer("/data/result")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn data_len(v: &Value) -> usize {
    v.pointer("/data")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn panel_queries_route_by_time_and_match_the_backend() {
    let _vm = promguard_testkit::VM_COUNTERS.read().await;
    let b = backends(BINS);
    // The README's flags-only command: routing by time needs no config file.
    let pg = Promguard::with_flags(
        BINS,
        &[
            "--recent-url",
            &b.prometheus,
            "--recent-window",
            "2d",
            "--long-term-url",
            &b.victoria,
        ],
    );
    let query = r#"sum by (region) (rate(shop_orders_total{status="created"}[5m]))"#;

    // A "last 1 hour" panel: Prometheus holds it.
    let end = aligned_end(30);
    let form = [
        ("query", query.to_string()),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
        ("step", "30".to_string()),
    ];
    let (status, backend, got) = post_form(
        &format!("{}/api/v1/query_range", pg.url),
        &form,
        GRAFANA_HEADERS,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(backend.as_deref(), Some("recent"));
    let (_, _, want) = post_form(&format!("{}/api/v1/query_range", b.prometheus), &form, &[]).await;
    assert!(
        result_len(&want) >= 8,
        "the demo data has 8 regions: {want}"
    );
    assert_same_answer(&got, &want, 0.0, "1h panel vs Prometheus");

    // A "last 30 days" panel: only the long-term store has it.
    let end = aligned_end(3600);
    let form = [
        ("query", query.to_string()),
        ("start", (end - 30 * 86400).to_string()),
        ("end", end.to_string()),
        ("step", "3600".to_string()),
    ];
    let (status, backend, got) = post_form(
        &format!("{}/api/v1/query_range", pg.url),
        &form,
        GRAFANA_HEADERS,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    // Its part inside the recent window comes from Prometheus (split fetches; the
    // seam itself is tested in split_fetches.rs): the rest is VictoriaMetrics'.
    assert_eq!(backend.as_deref(), Some("long_term, recent"));
    let mut direct = form.to_vec();
    direct.push(("nocache", "1".to_string()));
    let (_, _, want) = post_form(&format!("{}/api/v1/query_range", b.victoria), &direct, &[]).await;
    assert!(result_len(&want) >= 8, "{want}");
    let old = |t: f64| t < (now_secs() - 2 * 86_400 - 3600) as f64;
    assert_same_answer(
        &sorted_by_metric(points_where(&got, old)),
        &sorted_by_metric(points_where(&want, old)),
        1e-9,
        "30d panel vs VictoriaMetrics",
    );

    // A 1h panel whose selector reaches back 7 days is long-term data too.
    let end = aligned_end(60);
    let form = [
        ("query", "sum(increase(shop_orders_total[7d]))".to_string()),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
        ("step", "60".to_string()),
    ];
    let (status, backend, _) = post_form(
        &format!("{}/api/v1/query_range", pg.url),
        &form,
        GRAFANA_HEADERS,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(backend.as_deref(), Some("long_term"));
}

#[tokio::test]
async fn instant_queries_save_and_test_and_build_info() {
    let pg = Promguard::in_front_of_backends(BINS, "");
    let b = backends(BINS);

    // Grafana's "Save & test".
    let form = [("query", "1+1".to_string()), ("time", "4".to_string())];
    let (status, backend, got) = post_form(&format!("{}/api/v1/query", pg.url), &form, &[]).await;
    assert_eq!((status, backend.as_deref()), (200, Some("recent")));
    assert_eq!(got["data"]["result"], serde_json::json!([4, "2"]));

    // Instant queries at unaligned times, as Grafana sends them: a live one is
    // evaluated at the shared instant (its time rounded down to cache.instant_step,
    // 5 s), an old one at its exact time.
    let query = "sum by (service) (rate(http_requests_total[5m]))".to_string();
    let live = now_secs() - 90;
    for (time, evaluated) in [
        (format!("{live}.437"), (live / 5 * 5).to_string()),
        (
            format!("{}.437", live - 3600),
            format!("{}.437", live - 3600),
        ),
    ] {
        let form = [("query", query.clone()), ("time", time.clone())];
        let (status, backend, got) =
            post_form(&format!("{}/api/v1/query", pg.url), &form, GRAFANA_HEADERS).await;
        assert_eq!((status, backend.as_deref()), (200, Some("recent")));
        let direct = [("query", query.clone()), ("time", evaluated)];
        let (_, _, want) = post_form(&format!("{}/api/v1/query", b.prometheus), &direct, &[]).await;
        assert!(
            result_len(&want) >= 10,
            "the demo data has ~10 services: {want}"
        );
        assert_same_answer(
            &got,
            &want,
            0.0,
            &format!("instant query at {time} vs Prometheus"),
        );
    }

    // Exemplars (Grafana asks for them alongside panel queries).
    let end = now_secs() - 60;
    let exemplars = [
        ("query", "http_request_duration_seconds_bucket".to_string()),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
    ];
    let (status, backend, got) = post_form(
        &format!("{}/api/v1/query_exemplars", pg.url),
        &exemplars,
        &[],
    )
    .await;
    assert_eq!((status, backend.as_deref()), (200, Some("recent")), "{got}");
    let (_, _, want) = post_form(
        &format!("{}/api/v1/query_exemplars", b.prometheus),
        &exemplars,
        &[],
    )
    .await;
    assert_same_answer(&got, &want, 0.0, "query_exemplars");

    // Build info drives Grafana's feature detection; other read-only GETs pass through.
    for path in [
        "/api/v1/status/buildinfo",
        "/api/v1/status/flags",
        "/api/v1/rules",
    ] {
        let (status, _, got) = get(&format!("{}{path}", pg.url), &[]).await;
        let (_, _, want) = get(&format!("{}{path}", b.prometheus), &[]).await;
        assert_eq!(status, 200, "{path}: {got}");
        assert_same_answer(&got, &want, 0.0, path);
    }

    // The status page reports exact percentiles for what was just served.
    let (status, _, page) = get(&format!("{}/-/status", pg.url), &[]).await;
    assert_eq!(status, 200);
    let rows = page["latency"].as_array().expect("latency rows");
    let query = rows
        .iter()
        .find(|r| r["scope"] == "request" && r["endpoint"] == "query")
        .expect("a row for client instant queries");
    assert!(query["count"].as_u64() >= Some(2));
    for p in ["p50_ms", "p90_ms", "p99_ms", "p999_ms"] {
        assert!(query[p].as_f64().is_some_and(|v| v > 0.0), "{p}: {query}");
    }
    assert!(
        rows.iter().any(|r| r["scope"] == "recent"),
        "upstream rows per backend"
    );
}

#[tokio::test]
async fn explore_metric_browser_matches_the_backend() {
    let _vm = promguard_testkit::VM_COUNTERS.read().await;
    let pg = Promguard::in_front_of_backends(BINS, "");
    let b = backends(BINS);
    // Minute-aligned, as promguard snaps metadata spans to the minute (so that
    // the metric browser's storms share answers).
    let end = (now_secs() - 60) / 60 * 60;
    let hour = |extra: &[(&'static str, &'static str)]| {
        let mut q = vec![
            ("start", (end - 3600).to_string()),
            ("end", end.to_string()),
        ];
        q.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        q
    };
    // Metadata comes from scrapes: wait for Prometheus' first scrape of the exporter.
    let metadata = format!("{}/api/v1/metadata", b.prometheus);
    eventually(60, std::time::Duration::from_millis(500), async || {
        let (_, _, m) = get(&metadata, &[("metric", "shop_orders_total".into())]).await;
        m["data"].as_object().is_some_and(|o| !o.is_empty())
    })
    .await;
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/api/v1/labels", hour(&[])),
        ("/api/v1/label/__name__/values", hour(&[])),
        (
            "/api/v1/label/region/values",
            hour(&[("match[]", "shop_orders_total")]),
        ),
        (
            "/api/v1/series",
            hour(&[("match[]", r#"shop_orders_total{region="moscow"}"#)]),
        ),
        (
            "/api/v1/metadata",
            vec![("metric", "shop_orders_total".into())],
        ),
    ];
    for (path, query) in cases {
        let (status, backend, got) = get(&format!("{}{path}", pg.url), &query).await;
        assert_eq!(
            (status, backend.as_deref()),
            (200, Some("recent")),
            "{path}: {got}"
        );
        let (_, _, want) = get(&format!("{}{path}", b.prometheus), &query).await;
        assert!(
            data_len(&want) > 0 || want["data"].as_object().is_some_and(|o| !o.is_empty()),
            "{path} returned no data: {want}"
        );
        assert_same_answer(&sorted_by_metric(got), &sorted_by_metric(want), 0.0, path);
    }

    // Series over a month are answered by the long-term store.
    let month = [
        ("match[]", "shop_orders_total".to_string()),
        ("start", (end - 30 * 86400).to_string()),
        ("end", end.to_string()),
    ];
    let (status, backend, got) = post_form(&format!("{}/api/v1/series", pg.url), &month, &[]).await;
    assert_eq!(
        (status, backend.as_deref()),
        (200, Some("long_term")),
        "{got}"
    );
    let (_, _, want) = post_form(&format!("{}/api/v1/series", b.victoria), &month, &[]).await;
    assert!(data_len(&want) > 0);
    assert_same_answer(
        &sorted_by_metric(got),
        &sorted_by_metric(want),
        0.0,
        "series 30d",
    );
}
