//! Who takes part in the storm: engineers, the dashboards they keep open and their
//! Explore sessions, all drawn from one seed so that every arm replays the same
//! storm.
//!
//! Curated dashboards are the repository's own (`dashboards/orders.json`,
//! `dashboards/sla.json`): every target of every panel, variables at "All", the
//! dashboard's time range, each panel as wide as its grid position on the
//! engineer's screen. Personal dashboards are what people build without thinking
//! about cost: a catalogue of plausible queries over ranges from 30 minutes to 3
//! years, with range selectors up to 30 days. Every request is shaped by the
//! promguard's model of Grafana (`promguard::grafana`), the one the tests use.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use promguard::analysis::{DEFAULT_LOOKBACK_DELTA, analyse};
use promguard::grafana::{Call, Dashboard as Board, DataSource, Resolution, Screen, Sizing};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Which latency figures a request counts towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Curated,
    Personal,
    Explore,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Curated, Kind::Personal, Kind::Explore];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Curated => "curated",
            Kind::Personal => "personal",
            Kind::Explore => "explore",
        }
    }
}

/// One request a dashboard or Explore makes, with how far before its start its
/// expression reads (range selectors, offsets, lookback), for routing.
#[derive(Debug, Clone)]
pub struct Target {
    pub panel_id: u32,
    pub call: Call,
    pub reach_ms: i64,
}

#[derive(Debug)]
pub struct Dashboard {
    pub uid: Arc<str>,
    pub kind: Kind,
    pub refresh_ms: u64,
    /// Variable queries, sent once when the dashboard opens.
    pub on_load: Vec<Target>,
    /// Panel targets, sent on open and on every refresh.
    pub panels: Vec<Target>,
}

/// An engineer in Explore: one step of the metric browser or a query every
/// `every_ms`, cycling through `visits`.
#[derive(Debug)]
pub struct Explore {
    pub every_ms: u64,
    pub visits: Vec<Vec<Target>>,
}

#[derive(Debug)]
pub struct Engineer {
    pub login: Arc<str>,
    /// When, from the start of the run, the engineer opens their tabs.
    pub joins_ms: u64,
    pub dashboards: Vec<Dashboard>,
    pub explore: Option<Explore>,
}

/// The storm's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub engineers: usize,
    pub seed: u64,
    pub duration_ms: u64,
}

/// Part of the population present from the start: the "normal" load. Everyone
/// else joins during the ramp, so load grows five-fold.
const NORMAL_SHARE: f64 = 0.2;
/// The ramp runs from 10% to 60% of the run; the rest holds the peak.
pub const RAMP: (f64, f64) = (0.1, 0.6);

/// Build the population for `shape`, with the curated dashboards read from
/// `dashboards_dir`.
///
/// # Panics
///
/// When a curated dashboard file is missing or not a Grafana dashboard.
pub fn build(shape: Shape, dashboards_dir: &Path) -> Vec<Engineer> {
    let curated: Vec<CuratedFile> = ["orders", "sla"]
        .iter()
        .map(|uid| CuratedFile::load(&dashboards_dir.join(format!("{uid}.json"))))
        .collect();
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let normal = ((shape.engineers as f64) * NORMAL_SHARE).ceil() as usize;
    (0..shape.engineers)
        .map(|n| {
            let joins_ms = if n < normal {
                // Already at their desks: tabs open within the first seconds.
                rng.random_range(0..5_000)
            } else {
                let (from, to) = RAMP;
                rng.random_range(
                    (shape.duration_ms as f64 * from) as u64
                        ..(shape.duration_ms as f64 * to) as u64,
                )
            };
            engineer(&mut rng, n, joins_ms, &curated)
        })
        .collect()
}

fn engineer(rng: &mut StdRng, n: usize, joins_ms: u64, curated: &[CuratedFile]) -> Engineer {
    let login: Arc<str> = format!("eng-{n:03}").into();
    let screen = pick(rng, SCREENS);
    let mut dashboards = Vec::new();
    // Most people on shift keep the sale's dashboards open.
    for (file, share) in curated.iter().zip([0.8, 0.6]) {
        if rng.random_bool(share) {
            dashboards.push(file.open(rng, screen));
        }
    }
    let personal = pick(rng, &[(0, 10), (1, 60), (2, 30)]);
    for k in 0..personal {
        dashboards.push(personal_dashboard(rng, &login, k, screen));
    }
    let explore = rng.random_bool(0.2).then(|| explore(rng, screen));
    Engineer {
        login,
        joins_ms,
        dashboards,
        explore,
    }
}

/// Screen widths in pixels and how common they are.
const SCREENS: &[(i64, u32)] = &[(1366, 15), (1536, 15), (1920, 50), (2560, 20)];

/// Grafana's refresh picker: 10s, 30s, 1m.
const REFRESH_MS: &[(u64, u32)] = &[(10_000, 30), (30_000, 50), (60_000, 20)];

/// The data source as Grafana's defaults and `dashboards/provisioning/` have it: a
/// 15 s scrape interval.
const DATA_SOURCE: DataSource = DataSource::GRAFANA_DEFAULT;

/// How Grafana sizes a personal or Explore panel `cols` of 24 grid columns wide on a
/// `screen` pixels wide: by its width, with no min interval or min step of its own.
fn sizing(screen: i64, cols: i64) -> Sizing {
    Sizing {
        max_data_points: Screen { width_px: screen }.panel_px(cols),
        panel_min_interval_ms: None,
        target_min_step_ms: None,
    }
}

/// A curated dashboard as read from its JSON model, with its variables at "All".
struct CuratedFile {
    board: Board,
    variables: BTreeMap<String, String>,
}

impl CuratedFile {
    fn load(path: &Path) -> Self {
        let board = Board::load(path).unwrap_or_else(|e| panic!("{e}"));
        let variables = board.all_selected().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            board.query_panels().iter().any(|p| !p.targets.is_empty()),
            "{} has no targets",
            path.display()
        );
        CuratedFile { board, variables }
    }

    /// The dashboard as opened on a `screen` pixels wide: its variables, then every
    /// target of every panel, as Grafana's model sends them.
    fn open(&self, rng: &mut StdRng, screen: i64) -> Dashboard {
        let range_ms = self.board.range_ms().unwrap_or_else(|e| panic!("{e}"));
        let on_load = self
            .board
            .query_variables()
            .filter_map(|v| v.call(range_ms))
            .map(|call| target(0, call))
            .collect();
        let screen = Screen { width_px: screen };
        let mut panels = Vec::new();
        for panel in self.board.query_panels() {
            for t in &panel.targets {
                let calls = self
                    .board
                    .calls(panel, t, &self.variables, DATA_SOURCE, screen)
                    .unwrap_or_else(|e| {
                        panic!("{} panel {} {}: {e}", self.board.uid, panel.id, t.ref_id)
                    });
                panels.extend(calls.into_iter().map(|call| target(panel.id, call)));
            }
        }
        Dashboard {
            uid: self.board.uid.as_str().into(),
            kind: Kind::Curated,
            refresh_ms: pick(rng, REFRESH_MS),
            on_load,
            panels,
        }
    }
}

/// Queries people put on their own dashboards; `{r}` is the range selector.
const PERSONAL_QUERIES: &[&str] = &[
    "sum by (region) (rate(shop_orders_total[{r}]))",
    "sum(rate(shop_orders_total{status=\"created\"}[{r}])) * 60",
    "sum by (channel) (increase(shop_orders_total{status=\"delivered\"}[{r}]))",
    "sum by (status) (rate(shop_orders_total{region=\"moscow\"}[{r}]))",
    "sum by (service) (rate(http_requests_total[{r}]))",
    "sum by (service) (rate(http_requests_total{code=~\"5..\"}[{r}])) / sum by (service) (rate(http_requests_total[{r}]))",
    "histogram_quantile(0.99, sum by (le, service) (rate(http_request_duration_seconds_bucket[{r}])))",
    "histogram_quantile(0.9, sum by (le) (rate(http_request_duration_seconds_bucket{service=\"checkout\"}[{r}])))",
    "topk(5, sum by (service, instance) (rate(http_requests_total[{r}])))",
    "sum by (service) (rate(process_cpu_seconds_total[{r}]))",
    "sum by (warehouse) (increase(fulfilment_orders_total{result=\"late\"}[{r}]))",
    "max_over_time(erp_sync_lag_seconds[{r}])",
    "sum by (register) (rate(fiscal_receipts_total{result=\"error\"}[{r}]))",
    "avg_over_time(shop_orders_stuck[{r}])",
    "sum by (stage) (increase(shop_order_deadline_breaches_total[{r}]))",
];

/// Panel time ranges, short ones most common, with a tail out to three years.
#[rustfmt::skip]
const PERSONAL_RANGES: &[(i64, u32)] = &[
    (30 * MINUTE, 10), (HOUR, 15), (3 * HOUR, 12), (6 * HOUR, 12), (12 * HOUR, 8),
    (DAY, 10), (2 * DAY, 6), (7 * DAY, 10), (30 * DAY, 8), (90 * DAY, 4),
    (365 * DAY, 3), (3 * 365 * DAY, 2),
];

/// Range selectors, up to 30 days; `None` is `$__rate_interval`.
#[rustfmt::skip]
const SELECTORS: &[(Option<&str>, u32)] = &[
    (None, 20), (Some("1m"), 8), (Some("5m"), 30), (Some("15m"), 8), (Some("1h"), 15),
    (Some("1d"), 9), (Some("7d"), 6), (Some("30d"), 4),
];

fn personal_dashboard(rng: &mut StdRng, login: &str, k: usize, screen: i64) -> Dashboard {
    let range_ms = pick(rng, PERSONAL_RANGES);
    let panels = (0..rng.random_range(2..=6))
        .map(|id| {
            let query = PERSONAL_QUERIES[rng.random_range(0..PERSONAL_QUERIES.len())];
            let selector = pick(rng, SELECTORS).unwrap_or("$__rate_interval");
            // Some panels override the dashboard's range ("relative time").
            let range = if rng.random_bool(0.3) {
                pick(rng, PERSONAL_RANGES)
            } else {
                range_ms
            };
            let cols = pick(rng, &[(8, 30), (12, 50), (24, 20)]);
            let resolution = Resolution::new(range, sizing(screen, cols), DATA_SOURCE);
            let call = Call::range(
                &query.replace("{r}", selector),
                &resolution,
                &BTreeMap::new(),
            )
            .expect("personal queries use only Grafana's built-in variables");
            target(id + 1, call)
        })
        .collect();
    Dashboard {
        uid: format!("{login}-{k}").into(),
        kind: Kind::Personal,
        refresh_ms: pick(rng, REFRESH_MS),
        on_load: Vec::new(),
        panels,
    }
}

/// Metrics people look up in the metric browser.
const BROWSED: &[&str] = &[
    "shop_orders_total",
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "fulfilment_orders_total",
    "shop_orders_stuck",
    "erp_sync_lag_seconds",
    "fiscal_receipts_total",
];

/// An Explore session: open the metric browser, pick metrics (their labels and
/// label values), run queries (a range and an instant query, as Explore's "Both").
fn explore(rng: &mut StdRng, screen: i64) -> Explore {
    let range_ms = pick(rng, &[(HOUR, 60), (6 * HOUR, 20), (DAY, 10), (7 * DAY, 10)]);
    let browse_ms = HOUR;
    let mut visits = vec![vec![
        target(
            0,
            Call::Labels {
                range_ms: browse_ms,
            },
        ),
        target(
            0,
            Call::LabelValues {
                label: "__name__".into(),
                matcher: None,
                range_ms: browse_ms,
            },
        ),
    ]];
    for _ in 0..3 {
        let metric = BROWSED[rng.random_range(0..BROWSED.len())];
        let matcher: Arc<str> = format!("{{__name__=\"{metric}\"}}").into();
        let label = pick(
            rng,
            &[
                ("instance", 1),
                ("service", 1),
                ("region", 1),
                ("status", 1),
            ],
        );
        visits.push(vec![
            target(
                0,
                Call::Series {
                    matcher: matcher.clone(),
                    range_ms: browse_ms,
                },
            ),
            target(
                0,
                Call::LabelValues {
                    label: label.into(),
                    matcher: Some(matcher),
                    range_ms: browse_ms,
                },
            ),
        ]);
        let query = PERSONAL_QUERIES[rng.random_range(0..PERSONAL_QUERIES.len())]
            .replace("{r}", "$__rate_interval");
        // Both queries of one Explore run share the run's interval.
        let resolution = Resolution::new(range_ms, sizing(screen, 24), DATA_SOURCE);
        let no_variables = BTreeMap::new();
        let built_ins = "Explore queries use only Grafana's built-in variables";
        visits.push(vec![
            target(
                0,
                Call::range(&query, &resolution, &no_variables).expect(built_ins),
            ),
            target(
                0,
                Call::instant(&query, &resolution, &no_variables).expect(built_ins),
            ),
        ]);
    }
    Explore {
        every_ms: rng.random_range(10_000..30_000),
        visits,
    }
}

/// A target with its reach computed once by promguard's own PromQL analysis, so
/// that the direct and nginx arms send each query where promguard would.
fn target(panel_id: u32, call: Call) -> Target {
    let reach_ms = call.expr().map_or(0, |text| {
        let expr = std::sync::Arc::new(
            promql_parser::parser::parse(text)
                .unwrap_or_else(|e| panic!("the storm's query {text:?} does not parse: {e}")),
        );
        // Any fixed evaluation time: the reach does not depend on it.
        let at = 1_000_000_000_000;
        let range = match &call {
            Call::Range { range_ms, .. } => *range_ms,
            _ => 0,
        };
        analyse(&expr, at, at + range, DEFAULT_LOOKBACK_DELTA)
            .oldest
            .map_or(0, |oldest| at - oldest)
    });
    Target {
        panel_id,
        call,
        reach_ms,
    }
}

/// A weighted choice.
fn pick<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut at = rng.random_range(0..total);
    for (item, weight) in items {
        if at < *weight {
            return *item;
        }
        at -= weight;
    }
    unreachable!("the draw is below the total weight")
}
