//! Sale mode end to end against the real backends: during an active window a
//! 30-day query is refused with the reason and VictoriaMetrics (by its own request
//! counters) receives nothing, curated dashboards and short recent queries still
//! pass; panels loaded before the switch stay viewable from the cache, with a
//! warning where a call was held back; `sale-mode off` lifts it at once, a restart
//! keeps the override, an invalid policy edit leaves the old policy in force, and
//! dry-run rules only count.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::Value;

use promguard_testkit::{
    Promguard, VM_COUNTERS, backends, client, eventually, now_secs, post_form, range, scrape,
};

use crate::BINS;

const TOKEN: &str = "test-admin-token";

/// The sale rules of every test here.
const SALE_RULES: &str = "sale:\n  exempt: {dashboards: [orders]}\n  rules:\n\
     \x20   - {name: recent-data-only, long_term: deny, reason: reserved for on-call}\n\
     \x20   - {name: up-to-12h, max_range: 12h}\n\
     \x20   - {name: no-name-regex, block: '__name__=~', dry_run: true}\n";

/// A policy whose sale window is open now.
fn policy_now() -> String {
    let at = |h: i64| {
        (Utc::now() + chrono::Duration::hours(h)).to_rfc3339_opts(SecondsFormat::Secs, true)
    };
    format!(
        "windows:\n  - {{name: drill, start: '{}', end: '{}'}}\n{SALE_RULES}",
        at(-1),
        at(1)
    )
}

fn start(policy_dir: &Path, state: &Path) -> Promguard {
    start_with(policy_dir, state, "")
}

fn start_with(policy_dir: &Path, state: &Path, extra: &str) -> Promguard {
    Promguard::in_front_of_backends(
        BINS,
        &format!(
            "policy:\n  dir: {}\n  state_file: {}\n  admin_token: {TOKEN}\n  reload_interval: 1h\n{extra}",
            policy_dir.display(),
            state.display()
        ),
    )
}

/// A 1-hour panel whose selector reads 30 days back.
fn deep_query() -> [(&'static str, String); 4] {
    let end = (now_secs() - 120) / 60 * 60;
    [
        ("query", "sum(rate(shop_orders_total[30d]))".to_string()),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
        ("step", "60".to_string()),
    ]
}

fn month_query() -> [(&'static str, String); 4] {
    let end = (now_secs() - 120) / 3600 * 3600;
    [
        ("query", "sum(rate(shop_orders_total[30d]))".to_string()),
        ("start", (end - 30 * 86400).to_string()),
        ("end", end.to_string()),
        ("step", "3600".to_string()),
    ]
}

fn hour_query() -> [(&'static str, String); 4] {
    let end = (now_secs() - 120) / 30 * 30;
    [
        ("query", "sum(rate(http_requests_total[5m]))".to_string()),
        ("start", (end - 3600).to_string()),
        ("end", end.to_string()),
        ("step", "30".to_string()),
    ]
}

fn sale_mode_cli(pg: &Promguard, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_promguard"))
        .arg("sale-mode")
        .args(args)
        .args(["--url", &pg.url, "--token", TOKEN])
        .output()
        .expect("run promguard sale-mode");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the CLI")
}

async fn admin(pg: &Promguard, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().post(format!("{}{path}", pg.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("admin answers");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON"))
}

#[tokio::test]
async fn a_sale_window_refuses_long_term_reads_until_an_sre_lifts_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(policies.join("sale.yaml"), policy_now()).expect("write policy");
    let state = dir.path().join("state/sale-mode.json");
    let mut pg = start(&policies, &state);
    let url = |pg: &Promguard| format!("{}/api/v1/query_range", pg.url);

    {
        // Nothing else may query VictoriaMetrics while its counters are compared.
        let _quiet = VM_COUNTERS.write().await;
        let before = backends(BINS).vm_query_count().await;
        let (status, _, body) = post_form(&url(&pg), &deep_query(), &[]).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["errorType"], "execution");
        let error = body["error"].as_str().unwrap_or_default();
        for needle in [
            "sale mode",
            "window 'drill'",
            "until",
            "recent-data-only",
            "30 days back via rate(shop_orders_total[30d])",
            "reserved for on-call",
            "curated dashboards (orders)",
        ] {
            assert!(error.contains(needle), "{needle:?} missing in {error:?}");
        }
        assert_eq!(
            backends(BINS).vm_query_count().await,
            before,
            "the long-term store received nothing"
        );
    }

    let _vm = VM_COUNTERS.read().await;
    // The curated dashboard still reads long-term data; a short recent query passes.
    let (status, backend, _) =
        post_form(&url(&pg), &month_query(), &[("X-Dashboard-Uid", "orders")]).await;
    assert_eq!((status, backend.as_deref()), (200, Some("long_term")));
    let (status, backend, _) = post_form(&url(&pg), &hour_query(), &[]).await;
    assert_eq!((status, backend.as_deref()), (200, Some("recent")));

    // The SRE lifts it: at once.
    let switched = sale_mode_cli(
        &pg,
        &[
            "off",
            "--for",
            "1h",
            "--reason",
            "false alarm",
            "--by",
            "sre-anna",
        ],
    );
    assert_eq!(switched["mode"]["mode"], "normal");
    assert_eq!(switched["mode"]["source"], "manual");
    let (status, _, _) = post_form(&url(&pg), &month_query(), &[]).await;
    assert_eq!(status, 200);

    // A restart keeps the override and its audit trail.
    drop(pg);
    pg = start(&policies, &state);
    let (status, _, _) = post_form(&url(&pg), &month_query(), &[]).await;
    assert_eq!(status, 200, "still off after a restart");
    let status_json = sale_mode_cli(&pg, &["status"]);
    assert_eq!(status_json["mode"]["source"], "manual");
    let audit = &status_json["audit"][0];
    assert_eq!(audit["by"], "sre-anna");
    assert_eq!(audit["reason"], "false alarm");
    assert!(
        audit["from"]
            .as_str()
            .unwrap_or("")
            .starts_with("sale mode"),
        "{audit}"
    );

    // An invalid edit leaves the old policy in force.
    std::fs::write(
        policies.join("sale.yaml"),
        "windows:\n  - name: broken\n    start: soon\n",
    )
    .expect("write");
    let (status, body) = admin(&pg, "/admin/policies/reload", Some(TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("sale.yaml:2"),
        "{body}"
    );
    sale_mode_cli(
        &pg,
        &["auto", "--reason", "back to plan", "--by", "sre-anna"],
    );
    let (status, _, _) = post_form(&url(&pg), &deep_query(), &[]).await;
    assert_eq!(
        status, 422,
        "the old policy, with its window, still applies"
    );
    // The month loaded while it was off is in the cache: served, at no cost.
    let form = month_query();
    let (cache, _, _) = range(
        &pg.url,
        &form[0].1,
        form[1].1.parse().expect("start"),
        form[2].1.parse().expect("end"),
        3600,
        &[],
    )
    .await;
    assert_eq!(cache, "HIT");

    let metrics = scrape(&pg.url).await;
    assert_eq!(
        metrics.sum(r#"promguard_policy_reloads_total{result="error"}"#),
        1.0
    );
    assert_eq!(
        metrics.sum(r#"promguard_sale_mode{source="schedule",window="drill"}"#),
        1.0
    );
    assert!(metrics.sum(r#"promguard_policy_rejections_total{limit="long_term",mode="sale",rule="recent-data-only"}"#) >= 1.0);
}

/// A 30-day panel as Grafana sends it: start and end floored to its hour step.
async fn live_month(pg: &Promguard, query: &str) -> (String, String, Value) {
    let end = now_secs() / 3600 * 3600;
    range(&pg.url, query, end - 30 * 86_400, end, 3600, &[]).await
}

#[tokio::test]
async fn panels_loaded_before_the_switch_stay_viewable_without_long_term_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("sale.yaml"), SALE_RULES).expect("write policy");
    // Points of the last 2 hours stay live, so a refresh fetches its tail again.
    let pg = start_with(
        dir.path(),
        &dir.path().join("state.json"),
        "cache:\n  fresh_window: 2h\n  fresh_ttl: 1s\n",
    );
    // A rate whose tail reads what Prometheus holds, and an SLA over 3 days
    // whose tail still reads the long-term store.
    let rate = "sum(rate(shop_orders_total[5m]))";
    let sla = "sum(increase(shop_orders_total[3d]))";
    let _quiet = VM_COUNTERS.write().await;
    let b = backends(BINS);
    live_month(&pg, rate).await;
    let (_, _, before) = live_month(&pg, sla).await;
    assert!(before.get("warnings").is_none(), "{before}");

    sale_mode_cli(
        &pg,
        &["on", "--for", "1h", "--reason", "drill", "--by", "sre-anna"],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let vm_before = b.vm_query_count_settled().await;

    let (cache, backend, refreshed) = live_month(&pg, rate).await;
    assert_eq!(
        (cache.as_str(), backend.as_str()),
        ("PARTIAL", "long_term, recent")
    );
    assert!(refreshed.get("warnings").is_none(), "{refreshed}");

    let (_, _, held) = live_month(&pg, sla).await;
    let warning = held["warnings"][0].as_str().unwrap_or_default();
    for needle in [
        "promguard: no data from",
        "refused by rule 'recent-data-only'",
        "in sale mode (switched by hand, until",
    ] {
        assert!(warning.contains(needle), "{needle:?} missing in {held}");
    }
    // The cached 30 days, up to the newest cached point.
    let points = held["data"]["result"][0]["values"]
        .as_array()
        .map_or(0, Vec::len);
    assert!((700..720).contains(&points), "{points} points: {held}");

    // Cold, nothing can answer it: refused as before.
    let end = now_secs() / 3600 * 3600;
    let form = [
        ("query", "sum(rate(shop_orders_total[10m]))".to_string()),
        ("start", (end - 30 * 86_400).to_string()),
        ("end", end.to_string()),
        ("step", "3600".to_string()),
    ];
    let (status, _, cold) = post_form(&format!("{}/api/v1/query_range", pg.url), &form, &[]).await;
    assert_eq!(status, 422, "{cold}");
    assert!(
        cold["error"]
            .as_str()
            .unwrap_or_default()
            .contains("refused by rule 'recent-data-only'"),
        "{cold}"
    );
    assert_eq!(
        b.vm_query_count_settled().await,
        vm_before,
        "the long-term store received nothing"
    );
    let metrics = scrape(&pg.url).await;
    assert!(metrics.sum(r#"promguard_policy_held_fetches_total{limit="long_term",mode="sale",rule="recent-data-only"}"#) >= 2.0);
    assert_eq!(
        metrics.sum(r#"promguard_policy_rejections_total{limit="long_term",mode="sale",rule="recent-data-only"}"#),
        1.0
    );
}

#[tokio::test]
async fn dry_run_rules_count_without_refusing() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("sale.yaml"), policy_now()).expect("write policy");
    let pg = start(dir.path(), &dir.path().join("state.json"));
    let end = now_secs() - 60;
    let form = [
        ("query", r#"count({__name__=~"shop_.*"})"#.to_string()),
        ("time", end.to_string()),
    ];
    let (status, _, body) = post_form(&format!("{}/api/v1/query", pg.url), &form, &[]).await;
    assert_eq!(status, 200, "{body}");
    let metrics = scrape(&pg.url).await;
    assert_eq!(
        metrics.sum(r#"promguard_policy_dry_run_would_reject_total{limit="blocked_pattern",mode="sale",rule="no-name-regex"}"#),
        1.0
    );
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("p.yaml"), policy_now()).expect("write policy");
    let pg = start(dir.path(), &dir.path().join("state.json"));
    assert_eq!(admin(&pg, "/admin/policies/reload", None).await.0, 401);
    assert_eq!(
        admin(&pg, "/admin/policies/reload", Some("guess")).await.0,
        401
    );
    assert_eq!(
        admin(&pg, "/admin/policies/reload", Some(TOKEN)).await.0,
        200
    );
    let off = Promguard::in_front_of_backends(BINS, "");
    assert_eq!(
        admin(&off, "/admin/policies/reload", Some(TOKEN)).await.0,
        403,
        "no token configured: disabled"
    );
}

/// A policy that refuses everything that reads series, to see which policy is in force.
const REFUSE_ALL: &str = "sale:\n  rules:\n    - {name: closed, max_lookback: 1s}\n";

async fn instant_status(pg: &Promguard) -> u16 {
    let form = [
        ("query", "up".to_string()),
        ("time", (now_secs() - 60).to_string()),
    ];
    post_form(
        &format!("{}/api/v1/query", pg.url),
        &form,
        &[("Cache-Control", "no-cache")],
    )
    .await
    .0
}

#[tokio::test]
async fn policies_reload_when_their_files_change_and_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        format!("{}{}", window_only(), "sale:\n  rules: []\n"),
    )
    .expect("write");
    let pg = Promguard::in_front_of_backends(
        BINS,
        &format!(
            "policy:\n  dir: {}\n  state_file: {}\n  reload_interval: 200ms\n",
            dir.path().display(),
            dir.path().join("state.json").display()
        ),
    );
    assert_eq!(instant_status(&pg).await, 200);
    // An edit is picked up by the content poll.
    std::fs::write(&file, format!("{}{REFUSE_ALL}", window_only())).expect("write");
    let refused = eventually(50, Duration::from_millis(100), async || {
        instant_status(&pg).await == 422
    })
    .await;
    assert!(refused, "the edited policy took effect without a restart");

    // SIGHUP reloads at once, even with a long poll interval.
    let dir2 = tempfile::tempdir().expect("temp dir");
    let file2 = dir2.path().join("p.yaml");
    std::fs::write(&file2, format!("{}{REFUSE_ALL}", window_only())).expect("write");
    let pg2 = Promguard::in_front_of_backends(
        BINS,
        &format!(
            "policy:\n  dir: {}\n  state_file: {}\n  reload_interval: 1h\n",
            dir2.path().display(),
            dir2.path().join("state.json").display()
        ),
    );
    assert_eq!(instant_status(&pg2).await, 422);
    std::fs::write(&file2, format!("{}sale:\n  rules: []\n", window_only())).expect("write");
    let hup = Command::new("kill")
        .args(["-HUP", &pg2.pid().to_string()])
        .status()
        .expect("send SIGHUP");
    assert!(hup.success());
    let allowed = eventually(50, Duration::from_millis(100), async || {
        instant_status(&pg2).await == 200
    })
    .await;
    assert!(allowed, "SIGHUP reloaded the policy");
}

/// Just the open window of [`policy_now`].
fn window_only() -> String {
    let full = policy_now();
    full[..full.find("sale:").unwrap_or(full.len())].to_string()
}

#[tokio::test]
async fn exempt_dashboards_keep_normal_budgets_in_sale_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = policy_now().replace(
        "sale:\n",
        "sale:\n  limits: {upstream: {per_second: 1, burst: 1}}\n",
    );
    std::fs::write(dir.path().join("p.yaml"), policy).expect("write policy");
    let pg = start(dir.path(), &dir.path().join("state.json"));
    let query = |n: i64, dashboard: &'static str| {
        let form = [
            ("query", "sum(rate(http_requests_total[5m]))".to_string()),
            // Older than the live window, so each is a distinct question, not
            // one shared instant.
            ("time", (now_secs() - 600 - n).to_string()),
        ];
        let url = format!("{}/api/v1/query", pg.url);
        async move {
            post_form(&url, &form, &[("X-Dashboard-Uid", dashboard)])
                .await
                .0
        }
    };
    // A personal dashboard spends the sale-mode upstream budget of one call a
    // second: of five sent at once, the others are refused...
    let personal = futures_util::future::join_all((1..=5).map(|n| query(n, "personal"))).await;
    assert!(personal.contains(&200), "{personal:?}");
    assert!(
        personal.iter().filter(|s| **s == 429).count() >= 3,
        "{personal:?}"
    );
    // ...while the curated, exempt dashboard keeps the normal budget.
    for n in 10..15 {
        assert_eq!(query(n, "orders").await, 200, "curated query {n}");
    }
}

#[tokio::test]
async fn min_refresh_makes_live_refreshes_of_personal_panels_one_backend_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = policy_now().replace("sale:\n", "sale:\n  min_refresh: 1m\n");
    std::fs::write(dir.path().join("p.yaml"), policy).expect("write policy");
    let pg = start(dir.path(), &dir.path().join("state.json"));
    let upstream_calls = || async {
        scrape(&pg.url)
            .await
            .sum("promguard_upstream_request_duration_seconds_count")
    };
    // Three refreshes of a live 1-hour panel at a 15 s step, all within the last
    // whole minute (and within the cache's 5-minute live window).
    let minute = now_secs() / 60 * 60 - 60;
    let refresh = |end: i64, dashboard: &'static str| {
        let form = [
            ("query", "sum(rate(http_requests_total[5m]))".to_string()),
            ("start", (end - 3600).to_string()),
            ("end", end.to_string()),
            ("step", "15".to_string()),
        ];
        let url = format!("{}/api/v1/query_range", pg.url);
        async move { post_form(&url, &form, &[("X-Dashboard-Uid", dashboard)]).await }
    };
    let last_point = |body: &Value| {
        body["data"]["result"][0]["values"]
            .as_array()
            .and_then(|v| v.last())
            .and_then(|p| p[0].as_f64())
    };

    let before = upstream_calls().await;
    let (status, _, first) = refresh(minute + 15, "personal").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        last_point(&first),
        Some(minute as f64),
        "snapped to the minute: {first}"
    );
    assert_eq!(
        first["warnings"],
        serde_json::json!([
            "promguard: in sale mode this panel refreshes at most every 60 seconds, so its \
             newest point may be that old"
        ]),
        "Grafana shows why on the panel"
    );
    let after_first = upstream_calls().await;
    assert!(after_first > before, "the first load reaches the backend");
    for end in [minute + 30, minute + 45] {
        let (status, _, body) = refresh(end, "personal").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body, first,
            "the refresh ending at {end} is the first answer"
        );
    }
    assert_eq!(
        upstream_calls().await,
        after_first,
        "refreshes within the minute cost the backend nothing"
    );

    // The curated, exempt dashboard keeps its own refresh: every one reaches the
    // backend for the newest points, and ends where it asked.
    for end in [minute + 15, minute + 30, minute + 45] {
        let calls = upstream_calls().await;
        let (status, _, body) = refresh(end, "orders").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(last_point(&body), Some(end as f64), "{body}");
        assert!(body.get("warnings").is_none(), "{body}");
        assert!(upstream_calls().await > calls, "curated refresh at {end}");
    }
}
