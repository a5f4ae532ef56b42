//! Issue 3: what a refreshing "last 7 days" panel costs the backend through promguard.
//!
//! The panel is `sum by (region) (rate(shop_orders_total[5m]))` over the last 7 days
//! at a 10-minute step, refreshed every 30 s the way Grafana sends it (form POST,
//! start and end floored to the step). With Prometheus holding 2 days, promguard
//! routes it to VictoriaMetrics. For every refresh the bench records how many points
//! promguard fetched upstream (`promguard_cache_points_fetched_total` before and
//! after), how many points the same request returns when sent to VictoriaMetrics
//! directly, promguard's latency, its `X-Cache` and whether both answers agree. The
//! direct request is sent before and after promguard's, because VictoriaMetrics 1.79
//! does not always give the same answer to the same request: with its rollup result
//! cache cold, its newest points (the last few minutes) come out different from what
//! it answers a moment later. The table shows how often it disagrees with itself.
//!
//! Two phases, each with a fresh promguard (default configuration, except a per-user
//! request budget high enough for a replay):
//!
//! 1. Real time: a refresh every 30 s for REFRESH_SECS (default 300), at "now". This
//!    is the honest case: the newest points are still settling (promguard's fresh
//!    window) and are fetched again when their short cache life ends.
//! 2. The hour before, replayed at full speed: 120 refreshes whose "now" steps 30 s
//!    at a time through an hour that ended 10 minutes ago. It crosses six step
//!    boundaries, which a 5-minute real-time run may not, but all of its data is
//!    already settled, so it shows the steady state without the fresh-window refetches.
//!
//! After the first load a refresh costs one of three things, whatever the hour: a hit
//! (nothing fetched), the newest unsettled points, or one new step per series when
//! the end crosses a step boundary. That cycle repeats every step (10 minutes), so
//! the per-refresh cost is stationary and a short run measures what an hour would.
//!
//! Run: `cargo bench --bench refresh`; writes `benches/results/refresh.md`.
//! REFRESH_PROMGUARD=/path/to/an/older/promguard measures that build instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::Value;

use promguard_testkit::{Bins, Promguard, backends, client, now_secs, repo, scrape};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

const QUERY: &str = "sum by (region) (rate(shop_orders_total[5m]))";
const RANGE_S: i64 = 7 * 86_400;
const STEP_S: i64 = 600;
const REFRESH_S: i64 = 30;
/// A replay at full speed sends refreshes faster than a person could; the per-user
/// request budget is about people, not about this measurement.
const CONFIG: &str = "limits:\n  requests: {per_second: 1000, burst: 1000}\n";
/// Relative tolerance when comparing answers: VictoriaMetrics' own result cache
/// changes the last digits between calls.
const TOLERANCE: f64 = 1e-9;

/// One refresh as seen by promguard and by VictoriaMetrics directly.
struct Refresh {
    /// The panel's "now", seconds from the first refresh.
    at_s: i64,
    cache: String,
    fetched: u64,
    direct_points: u64,
    latency_ms: f64,
    direct_ms: f64,
    /// How promguard's answer differs from VictoriaMetrics' second direct answer.
    same: Diff,
    /// How VictoriaMetrics' first direct answer differs from its second.
    stable: Diff,
}

/// Points that differ between two answers beyond [`TOLERANCE`], and the largest
/// relative difference among them.
#[derive(Clone, Copy, Default)]
struct Diff {
    points: usize,
    max_relative: f64,
}

impl Diff {
    fn describe(self) -> String {
        if self.points == 0 {
            "yes".into()
        } else {
            format!(
                "no: {} points, up to {:.1}%",
                self.points,
                100.0 * self.max_relative
            )
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let realtime_s: i64 = std::env::var("REFRESH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let b = backends(BINS);
    // REFRESH_PROMGUARD=/path/to/another/promguard measures that build instead,
    // against the same backends: an older one, to compare.
    let bins = BINS.promguard_from_env("REFRESH_PROMGUARD").unwrap_or(BINS);

    let pg = Promguard::in_front_of_backends(bins, CONFIG);
    let first = now_secs();
    let mut realtime = Vec::new();
    let started = Instant::now();
    for k in 0..=realtime_s / REFRESH_S {
        let due = Duration::from_secs((k * REFRESH_S) as u64);
        tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        let now = now_secs();
        realtime.push(refresh(&pg.url, &b.victoria, now, now - first).await);
        eprintln!(
            "refresh: real time {}/{}",
            k + 1,
            realtime_s / REFRESH_S + 1
        );
    }
    drop(pg);

    let pg = Promguard::in_front_of_backends(bins, CONFIG);
    let hour_end = now_secs() - 600;
    let mut replay = Vec::new();
    for k in 0..3600 / REFRESH_S {
        let at = k * REFRESH_S;
        replay.push(refresh(&pg.url, &b.victoria, hour_end - 3600 + at, at).await);
    }

    let mut out = format!(
        "A \"last 7 days\" panel, `{QUERY}` at a {} min step, refreshed every {REFRESH_S} s \
         as Grafana sends it, through promguard (default configuration) to VictoriaMetrics \
         (Prometheus holds 2 days). \"Fetched\" is promguard's \
         `promguard_cache_points_fetched_total` for the refresh; \"direct\" the points in the \
         same request's answer straight from VictoriaMetrics. Answers compared with a relative \
         tolerance of {TOLERANCE:e}. {} cores, release build.\n\n",
        STEP_S / 60,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    summary(&mut out, "Real time, at now", &realtime);
    summary(&mut out, "The hour before, replayed at full speed", &replay);
    out.push_str("### Every real-time refresh\n\n");
    table(&mut out, realtime.iter());
    out.push_str("\n### Replayed refreshes that fetched anything\n\n");
    table(&mut out, replay.iter().filter(|r| r.fetched > 0));
    print!("{out}");
    std::fs::write(repo().join("benches/results/refresh.md"), out)
        .expect("write benches/results/refresh.md");
}

/// Send the panel's request for time `now` through promguard, then directly.
async fn refresh(promguard: &str, victoria: &str, now: i64, at_s: i64) -> Refresh {
    let end = now.div_euclid(STEP_S) * STEP_S;
    let form = [
        ("query", QUERY.to_string()),
        ("start", (end - RANGE_S).to_string()),
        ("end", end.to_string()),
        ("step", STEP_S.to_string()),
    ];
    let (direct_ms, _, first) = post(victoria, &form).await;
    let fetched_before = points_fetched(promguard).await;
    let (latency_ms, cache, got) = post(promguard, &form).await;
    let fetched = points_fetched(promguard).await - fetched_before;
    let (_, _, want) = post(victoria, &form).await;
    Refresh {
        at_s,
        cache: cache.unwrap_or_else(|| "none".into()),
        fetched,
        direct_points: points(&want),
        latency_ms,
        direct_ms,
        same: diff(&got, &want),
        stable: diff(&first, &want),
    }
}

async fn points_fetched(promguard: &str) -> u64 {
    scrape(promguard)
        .await
        .sum("promguard_cache_points_fetched_total") as u64
}

/// POST the form to `base`, the way Grafana does; the latency covers the whole body.
async fn post(base: &str, form: &[(&str, String)]) -> (f64, Option<String>, Value) {
    let started = Instant::now();
    let response = client()
        .post(format!("{base}/api/v1/query_range"))
        .header("X-Dashboard-Uid", "capacity")
        .header("X-Panel-Id", "1")
        .form(form)
        .send()
        .await
        .expect("the panel's request is answered");
    let cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = response.status();
    let body = response.bytes().await.expect("read the answer");
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        status.is_success(),
        "{base} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let json = serde_json::from_slice(&body).expect("a JSON answer");
    (latency_ms, cache, json)
}

fn series(answer: &Value) -> Vec<&Value> {
    let mut series: Vec<&Value> = answer
        .pointer("/data/result")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    series.sort_by_key(|s| s["metric"].to_string());
    series
}

fn points(answer: &Value) -> u64 {
    series(answer)
        .iter()
        .filter_map(|s| s["values"].as_array())
        .map(|v| v.len() as u64)
        .sum()
}

/// Compare two answers point by point; a series or timestamp that is missing on
/// either side counts as a differing point.
fn diff(got: &Value, want: &Value) -> Diff {
    let index = |answer: &Value| -> HashMap<(String, String), f64> {
        series(answer)
            .iter()
            .flat_map(|s| {
                let metric = s["metric"].to_string();
                s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(move |p| {
                        let value = p[1].as_str()?.parse().ok()?;
                        Some(((metric.clone(), p[0].to_string()), value))
                    })
            })
            .collect()
    };
    let (got, want) = (index(got), index(want));
    let mut d = Diff::default();
    for (key, &w) in &want {
        let relative = match got.get(key) {
            Some(&g) if g == w => 0.0,
            Some(&g) => (g - w).abs() / g.abs().max(w.abs()),
            None => 1.0,
        };
        if relative > TOLERANCE {
            d.points += 1;
            d.max_relative = d.max_relative.max(relative);
        }
    }
    d.points += got.keys().filter(|k| !want.contains_key(*k)).count();
    d
}

fn summary(out: &mut String, title: &str, refreshes: &[Refresh]) {
    let Some((first, rest)) = refreshes.split_first() else {
        return;
    };
    let fetched: u64 = rest.iter().map(|r| r.fetched).sum();
    let direct: u64 = rest.iter().map(|r| r.direct_points).sum();
    let worst = rest
        .iter()
        .map(|r| r.fetched as f64 / r.direct_points.max(1) as f64)
        .fold(0.0, f64::max);
    let mut latencies: Vec<f64> = rest.iter().map(|r| r.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let p50 = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);
    let max = latencies.last().copied().unwrap_or(0.0);
    let mut caches: Vec<(String, usize)> = Vec::new();
    for r in rest {
        match caches.iter_mut().find(|(c, _)| *c == r.cache) {
            Some((_, n)) => *n += 1,
            None => caches.push((r.cache.clone(), 1)),
        }
    }
    let caches: Vec<String> = caches.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let agreed = refreshes.iter().filter(|r| r.same.points == 0).count();
    let stable = refreshes.iter().filter(|r| r.stable.points == 0).count();
    let _ = writeln!(
        out,
        "### {title}\n\n\
         | | points fetched | of direct | promguard latency | X-Cache |\n|---|---|---|---|---|\n\
         | first load | {} | {} ({:.1}%) | {:.1} ms | {} |\n\
         | {} refreshes after it | {fetched} in all, {:.1} per refresh | {direct} ({:.3}%; worst single refresh {:.3}%) | p50 {p50:.1} ms, max {max:.1} ms | {} |\n\n\
         promguard's answer equal to VictoriaMetrics' own: {agreed} of {n} refreshes; \
         VictoriaMetrics' answer equal to its own answer to the same request a moment \
         earlier: {stable} of {n}.\n",
        first.fetched,
        first.direct_points,
        100.0 * first.fetched as f64 / first.direct_points.max(1) as f64,
        first.latency_ms,
        first.cache,
        rest.len(),
        fetched as f64 / rest.len().max(1) as f64,
        100.0 * fetched as f64 / direct.max(1) as f64,
        100.0 * worst,
        caches.join(", "),
        n = refreshes.len(),
    );
}

fn table<'a>(out: &mut String, refreshes: impl Iterator<Item = &'a Refresh>) {
    out.push_str(
        "| at (s) | X-Cache | fetched | direct points | fetched/direct | promguard ms | direct ms | same as direct | direct same twice |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in refreshes {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3}% | {:.1} | {:.1} | {} | {} |",
            r.at_s,
            r.cache,
            r.fetched,
            r.direct_points,
            100.0 * r.fetched as f64 / r.direct_points.max(1) as f64,
            r.latency_ms,
            r.direct_ms,
            r.same.describe(),
            r.stable.describe(),
        );
    }
}
