//! Issue 15: what a range stitched from two query engines means on the demo data.
//!
//! With `routing.split_fetches` a long panel's old extents come from
//! VictoriaMetrics and the part whose reads lie inside Prometheus' window from
//! Prometheus. Where the answer moves from one engine to the other, its value can
//! jump by however much the engines disagree about the same timestamp: MetricsQL's
//! `rate`/`increase` use the sample before each window and do not extrapolate,
//! PromQL's extrapolate to the window's edges. This measures that disagreement
//! where it matters, over the last day (both backends hold it at the 30 s scrape
//! step): for each query of the curated dashboards' kind, every point both
//! engines return is compared, and the table gives the largest and the median
//! relative difference, `|vm − prom| / max(|vm|, |prom|)`, and how many series one
//! engine returned that the other did not.
//!
//! Run: `cargo bench --bench seam`; writes `benches/results/seam.md`.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

use promguard_testkit::{Bins, backends, now_secs, range, repo};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

/// Raw PromQL as the curated dashboards and personal panels write it.
const QUERIES: &[&str] = &[
    r#"sum by (region) (rate(shop_orders_total{status="created"}[5m]))"#,
    "sum by (service, code) (rate(http_requests_total[5m]))",
    "histogram_quantile(0.99, sum by (service, le) (rate(http_request_duration_seconds_bucket[5m])))",
    r#"sum(increase(shop_orders_total{status="paid"}[1h]))"#,
    "sum by (service) (rate(http_requests_total[1m]))",
    "shop_orders_stuck",
];
const STEP_S: i64 = 300;
const SPAN_S: i64 = 86_400;

/// Every (series labels, timestamp) → value of a matrix answer.
fn points(answer: &Value) -> HashMap<(String, i64), f64> {
    let mut out = HashMap::new();
    for series in answer["data"]["result"].as_array().into_iter().flatten() {
        let labels = series["metric"].to_string();
        for p in series["values"].as_array().into_iter().flatten() {
            let (Some(t), Some(v)) = (
                p[0].as_f64(),
                p[1].as_str().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            out.insert((labels.clone(), t as i64), v);
        }
    }
    out
}

fn series(points: &HashMap<(String, i64), f64>) -> std::collections::BTreeSet<&str> {
    points.keys().map(|(s, _)| s.as_str()).collect()
}

#[tokio::main]
async fn main() {
    let b = backends(BINS);
    // Settled data only: ten minutes back, where neither backend is still ingesting.
    let end = (now_secs() - 600) / STEP_S * STEP_S;
    let start = end - SPAN_S;
    let mut out = format!(
        "The engines' disagreement at the seam of a stitched answer, on the demo data: \
         each query over the last day ({start}..{end}, step {STEP_S} s) from \
         VictoriaMetrics (`nocache=1`) and Prometheus, every point both return compared. \
         Relative difference: `|vm − prom| / max(|vm|, |prom|)` (0 when both are 0).\n\n\
         | query | points compared | largest | median | series only in one |\n\
         |---|---|---|---|---|\n"
    );
    for query in QUERIES {
        let (_, _, vm) = range(&b.victoria, query, start, end, STEP_S, &[("nocache", "1")]).await;
        let (_, _, prom) = range(&b.prometheus, query, start, end, STEP_S, &[]).await;
        let (vm, prom) = (points(&vm), points(&prom));
        let mut diffs: Vec<f64> = vm
            .iter()
            .filter_map(|(k, a)| prom.get(k).map(|b| (a, b)))
            .map(|(a, b)| {
                let scale = a.abs().max(b.abs());
                if scale == 0.0 {
                    0.0
                } else {
                    (a - b).abs() / scale
                }
            })
            .collect();
        diffs.sort_by(f64::total_cmp);
        let only_one = series(&vm).symmetric_difference(&series(&prom)).count();
        let (largest, median) = match diffs.len() {
            0 => ("-".to_string(), "-".to_string()),
            n => (
                format!("{:.2e}", diffs[n - 1]),
                format!("{:.2e}", diffs[n / 2]),
            ),
        };
        eprintln!("seam: {query}: {} points, largest {largest}", diffs.len());
        let _ = writeln!(
            out,
            "| `{}` | {} | {largest} | {median} | {only_one} |",
            query.replace('|', "\\|"),
            diffs.len()
        );
    }
    let path = repo().join("benches/results/seam.md");
    std::fs::write(&path, &out).expect("write the results");
    println!("{out}");
}
