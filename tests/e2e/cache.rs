//! The result cache against real backends: cached and stitched answers equal the
//! direct answers (exactly for Prometheus, within 1e-9 for VictoriaMetrics, whose
//! own cache changes last digits), identical requests share one upstream call,
//! late samples are fetched again, failures are covered by stale answers, and the
//! byte bound holds.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use promguard_testkit::{
    Promguard, Rng, assert_same_answer, backends, client, now_secs, range, scrape, sorted_by_metric,
};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

/// Per-user budgets out of the way, for tests that send floods as one user.
const UNLIMITED: &str = "limits:\n  requests: {per_second: 100000, burst: 100000}\n  upstream: {per_second: 100000, burst: 100000}\n  max_in_flight: 1000\n";

pub const QUERIES: &[&str] = &[
    r#"sum by (region) (rate(shop_orders_total{status="created"}[5m]))"#,
    "sum by (service, code) (rate(http_requests_total[5m]))",
    "histogram_quantile(0.99, sum by (service, le) (rate(http_request_duration_seconds_bucket[5m])))",
    r#"sum(increase(shop_orders_total{status="paid"}[1h] offset 1h))"#,
    "max_over_time(sum(rate(http_requests_total[5m]))[30m:1m])",
    "shop_orders_stuck",
];

#[tokio::test]
async fn stitched_answers_equal_prometheus_exactly() {
    let pg = Promguard::in_front_of_backends(BINS, "");
    let prom = &backends(BINS).prometheus;
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut seen = BTreeSet::new();
    for round in 0..24 {
        let query = *rng.pick(QUERIES);
        let step = *rng.pick(&[15, 30, 45, 60, 120, 300]);
        // Grafana aligns to the step; some rounds use an unaligned phase too.
        let phase = if round % 3 == 0 {
            rng.below(step as u64)
        } else {
            0
        };
        // Ends stay clear of the live edge, where new scrapes land between calls, and
        // every view stays inside Prometheus' 2-day window.
        let end = (now_secs() - 4 * 3600 - rng.below(8 * 3600)) / step * step + phase;
        let width = step * (20 + rng.below(400)).min(12 * 3600 / step);
        let start = end - width;
        // A first view, a refresh that moves forward, and a wider view that
        // reaches back over a hole: hits, partial hits and misses.
        let shift = step * (1 + rng.below(40));
        for (s, e) in [
            (start, end),
            (start + shift, end + shift),
            (start - width / 2, end),
            (start, end),
        ] {
            let (cache, backend, got) = range(&pg.url, query, s, e, step, &[]).await;
            assert_eq!(backend, "recent", "{query} {s}..{e}");
            let (_, _, want) = range(prom, query, s, e, step, &[]).await;
            assert_same_answer(
                &got,
                &want,
                0.0,
                &format!("{query} {s}..{e}/{step} ({cache})"),
            );
            seen.insert(cache);
        }
    }
    for outcome in ["MISS", "PARTIAL", "HIT"] {
        assert!(seen.contains(outcome), "no {outcome} among {seen:?}");
    }
}

#[tokio::test]
async fn stitched_answers_equal_victoria_metrics_within_1e_9() {
    let _vm = promguard_testkit::VM_COUNTERS.read().await;
    // Anything older than 2 hours goes to VictoriaMetrics, which holds the last two
    // days at scrape resolution, as a long-term store does.
    let pg = Promguard::with_recent_window(BINS, "2h", "");
    let vm = &backends(BINS).victoria;
    let mut rng = Rng(0x5EED_0000_0000_0002);
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let query = *rng.pick(QUERIES);
        let step = *rng.pick(&[30, 60, 120, 300, 600]);
        let end = (now_secs() - 4 * 3600 - rng.below(8 * 3600)) / step * step;
        let start = end - step * (20 + rng.below(400)).min(12 * 3600 / step);
        let shift = step * (1 + rng.below(30));
        for (s, e) in [(start, end), (start + shift, end + shift), (start, end)] {
            let (cache, backend, got) = range(&pg.url, query, s, e, step, &[]).await;
            assert_eq!(backend, "long_term");
            let (_, _, want) = range(vm, query, s, e, step, &[("nocache", "1")]).await;
            assert_same_answer(
                &sorted_by_metric(got),
                &sorted_by_metric(want),
                1e-9,
                &format!("{query} {s}..{e}/{step} ({cache})"),
            );
            seen.insert(cache);
        }
    }
    assert!(seen.contains("PARTIAL") && seen.contains("HIT"), "{seen:?}");
}

#[tokio::test]
async fn late_samples_are_fetched_again_after_the_fresh_ttl() {
    let pg = Promguard::in_front_of_backends(BINS, "cache:\n  fresh_ttl: 1s\n");
    let prom = &backends(BINS).prometheus;
    let query = "sum(rate(http_requests_total[1m]))";
    let end = now_secs() / 15 * 15;
    let start = end - 3600;
    let (first, _, _) = range(&pg.url, query, start, end + 60, 15, &[]).await;
    assert_eq!(first, "MISS");
    // Let the exporter be scraped again, so the newest points change.
    tokio::time::sleep(Duration::from_secs(16)).await;
    // A scrape can land between the two calls; a real mismatch persists.
    let mut last = None;
    for _ in 0..5 {
        let (cache, _, got) = range(&pg.url, query, start, end + 60, 15, &[]).await;
        let (_, _, want) = range(prom, query, start, end + 60, 15, &[]).await;
        if got == want {
            assert_eq!(cache, "PARTIAL", "only the recent tail was fetched again");
            return;
        }
        last = Some((got, want));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (got, want) = last.expect("at least one attempt");
    assert_same_answer(&got, &want, 0.0, "after late samples");
}

#[tokio::test]
async fn a_hundred_identical_requests_make_one_upstream_call() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(400))).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\n{UNLIMITED}",
            backend.url
        ),
    );
    for path in [
        "/api/v1/query?query=up&time=1700000000",
        "/api/v1/query_range?query=up&start=1700000040&end=1700003640&step=60",
    ] {
        let before = backend.requests();
        let calls: Vec<_> = (0..100)
            .map(|_| {
                let url = format!("{}{path}", pg.url);
                tokio::spawn(async move {
                    let r = client().get(url).send().await.expect("answer");
                    (r.status().as_u16(), r.text().await.expect("body"))
                })
            })
            .collect();
        for call in calls {
            let (status, body) = call.await.expect("join");
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(backend.requests() - before, 1, "{path}");
    }
    let waiters = scrape(&pg.url)
        .await
        .sum("promguard_cache_coalesced_waiters_total");
    assert_eq!(waiters, 198.0);
}

#[tokio::test]
async fn metadata_is_cached_and_no_cache_bypasses() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let url = format!("{}/api/v1/labels?start=1700000005&end=1700003590", pg.url);
    let first = client().get(&url).send().await.expect("answer");
    assert_eq!(first.headers()["x-cache"], "MISS");
    // Within the same minutes the snapped span is the same answer.
    let nearby = format!("{}/api/v1/labels?start=1700000010&end=1700003595", pg.url);
    let second = client().get(&nearby).send().await.expect("answer");
    assert_eq!(second.headers()["x-cache"], "HIT");
    let bypass = client()
        .get(&url)
        .header("cache-control", "no-cache")
        .send()
        .await
        .expect("answer");
    assert_eq!(bypass.headers()["x-cache"], "BYPASS");
    assert_eq!(backend.requests(), 2);
}

#[tokio::test]
async fn a_failing_backend_is_covered_by_a_stale_answer_with_a_warning() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\ncache:\n  fresh_ttl: 1s\n",
            backend.url
        ),
    );
    let url = format!("{}/api/v1/query?query=up&time={}", pg.url, now_secs());
    let fresh = client().get(&url).send().await.expect("answer");
    assert_eq!(fresh.headers()["x-cache"], "MISS");
    backend
        .counters
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = client().get(&url).send().await.expect("answer");
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.headers()["x-cache"], "STALE");
    let body: Value = stale.json().await.expect("json");
    let warning = body["warnings"][0].as_str().expect("a warning");
    assert!(
        warning.contains("old") && warning.contains("recent"),
        "{warning}"
    );
    assert_eq!(body["data"]["resultType"], "vector");

    // Without an older answer the failure is reported as it is.
    let other = format!("{}/api/v1/query?query=down&time={}", pg.url, now_secs());
    let failed = client().get(&other).send().await.expect("answer");
    assert_eq!(failed.status(), 502);
}

#[tokio::test]
async fn the_byte_bound_holds_under_many_distinct_queries() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\ncache:\n  max_bytes: 256KiB\n{UNLIMITED}",
            backend.url
        ),
    );
    for i in 0..3000 {
        let url = format!(
            "{}/api/v1/query?query=up%7Bi%3D%22{i}%22%7D&time=1700000000",
            pg.url
        );
        assert_eq!(
            client().get(url).send().await.expect("answer").status(),
            200
        );
    }
    let metrics = scrape(&pg.url).await;
    assert!(metrics.sum("promguard_cache_bytes") <= 256.0 * 1024.0);
    assert!(metrics.sum("promguard_cache_evictions_total{cause=\"size\"}") > 1000.0);
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test]
async fn memory_stays_near_the_bound_when_far_more_passes_through() {
    let backend = FaultServer::start(Mode::Big(64 * 1024)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\ncache:\n  max_bytes: 4MiB\n{UNLIMITED}",
            backend.url
        ),
    );
    let before = rss_bytes(pg.pid());
    // About 190 MiB of distinct answers through a 4 MiB cache.
    for i in 0..3000 {
        let url = format!(
            "{}/api/v1/query?query=up%7Bi%3D%22{i}%22%7D&time=1700000000",
            pg.url
        );
        let r = client().get(url).send().await.expect("answer");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let after = rss_bytes(pg.pid());
    let metrics = scrape(&pg.url).await;
    assert!(metrics.sum("promguard_cache_bytes") <= 4.0 * 1024.0 * 1024.0);
    // The bound plus a fixed allowance for buffers and allocator slack, far below
    // what passed through.
    let growth = after.saturating_sub(before);
    assert!(
        growth < 4 * 1024 * 1024 + 48 * 1024 * 1024,
        "resident memory grew by {} MiB",
        growth / (1024 * 1024)
    );
}

#[tokio::test]
async fn hits_go_out_gzipped_to_clients_that_accept_it() {
    use std::io::Read;
    let backend = FaultServer::start(Mode::Big(64 * 1024)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let url = format!("{}/api/v1/query?query=up&time=1700000000", pg.url);
    // A client that does not decompress by itself, so the wire format is visible.
    let raw = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");
    let get = |encoding: &'static str| raw.get(&url).header("accept-encoding", encoding).send();
    let miss = get("gzip").await.expect("answer");
    assert_eq!(miss.headers()["x-cache"], "MISS");
    assert!(!miss.headers().contains_key("content-encoding"));
    let plain = miss.bytes().await.expect("body");

    let hit = get("gzip").await.expect("answer");
    assert_eq!(hit.headers()["x-cache"], "HIT");
    assert_eq!(hit.headers()["content-encoding"], "gzip");
    let wire = hit.bytes().await.expect("body");
    assert!(
        wire.len() < plain.len() / 10,
        "{} of {} bytes",
        wire.len(),
        plain.len()
    );
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&wire[..])
        .read_to_end(&mut unzipped)
        .expect("valid gzip");
    assert_eq!(unzipped, plain);

    let identity = get("identity").await.expect("answer");
    assert!(!identity.headers().contains_key("content-encoding"));
    assert_eq!(identity.bytes().await.expect("body"), plain);
}
