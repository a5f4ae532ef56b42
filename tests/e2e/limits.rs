//! Per-user limits and admission against a slow fault backend: the in-flight cap
//! holds at the backend itself, curated dashboards get through an Explore storm,
//! shed requests are answered while the backend is still busy, a user over budget
//! gets 429 without affecting others, and cancelled clients free their slots.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use promguard_testkit::{Promguard, client, eventually, scrape};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

fn config(backend: &str, extra: &str) -> String {
    format!(
        "backends:\n  recent:\n    url: {backend}\n\
         limits:\n  requests: {{per_second: 1000, burst: 1000}}\n  upstream: {{per_second: 1000, burst: 1000}}\n  max_in_flight: 100\n\
         {extra}"
    )
}

/// A distinct instant query per `n`, so nothing is coalesced or cached.
fn query_url(pg: &Promguard, n: usize) -> String {
    format!(
        "{}/api/v1/query?query=up&time={}",
        pg.url,
        1_700_000_000 + n
    )
}

async fn metric(pg: &Promguard, prefix: &str) -> f64 {
    scrape(&pg.url).await.sum(prefix)
}

#[tokio::test]
async fn backend_in_flight_never_exceeds_the_cap() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(150))).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "admission:\n  recent: {max_in_flight: 4, reserved: 1, max_queue: 100, max_wait: 30s}\n",
        ),
    );
    let calls: Vec<_> = (0..40)
        .map(|n| {
            let url = query_url(&pg, n);
            let dashboard = if n % 4 == 0 { "orders" } else { "mine" };
            tokio::spawn(async move {
                client()
                    .get(url)
                    .header("x-dashboard-uid", dashboard)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("join").expect("answer"), 200);
    }
    assert_eq!(backend.requests(), 40);
    let peak = backend.counters.peak_in_flight.load(Ordering::SeqCst);
    assert!(peak <= 4, "the backend saw {peak} queries at once");
    assert!(peak >= 3, "the cap is used, not just respected: {peak}");
}

#[tokio::test]
async fn curated_dashboards_get_through_an_explore_storm() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_secs(4))).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "admission:\n  recent: {max_in_flight: 4, reserved: 2, max_queue: 4, max_wait: 200ms, retry_after: 7s}\n\
         priority:\n  dashboards: [orders]\n",
        ),
    );
    // Explore: no dashboard headers. Far more than the backend may take.
    let storm: Vec<_> = (0..24)
        .map(|n| {
            let url = query_url(&pg, n);
            let counters = backend.counters.clone();
            tokio::spawn(async move {
                let r = client().get(url).send().await.expect("answer");
                let completed = counters.completed.load(Ordering::SeqCst);
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap_or("").to_string());
                let status = r.status().as_u16();
                let body: Value = r.json().await.expect("JSON");
                (status, retry, completed, body)
            })
        })
        .collect();
    while backend.counters.in_flight.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let curated: Vec<_> = (100..102)
        .map(|n| {
            let url = query_url(&pg, n);
            tokio::spawn(async move {
                client()
                    .get(url)
                    .header("x-dashboard-uid", "orders")
                    .header("x-panel-id", "1")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    for c in curated {
        assert_eq!(
            c.await.expect("join").expect("answer"),
            200,
            "curated panels load"
        );
    }
    let mut shed = 0;
    for s in storm {
        let (status, retry, completed, body) = s.await.expect("join");
        if status == 503 {
            shed += 1;
            assert_eq!(retry.as_deref(), Some("7"));
            assert_eq!(body["errorType"], "unavailable");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("shedding load"),
                "{body}"
            );
            assert_eq!(
                completed, 0,
                "shed before any backend call finished, not after waiting for one"
            );
        } else {
            assert_eq!(status, 200);
        }
    }
    assert!(shed >= 16, "most of the storm is shed: {shed}");
    assert!(backend.counters.peak_in_flight.load(Ordering::SeqCst) <= 4);
    assert!(metric(&pg, "promguard_limit_rejections_total{class=\"explore\"").await >= 16.0);
}

#[tokio::test]
async fn a_user_over_budget_gets_429_and_others_do_not() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\n\
         identity:\n  grafana: {{secret_header: X-Secret, secret: s3cret}}\n\
         limits:\n  upstream: {{per_second: 1, burst: 2}}\n",
            backend.url
        ),
    );
    let as_grafana_user = |user: &'static str, n: usize| {
        client()
            .get(query_url(&pg, n))
            .header("x-secret", "s3cret")
            .header("x-grafana-user", user)
            .send()
    };
    assert_eq!(
        as_grafana_user("alice", 1).await.expect("answer").status(),
        200
    );
    assert_eq!(
        as_grafana_user("alice", 2).await.expect("answer").status(),
        200
    );
    let refused = as_grafana_user("alice", 3).await.expect("answer");
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["errorType"], "too_many_requests");
    assert!(
        body["error"].as_str().unwrap_or("").contains("alice"),
        "{body}"
    );

    // A cached panel still loads for her: hits spend only the request budget.
    let hit = as_grafana_user("alice", 1).await.expect("answer");
    assert_eq!(
        (
            hit.status().as_u16(),
            hit.headers()["x-cache"].to_str().unwrap_or("")
        ),
        (200, "HIT")
    );
    // Bob is unaffected.
    assert_eq!(
        as_grafana_user("bob", 4).await.expect("answer").status(),
        200
    );
    // Claiming to be bob without the Grafana secret does not reach bob's budget,
    // and claiming to be alice does not spend hers.
    let spoof = client()
        .get(query_url(&pg, 5))
        .header("x-grafana-user", "alice")
        .send()
        .await
        .expect("answer");
    assert_eq!(spoof.status(), 200, "an anonymous budget, not alice's");
}

#[tokio::test]
async fn cancelled_clients_free_their_slots_and_queue_places() {
    let backend = FaultServer::start(Mode::Hang).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "admission:\n  recent: {max_in_flight: 1, reserved: 0, max_queue: 8, max_wait: 30s}\n",
        ),
    );
    let patient_for = |ms| {
        reqwest::Client::builder()
            .timeout(Duration::from_millis(ms))
            .build()
            .expect("client")
    };
    let impatient = patient_for(300);
    // The first takes the only slot; the second queues and gives up first, then
    // the first gives up too.
    let (a, b) = tokio::join!(impatient.get(query_url(&pg, 1)).send(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        patient_for(100).get(query_url(&pg, 2)).send().await
    });
    assert!(a.is_err() && b.is_err());
    let freed = eventually(100, Duration::from_millis(20), async || {
        let queued = metric(&pg, "promguard_admission_queue_length{backend=\"recent\"}").await;
        let running = metric(&pg, "promguard_admission_in_flight{backend=\"recent\"").await;
        queued == 0.0 && running == 0.0
    })
    .await;
    assert!(freed, "the slot and the queue place were released");
    assert_eq!(backend.counters.abandoned.load(Ordering::SeqCst), 1);
    // The slot is usable again: the next call reaches the backend.
    let third = impatient.get(query_url(&pg, 3)).send().await;
    assert!(third.is_err());
    assert_eq!(
        backend.requests(),
        2,
        "only the first and the third reached the backend"
    );
}

#[tokio::test]
async fn a_user_at_their_limit_stays_limited_across_a_policy_reload() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let policies = tempfile::tempdir().expect("a policy directory");
    let file = policies.path().join("p.yaml");
    std::fs::write(&file, "normal:\n  rules: []\n").expect("write the policy");
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\n\
         limits:\n  requests: {{per_second: 1000, burst: 1000}}\n  upstream: {{per_second: 1, burst: 20}}\n  max_in_flight: 100\n\
         policy:\n  dir: {}\n  admin_token: t0ken\n  reload_interval: 1h\n",
            backend.url,
            policies.path().display()
        ),
    );
    let burst = |from: usize| {
        let urls: Vec<String> = (from..from + 30).map(|n| query_url(&pg, n)).collect();
        async move {
            let answers =
                futures_util::future::join_all(urls.iter().map(|u| async move {
                    client().get(u).send().await.map(|r| r.status().as_u16())
                }))
                .await;
            answers.into_iter().filter(|s| matches!(s, Ok(200))).count()
        }
    };
    // The user spends the whole burst of 20.
    let passed = burst(0).await;
    assert!((20..=22).contains(&passed), "{passed} of 30 passed");
    // An edit of the policy reloads it (a new rule, nothing about limits).
    std::fs::write(
        &file,
        "normal:\n  rules:\n    - {name: watch-regex, block: 'x', dry_run: true}\n",
    )
    .expect("edit the policy");
    let reloaded = client()
        .post(format!("{}/admin/policies/reload", pg.url))
        .bearer_auth("t0ken")
        .send()
        .await
        .expect("reload");
    assert_eq!(reloaded.status(), 200);
    // The budget is still spent: only what refilled since (one a second) passes,
    // not a fresh burst of 20.
    let after = burst(100).await;
    assert!(after <= 8, "{after} of 30 passed after the reload");
}
