//! A seeded, randomised differential against both real backends: whatever the
//! cache holds, promguard's answer to a range query is the backend's own answer
//! to it. Windows are aligned to the step and not, shifted by whole steps and by
//! odd seconds, widened, narrowed and repeated, and some end at "now" while new
//! samples arrive.
//!
//! `cargo test` runs a bounded number of rounds per backend; set
//! `PROMGUARD_DIFF_ROUNDS` for a longer run (500 rounds is about 3,000 requests per
//! backend) and `PROMGUARD_DIFF_SEED` to replay or vary the draw.

use serde_json::Value;

use promguard_testkit::{
    Promguard, Rng, assert_same_answer, backends, differs, now_secs, range, sorted_by_metric,
};

use crate::BINS;
use crate::cache::QUERIES;

const DEFAULT_ROUNDS: u64 = 8;

fn rounds() -> u64 {
    std::env::var("PROMGUARD_DIFF_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
}

fn seed(backend: u64) -> u64 {
    std::env::var("PROMGUARD_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xD1FF_0000_0000_0001)
        ^ backend
}

/// Which backend a run compares with, and how promguard reaches it.
struct Target {
    name: &'static str,
    /// promguard routes here anything whose oldest sample is older than this.
    recent_window: &'static str,
    /// The newest end a non-live window may have, seconds before now: data older
    /// than promguard's fresh window no longer changes.
    settled_secs: i64,
    /// The oldest end, seconds before now, and the widest window: together with
    /// the queries' ranges and offsets they stay inside what the backend holds
    /// (and, for Prometheus, inside promguard's recent window).
    oldest_end_secs: i64,
    max_width_secs: i64,
    /// Relative tolerance: VictoriaMetrics' own cache changes last digits.
    tolerance: f64,
    backend: &'static str,
    /// More of promguard's configuration.
    config: &'static str,
}

#[tokio::test]
async fn answers_equal_prometheus_for_any_window() {
    run(
        Target {
            name: "Prometheus",
            recent_window: "2d",
            settled_secs: 600,
            oldest_end_secs: 20 * 3600,
            max_width_secs: 16 * 3600,
            tolerance: 0.0,
            backend: "recent",
            config: "",
        },
        &backends(BINS).prometheus,
    )
    .await;
}

#[tokio::test]
async fn answers_equal_victoria_metrics_for_any_window() {
    let _vm = promguard_testkit::VM_COUNTERS.read().await;
    run(
        Target {
            name: "VictoriaMetrics",
            recent_window: "1h",
            settled_secs: 2 * 3600,
            // VictoriaMetrics holds the last 49 hours at scrape resolution and
            // hourly samples before: windows stay clear of that seam, where its
            // answers depend on its own cache (see ARCHITECTURE.md).
            oldest_end_secs: 24 * 3600,
            max_width_secs: 12 * 3600,
            tolerance: 1e-9,
            backend: "long_term",
            // Every answer VictoriaMetrics' own: with fetch-level routing the live
            // tail of a window would come from Prometheus (tests/e2e/split_fetches.rs).
            config: "routing: {split_fetches: false}\n",
        },
        &backends(BINS).victoria,
    )
    .await;
}

async fn run(target: Target, direct: &str) {
    // A short fresh_ttl, so that a live window's answer is fetched again within
    // the comparison's retries rather than served from cache for 10 s.
    let pg = Promguard::with_recent_window(
        BINS,
        target.recent_window,
        &format!(
            "cache:\n  fresh_ttl: 1s\nlimits:\n  requests: {{per_second: 100000, burst: 100000}}\n  upstream: {{per_second: 100000, burst: 100000}}\n{}",
            target.config
        ),
    );
    let mut rng = Rng(seed(target.tolerance.to_bits()));
    let mut compared = 0;
    let mut unaligned = 0;
    let mut live = 0;
    for _ in 0..rounds() {
        let query = *rng.pick(QUERIES);
        let step = *rng.pick(&[15, 30, 45, 60, 120, 300, 600, 3600]);
        let aligned = rng.below(2) == 0;
        let phase = if aligned {
            0
        } else {
            1 + rng.below(step as u64 - 1)
        };
        let is_live = rng.below(5) == 0;
        // Long enough that the oldest sample lies outside the recent window for
        // the VictoriaMetrics run; at most 11,000 points and within the data.
        let min_points = (3 * 3600 / step).max(20);
        let points = (min_points + rng.below(600))
            .min(11_000)
            .min(target.max_width_secs / step);
        let width = points * step;
        let end = if is_live {
            now_secs()
        } else {
            let back = target.settled_secs
                + rng.below((target.oldest_end_secs - target.settled_secs) as u64);
            (now_secs() - back) / step * step + phase
        };
        let start = end - width;
        // Shifts stay within half the width, so no window reaches further back than
        // the widened one.
        let k = 1 + rng.below((points as u64 / 2).clamp(1, 40));
        let odd = 1 + rng.below((step as u64 * 3).min(width as u64 / 2));
        let windows = [
            (start, end),
            // Shifted by whole steps: the same grid, partly cached.
            (start - k * step, end - k * step),
            // Shifted by odd seconds: another grid.
            (start - odd, end - odd),
            // Wider, reaching back over what is not cached.
            (start - width / 2, end),
            // Nested inside.
            (start + width / 4, end - width / 4),
            (start, end),
        ];
        for (s, e) in windows {
            let what = format!("{} {query} {s}..{e}/{step}", target.name);
            let live_window = e > now_secs() - target.settled_secs;
            if s.rem_euclid(step) != 0 {
                unaligned += 1;
            }
            if live_window {
                live += 1;
            }
            compare(
                &pg.url,
                direct,
                query,
                (s, e, step),
                &target,
                live_window,
                &what,
            )
            .await;
            compared += 1;
        }
    }
    assert!(compared >= 6 * rounds() as usize);
    assert!(
        unaligned > 0 && live > 0,
        "the draw covers unaligned ({unaligned}) and live ({live}) windows"
    );
}

/// One window through promguard and directly. A live window's newest points can
/// change between the two calls, so it passes when promguard's answer equals the
/// backend's just before or just after it; a real difference persists.
async fn compare(
    pg: &str,
    direct: &str,
    query: &str,
    (s, e, step): (i64, i64, i64),
    target: &Target,
    live: bool,
    what: &str,
) {
    let normalise = |v: Value| {
        if target.tolerance > 0.0 {
            sorted_by_metric(v)
        } else {
            v
        }
    };
    let mut last = None;
    for _ in 0..if live { 4 } else { 1 } {
        let (_, _, before) = range(direct, query, s, e, step, &[]).await;
        let (cache, backend, got) = range(pg, query, s, e, step, &[]).await;
        assert_eq!(backend, target.backend, "{what}");
        let (_, _, after) = range(direct, query, s, e, step, &[]).await;
        let (got, before, after) = (normalise(got), normalise(before), normalise(after));
        let equal = |want: &Value| differs(&got, want, target.tolerance).is_none();
        if equal(&before) || equal(&after) {
            return;
        }
        last = Some((got, after, cache));
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    let (got, want, cache) = last.expect("at least one attempt");
    assert_same_answer(&got, &want, target.tolerance, &format!("{what} ({cache})"));
}
