//! promguard behind a Grafana with its default settings: stat panels are instant
//! queries at "now" to the millisecond, no user header is sent, and every request
//! comes from Grafana's one address. Live instants must be shared, and per-user
//! budgets must not refuse hits, curated dashboards, or the whole company at once.

use std::time::Duration;

use serde_json::Value;

use promguard_testkit::{Promguard, client, get, now_secs, scrape};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

/// The headers a default Grafana sends with a panel query: no user, no secret.
fn grafana_panel(
    request: reqwest::RequestBuilder,
    dashboard: &str,
    panel: u32,
) -> reqwest::RequestBuilder {
    request
        .header("User-Agent", "Grafana/11.3.0")
        .header("X-Grafana-Org-Id", "1")
        .header("X-Datasource-Uid", "promguard")
        .header("X-Dashboard-Uid", dashboard)
        .header("X-Panel-Id", panel.to_string())
}

async fn upstream_queries(pg: &Promguard) -> f64 {
    scrape(&pg.url).await.sum(
        "promguard_upstream_request_duration_seconds_count{backend=\"recent\",endpoint=\"query\"}",
    )
}

#[tokio::test]
async fn fifty_stat_panels_within_one_second_cost_prometheus_one_query() {
    let pg = Promguard::in_front_of_backends(BINS, "");
    let query = "sum(rate(shop_orders_total{status=\"created\"}[5m])) * 60";
    // One second inside one 5 s instant step, in the live window.
    let cell = (now_secs() - 20) / 5 * 5;
    let before = upstream_queries(&pg).await;
    let calls: Vec<_> = (0..50)
        .map(|k| {
            let url = format!("{}/api/v1/query", pg.url);
            let time = format!("{cell}.{:03}", k * 20);
            tokio::spawn(async move {
                let response = grafana_panel(client().post(url), "orders", 4)
                    .form(&[("query", query.to_string()), ("time", time)])
                    .send()
                    .await
                    .expect("an answer");
                assert_eq!(response.status(), 200);
                response.json::<Value>().await.expect("JSON")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join"));
    }
    assert_eq!(
        upstream_queries(&pg).await - before,
        1.0,
        "one query for 50 panels"
    );
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "one answer for all"
    );
    // The answer is evaluated at the shared instant, the start of the step.
    let evaluated = answers[0]["data"]["result"][0]["value"][0].as_f64();
    assert_eq!(evaluated, Some(cell as f64), "{}", answers[0]);

    // An instant an hour back keeps its exact time, to the millisecond.
    let old = format!("{}.123", now_secs() - 3600);
    let response = grafana_panel(
        client().post(format!("{}/api/v1/query", pg.url)),
        "orders",
        4,
    )
    .form(&[("query", query.to_string()), ("time", old.clone())])
    .send()
    .await
    .expect("an answer");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(
        body["data"]["result"][0]["value"][0].as_f64(),
        old.parse::<f64>().ok(),
        "{body}"
    );
}

#[tokio::test]
async fn a_grafana_burst_without_identity_is_not_refused_for_hits_or_curated_panels() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    // Tiny budgets, told apart per dashboard, so that refusals would show.
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\npriority:\n  dashboards: [orders]\nlimits:\n  requests: {{per_second: 1, burst: 5}}\n  upstream: {{per_second: 1, burst: 5}}\n  unverified: per_dashboard\n",
            backend.url
        ),
    );
    let http = client();
    let send = |dashboard: &'static str, query: String| {
        let request = grafana_panel(http.post(format!("{}/api/v1/query", pg.url)), dashboard, 1)
            .form(&[("query", query), ("time", "1700000000".to_string())]);
        async move { request.send().await.expect("an answer").status().as_u16() }
    };
    assert_eq!(send("mine", "up".into()).await, 200, "the answer to be hit");
    let mut statuses = Vec::new();
    for i in 0..100 {
        statuses.push(("hit", send("mine", "up".into()).await));
        statuses.push(("curated", send("orders", format!("up{{i=\"{i}\"}}")).await));
        statuses.push(("personal", send("mine", format!("up{{p=\"{i}\"}}")).await));
    }
    let count = |kind: &str, status: u16| {
        statuses
            .iter()
            .filter(|(k, s)| *k == kind && *s == status)
            .count()
    };
    assert_eq!(count("hit", 200), 100, "hits are never refused by a budget");
    assert_eq!(
        count("curated", 200),
        100,
        "curated dashboards spend no budget"
    );
    assert!(
        count("personal", 429) > 0,
        "the personal dashboard's misses do meet its budget"
    );

    // With the default (limits.unverified: off), a whole Grafana is not one user.
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let http = client();
    let mut refused = 0;
    for i in 0..300 {
        let status = grafana_panel(http.post(format!("{}/api/v1/query", pg.url)), "mine", 1)
            .form(&[
                ("query", format!("up{{i=\"{i}\"}}")),
                ("time", "1700000000".into()),
            ])
            .send()
            .await
            .expect("an answer")
            .status();
        refused += usize::from(status == 429);
    }
    assert_eq!(refused, 0, "300 distinct queries from one Grafana address");
}

#[tokio::test]
async fn the_identity_mode_and_what_to_configure_are_said_once() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    assert_eq!(pg.log_lines_with("identity mode unverified"), 1);
    for _ in 0..3 {
        let status = grafana_panel(
            client().get(format!("{}/api/v1/query?query=up&time=1", pg.url)),
            "mine",
            1,
        )
        .send()
        .await
        .expect("an answer")
        .status();
        assert_eq!(status, 200);
    }
    let warned = |pg: &Promguard, text: &str| pg.log_lines_with(text);
    assert!(
        promguard_testkit::eventually(20, Duration::from_millis(50), async || {
            warned(&pg, "carry no proof") == 1
        })
        .await,
        "explained once"
    );
    let (code, _, status) = get(&format!("{}/-/status", pg.url), &[]).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["identity"]["mode"], "unverified");
    assert_eq!(status["identity"]["unverified_budgets"], "off");
    assert_eq!(
        status["identity"]["requests_by_source"]["grafana_unproven"],
        3
    );
    assert!(
        status["identity"]["advice"][0]
            .as_str()
            .is_some_and(|a| a.contains("identity.grafana")),
        "{status}"
    );

    // A proven Grafana that sends no user header is told to send it.
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\nidentity:\n  grafana: {{secret_header: X-Secret, secret: s3cret}}\n",
            backend.url
        ),
    );
    for _ in 0..2 {
        let request = grafana_panel(
            client().get(format!("{}/api/v1/query?query=up&time=1", pg.url)),
            "mine",
            1,
        )
        .header("X-Secret", "s3cret");
        assert_eq!(request.send().await.expect("an answer").status(), 200);
    }
    assert!(
        promguard_testkit::eventually(20, Duration::from_millis(50), async || {
            warned(&pg, "sends no X-Grafana-User") == 1
        })
        .await
    );
    assert_eq!(pg.log_lines_with("identity mode unverified"), 0);
}
