//! A fleet of three real promguard processes sharing a real `redis-server`: one
//! cache (an answer fetched through one replica is a hit on the others, and
//! identical misses across replicas cost one backend call), one backend cap, one
//! sale-mode switch that outlives every replica, and no outage when Redis dies or
//! holds garbage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use promguard_testkit::redis::RedisServer;
use promguard_testkit::{
    Promguard, admin_get, backends, client, eventually, header, now_secs, range, scrape,
};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

const TOKEN: &str = "fleet-admin";

/// Three replicas in front of `backend` (with `extra` config), sharing `redis`
/// under a prefix of their own.
fn fleet(redis: &RedisServer, backend: &str, extra: &str) -> Vec<Promguard> {
    (0..3).map(|_| replica(redis, backend, extra)).collect()
}

fn replica(redis: &RedisServer, backend: &str, extra: &str) -> Promguard {
    Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {backend}\n\
             shared:\n  redis: {{url: '{}', key_prefix: 'fleet-test:'}}\n{extra}",
            redis.url()
        ),
    )
}

/// Upstream calls the replicas made, from their own metrics.
async fn upstream_calls(replicas: &[Promguard]) -> f64 {
    let mut calls = 0.0;
    for pg in replicas {
        calls += scrape(&pg.url)
            .await
            .sum("promguard_upstream_request_duration_seconds_count");
    }
    calls
}

/// An instant query through `pg`: (status, X-Cache).
async fn instant(pg: &Promguard, expr: &str, time: i64) -> (u16, String) {
    let response = client()
        .post(format!("{}/api/v1/query", pg.url))
        .form(&[("query", expr.to_string()), ("time", time.to_string())])
        .send()
        .await
        .expect("an answer");
    let cache = header(&response, "x-cache");
    (response.status().as_u16(), cache)
}

/// Wait until every replica has heard from Redis (its heartbeat connects within a
/// second of start-up).
async fn joined(replicas: &[Promguard]) {
    for pg in replicas {
        pg.until_redis_up(Duration::from_secs(20)).await;
    }
}

/// `GET /admin/sale-mode` through `pg`.
async fn mode_status(pg: &Promguard) -> serde_json::Value {
    admin_get(&pg.url, "/admin/sale-mode", TOKEN).await
}

/// Whether a sale-mode status lists `replicas` live replicas, each with the state
/// in force where it was asked.
fn agreed(status: &serde_json::Value, replicas: usize) -> bool {
    status["fleet"]["replicas"]
        .as_array()
        .is_some_and(|r| r.len() == replicas && r.iter().all(|r| r["same_state"] == true))
}

#[tokio::test]
async fn an_answer_fetched_through_one_replica_is_a_hit_on_the_others() {
    let redis = RedisServer::start();
    let b = backends(BINS);
    let replicas = fleet(&redis, &b.prometheus, "");
    joined(&replicas).await;
    // A day-old hour: immutable, so cached as extents and a whole answer.
    let end = (now_secs() - 86_400) / 60 * 60;
    let form = [
        (
            "query",
            "sum by (region) (rate(shop_orders_total[5m]))".to_string(),
        ),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
        ("step", "60".to_string()),
    ];
    // Replicas 1 and 2 are asked as Grafana asks (gzip, so replica 2 sends the
    // fleet's gzipped copy as it is); replica 3 by a client that takes no gzip.
    let plain = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("a client");
    let gzip = client();
    let mut answers = Vec::new();
    for (i, pg) in replicas.iter().enumerate() {
        let response = if i == 2 { &plain } else { &gzip }
            .post(format!("{}/api/v1/query_range", pg.url))
            .form(&form)
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        let cache = response.headers()["x-cache"]
            .to_str()
            .expect("ascii")
            .to_string();
        answers.push((cache, response.text().await.expect("body")));
        // The first replica's write to Redis runs after its answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answers[0].0, "MISS");
    assert_eq!(answers[1].0, "HIT", "replica 2");
    assert_eq!(answers[2].0, "HIT", "replica 3");
    assert!(
        answers.iter().all(|(_, body)| *body == answers[0].1),
        "same bytes everywhere"
    );
    assert_eq!(upstream_calls(&replicas).await, 1.0);
    let l2_hits: f64 = join_all(replicas.iter().map(|pg| scrape(&pg.url)))
        .await
        .iter()
        .map(|page| page.sum("promguard_cache_tier_hits_total{tier=\"l2\"}"))
        .sum();
    assert_eq!(l2_hits, 2.0);
}

#[tokio::test]
async fn a_replica_takes_the_growing_chunk_another_extended_and_fetches_only_what_is_newer() {
    let redis = RedisServer::start();
    let b = backends(BINS);
    // Points older than 30 s go into extents; answers with newer ones stay fresh
    // for a second.
    let extra = "cache: {fresh_window: 30s, fresh_ttl: 1s}\n";
    let replicas: Vec<Promguard> = (0..2)
        .map(|_| replica(&redis, &b.prometheus, extra))
        .collect();
    joined(&replicas).await;
    let fetched = async |pg: &Promguard| {
        scrape(&pg.url)
            .await
            .sum("promguard_cache_points_fetched_total")
    };
    // A live "last hour" panel at a 15 s step, as Grafana asks at each refresh.
    let refresh = async |pg: &Promguard| {
        let end = now_secs() / 15 * 15;
        let before = fetched(pg).await;
        let query = "sum by (region) (rate(shop_orders_total[5m]))";
        range(&pg.url, query, end - 3600, end, 15, &[]).await;
        fetched(pg).await - before
    };
    // Replica 1 loads the panel; 45 s later replica 2 refreshes it from replica
    // 1's chunks in Redis plus the tail since.
    assert!(refresh(&replicas[0]).await > 0.0);
    tokio::time::sleep(Duration::from_secs(45)).await;
    let by_second = refresh(&replicas[1]).await;
    assert!(by_second > 0.0, "the tail since the first load");
    // Its writes to Redis run after its answer, and the answer goes stale.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Replica 1's own copy of the growing chunk is 45 s behind the fleet's: it
    // takes the fleet's, and fetches only what is newer than replica 2's load.
    let by_first = refresh(&replicas[0]).await;
    assert!(
        by_first < by_second,
        "replica 1 fetched {by_first} points, replica 2 {by_second}"
    );
}

#[tokio::test]
async fn identical_concurrent_misses_across_the_fleet_cost_one_call() {
    let redis = RedisServer::start();
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(500))).await;
    let replicas = Arc::new(fleet(&redis, &backend.url, ""));
    joined(&replicas).await;
    let asks = (0..30).map(|i| {
        let replicas = replicas.clone();
        async move { instant(&replicas[i % 3], "sum(up)", 1_700_000_000).await }
    });
    let answers = join_all(asks).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert_eq!(backend.requests(), 1, "{answers:?}");
}

#[tokio::test]
async fn a_flood_over_the_fleet_never_passes_the_fleet_cap_and_curated_panels_get_through() {
    let redis = RedisServer::start();
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(300))).await;
    let replicas = Arc::new(fleet(
        &redis,
        &backend.url,
        "admission:\n  recent: {max_in_flight: 4, reserved: 1, max_queue: 256, max_wait: 20s}\n\
         priority:\n  dashboards: [orders]\n\
         limits: {max_in_flight: 64, upstream: {per_second: 1000, burst: 1000}}\n",
    ));
    joined(&replicas).await;
    let flood = (0..60).map(|i| {
        let replicas = replicas.clone();
        async move {
            instant(&replicas[i % 3], &format!("up{{n=\"{i}\"}}"), 1_700_000_000)
                .await
                .0
        }
    });
    let curated = (0..6).map(|i| {
        let replicas = replicas.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client()
                .post(format!("{}/api/v1/query", replicas[i % 3].url))
                .header("X-Dashboard-Uid", "orders")
                .form(&[
                    ("query", format!("sum(orders{{n=\"{i}\"}})")),
                    ("time", "1700000000".into()),
                ])
                .send()
                .await
                .expect("an answer")
                .status()
                .as_u16()
        }
    });
    let (flood, curated) = tokio::join!(join_all(flood), join_all(curated));
    let peak = backend
        .counters
        .peak_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= 4,
        "the backend saw {peak} calls at once, over the fleet's cap of 4"
    );
    assert!(curated.iter().all(|s| *s == 200), "curated: {curated:?}");
    assert!(
        flood.iter().all(|s| matches!(s, 200 | 503)),
        "flood: {flood:?}"
    );
}

#[tokio::test]
async fn a_sale_mode_switch_through_one_replica_holds_on_all_and_outlives_them() {
    let redis = RedisServer::start();
    let b = backends(BINS);
    let extra = format!(
        "policy:\n  dir: {}\n  admin_token: {TOKEN}\n",
        promguard_testkit::repo().join("policies").display()
    );
    let config = |redis: &RedisServer| {
        format!(
            "backends:\n  recent:\n    url: {}\n    window: 2d\n  long_term:\n    url: {}\n\
             shared:\n  redis: {{url: '{}', key_prefix: 'fleet-test:'}}\n{extra}",
            b.prometheus,
            b.victoria,
            redis.url()
        )
    };
    let replicas: Vec<Promguard> = (0..3)
        .map(|_| Promguard::start(BINS, &config(&redis)))
        .collect();
    joined(&replicas).await;
    let switched = client()
        .post(format!("{}/admin/sale-mode", replicas[0].url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"mode": "on", "for": "1h", "reason": "fleet test", "by": "sre"}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(switched.status(), 200);
    let body: serde_json::Value = switched.json().await.expect("json");
    assert_eq!(body["applies_to"], "every replica", "{body}");

    // Each attempt asks a panel nobody asked before: one answered in normal mode
    // would be cached, and the rules judge only what reaches the backend.
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let month = || {
        let end = now_secs() / 60 * 60;
        let n = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        [
            ("query", format!("sum(rate(shop_orders_total[5m])) + {n}")),
            ("start", (end - 30 * 86_400).to_string()),
            ("end", end.to_string()),
            ("step", "3600".to_string()),
        ]
    };
    let refused_on = |pg: &Promguard| {
        let url = format!("{}/api/v1/query_range", pg.url);
        let form = month();
        async move {
            client()
                .post(url)
                .form(&form)
                .send()
                .await
                .expect("an answer")
                .status()
                .as_u16()
                == 422
        }
    };
    // Another replica follows within its half-second poll; waited for here with a
    // generous bound, since this machine's timing is not what is tested.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused_on(&replicas[2]).await {
        assert!(
            Instant::now() < deadline,
            "replica 3 never refused the 30-day query"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The status lists all three, each reporting the state in force here at its
    // next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = mode_status(&replicas[1]).await;
        if agreed(&status, 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never agreed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every replica goes; new ones, with no state file of their own, come up in
    // sale mode from Redis.
    drop(replicas);
    let replicas: Vec<Promguard> = (0..3)
        .map(|_| Promguard::start(BINS, &config(&redis)))
        .collect();
    joined(&replicas).await;
    for pg in &replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !refused_on(pg).await {
            assert!(
                Instant::now() < deadline,
                "a restarted replica is not in sale mode"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_switch_made_while_redis_is_down_becomes_the_fleets_when_it_returns() {
    let mut redis = RedisServer::start();
    let backend = FaultServer::start(Mode::Big(100)).await;
    let extra = format!(
        "policy:\n  dir: {}\n  admin_token: {TOKEN}\n",
        promguard_testkit::repo().join("policies").display()
    );
    let replicas = [
        replica(&redis, &backend.url, &extra),
        replica(&redis, &backend.url, &extra),
    ];
    joined(&replicas).await;
    // Redis comes back with the fleet's state as it was, as after a partition:
    // saved before it goes, loaded when it returns. (Back empty, the first
    // replica to look would seed it, which would hide a switch left local.)
    let version = "fleet-test:mode:version";
    let seeded = eventually(50, Duration::from_millis(100), async || {
        !redis.cli(&["GET", version]).trim().is_empty()
    })
    .await;
    assert!(seeded, "the fleet's state never reached redis");
    redis.cli(&["SAVE"]);
    redis.kill();

    let switched: serde_json::Value = client()
        .post(format!("{}/admin/sale-mode", replicas[0].url))
        .bearer_auth(TOKEN)
        .json(
            &serde_json::json!({"mode": "on", "for": "1h", "reason": "outage drill", "by": "sre"}),
        )
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("json");
    assert!(
        switched["applies_to"]
            .as_str()
            .is_some_and(|a| a.starts_with("this replica only")),
        "{switched}"
    );
    let here = mode_status(&replicas[0]).await;
    assert_eq!(here["mode"]["mode"], "sale", "{here}");
    assert_eq!(here["fleet"]["held_switch"], true, "{here}");
    let other = mode_status(&replicas[1]).await;
    assert_eq!(other["mode"]["mode"], "normal", "{other}");

    redis.restart();
    let mut last = serde_json::Value::Null;
    let agreed = eventually(100, Duration::from_millis(200), async || {
        let (here, other) = (
            mode_status(&replicas[0]).await,
            mode_status(&replicas[1]).await,
        );
        let done = other["mode"]["mode"] == "sale"
            && here["fleet"]["held_switch"] == false
            && agreed(&here, 2)
            && agreed(&other, 2);
        last = serde_json::json!({"switched": here, "other": other});
        done
    })
    .await;
    assert!(agreed, "the fleet never took the switch: {last}");
    let audit = redis.cli(&["LRANGE", "fleet-test:mode:audit", "0", "-1"]);
    assert_eq!(
        audit.matches("outage drill").count(),
        1,
        "the fleet's audit holds the switch once: {audit}"
    );
}

#[tokio::test]
async fn redis_dying_mid_flood_is_not_an_outage_and_sharing_resumes() {
    let mut redis = RedisServer::start();
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(20))).await;
    let replicas = Arc::new(fleet(
        &redis,
        &backend.url,
        "limits: {max_in_flight: 64, upstream: {per_second: 1000, burst: 1000}}\n",
    ));
    joined(&replicas).await;
    let flood = {
        let replicas = replicas.clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..300 {
                let started = Instant::now();
                let (status, _) = instant(
                    &replicas[i % 3],
                    &format!("up{{i=\"{}\"}}", i % 40),
                    1_700_000_000 + i as i64,
                )
                .await;
                answers.push((status, started.elapsed()));
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let answers = flood.await.expect("the flood ran");
    assert!(
        answers
            .iter()
            .all(|(status, _)| matches!(status, 200 | 429 | 503)),
        "{answers:?}"
    );
    // No answer waited on Redis past the backend's own time (20 ms) and Redis'
    // timeout (50 ms) by more than a wide margin for this machine.
    let slowest = answers
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(5),
        "slowest answer took {slowest:?}"
    );
    for pg in replicas.iter() {
        let ready = client()
            .get(format!("{}/-/ready", pg.url))
            .send()
            .await
            .expect("ready");
        assert_eq!(ready.status(), 200, "ready while redis is down");
    }

    redis.restart();
    joined(&replicas).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut t = 1_650_000_000;
    loop {
        t += 1;
        let (first, _) = instant(&replicas[0], "sum(up)", t).await;
        assert_eq!(first, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if instant(&replicas[1], "sum(up)", t).await.1 == "HIT" {
            break;
        }
        assert!(Instant::now() < deadline, "answers were never shared again");
    }
}

#[tokio::test]
async fn garbage_in_redis_reads_as_a_miss() {
    let redis = RedisServer::start();
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let replicas = fleet(&redis, &backend.url, "");
    joined(&replicas).await;
    assert_eq!(
        instant(&replicas[0], "sum(up)", 1_700_000_000).await,
        (200, "MISS".into())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys = redis.cli(&["--scan", "--pattern", "fleet-test:a:*"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 1, "one answer stored: {keys:?}");
    redis.cli(&["SET", keys[0], "PGL2\u{1}\u{1}garbage"]);
    assert_eq!(
        instant(&replicas[1], "sum(up)", 1_700_000_000).await,
        (200, "MISS".into())
    );
    assert_eq!(backend.requests(), 2);
    let invalid: f64 = scrape(&replicas[1].url)
        .await
        .sum("promguard_cache_l2_values_total{op=\"get\",outcome=\"invalid\"}");
    assert!(invalid >= 1.0, "counted as invalid");
}

#[tokio::test]
async fn a_fleet_shares_over_tls_and_a_replica_that_cannot_verify_redis_stays_on_its_own() {
    let redis = RedisServer::start_tls();
    let b = backends(BINS);
    let config = format!(
        "backends:\n  recent:\n    url: {}\n\
         shared:\n  redis: {{url: '{}', key_prefix: 'fleet-tls:'}}\n",
        b.prometheus,
        redis.url()
    );
    let ca = redis.ca_file();
    let trusting = [("SSL_CERT_FILE", ca.to_str().expect("a UTF-8 path"))];
    let replicas: Vec<Promguard> = (0..2)
        .map(|_| Promguard::start_with_env(BINS, &config, &trusting))
        .collect();
    joined(&replicas).await;
    let time = now_secs() - 86_400;
    let expr = "sum(shop_orders_total)";
    assert_eq!(
        instant(&replicas[0], expr, time).await,
        (200, "MISS".into())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(instant(&replicas[1], expr, time).await, (200, "HIT".into()));
    assert_eq!(upstream_calls(&replicas).await, 1.0);

    // Without the CA the certificate does not verify: that replica never joins,
    // and answers on its own.
    let stranger = Promguard::start(BINS, &config);
    let deadline = Instant::now() + Duration::from_secs(3);
    while scrape(&stranger.url)
        .await
        .sum("promguard_redis_errors_total")
        < 1.0
    {
        assert!(Instant::now() < deadline, "the stranger never tried redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scrape(&stranger.url).await.sum("promguard_redis_up"), 0.0);
    assert_eq!(instant(&stranger, expr, time).await, (200, "MISS".into()));
}
