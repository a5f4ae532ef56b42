//! A fetch shared by several requests runs for all of them: at the best class
//! among them, and never refusing one of them for another's budget.

use std::time::Duration;

use crate::BINS;
use crate::faults::{FaultServer, Mode};
use promguard_testkit::{Promguard, client, scrape};

const SECRET: &str = "s3cret";

/// One instant query as a proven Grafana user; Explore unless `dashboard` is given.
async fn query(pg: &Promguard, user: &str, dashboard: Option<&str>, expr: &str) -> u16 {
    let mut request = client()
        .post(format!("{}/api/v1/query", pg.url))
        .header("X-Secret", SECRET)
        .header("X-Grafana-User", user)
        .form(&[("query", expr), ("time", "1700000000")]);
    if let Some(uid) = dashboard {
        request = request
            .header("X-Dashboard-Uid", uid)
            .header("X-Panel-Id", "1");
    }
    request.send().await.expect("an answer").status().as_u16()
}

fn config(backend: &str, max_wait: &str) -> String {
    format!(
        "backends:\n  recent:\n    url: {backend}\n\
         identity:\n  grafana: {{secret_header: X-Secret, secret: {SECRET}}}\n\
         priority:\n  dashboards: [orders]\n\
         admission:\n  recent: {{max_in_flight: 2, reserved: 1, max_queue: 16, max_wait: {max_wait}}}\n\
         limits:\n  max_in_flight: 1\n  in_flight_wait: 500ms\n"
    )
}

#[tokio::test]
async fn a_curated_panel_joining_an_explore_fetch_lifts_it_past_the_flood() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(1500))).await;
    // No Explore fetch waits more than 1 s for a slot: less than the 1.5 s the
    // one unreserved slot stays taken, so only the reserved slot can serve the
    // curated panel in time.
    let pg = std::sync::Arc::new(Promguard::start(BINS, &config(&backend.url, "1s")));
    // Four Explore users fill the one unreserved slot and queue behind it.
    let mut flood = Vec::new();
    for n in 0..4 {
        let pg = pg.clone();
        flood.push(tokio::spawn(async move {
            query(&pg, &format!("e{n}"), None, &format!("up{{flood=\"{n}\"}}")).await
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // A fifth Explore user asks for the query the curated panel will ask for.
    let shared = "sum(up{job=\"orders\"})";
    let explorer = tokio::spawn({
        let pg = pg.clone();
        async move { query(&pg, "e9", None, shared).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let curated = query(&pg, "alice", Some("orders"), shared).await;
    assert_eq!(
        curated, 200,
        "the curated panel got its answer, not a 429 or 503"
    );
    assert_eq!(
        explorer.await.expect("join"),
        200,
        "and so did the Explore user it joined"
    );
    let waiters = scrape(&pg.url)
        .await
        .sum("promguard_cache_coalesced_waiters_total");
    assert_eq!(waiters, 1.0, "the curated panel joined the Explore fetch");
    for f in flood {
        let _ = f.await;
    }
}

#[tokio::test]
async fn a_waiter_is_never_refused_for_the_budget_of_the_request_it_joined() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(1500))).await;
    let pg = std::sync::Arc::new(Promguard::start(BINS, &config(&backend.url, "5s")));
    // Bob holds his one in-flight slot with a slow query...
    let holding = tokio::spawn({
        let pg = pg.clone();
        async move { query(&pg, "bob", Some("mine"), "up{hold=\"1\"}").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so his next fetch waits for a slot of his own, and will be refused.
    let shared = "sum(up{job=\"cart\"})";
    let bob = tokio::spawn({
        let pg = pg.clone();
        async move { query(&pg, "bob", Some("mine"), shared).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Carol asks for the same answer while Bob's fetch waits.
    let carol = query(&pg, "carol", Some("hers"), shared).await;
    assert_eq!(bob.await.expect("join"), 429, "Bob is over his own limit");
    assert_eq!(carol, 200, "Carol is not refused for Bob's limit");
    assert_eq!(holding.await.expect("join"), 200);
}
