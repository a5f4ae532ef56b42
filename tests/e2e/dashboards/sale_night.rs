//! End to end: a sale night through the real promguard, in sale mode with the
//! repository's policies, in front of the real backends. A storm of personal panels is
//! refused or throttled, and every panel of every curated dashboard, requested as the
//! testkit's Grafana model requests it, answers 200 with at least one series; the
//! promguard dashboard's from the shared Prometheus scraping this very promguard.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use promguard::grafana::{Dashboard, DataSource, HttpCall};
use promguard_testkit::{
    Promguard, VM_COUNTERS, backends, client, get, now_ms, now_secs, post_form, repo,
};
use serde_json::{Value, json};

use super::provisioning::{data_source, sale_upstream_burst};
use super::{DATASOURCE_UID, SCREEN, SECRET_HEADER, curated};
use crate::BINS;

const SECRET: &str = "grafana-shared-secret";
const ADMIN_TOKEN: &str = "sale-night-admin-token";

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

/// How many times the shared Prometheus scraped `instance` after `from`, up to `to`,
/// and got its metrics (`up` is 1): a scrape that timed out on a busy machine is
/// no sample of promguard's counters.
async fn scrapes(instance: &str, from: i64, to: i64) -> u64 {
    let query = format!(
        "sum_over_time(up{{job=\"promguard\",instance=\"{instance}\"}}[{}s])",
        to - from
    );
    let (status, _, body) = get(
        &format!("{}/api/v1/query", backends(BINS).prometheus),
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

#[tokio::test]
async fn every_curated_panel_answers_through_promguard_on_a_sale_night() {
    // The week-ago panels and the storm read VictoriaMetrics.
    let _vm = VM_COUNTERS.read().await;
    let b = backends(BINS);
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {prom}\n    window: 2d\n  long_term:\n    url: {vm}\n    max_response: 1MiB\n\
         identity:\n  grafana:\n    secret_header: {SECRET_HEADER}\n    secret: {SECRET}\n\
         priority:\n  dashboards: [orders, sla, promguard]\n\
         policy:\n  dir: {policies}\n  state_file: {state}\n  admin_token: {ADMIN_TOKEN}\n  reload_interval: 1h\n",
            prom = b.prometheus,
            vm = b.victoria,
            policies = repo().join("policies").display(),
            state = dir.path().join("sale-mode.json").display(),
        ),
    );
    let instance = pg.url.trim_start_matches("http://").to_string();
    let _target = ScrapeTarget::register(&b.promguard_targets, &instance);

    sale_night_storm(&pg).await;
    // Rounded up: a scrape in the storm's last second may predate its last counters
    // (the 429s come last), and must not count as one after it.
    let storm_end = (now_ms() + 999) / 1000;

    // Sale mode is on: the curated dashboards are exempt, so their week-ago panels
    // still read the long-term store that personal panels may not touch.
    let data_source = data_source();
    let mut failures = Vec::new();
    let mut long_term = 0;
    for uid in ["orders", "sla"] {
        let (failed, lts) = open_dashboard(&pg, &curated(uid), data_source).await;
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
    let board = curated("promguard");
    let step = largest_step(&board, data_source);
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
    let (failed, _) = open_dashboard(&pg, &board, data_source).await;
    failures.extend(failed);
    assert!(
        failures.is_empty(),
        "panels that failed:\n{}",
        failures.join("\n")
    );
}

/// Open `board` as Grafana does, as one user: its variables, then every target of
/// every panel. Returns what failed and how many targets the long-term store answered.
async fn open_dashboard(
    pg: &Promguard,
    board: &Dashboard,
    data_source: DataSource,
) -> (Vec<String>, usize) {
    let user = format!("viewer-{}", board.uid);
    // One "now" for the whole dashboard, in milliseconds, as Grafana's time range has it.
    let now_ms = now_ms();
    let range_ms = board.range_ms().unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for variable in board.query_variables() {
        let Some(call) = variable.call(range_ms) else {
            failures.push(format!(
                "{}: ${}: {:?} is not label_values(...)",
                board.uid, variable.name, variable.definition
            ));
            continue;
        };
        let HttpCall { path, params, .. } = call.http(now_ms);
        let response = client()
            .get(format!("{}{path}", pg.url))
            .query(&params)
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
    let variables = board.all_selected().unwrap_or_else(|e| panic!("{e}"));
    let mut long_term = 0;
    for panel in board.query_panels() {
        let panel_id = panel.id.to_string();
        let headers = grafana_headers(&user, &board.uid, Some(&panel_id));
        for target in &panel.targets {
            let at = format!(
                "{} panel {} {:?} {}",
                board.uid, panel.id, panel.title, target.ref_id
            );
            let calls = match board.calls(panel, target, &variables, data_source, SCREEN) {
                Ok(calls) => calls,
                Err(e) => {
                    failures.push(format!("{at}: {e}"));
                    continue;
                }
            };
            for call in calls {
                // Query calls are form POSTs: a range aligned to its step, an instant at
                // the dashboard's "now", aligned to nothing.
                let HttpCall { path, params, .. } = call.http(now_ms);
                let (status, backend, body) =
                    post_form(&format!("{}{path}", pg.url), &params, &headers).await;
                let series = body["data"]["result"].as_array().map_or(0, Vec::len);
                if status != 200 || series == 0 {
                    // Tell a data problem from a proxy one: what the backend says directly.
                    let direct = match backend.as_deref() {
                        Some("long_term") => &backends(BINS).victoria,
                        _ => &backends(BINS).prometheus,
                    };
                    let (_, _, want) = post_form(&format!("{direct}{path}"), &params, &[]).await;
                    let want = want["data"]["result"].as_array().map_or(0, Vec::len);
                    failures.push(format!(
                        "{at}: {status}, {series} series ({want} from {direct} directly): {}\n{body}",
                        call.expr().unwrap_or_default()
                    ));
                }
                long_term += usize::from(backend.as_deref() == Some("long_term"));
            }
        }
    }
    (failures, long_term)
}

/// The largest step, in seconds, of `board`'s range queries.
fn largest_step(board: &Dashboard, data_source: DataSource) -> i64 {
    let variables = board.all_selected().unwrap_or_else(|e| panic!("{e}"));
    board
        .query_panels()
        .iter()
        .flat_map(|p| p.targets.iter().map(move |t| (*p, t)))
        .filter_map(|(panel, target)| {
            board
                .calls(panel, target, &variables, data_source, SCREEN)
                .ok()
        })
        .flatten()
        .filter_map(|call| call.step_ms())
        .max()
        .map_or(1, |ms| (ms / 1000).max(1))
}
