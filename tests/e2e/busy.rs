//! The busy refresh floor end to end against the real Prometheus: once a request
//! has found no admission slot there, live panels of dashboards that are not
//! curated refresh at most every `cache.busy_refresh`, with a warning saying so,
//! while curated panels keep every refresh.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use promguard_testkit::{Promguard, eventually, get, now_secs, post_form, scrape};

use crate::BINS;

/// One slot and no queue at Prometheus, so a burst is shed; answers with recent
/// points stay fresh for a second only, so every refresh past it would fetch.
const CONFIG: &str = "admission:\n  recent: {max_in_flight: 1, reserved: 0, max_queue: 0}\n\
     cache: {fresh_ttl: 1s, busy_refresh: 10m}\n\
     priority:\n  dashboards: [orders]\n\
     limits:\n  requests: {per_second: 1000, burst: 1000}\n  upstream: {per_second: 1000, burst: 1000}\n  max_in_flight: 100\n";

#[tokio::test]
async fn a_saturated_backend_moves_personal_panels_onto_the_busy_floor_but_not_curated_ones() {
    let pg = Promguard::in_front_of_backends(BINS, CONFIG);
    let upstream_calls = || async {
        scrape(&pg.url)
            .await
            .sum("promguard_upstream_request_duration_seconds_count")
    };
    // A live 1-hour panel at a 15 s step, ending off the 10-minute clock.
    let end = match now_secs() / 15 * 15 {
        end if end % 600 == 0 => end - 15,
        end => end,
    };
    let panel = |dashboard: &'static str| {
        let form = [
            ("query", "sum(rate(http_requests_total[5m]))".to_string()),
            ("start", (end - 3600).to_string()),
            ("end", end.to_string()),
            ("step", "15".to_string()),
        ];
        let url = format!("{}/api/v1/query_range", pg.url);
        async move {
            let (status, _, body) = post_form(&url, &form, &[("X-Dashboard-Uid", dashboard)]).await;
            assert_eq!(status, 200, "{dashboard}: {body}");
            body
        }
    };
    let last_point = |body: &Value| {
        body["data"]["result"][0]["values"]
            .as_array()
            .and_then(|v| v.last())
            .and_then(|p| p[0].as_i64())
    };
    let pause = || tokio::time::sleep(Duration::from_millis(1_200));

    // At rest a personal refresh past fresh_ttl reaches the backend, as asked.
    let first = panel("personal").await;
    assert_eq!(last_point(&first), Some(end), "{first}");
    assert!(first.get("warnings").is_none(), "{first}");
    pause().await;
    let calls = upstream_calls().await;
    panel("personal").await;
    assert!(
        upstream_calls().await > calls,
        "not busy: the refresh fetched"
    );

    // Saturate: distinct queries at once on a backend with one slot and no queue.
    let saturated = eventually(20, Duration::from_millis(100), async || {
        let url = format!("{}/api/v1/query", pg.url);
        join_all((0..32).map(|n| {
            let form = [("query", format!("count_over_time(up[{}s])", 60 + n))];
            let url = url.clone();
            async move { post_form(&url, &form, &[]).await }
        }))
        .await;
        scrape(&pg.url)
            .await
            .sum("promguard_backend_busy{backend=\"recent\"}")
            == 1.0
    })
    .await;
    assert!(saturated, "a burst on one slot was shed");
    let (code, _, status) = get(&format!("{}/-/status", pg.url), &[]).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["backends"][0]["busy"], true, "{status}");

    // Busy: the personal panel ends on the 10-minute clock, says so, and its
    // refreshes past fresh_ttl are the same answer without a backend call.
    let floored = panel("personal").await;
    assert_eq!(last_point(&floored), Some(end / 600 * 600), "{floored}");
    assert_eq!(
        floored["warnings"],
        serde_json::json!([
            "promguard: the metrics backends are busy: this panel refreshes at most every \
             10 minutes, so its newest point may be that old"
        ]),
        "Grafana shows why on the panel"
    );
    let calls = upstream_calls().await;
    for _ in 0..2 {
        pause().await;
        assert_eq!(panel("personal").await, floored);
    }
    assert_eq!(
        upstream_calls().await,
        calls,
        "busy: refreshes cost nothing"
    );
    assert!(
        scrape(&pg.url)
            .await
            .sum("promguard_busy_floored_requests_total")
            >= 3.0
    );

    // The curated dashboard keeps its own refresh, ending where it asked.
    for _ in 0..2 {
        pause().await;
        let calls = upstream_calls().await;
        let curated = panel("orders").await;
        assert_eq!(last_point(&curated), Some(end), "{curated}");
        assert!(curated.get("warnings").is_none(), "{curated}");
        assert!(
            upstream_calls().await > calls,
            "the curated refresh fetched"
        );
    }
}
