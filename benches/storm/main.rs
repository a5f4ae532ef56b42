//! Issue 7: the sale-night dashboard storm, replayed against real backends through
//! ten arms side by side.
//!
//! A seeded population of engineers (300 by default) opens the curated dashboards
//! (`dashboards/orders.json`, `dashboards/sla.json`: range panels on recording rules,
//! and stat and bar-gauge panels as instant queries at the refresh's "now", some on
//! the raw series) and their own personal ones (panels from 30 minutes to 3 years,
//! range selectors up to 30 days), refreshes them every 10–60 s with Grafana's
//! request shapes, and browses metrics in Explore. A fifth of them are there from the
//! start; the rest join during the ramp, so load grows five-fold, then holds. The
//! same storm meets, one arm after another (STORM_ARMS keys in parentheses):
//!
//! 1. the backends directly, each query sent where promguard would route it (`direct`);
//! 2. nginx with proxy_cache in front of each backend (`nginx`);
//! 3. promguard started as the README's flags-only command: default limits and
//!    admission caps, no identity, no priority, no policies; behind a Grafana with
//!    default settings, which sends neither `X-Grafana-User` nor a shared secret
//!    (`quickstart`);
//! 4. promguard with only `identity.grafana` and `priority.dashboards` configured,
//!    everything else at its defaults (`identity`);
//! 5. promguard with every limit tuned for this machine and the shipped `policies/`,
//!    in normal mode (`tuned`; `normal` is accepted too);
//! 6. the same with `routing.split_fetches: false`, every call of a request sent
//!    where the request was routed, as before fetch-level routing (`unsplit`);
//! 7. the same with `cache.busy_refresh: 0s` as well: the tuned configuration as
//!    the release before fetch-level routing and the busy refresh floor (`before`);
//! 8. the tuned arm in sale mode, switched on by the admin API (`sale`);
//! 9. the tuned arm after a warm-up: the same engineers on the same dashboards in
//!    normal mode for STORM_WARMUP_SECS (a shortened afternoon, not measured),
//!    then sale mode switched on for the measured run, the window opening on the
//!    afternoon's cache (`warmed`);
//! 10. three replicas of the tuned arm's promguard (normal mode) sharing one real
//!     redis-server, so that the caps are the whole fleet's, behind one nginx that
//!     balances round-robin without caching (`fleet`).
//!
//! Every arm but the quick start has a Grafana that sends the user and the secret.
//! Per arm it reports what the backends did by their own metrics (queries, samples
//! read, CPU, in flight), what the engineers saw (latency and outcomes of curated,
//! personal and Explore requests), promguard's refusals, and the proxies' CPU and
//! memory (a fleet's replicas added up, its balancer and Redis apart), then judges
//! the quick-start, identity and tuned arms against their targets, and the fleet
//! against the tuned arm; see the "How to read it" notes in the output for
//! definitions.
//!
//! Run: `cargo bench --bench storm` (about 37 minutes on 2 cores). Writes
//! `benches/results/storm.md` and `benches/results/storm-*.png`. Settings, by
//! environment variable: STORM_ENGINEERS (300), STORM_SECS per arm (120),
//! STORM_SEED (11), STORM_TIMEOUT_SECS (30), STORM_LONG_TERM (3y),
//! STORM_INSTANCES (2), STORM_NGINX_TTL (10s, promguard's fresh_ttl),
//! STORM_WARMUP_SECS (60), STORM_ARMS
//! (direct,nginx,quickstart,identity,tuned,unsplit,before,sale,warmed,fleet), STORM_FONT (a TrueType font
//! for the plots). Needs the Debian packages prometheus, victoria-metrics,
//! nginx-light, redis-server (the fleet arm) and fonts-dejavu-core.
//!
//! The driver is this directory: `population` (who asks what), `load` (plays it),
//! `arms` (what stands in front of the backends), `backends` (the storm's own, with
//! Prometheus' query log), `report` and `plot`. Grafana's requests, the harness and
//! the nginx baseline are the testkit's (`testkit/`).

mod arms;
mod backends;
mod load;
mod plot;
mod population;
mod report;

use std::sync::Arc;
use std::time::{Duration, Instant};

use promguard_testkit::{Bins, Scrape, procstat, repo, scrape};

use arms::Arm;
use backends::{Backends, Logged};
use load::Load;
use population::Shape;
use report::{ArmResult, PromguardStats, Rate, RunInfo, Sample, Steady};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

/// The steady state is measured from here (a share of the run) to its end: the ramp
/// ends at 60%, and the last engineers' first loads are over a few seconds later.
const STEADY_FROM: f64 = 0.7;
/// How often the in-flight gauges and request counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Every arm starts on a multiple of this on the wall clock: the busy refresh floor
/// (2 min by default) moves panels onto that grid, so which of their refetches fall
/// in the steady window depends on where the arm starts on it. A handful of tail
/// fetches of day-long selectors carry most of the window's samples, so arms
/// started at different points of the grid differed 2.5× in samples for the same
/// work.
const PHASE: Duration = Duration::from_secs(120);
/// Longest wait between arms for the previous arm's abandoned queries to leave the
/// backends.
const SETTLE: Duration = Duration::from_secs(30);

struct Settings {
    engineers: usize,
    seconds: u64,
    seed: u64,
    timeout: Duration,
    long_term: String,
    instances: usize,
    nginx_ttl: String,
    /// How long the warmed arm's engineers use their dashboards before its window.
    warm_up: Duration,
    arms: Vec<Arm>,
}

fn settings() -> Settings {
    fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
            Err(_) => default,
        }
    }
    let all = Arm::ALL.map(Arm::key).join(",");
    let arms = var("STORM_ARMS", all)
        .split(',')
        .map(|key| {
            Arm::from_key(key.trim()).unwrap_or_else(|| panic!("STORM_ARMS: unknown arm {key:?}"))
        })
        .collect();
    Settings {
        engineers: var("STORM_ENGINEERS", 300),
        seconds: var("STORM_SECS", 120),
        seed: var("STORM_SEED", 11),
        timeout: Duration::from_secs(var("STORM_TIMEOUT_SECS", 30)),
        long_term: var("STORM_LONG_TERM", "3y".to_string()),
        instances: var("STORM_INSTANCES", 2),
        nginx_ttl: var("STORM_NGINX_TTL", "10s".to_string()),
        warm_up: Duration::from_secs(var("STORM_WARMUP_SECS", 60)),
        arms,
    }
}

#[tokio::main]
async fn main() {
    let began = Instant::now();
    let s = settings();
    eprintln!(
        "storm: starting Prometheus and VictoriaMetrics with {} of data",
        s.long_term
    );
    let backends = Backends::start(&s.long_term, s.instances).await;
    let population = Arc::new(population::build(
        Shape {
            engineers: s.engineers,
            seed: s.seed,
            duration_ms: s.seconds * 1000,
        },
        &repo().join("dashboards"),
    ));
    let mut results = Vec::new();
    for &arm in &s.arms {
        eprintln!("storm: arm {} ({} s)", arm.name(), s.seconds);
        let result = run_arm(arm, &backends, &population, &s).await;
        eprintln!(
            "storm: arm {} done: {} requests",
            arm.name(),
            result.records.len()
        );
        results.push(result);
    }
    let info = RunInfo {
        engineers: s.engineers,
        seed: s.seed,
        seconds: s.seconds,
        timeout_s: s.timeout.as_secs(),
        long_term: s.long_term.clone(),
        instances: s.instances,
        nginx_ttl: s.nginx_ttl.clone(),
        total_minutes: began.elapsed().as_secs_f64() / 60.0,
    };
    let dir = repo().join("benches/results");
    let mut text = report::markdown(&results, &info);
    match plot::write_all(&results, &dir) {
        Ok(files) => {
            text.push_str("\nPlots:\n\n");
            for file in files {
                let name = file
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                text.push_str(&format!("![{name}]({name})\n"));
            }
        }
        Err(e) => eprintln!("storm: no plots: {e}"),
    }
    print!("{text}");
    std::fs::write(dir.join("storm.md"), text).expect("write benches/results/storm.md");
}

/// One arm: a fresh proxy, the whole storm, and everything measured around it.
async fn run_arm(
    arm: Arm,
    backends: &Backends,
    population: &Arc<Vec<population::Engineer>>,
    s: &Settings,
) -> ArmResult {
    settle(backends).await;
    let load_average = procstat::load_average();
    backends.reset_caches().await;
    let (proxy, endpoints) = arms::start(arm, backends, &s.nginx_ttl).await;
    if arm == Arm::Warmed {
        // The afternoon before the window: the same storm, shortened, unmeasured.
        eprintln!("storm: warm-up in normal mode ({} s)", s.warm_up.as_secs());
        Load::new(endpoints.clone(), arm.grafana(), s.warm_up, s.timeout)
            .run(population)
            .await;
        arms::open_window(&proxy).await;
        settle(backends).await;
    }
    // Before the CPU readings, which would count the idle wait otherwise.
    on_phase().await;
    let promguard_urls = proxy.promguard_urls();
    let proxy_cpu = proxy.cpu_seconds();
    let fleet_cpu = proxy.fleet_cpu_seconds();
    let generator_cpu = procstat::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let before = backends.counters().await;

    let load = Load::new(
        endpoints,
        arm.grafana(),
        Duration::from_secs(s.seconds),
        s.timeout,
    );
    let run = load.run(population);
    tokio::pin!(run);
    let mut timeline = Vec::new();
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    // A sample that waited for an overloaded backend is not followed by a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let records = loop {
        tokio::select! {
            records = &mut run => break records,
            _ = ticker.tick() => {
                let at_ms = load.elapsed_ms();
                let (gauges, in_flight) = tokio::join!(
                    backends.gauges(),
                    promguard_in_flight(&promguard_urls),
                );
                timeline.push(Sample { at_ms, backends: gauges, promguard_in_flight: in_flight });
            }
        }
    };

    let after = backends.counters().await;
    let prometheus_log = backends.prometheus_log(
        before.query_log_len,
        after.query_log_len,
        load.started_unix_ms(),
    );
    let promguard = promguard_stats(&promguard_urls).await;
    ArmResult {
        arm,
        seconds: s.seconds as f64,
        steady: steady_state(&timeline, &prometheus_log, s.seconds * 1000),
        prometheus_log,
        records,
        timeline,
        before,
        after,
        proxy_cpu: proxy
            .cpu_seconds()
            .zip(proxy_cpu)
            .map(|(end, start)| end - start),
        proxy_peak_rss: proxy.peak_rss_bytes(),
        fleet_cpu: proxy
            .fleet_cpu_seconds()
            .zip(fleet_cpu)
            .map(|(end, start)| [end[0] - start[0], end[1] - start[1]]),
        generator_cpu: procstat::cpu_seconds(std::process::id()).unwrap_or(0.0) - generator_cpu,
        promguard,
        peak_open: load.peak_open(),
        load_average,
    }
}

/// What reached the backends while the whole population was on, from
/// [`STEADY_FROM`] of the run to its end. Prometheus' figures come from its query
/// log (queries by the time they finished), since under overload it stops answering
/// /metrics; VictoriaMetrics' from the first and last samples of the window.
fn steady_state(timeline: &[Sample], prometheus_log: &[Logged], run_ms: u64) -> Steady {
    let from = (run_ms as f64 * STEADY_FROM) as u64;
    let window = |at: u64| (from..=run_ms).contains(&at);
    let logged: Vec<f64> = prometheus_log
        .iter()
        .filter(|q| u64::try_from(q.finished_ms).is_ok_and(window))
        .map(|q| q.samples)
        .collect();
    let mut answered = timeline
        .iter()
        .filter(|s| window(s.at_ms))
        .filter_map(|s| Some((s.at_ms, s.backends.victoria?)));
    let victoria = answered
        .next()
        .zip(answered.next_back())
        .and_then(|((t0, v0), (t1, v1))| {
            Some(Rate {
                seconds: (t1 - t0) as f64 / 1000.0,
                queries: v1.queries - v0.queries,
                samples: v1.samples? - v0.samples?,
            })
        });
    Steady {
        prometheus: Rate {
            seconds: (run_ms - from) as f64 / 1000.0,
            queries: logged.len() as f64,
            samples: logged.iter().sum(),
        },
        victoria,
    }
}

/// Wait for the next multiple of [`PHASE`] on the wall clock.
async fn on_phase() {
    let phase = PHASE.as_millis();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let wait = (phase - now % phase) % phase;
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
}

/// Wait until neither backend runs a query (a client that gave up does not stop
/// the work it started), for at most [`SETTLE`].
async fn settle(backends: &Backends) {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        let g = backends.gauges().await;
        let idle = |g: Option<backends::Gauge>| g.is_some_and(|g| g.in_flight == 0.0);
        if idle(g.prometheus) && idle(g.victoria) {
            return;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    eprintln!("storm: the backends are still busy after {SETTLE:?}; starting anyway");
}

/// promguard's calls in flight to each backend (recent, long-term), added up over
/// the processes at `urls` (scraped at once); `None` without promguard, or when one
/// of them did not answer its /metrics within 2 s.
async fn promguard_in_flight(urls: &[String]) -> Option<[f64; 2]> {
    if urls.is_empty() {
        return None;
    }
    let mut scrapes = tokio::task::JoinSet::new();
    for url in urls {
        let url = url.clone();
        scrapes.spawn(async move { backends::scrape_within(&url, Duration::from_secs(2)).await });
    }
    let mut total = [0.0; 2];
    while let Some(page) = scrapes.join_next().await {
        let page = page.expect("a scrape does not panic")?;
        for (sum, backend) in total.iter_mut().zip(["recent", "long_term"]) {
            *sum += backends::labelled_sum(
                &page,
                "promguard_upstream_in_flight_requests",
                "backend",
                backend,
            );
        }
    }
    Some(total)
}

/// promguard's account of the arm, added up over the processes at `urls`; `None`
/// without promguard.
async fn promguard_stats(urls: &[String]) -> Option<PromguardStats> {
    if urls.is_empty() {
        return None;
    }
    let mut stats = PromguardStats::default();
    for url in urls {
        add_stats(&mut stats, &scrape(url).await);
    }
    Some(stats)
}

/// Add one promguard's /metrics `page` to `stats`.
fn add_stats(stats: &mut PromguardStats, page: &Scrape) {
    stats.points_fetched += page.sum("promguard_cache_points_fetched_total");
    stats.points_served += page.sum("promguard_cache_points_served_total");
    stats.cache_bytes += page.sum("promguard_cache_bytes");
    for line in page.0.lines().filter(|l| !l.starts_with('#')) {
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.starts_with("promguard_limit_rejections_total{") {
            let key = (label(line, "reason"), label(line, "class"));
            *stats.rejections.entry(key).or_default() += value;
        } else if line.starts_with("promguard_policy_rejections_total{") {
            *stats.policy.entry(label(line, "rule")).or_default() += value;
        } else if line.starts_with("promguard_cache_lookups_total{") {
            *stats.lookups.entry(label(line, "outcome")).or_default() += value;
        }
    }
}

/// The value of `name` in a metric line's labels (promguard's values have no quotes).
fn label(line: &str, name: &str) -> String {
    line.split_once(&format!("{name}=\""))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or(String::new(), |(value, _)| value.to_string())
}
