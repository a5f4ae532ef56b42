//! Latency promguard adds over querying Prometheus directly, without a cache.
//!
//! Starts the real backends (scripts/backends.sh, small data) and the release
//! promguard binary, then sends the same requests directly and through promguard,
//! interleaved in one run so machine noise hits both alike, and reports median and
//! p99 of each with the difference. Run: `cargo bench --bench passthrough`.
//! Writes `benches/results/passthrough.md`.
//!
//! `PASSTHROUGH_BASELINE=/path/to/an/older/promguard` adds that binary as a third
//! arm, started the same way and interleaved with the other two, and reports this
//! build against it: a regression check in one run, as noise allows no other.

use std::fmt::Write as _;
use std::time::Instant;

use hdrhistogram::Histogram;

use promguard_testkit::{Bins, Promguard, backends, client, now_secs, repo};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

const ROUNDS: usize = 2000;

/// The cache disabled and the per-user budgets out of the way: this measures the
/// proxy path itself (parse, analyse, route, limit, admit, forward), not refusals.
const PROXY_CONFIG: &str = "cache:\n  enabled: false\n\
     limits:\n  requests: {per_second: 100000, burst: 100000}\n  upstream: {per_second: 100000, burst: 100000}\n";

struct Arm {
    name: &'static str,
    path: &'static str,
    form: Vec<(&'static str, String)>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = std::env::var("PASSTHROUGH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    let b = backends(BINS);
    let pg = Promguard::in_front_of_backends(BINS, PROXY_CONFIG);
    let baseline = BINS
        .promguard_from_env("PASSTHROUGH_BASELINE")
        .map(|bins| Promguard::in_front_of_backends(bins, PROXY_CONFIG));
    let end = (now_secs() - 120) / 30 * 30;
    let arms = [
        Arm {
            name: "instant `vector(1)` (pure overhead)",
            path: "/api/v1/query",
            form: vec![("query", "vector(1)".into()), ("time", end.to_string())],
        },
        Arm {
            name: "1h panel `sum by (region) (rate(shop_orders_total[5m]))`, step 30s",
            path: "/api/v1/query_range",
            form: vec![
                (
                    "query",
                    "sum by (region) (rate(shop_orders_total[5m]))".into(),
                ),
                ("start", (end - 3600).to_string()),
                ("end", end.to_string()),
                ("step", "30".into()),
            ],
        },
    ];
    let http = client();
    // The bases to ask, in the order of the report's columns: direct, this build,
    // and the baseline if one is given.
    let bases: Vec<&str> = [Some(b.prometheus.as_str()), Some(pg.url.as_str())]
        .into_iter()
        .chain([baseline.as_ref().map(|p| p.url.as_str())])
        .flatten()
        .collect();
    let mut report = String::from(
        "| request | direct p50 | via promguard p50 | added p50 | direct p99 | via promguard p99 | added p99 |",
    );
    if baseline.is_some() {
        report.push_str(" baseline p50 | added p50, baseline | this build / baseline, p50 |");
    }
    report.push_str(&format!(
        "\n|{}\n",
        "---|".repeat(if baseline.is_some() { 10 } else { 7 })
    ));
    for arm in &arms {
        let mut latencies: Vec<Histogram<u64>> = bases.iter().map(|_| histogram()).collect();
        for i in 0..rounds {
            // Rotate which goes first so none always meets a warm connection.
            for k in 0..bases.len() {
                let which = (i + k) % bases.len();
                let started = Instant::now();
                let response = http
                    .post(format!("{}{}", bases[which], arm.path))
                    .form(&arm.form)
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                let body = response.bytes().await.expect("body");
                assert!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let micros = started.elapsed().as_micros() as u64;
                latencies[which].saturating_record(micros.max(1));
            }
        }
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let (direct, proxied) = (&latencies[0], &latencies[1]);
        write!(
            report,
            "| {} | {:.3} ms | {:.3} ms | {:+.3} ms | {:.3} ms | {:.3} ms | {:+.3} ms |",
            arm.name,
            ms(direct, 0.5),
            ms(proxied, 0.5),
            ms(proxied, 0.5) - ms(direct, 0.5),
            ms(direct, 0.99),
            ms(proxied, 0.99),
            ms(proxied, 0.99) - ms(direct, 0.99),
        )
        .expect("write to string");
        if let Some(older) = latencies.get(2) {
            write!(
                report,
                " {:.3} ms | {:+.3} ms | {:.3} |",
                ms(older, 0.5),
                ms(older, 0.5) - ms(direct, 0.5),
                (ms(proxied, 0.5) - ms(direct, 0.5)) / (ms(older, 0.5) - ms(direct, 0.5)),
            )
            .expect("write to string");
        }
        report.push('\n');
    }
    let header = format!(
        "Pass-through latency, {rounds} interleaved requests per arm at concurrency 1, \
         {} cores, release build{}.\n\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if baseline.is_some() {
            "; \"this build / baseline\" is the added p50 of this build over the baseline's"
        } else {
            ""
        }
    );
    let out = format!("{header}{report}");
    print!("{out}");
    let path = repo().join("benches/results/passthrough.md");
    std::fs::write(&path, out).expect("write the results");
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}
