//! The curated dashboards (`dashboards/*.json`), the recording rules they read
//! (`dashboards/rules/`) and the Grafana provisioning that points them at promguard.
//!
//! Offline: uids, datasource references, variables, layout, every PromQL expression
//! parsed after Grafana's substitutions, every recorded series defined and every rule
//! used, each dashboard within one user's sale-mode budget. End to end: a sale night
//! through the real promguard, in sale mode with the repository's policies, in front
//! of the real backends: a storm of personal panels is refused or throttled, and every
//! panel of every curated dashboard, requested as Grafana requests it, answers 200
//! with at least one series; the promguard dashboard's from the shared Prometheus
//! scraping this very promguard.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, parse_duration, walk_expr};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::harness::{
    Promguard, VM_COUNTERS, backends, client, get, grafana_seconds, now_ms, now_secs, post_form,
    repo,
};

/// The uids the example policies exempt in sale mode; each is `dashboards/<uid>.json`.
const CURATED: [&str; 3] = ["orders", "sla", "promguard"];
/// The provisioned Prometheus data source every panel goes through.
const DATASOURCE_UID: &str = "promguard";
const SECRET_HEADER: &str = "X-Promguard-Grafana-Secret";
const SECRET: &str = "grafana-shared-secret";
const ADMIN_TOKEN: &str = "sale-night-admin-token";
/// Grafana sizes a panel's step by its width in pixels: a 24-column dashboard on a
/// 1,800-pixel-wide screen.
const PX_PER_COLUMN: u64 = 75;
/// Prometheus refuses more points per series than this; Grafana raises the step to fit.
const MAX_POINTS: u64 = 11_000;

#[derive(Deserialize)]
struct Dashboard {
    uid: String,
    title: String,
    tags: Vec<String>,
    refresh: String,
    time: TimeRange,
    timepicker: Timepicker,
    templating: Templating,
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
struct TimeRange {
    from: String,
    to: String,
}

#[derive(Deserialize)]
struct Timepicker {
    refresh_intervals: Vec<String>,
}

#[derive(Deserialize)]
struct Templating {
    list: Vec<Variable>,
}

#[derive(Deserialize)]
struct Variable {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    /// A plugin id for a `datasource` variable, a query object for a `query` one.
    query: Value,
    datasource: Option<Value>,
    definition: Option<String>,
    #[serde(rename = "includeAll", default)]
    include_all: bool,
    #[serde(rename = "allValue")]
    all_value: Option<String>,
    current: Value,
}

#[derive(Deserialize)]
struct Panel {
    id: u32,
    #[serde(rename = "type")]
    kind: String,
    title: String,
    #[serde(default)]
    description: String,
    datasource: Option<Value>,
    #[serde(rename = "gridPos")]
    grid_pos: GridPos,
    /// Panel-wide min interval.
    interval: Option<String>,
    #[serde(rename = "maxDataPoints")]
    max_data_points: Option<u64>,
    #[serde(rename = "fieldConfig")]
    field_config: Option<Value>,
    #[serde(default)]
    targets: Vec<Target>,
    /// A collapsed row keeps its panels inside it.
    #[serde(default)]
    panels: Vec<Panel>,
}

#[derive(Deserialize, Clone, Copy)]
struct GridPos {
    x: u64,
    y: u64,
    w: u64,
    h: u64,
}

#[derive(Deserialize)]
struct Target {
    #[serde(rename = "refId")]
    ref_id: String,
    expr: String,
    datasource: Value,
    /// The target's min step; also Grafana's scrape interval for `$__rate_interval`.
    interval: Option<String>,
    /// Grafana's query type: an instant query at the dashboard's "now", or a range
    /// query over its time range; exactly one is set.
    #[serde(default)]
    instant: bool,
    #[serde(default)]
    range: bool,
    /// `table` for a table panel's target, whose rows Grafana builds from one instant.
    format: Option<String>,
}

impl Dashboard {
    fn load(uid: &str) -> Self {
        let path = repo().join(format!("dashboards/{uid}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Every panel that queries, rows' nested panels included.
    fn query_panels(&self) -> Vec<&Panel> {
        self.panels
            .iter()
            .flat_map(|p| std::iter::once(p).chain(&p.panels))
            .filter(|p| p.kind != "row")
            .collect()
    }

    fn range(&self) -> Duration {
        let from = self.time.from.strip_prefix("now-").unwrap_or_else(|| {
            panic!(
                "{}: time.from {:?} is not now-<duration>",
                self.uid, self.time.from
            )
        });
        duration(from)
    }

    fn query_variables(&self) -> impl Iterator<Item = &Variable> {
        self.templating.list.iter().filter(|v| v.kind == "query")
    }
}

/// A duration in Grafana's and Prometheus' syntax (`30s`, `5m`, `6h`).
fn duration(text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|e| panic!("duration {text:?}: {e}"))
}

/// What every panel and query variable must name as its data source.
fn datasource_ref() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

/// The data source Grafana is provisioned with.
#[derive(Deserialize)]
struct DatasourceFile {
    datasources: Vec<Datasource>,
}

#[derive(Deserialize)]
struct Datasource {
    uid: String,
    #[serde(rename = "type")]
    kind: String,
    url: String,
    #[serde(rename = "jsonData")]
    json_data: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(rename = "secureJsonData")]
    secure_json_data: BTreeMap<String, String>,
}

fn provisioned_datasource() -> Datasource {
    let path = repo().join("dashboards/provisioning/datasources/promguard.yaml");
    let text = std::fs::read_to_string(&path).expect("read the data source provisioning");
    let mut file: DatasourceFile =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(file.datasources.len(), 1, "one data source");
    file.datasources.remove(0)
}

/// The data source's scrape interval: the floor of `$__interval` and the base of
/// `$__rate_interval` for targets without their own min step.
fn scrape_interval() -> Duration {
    let ds = provisioned_datasource();
    let value = ds.json_data["timeInterval"]
        .as_str()
        .expect("jsonData.timeInterval is set");
    duration(value)
}

/// The sale-mode upstream burst of the repository's policies: how many upstream calls
/// one user may make at once on a sale night.
fn sale_upstream_burst() -> usize {
    let policy = sale_policy();
    let burst = policy["limits"]["upstream"]["burst"]
        .as_u64()
        .expect("policies/november.yaml sets sale.limits.upstream.burst");
    usize::try_from(burst).expect("a small burst")
}

fn sale_policy() -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(repo().join("policies/november.yaml"))
        .expect("read policies/november.yaml");
    let policy: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    policy["sale"].clone()
}

/// Grafana's "nice" intervals (`roundInterval` in its time range utilities): an
/// interval below the first bound rounds to the second, in milliseconds.
const ROUNDED_INTERVALS: &[(u64, u64)] = &[
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (1_050_000, 600_000),
    (2_100_000, 1_800_000),
    (9_000_000, 3_600_000),
    (17_280_000, 7_200_000),
    (34_560_000, 21_600_000),
    (51_840_000, 43_200_000),
    (107_892_000, 86_400_000),
];

fn round_interval(ms: u64) -> u64 {
    ROUNDED_INTERVALS
        .iter()
        .find(|&&(below, _)| ms < below)
        .map_or(604_800_000, |&(_, rounded)| rounded)
}

/// One Prometheus request as Grafana would send it for a panel's target.
struct Query {
    expr: String,
    instant: bool,
    start: i64,
    end: i64,
    step: i64,
}

/// Turn a target into the request Grafana's Prometheus data source sends (Grafana
/// 10-11): the interval is the time range over the panel's data points (its width in
/// pixels unless `maxDataPoints` says otherwise), rounded to a nice value and raised
/// to the min interval (the target's, else the panel's, else the data source's
/// scrape interval) and to the 11,000-point limit; `$__rate_interval` is
/// max(interval + scrape, 4 × scrape), scrape being the target's min step or the data
/// source's; start and end are floored to a multiple of the step.
fn grafana_query(
    board: &Dashboard,
    panel: &Panel,
    target: &Target,
    variables: &BTreeMap<String, String>,
    scrape: Duration,
    now: i64,
) -> Result<Query, String> {
    let range = board.range();
    let width = panel
        .max_data_points
        .unwrap_or(panel.grid_pos.w * PX_PER_COLUMN);
    let own_min = target.interval.as_deref().map(duration);
    let min = own_min
        .or_else(|| panel.interval.as_deref().map(duration))
        .unwrap_or(scrape);
    let range_ms = u64::try_from(range.as_millis()).expect("a sane range");
    let step_ms = round_interval(range_ms / width)
        .max(u64::try_from(min.as_millis()).expect("a sane interval"))
        .max(range_ms.div_ceil(MAX_POINTS));
    let step = Duration::from_millis(step_ms);
    let rate_scrape = own_min.unwrap_or(scrape);
    let rate_interval = (step + rate_scrape).max(4 * rate_scrape);
    let mut vars = variables.clone();
    vars.insert("__interval".into(), format!("{}ms", step.as_millis()));
    vars.insert(
        "__rate_interval".into(),
        format!("{}ms", rate_interval.as_millis()),
    );
    vars.insert("__range".into(), format!("{}s", range.as_secs()));
    let expr = substitute(&target.expr, &vars)?;
    let step = i64::try_from(step.as_secs()).expect("a sane step").max(1);
    let range = i64::try_from(range.as_secs()).expect("a sane range");
    Ok(Query {
        expr,
        instant: target.instant,
        start: (now - range) / step * step,
        end: now / step * step,
        step,
    })
}

/// Replace `$name` and `${name}` as Grafana does before sending a query; an
/// undefined name is an error, so a typo cannot reach Prometheus as literal text.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = match after.strip_prefix('{') {
            Some(braced) => {
                let close = braced.find('}').ok_or("an unclosed ${")?;
                (&braced[..close], close + 2)
            }
            None => {
                let len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..len], len)
            }
        };
        if name.is_empty() {
            // Not a variable (a `$` anchor in a regex): Grafana leaves it alone.
            out.push('$');
        } else {
            let value = vars
                .get(name)
                .ok_or_else(|| format!("undefined variable ${name}"))?;
            out.push_str(value);
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The values Grafana substitutes for a dashboard's own variables when everything
/// is selected: a multi-value variable's "All" value.
fn all_selected(board: &Dashboard) -> BTreeMap<String, String> {
    board
        .query_variables()
        .map(|v| {
            let all = v
                .all_value
                .clone()
                .filter(|_| v.include_all)
                .unwrap_or_else(|| panic!("{}: ${} needs an All value", board.uid, v.name));
            (v.name.clone(), all)
        })
        .collect()
}

/// `label_values(selector, label)`: what a query variable asks Prometheus.
fn label_values(variable: &Variable) -> (String, String) {
    let definition = variable.definition.as_deref().unwrap_or_default();
    let inner = definition
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| {
            panic!(
                "${}: {definition:?} is not label_values(...)",
                variable.name
            )
        });
    let (selector, label) = inner.rsplit_once(',').unwrap_or_else(|| {
        panic!(
            "${}: label_values needs a selector and a label",
            variable.name
        )
    });
    (selector.trim().to_string(), label.trim().to_string())
}

/// Metric names an expression reads.
fn metric_names(expr: &Expr) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = selector {
                let name = vs.name.clone().ok_or("select metrics by name")?;
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, expr).unwrap_or_else(|e| panic!("{e}: {expr}"));
    names.0
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    interval: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    record: String,
    expr: String,
}

fn rule_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("dashboards/rules"))
        .expect("dashboards/rules exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards/rules/*.yml");
    files
}

/// Every recorded series with the group (and so the interval) that records it.
fn recorded_series() -> BTreeMap<String, String> {
    let mut recorded = BTreeMap::new();
    for file in rule_files() {
        let text = std::fs::read_to_string(&file).expect("read a rule file");
        let rules: RuleFile =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for group in rules.groups {
            assert!(
                duration(&group.interval) <= Duration::from_secs(60),
                "{}: sale-night panels need a point at least every minute",
                group.name
            );
            for rule in group.rules {
                let expr = parser::parse(&rule.expr)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", group.name, rule.record));
                // promtool's rule backfill cannot read a rule it is backfilling.
                for name in metric_names(&expr) {
                    assert!(
                        !name.contains(':'),
                        "{} reads the recorded series {name}",
                        rule.record
                    );
                }
                let previous = recorded.insert(rule.record.clone(), group.name.clone());
                assert!(previous.is_none(), "{} is recorded twice", rule.record);
            }
        }
    }
    recorded
}

fn overlaps(a: GridPos, b: GridPos) -> bool {
    a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
}

#[test]
fn the_curated_dashboards_are_well_formed_and_cheap() {
    let recorded = recorded_series();
    let scrape = scrape_interval();
    let burst = sale_upstream_burst();
    let mut used_records = BTreeSet::new();
    for uid in CURATED {
        let board = Dashboard::load(uid);
        assert_eq!(
            board.uid, uid,
            "dashboards/{uid}.json has uid {}",
            board.uid
        );
        assert!(!board.title.is_empty(), "{uid}: a title");
        assert!(
            board.tags.iter().any(|t| t == "curated"),
            "{uid}: tagged curated"
        );
        assert_eq!(board.time.to, "now", "{uid}: ends now");
        // Cheap by construction: nobody can make a curated dashboard refresh every 5 s.
        for refresh in board
            .timepicker
            .refresh_intervals
            .iter()
            .chain([&board.refresh])
        {
            assert!(
                duration(refresh) >= Duration::from_secs(30),
                "{uid}: refresh {refresh}"
            );
        }

        let datasource = board
            .templating
            .list
            .iter()
            .find(|v| v.kind == "datasource")
            .unwrap_or_else(|| panic!("{uid}: no data source variable"));
        assert_eq!(datasource.name, "datasource", "{uid}");
        assert_eq!(datasource.query, "prometheus", "{uid}");
        assert_eq!(
            datasource.current["value"], DATASOURCE_UID,
            "{uid}: defaults to promguard"
        );
        for variable in board.query_variables() {
            assert_eq!(
                variable.datasource,
                Some(datasource_ref()),
                "{uid}: ${}",
                variable.name
            );
            let (selector, _) = label_values(variable);
            parser::parse(&selector).unwrap_or_else(|e| panic!("{uid}: ${}: {e}", variable.name));
            assert_eq!(
                variable.query["query"],
                variable.definition.as_deref().unwrap_or("")
            );
        }

        // Every variable is used, every use is defined (substitute refuses unknown names).
        let variables = all_selected(&board);
        let mut used_variables = BTreeSet::new();
        let panels = board.query_panels();
        let mut ids = BTreeSet::new();
        for panel in board
            .panels
            .iter()
            .flat_map(|p| std::iter::once(p).chain(&p.panels))
        {
            assert!(ids.insert(panel.id), "{uid}: panel id {} twice", panel.id);
            assert!(
                panel.grid_pos.x + panel.grid_pos.w <= 24,
                "{uid}: {} is too wide",
                panel.title
            );
        }
        for (i, a) in panels.iter().enumerate() {
            for b in &panels[i + 1..] {
                assert!(
                    !overlaps(a.grid_pos, b.grid_pos),
                    "{uid}: {} overlaps {}",
                    a.title,
                    b.title
                );
            }
        }
        let mut queries = board.query_variables().count();
        for panel in &panels {
            let at = format!("{uid}: panel {} {:?}", panel.id, panel.title);
            assert!(
                panel.description.len() >= 40,
                "{at}: describe what it shows and why"
            );
            assert_eq!(panel.datasource, Some(datasource_ref()), "{at}");
            let unit = panel
                .field_config
                .as_ref()
                .and_then(|f| f["defaults"]["unit"].as_str());
            assert!(unit.is_some_and(|u| !u.is_empty()), "{at}: a unit");
            assert!(!panel.targets.is_empty(), "{at}: no queries");
            let mut refs = BTreeSet::new();
            for target in &panel.targets {
                assert!(
                    refs.insert(&target.ref_id),
                    "{at}: refId {} twice",
                    target.ref_id
                );
                assert_eq!(
                    target.datasource,
                    datasource_ref(),
                    "{at} {}",
                    target.ref_id
                );
                assert_ne!(
                    target.instant, target.range,
                    "{at} {}: Grafana sends an instant or a range query",
                    target.ref_id
                );
                if panel.kind == "table" {
                    assert_eq!(
                        (target.instant, target.format.as_deref()),
                        (true, Some("table")),
                        "{at} {}: a table of the current values",
                        target.ref_id
                    );
                }
                for name in variables.keys() {
                    if target.expr.contains(&format!("${name}")) {
                        used_variables.insert(name.clone());
                    }
                }
                let query = grafana_query(&board, panel, target, &variables, scrape, now_secs())
                    .unwrap_or_else(|e| panic!("{at} {}: {e}", target.ref_id));
                let expr = parser::parse(&query.expr)
                    .unwrap_or_else(|e| panic!("{at} {}: {e}\n{}", target.ref_id, query.expr));
                // Recorded series are named level:metric:operations; raw ones have no colon.
                for name in metric_names(&expr).into_iter().filter(|n| n.contains(':')) {
                    assert!(
                        recorded.contains_key(&name),
                        "{at}: {name} is recorded by no rule"
                    );
                    used_records.insert(name);
                }
                queries += 1;
            }
        }
        assert_eq!(
            used_variables,
            variables.keys().cloned().collect(),
            "{uid}: every variable is used by a panel"
        );
        // A viewer opening the dashboard with a cold cache on a sale night must get
        // every panel within one user's upstream burst.
        assert!(
            queries <= burst,
            "{uid}: {queries} queries on load, more than the sale-mode upstream burst of {burst}"
        );
    }
    let unused: Vec<_> = recorded
        .keys()
        .filter(|r| !used_records.contains(*r))
        .collect();
    assert!(
        unused.is_empty(),
        "recording rules no dashboard reads: {unused:?}"
    );
}

#[test]
fn the_recording_rules_pass_promtool() {
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .args(rule_files())
        .output()
        .expect("run promtool (installed with prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn grafana_is_provisioned_with_promguard_and_the_policies_exempt_its_dashboards() {
    let ds = provisioned_datasource();
    assert_eq!(ds.uid, DATASOURCE_UID);
    assert_eq!(ds.kind, "prometheus");
    assert!(
        ds.url.contains(":9091"),
        "the proxy's port, not Prometheus': {}",
        ds.url
    );
    assert_eq!(ds.json_data["httpMethod"].as_str(), Some("POST"));
    assert_eq!(
        ds.json_data["httpHeaderName1"].as_str(),
        Some(SECRET_HEADER)
    );
    assert_eq!(
        ds.secure_json_data
            .get("httpHeaderValue1")
            .map(String::as_str),
        Some("$PROMGUARD_GRAFANA_SECRET"),
        "the secret comes from Grafana's environment, not the file"
    );

    let path = repo().join("dashboards/provisioning/dashboards/promguard.yaml");
    let text = std::fs::read_to_string(path).expect("read the dashboard provisioning");
    let providers: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert!(
        provider["options"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with('/'))
    );

    let sale = sale_policy();
    let exempt: BTreeSet<&str> = sale["exempt"]["dashboards"]
        .as_sequence()
        .expect("sale.exempt.dashboards")
        .iter()
        .filter_map(serde_yaml_ng::Value::as_str)
        .collect();
    for uid in CURATED {
        assert!(
            exempt.contains(uid),
            "policies/november.yaml does not exempt {uid}"
        );
    }
}

/// Lists a promguard in the shared Prometheus' file_sd directory for as long as it
/// lives, so the promguard dashboard has this process' metrics to show.
struct ScrapeTarget {
    file: PathBuf,
}

impl ScrapeTarget {
    fn register(dir: &Path, address: &str) -> Self {
        let file = dir.join(format!("e2e-{}.json", address.replace([':', '.'], "-")));
        // Written aside and renamed, so Prometheus never reads half a file.
        let partial = file.with_extension("partial");
        let body = json!([{"targets": [address], "labels": {"job": "promguard"}}]);
        std::fs::write(&partial, body.to_string()).expect("write the scrape target");
        std::fs::rename(&partial, &file).expect("publish the scrape target");
        ScrapeTarget { file }
    }
}

impl Drop for ScrapeTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// How many times the shared Prometheus scraped `instance` after `from`, up to `to`.
async fn scrapes(instance: &str, from: i64, to: i64) -> u64 {
    let query = format!(
        "count_over_time(up{{job=\"promguard\",instance=\"{instance}\"}}[{}s])",
        to - from
    );
    let (status, _, body) = get(
        &format!("{}/api/v1/query", backends().prometheus),
        &[("query", query), ("time", to.to_string())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Grafana's headers for a query of `user` from `dashboard` (and a panel of it, for
/// panel queries), proven by the shared secret so promguard believes them.
fn grafana_headers<'a>(
    user: &'a str,
    dashboard: &'a str,
    panel: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        (SECRET_HEADER, SECRET),
        ("X-Grafana-User", user),
        ("X-Dashboard-Uid", dashboard),
        ("X-Datasource-Uid", DATASOURCE_UID),
        ("User-Agent", "Grafana/11.3.0"),
    ];
    headers.extend(panel.map(|p| ("X-Panel-Id", p)));
    headers
}

fn range_form(query: &str, start: i64, end: i64, step: i64) -> [(&'static str, String); 4] {
    [
        ("query", query.to_string()),
        ("start", start.to_string()),
        ("end", end.to_string()),
        ("step", step.to_string()),
    ]
}

async fn admin(pg: &Promguard, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}{path}", pg.url))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the admin API answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// promguard's own counter, summed over its labels, from its `/metrics`.
async fn own_metric(pg: &Promguard, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", pg.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the on-call team's guard does on a sale night, so that every panel of the
/// promguard dashboard has something to show: a policy reload, sale mode switched on,
/// an answer too large for the long-term store, a personal panel refused and one a
/// dry-run rule would refuse, a crowd opening the same curated panel at once, and a
/// user over their upstream budget.
async fn sale_night_storm(pg: &Promguard) {
    let query_range = format!("{}/api/v1/query_range", pg.url);
    let end = now_secs() / 60 * 60;

    // Normal mode: a personal panel dumping 30 days of raw counters from the
    // long-term store, larger than its max_response.
    let dump = range_form("shop_orders_total", end - 30 * 86400, end, 3600);
    let (status, _, body) = post_form(
        &query_range,
        &dump,
        &grafana_headers("storm", "my-dashboard", Some("1")),
    )
    .await;
    assert_eq!(status, 422, "an answer over max_response: {body}");

    let (status, body) = admin(pg, "/admin/policies/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let switch = json!({"mode": "on", "for": "1h", "reason": "e2e sale night", "by": "oncall"});
    let (status, body) = admin(pg, "/admin/sale-mode", Some(switch)).await;
    assert_eq!(status, 200, "{body}");

    // A personal week-long panel: refused by a sale rule, with the reason.
    let week = range_form(
        "sum(rate(shop_orders_total[5m]))",
        end - 7 * 86400,
        end,
        3600,
    );
    let (status, _, body) = post_form(
        &query_range,
        &week,
        &grafana_headers("storm", "my-dashboard", Some("2")),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("sale mode")),
        "{body}"
    );

    // Allowed, but the dry-run rule against name regexes counts it.
    let scan = range_form(
        "count({__name__=~\"shop_orders_forecast_per_minute\"})",
        end - 600,
        end,
        60,
    );
    let (status, _, body) = post_form(
        &query_range,
        &scan,
        &grafana_headers("storm", "my-dashboard", Some("3")),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Twenty on-call engineers open the same heavy panel at once: one upstream call.
    // Retried with a new range if the calls happened not to overlap on a loaded machine.
    let heavy = "histogram_quantile(0.99, sum by (le, service) (rate(http_request_duration_seconds_bucket[5m])))";
    for attempt in 0..5 {
        let form = range_form(heavy, end - 12 * 3600 - attempt * 15, end, 15);
        let crowd: Vec<_> = (0..20)
            .map(|i| {
                let url = query_range.clone();
                let form = form.clone();
                tokio::spawn(async move {
                    let user = format!("oncall-{i}");
                    post_form(&url, &form, &grafana_headers(&user, "orders", Some("4")))
                        .await
                        .0
                })
            })
            .collect();
        for call in crowd {
            assert_eq!(call.await.expect("join"), 200);
        }
        if own_metric(pg, "promguard_cache_coalesced_waiters_total").await > 0.0 {
            break;
        }
    }
    assert!(own_metric(pg, "promguard_cache_coalesced_waiters_total").await > 0.0);

    // One user's distinct uncached queries past the sale-mode upstream burst: 429.
    // An hour back, past the cache's live window: the sale policy's refresh floor
    // would make live instants within one minute the same query.
    let query = format!("{}/api/v1/query", pg.url);
    let mut throttled = 0;
    for n in 0..(sale_upstream_burst() as i64 + 15) {
        let form = [
            ("query", "vector(1)".to_string()),
            ("time", (end - 3600 - n).to_string()),
        ];
        let (status, _, _) = post_form(
            &query,
            &form,
            &grafana_headers("storm", "my-dashboard", Some("5")),
        )
        .await;
        throttled += usize::from(status == 429);
    }
    assert!(throttled > 0, "the user's upstream budget held");
}

/// Open `board` as Grafana does, as one user: its variables, then every target of
/// every panel. Returns what failed and how many targets the long-term store answered.
async fn open_dashboard(
    pg: &Promguard,
    board: &Dashboard,
    scrape: Duration,
) -> (Vec<String>, usize) {
    let user = format!("viewer-{}", board.uid);
    // One "now" for the whole dashboard, in milliseconds, as Grafana's time range has it.
    let now_ms = now_ms();
    let now = now_ms.div_euclid(1000);
    let range = i64::try_from(board.range().as_secs()).expect("a sane range");
    let mut failures = Vec::new();
    for variable in board.query_variables() {
        let (selector, label) = label_values(variable);
        let response = client()
            .get(format!("{}/api/v1/label/{label}/values", pg.url))
            .query(&[
                ("match[]", selector),
                ("start", (now - range).to_string()),
                ("end", now.to_string()),
            ])
            .headers(
                grafana_headers(&user, &board.uid, None)
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k.parse().expect("header name"),
                            v.parse().expect("header value"),
                        )
                    })
                    .collect(),
            )
            .send()
            .await
            .expect("promguard answers");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON");
        if status != 200 || body["data"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!(
                "{}: ${}: {status} {body}",
                board.uid, variable.name
            ));
        }
    }
    let variables = all_selected(board);
    let mut long_term = 0;
    for panel in board.query_panels() {
        let panel_id = panel.id.to_string();
        let headers = grafana_headers(&user, &board.uid, Some(&panel_id));
        for target in &panel.targets {
            let at = format!(
                "{} panel {} {:?} {}",
                board.uid, panel.id, panel.title, target.ref_id
            );
            let query = match grafana_query(board, panel, target, &variables, scrape, now) {
                Ok(q) => q,
                Err(e) => {
                    failures.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let (path, form) = if query.instant {
                // Not aligned to any step: Grafana evaluates an instant target at now.
                let form = vec![
                    ("query", query.expr.clone()),
                    ("time", grafana_seconds(now_ms)),
                ];
                ("/api/v1/query", form)
            } else {
                let form = range_form(&query.expr, query.start, query.end, query.step);
                ("/api/v1/query_range", form.to_vec())
            };
            let (status, backend, body) =
                post_form(&format!("{}{path}", pg.url), &form, &headers).await;
            let series = body["data"]["result"].as_array().map_or(0, Vec::len);
            if status != 200 || series == 0 {
                // Tell a data problem from a proxy one: what the backend says directly.
                let direct = match backend.as_deref() {
                    Some("long_term") => &backends().victoria,
                    _ => &backends().prometheus,
                };
                let (_, _, want) = post_form(&format!("{direct}{path}"), &form, &[]).await;
                let want = want["data"]["result"].as_array().map_or(0, Vec::len);
                failures.push(format!(
                    "{at}: {status}, {series} series ({want} from {direct} directly): {}\n{body}",
                    query.expr
                ));
            }
            long_term += usize::from(backend.as_deref() == Some("long_term"));
        }
    }
    (failures, long_term)
}

/// The largest step Grafana uses for any of `board`'s panels.
fn largest_step(board: &Dashboard, scrape: Duration) -> i64 {
    let variables = all_selected(board);
    board
        .query_panels()
        .iter()
        .flat_map(|p| p.targets.iter().map(move |t| (*p, t)))
        .map(|(panel, target)| {
            grafana_query(board, panel, target, &variables, scrape, now_secs())
                .map_or(1, |q| q.step)
        })
        .max()
        .unwrap_or(1)
}

#[tokio::test]
async fn every_curated_panel_answers_through_promguard_on_a_sale_night() {
    // The week-ago panels and the storm read VictoriaMetrics.
    let _vm = VM_COUNTERS.read().await;
    let b = backends();
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = Promguard::start(&format!(
        "backends:\n  recent:\n    url: {prom}\n    window: 2d\n  long_term:\n    url: {vm}\n    max_response: 1MiB\n\
         identity:\n  grafana:\n    secret_header: {SECRET_HEADER}\n    secret: {SECRET}\n\
         priority:\n  dashboards: [orders, sla, promguard]\n\
         policy:\n  dir: {policies}\n  state_file: {state}\n  admin_token: {ADMIN_TOKEN}\n  reload_interval: 1h\n",
        prom = b.prometheus,
        vm = b.victoria,
        policies = repo().join("policies").display(),
        state = dir.path().join("sale-mode.json").display(),
    ));
    let instance = pg.url.trim_start_matches("http://").to_string();
    let _target = ScrapeTarget::register(&b.promguard_targets, &instance);

    sale_night_storm(&pg).await;
    let storm_end = now_secs();

    // Sale mode is on: the curated dashboards are exempt, so their week-ago panels
    // still read the long-term store that personal panels may not touch.
    let scrape = scrape_interval();
    let mut failures = Vec::new();
    let mut long_term = 0;
    for uid in ["orders", "sla"] {
        let (failed, lts) = open_dashboard(&pg, &Dashboard::load(uid), scrape).await;
        failures.extend(failed);
        long_term += lts;
    }
    assert!(
        long_term > 0,
        "no curated panel read the long-term store in sale mode"
    );

    // Every counter the storm created needs two samples for rate() to return a series,
    // and Grafana floors the panels' end to their step: wait until two scrapes after the
    // storm lie before that end.
    let board = Dashboard::load("promguard");
    let step = largest_step(&board, scrape);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let end = now_secs() / step * step;
        if end > storm_end && scrapes(&instance, storm_end, end).await >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus is not scraping {instance}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (failed, _) = open_dashboard(&pg, &board, scrape).await;
    failures.extend(failed);
    assert!(
        failures.is_empty(),
        "panels that failed:\n{}",
        failures.join("\n")
    );
}
