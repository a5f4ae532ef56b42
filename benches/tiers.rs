//! Issue 14: what a hit in the fleet's cache (L2, Redis) costs over a hit in the
//! replica's own (L1), and what one Redis round trip costs, the price of checking
//! anything in Redis on every request.
//!
//! Two promguard replicas share a real redis-server in front of a real Prometheus.
//! Replica A fetches N distinct panels over settled data (each a MISS, written to
//! Redis after its answer). Replica B then asks for each panel twice: the first ask
//! is served from Redis (an L2 hit, copied into B's memory), the second, ten panels
//! later, from B's memory (an L1 hit). The pairs are interleaved, so noise hits both tiers
//! alike, and B's tier counters must show exactly N L2 hits. Each panel shape is
//! measured plain and gzipped (Grafana always asks for gzip), at concurrency 1 over
//! one keep-alive connection. A third series times a bare Redis `GET` of a small
//! key from this process: the round trip that a fleet-wide request budget would add
//! to every cache hit.
//!
//! Run: `cargo bench --bench tiers`; TIERS_PANELS per shape and encoding (300).
//! Writes `benches/results/tiers.md`. Needs the Debian packages prometheus,
//! victoria-metrics and redis-server.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use promguard_testkit::redis::RedisServer;
use promguard_testkit::{Bins, Promguard, backends, header, now_secs, repo, scrape};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

/// The bench is one "user" sending back to back, which the per-user budgets are not
/// about.
const LIMITS: &str = "limits:\n  requests: {per_second: 1000000, burst: 1000000}\n  \
                      upstream: {per_second: 100000, burst: 100000}\n  max_in_flight: 64\n";

/// How many panels later a panel's second ask (its L1 hit) comes.
const LAG: usize = 10;

/// A panel shape: its name, query (`{}` where a matcher goes), span and step.
struct Shape {
    name: &'static str,
    query: &'static str,
    span: i64,
    step: i64,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "1 h panel at 15 s",
        query: "sum by (region, status) (rate(shop_orders_total{}[5m]))",
        span: 3600,
        step: 15,
    },
    Shape {
        name: "24 h panel at 60 s",
        query: "sum by (region, status) (rate(shop_orders_total{}[5m]))",
        span: 86_400,
        step: 60,
    },
];

/// Latencies of one tier, in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn ms(micros: u64) -> String {
    format!("{:.3} ms", micros as f64 / 1000.0)
}

async fn ask(
    client: &reqwest::Client,
    url: &str,
    form: &[(&str, String)],
    gzip: bool,
) -> (Duration, String, usize) {
    let mut request = client.post(format!("{url}/api/v1/query_range")).form(form);
    if gzip {
        request = request.header("accept-encoding", "gzip");
    }
    let started = Instant::now();
    let response = request.send().await.expect("promguard answers");
    let cache = header(&response, "x-cache");
    let status = response.status();
    let body = response.bytes().await.expect("a body");
    let took = started.elapsed();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    (took, cache, body.len())
}

fn l2_hits(page: &promguard_testkit::Scrape) -> f64 {
    page.sum("promguard_cache_tier_hits_total{tier=\"l2\"}")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let panels: i64 = std::env::var("TIERS_PANELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let b = backends(BINS);
    let redis = RedisServer::start();
    let config = format!(
        "backends:\n  recent:\n    url: {}\n    window: 30d\n\
         shared:\n  redis: {{url: '{}', key_prefix: 'tiers:'}}\n{LIMITS}",
        b.prometheus,
        redis.url()
    );
    let a = Promguard::start(BINS, &config);
    let replica_b = Promguard::start(BINS, &config);
    for pg in [&a, &replica_b] {
        pg.until_redis_up(Duration::from_secs(20)).await;
    }
    // The bytes as sent: no decoding in the client, which would add its cost.
    let client = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("a client");
    let load_average = promguard_testkit::procstat::load_average().unwrap_or(f64::NAN);

    let mut text = String::new();
    writeln!(
        text,
        "Fleet cache (L2, Redis) hits against the replica's own (L1): two promguard \
         replicas sharing one redis-server on loopback, in front of Prometheus; {panels} \
         distinct panels per row fetched through replica A, then asked twice each through \
         replica B (first an L2 hit, then, ten panels later, an L1 hit), concurrency 1, one \
         keep-alive connection, release build, 2 cores, machine load average {load_average:.2} \
         before the run. Latency is the whole response at the client. Reproduce: `cargo \
         bench --bench tiers`.\n"
    )
    .expect("write to a string");
    writeln!(
        text,
        "| response | encoding | L1 hit p50 | L2 hit p50 | L2 over L1, p50 | L1 hit p99 | L2 hit p99 | L2 hits counted |\n|---|---|---|---|---|---|---|---|"
    )
    .expect("write to a string");

    // Panels ending an hour or two ago: settled data (cached as extents and whole
    // answers), within the two days Prometheus holds.
    let end = (now_secs() - 2 * 3600) / 3600 * 3600;
    let mut offset = 0;
    for shape in &SHAPES {
        for gzip in [false, true] {
            let forms: Vec<Vec<(&str, String)>> = (0..panels)
                .map(|_| {
                    // Distinct panels over the same data: a matcher on a label no
                    // series has makes each query (and its extents) its own.
                    offset += 1;
                    vec![
                        (
                            "query",
                            shape
                                .query
                                .replace("{}", &format!("{{bench!=\"{offset}\"}}")),
                        ),
                        ("start", (end - shape.span).to_string()),
                        ("end", end.to_string()),
                        ("step", shape.step.to_string()),
                    ]
                })
                .collect();
            for form in &forms {
                let (_, cache, _) = ask(&client, &a.url, form, gzip).await;
                assert_eq!(cache, "MISS", "replica A fetches every panel");
            }
            // Replica A writes to Redis after answering.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = l2_hits(&scrape(&replica_b.url).await);
            let (mut l1, mut l2) = (histogram(), histogram());
            let mut size = 0;
            // Each panel's L1 hit is asked LAG panels after its L2 hit, once
            // replica B has inflated and kept what came gzipped (after the answer,
            // off its path).
            for i in 0..forms.len() + LAG {
                if let Some(form) = forms.get(i) {
                    let (took, cache, bytes) = ask(&client, &replica_b.url, form, gzip).await;
                    assert_eq!(cache, "HIT", "replica B finds the panel in Redis");
                    l2.record(took.as_micros() as u64).expect("in range");
                    size = bytes;
                }
                if let Some(form) = i.checked_sub(LAG).and_then(|j| forms.get(j)) {
                    let (took, cache, _) = ask(&client, &replica_b.url, form, gzip).await;
                    assert_eq!(cache, "HIT", "replica B now holds the panel");
                    l1.record(took.as_micros() as u64).expect("in range");
                }
            }
            let counted = l2_hits(&scrape(&replica_b.url).await) - before;
            let added = l2.value_at_quantile(0.5) as i64 - l1.value_at_quantile(0.5) as i64;
            writeln!(
                text,
                "| {} ({} KiB) | {} | {} | {} | {:+.3} ms | {} | {} | {counted} of {panels} |",
                shape.name,
                size / 1024,
                if gzip { "gzip" } else { "plain" },
                ms(l1.value_at_quantile(0.5)),
                ms(l2.value_at_quantile(0.5)),
                added as f64 / 1000.0,
                ms(l1.value_at_quantile(0.99)),
                ms(l2.value_at_quantile(0.99)),
            )
            .expect("write to a string");
            eprintln!(
                "tiers: {} {} done",
                shape.name,
                if gzip { "gzip" } else { "plain" }
            );
        }
    }

    // One Redis round trip from a client on this machine, as promguard makes them.
    let redis_client = redis::Client::open(redis.url()).expect("a redis URL");
    let mut connection = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    let _: () = redis::cmd("SET")
        .arg("tiers:probe")
        .arg("1")
        .query_async(&mut connection)
        .await
        .expect("redis answers");
    let mut round_trip = histogram();
    for _ in 0..2000 {
        let started = Instant::now();
        let _: Option<String> = redis::cmd("GET")
            .arg("tiers:probe")
            .query_async(&mut connection)
            .await
            .expect("redis answers");
        round_trip
            .record(started.elapsed().as_micros() as u64)
            .expect("in range");
    }
    writeln!(
        text,
        "\nOne Redis round trip (`GET` of a small key, 2000 in a row, multiplexed \
         connection): p50 {}, p99 {}. A request budget kept in Redis would add one such \
         trip to every cache hit, and a Redis call per request for the whole fleet; it \
         stays per replica (limits.requests), while the upstream budget and per-user \
         in-flight calls, spent only on the way to a backend, are the fleet's.",
        ms(round_trip.value_at_quantile(0.5)),
        ms(round_trip.value_at_quantile(0.99)),
    )
    .expect("write to a string");

    print!("{text}");
    let path = repo().join("benches/results/tiers.md");
    std::fs::write(&path, text).expect("write benches/results/tiers.md");
}
