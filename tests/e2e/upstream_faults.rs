//! A backend that is down, hangs, answers garbage or too much is reported as a
//! Prometheus-style error naming the backend; promguard never hangs with it, frees
//! the upstream call when the client leaves, exports its in-flight work, and drains
//! on SIGTERM.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

use promguard_testkit::{Promguard, client, free_port, scrape};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

fn recent_only(url: &str, extra: &str) -> String {
    format!("backends:\n  recent:\n    url: {url}\n{extra}")
}

async fn query(pg: &Promguard) -> (u16, Value) {
    let response = client()
        .get(format!("{}/api/v1/query?query=up", pg.url))
        .send()
        .await
        .expect("promguard answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON error body"))
}

/// Upstream instant queries in flight on the recent backend, from promguard's gauge.
async fn in_flight(pg: &Promguard) -> f64 {
    scrape(&pg.url)
        .await
        .sum(r#"promguard_upstream_in_flight_requests{backend="recent",endpoint="query"}"#)
}

#[tokio::test]
async fn backend_down_is_503_naming_the_backend() {
    let pg = Promguard::start(
        BINS,
        &recent_only(&format!("http://127.0.0.1:{}", free_port()), ""),
    );
    let (status, body) = query(&pg).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errorType"], "unavailable");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("recent"),
        "{body}"
    );
    let ready = client()
        .get(format!("{}/-/ready", pg.url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn hanging_backend_times_out_with_504() {
    let backend = FaultServer::start(Mode::Hang).await;
    let pg = Promguard::start(BINS, &recent_only(&backend.url, "    timeout: 1s\n"));
    let (status, body) = query(&pg).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["errorType"], "timeout");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("recent")
    );
}

#[tokio::test]
async fn garbage_from_the_backend_is_502() {
    let backend = FaultServer::start(Mode::Garbage).await;
    let pg = Promguard::start(BINS, &recent_only(&backend.url, ""));
    let (status, body) = query(&pg).await;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("recent") && error.contains("invalid body"),
        "{error}"
    );
}

#[tokio::test]
async fn oversized_answers_are_refused_with_advice() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(BINS, &recent_only(&backend.url, "    max_response: 16\n"));
    let (status, body) = query(&pg).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errorType"], "execution");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("16-byte")
    );
}

#[tokio::test]
async fn in_flight_gauge_moves_under_load() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(1500))).await;
    let pg = Promguard::start(BINS, &recent_only(&backend.url, ""));
    assert_eq!(in_flight(&pg).await, 0.0);
    // Distinct queries: identical ones would share one upstream call.
    let requests: Vec<_> = (0..5)
        .map(|n| {
            let url = format!(
                "{}/api/v1/query?query=up&time={}",
                pg.url,
                1_700_000_000 + n
            );
            tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peak: f64 = 0.0;
    while Instant::now() < deadline && peak < 5.0 {
        peak = peak.max(in_flight(&pg).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(peak, 5.0, "all five slow calls show as in flight");
    for r in requests {
        assert_eq!(r.await.expect("join").expect("response"), 200);
    }
    assert_eq!(in_flight(&pg).await, 0.0);
    assert_eq!(backend.counters.peak_in_flight.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstream_call() {
    let backend = FaultServer::start(Mode::Hang).await;
    let pg = Promguard::start(BINS, &recent_only(&backend.url, ""));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let gone = impatient
        .get(format!("{}/api/v1/query?query=up", pg.url))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up");
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.counters.abandoned.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.counters.abandoned.load(Ordering::SeqCst), 1);
    assert_eq!(in_flight(&pg).await, 0.0);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(800))).await;
    let mut pg = Promguard::start(BINS, &recent_only(&backend.url, ""));
    let url = format!("{}/api/v1/query?query=up", pg.url);
    let request = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    while backend.counters.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pg.pid().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    assert_eq!(request.await.expect("join").expect("response"), 200);
    let exit = pg
        .wait_exit(Duration::from_secs(10))
        .expect("promguard exits after draining");
    assert!(exit.success(), "{exit}");
}
