//! Offline lints of the curated dashboards, the recording rules they read and the
//! provisioning: uids, data source references, variables, layout, every PromQL
//! expression parsed after Grafana's substitutions, every recorded series defined and
//! every rule used, each dashboard within one user's sale-mode budget, promtool's
//! check of the rules, and a data source that points at promguard.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use promguard::grafana::dashboard::GridPos;
use promguard_testkit::repo;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, parse_duration, walk_expr};
use serde::Deserialize;
use serde_json::{Value, json};

use super::provisioning::{data_source, provisioned_datasource, sale_policy, sale_upstream_burst};
use super::{CURATED, DATASOURCE_UID, SCREEN, SECRET_HEADER, curated};

/// A duration in Grafana's and Prometheus' syntax (`30s`, `5m`, `6h`).
fn duration(text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|e| panic!("duration {text:?}: {e}"))
}

/// What every panel and query variable must name as its data source.
fn datasource_ref() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
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
    let data_source = data_source();
    let burst = sale_upstream_burst();
    let mut used_records = BTreeSet::new();
    for uid in CURATED {
        let board = curated(uid);
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
            let values = variable.label_values().unwrap_or_else(|| {
                panic!(
                    "{uid}: ${}: {:?} is not label_values(...)",
                    variable.name, variable.definition
                )
            });
            let selector = values.matcher.unwrap_or_else(|| {
                panic!(
                    "{uid}: ${}: label_values needs a selector and a label",
                    variable.name
                )
            });
            parser::parse(&selector).unwrap_or_else(|e| panic!("{uid}: ${}: {e}", variable.name));
            assert_eq!(
                variable.query["query"],
                variable.definition.as_deref().unwrap_or("")
            );
        }

        // Every variable is used, every use is defined (interpolation refuses unknown
        // names).
        let variables = board.all_selected().unwrap_or_else(|e| panic!("{e}"));
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
                let calls = board
                    .calls(panel, target, &variables, data_source, SCREEN)
                    .unwrap_or_else(|e| panic!("{at} {}: {e}", target.ref_id));
                for sent in calls.iter().filter_map(|c| c.expr()) {
                    let expr = parser::parse(sent)
                        .unwrap_or_else(|e| panic!("{at} {}: {e}\n{sent}", target.ref_id));
                    // Recorded series are named level:metric:operations; raw ones have no
                    // colon.
                    for name in metric_names(&expr).into_iter().filter(|n| n.contains(':')) {
                        assert!(
                            recorded.contains_key(&name),
                            "{at}: {name} is recorded by no rule"
                        );
                        used_records.insert(name);
                    }
                }
                queries += calls.len();
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
