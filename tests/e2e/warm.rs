//! Warming against the real backends: a window's `warm_before` fills the cache
//! with the configured dashboards' panels, so the first request in the window is
//! a hit and VictoriaMetrics (by its own counters) sees nothing; `promguard warm`
//! warms every range panel of a dashboard JSON; and against a slow fault backend
//! that counts its concurrency, warming keeps to its share of the cap, and stops
//! when others queue for the backend past its patience or sale mode comes on.

use std::path::Path;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::Value;

use promguard::grafana::{Call, Dashboard, DataSource, Screen};
use promguard_testkit::{
    Promguard, VM_COUNTERS, admin_get, backends, client, eventually, now_ms, range, repo, scrape,
};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

const TOKEN: &str = "warm-admin-token";

/// The range calls Grafana makes for `board` over `range_ms` at `now_ms`, as warming
/// builds them: (query, start, end, step) in seconds.
fn range_calls(
    board: &Dashboard,
    range_ms: Option<i64>,
    now_ms: i64,
) -> Vec<(String, i64, i64, i64)> {
    let variables = board.opened();
    let mut calls = Vec::new();
    for panel in board.query_panels() {
        for target in &panel.targets {
            let sent = board
                .calls_over(
                    panel,
                    target,
                    &variables,
                    DataSource::GRAFANA_DEFAULT,
                    Screen { width_px: 1920 },
                    range_ms,
                )
                .expect("well-formed targets");
            for call in sent {
                if let Call::Range { .. } = call {
                    let form = call.http(now_ms).params;
                    let number = |i: usize| form[i].1.parse::<f64>().expect("a number") as i64;
                    calls.push((form[0].1.clone(), number(1), number(2), number(3)));
                }
            }
        }
    }
    calls
}

/// Sleep past the next multiple of `step_s` when it is less than `margin_s` away,
/// so that every call of a test lands in the same step and keeps its cache key.
async fn clear_of_a_step_boundary(step_s: i64, margin_s: i64) {
    let into = (now_ms() / 1000).rem_euclid(step_s);
    if step_s - into < margin_s {
        tokio::time::sleep(Duration::from_secs((step_s - into + 1) as u64)).await;
    }
}

/// `POST /admin/warm` with `body`; its status.
async fn start_warm(pg: &Promguard, body: &Value) -> u16 {
    client()
        .post(format!("{}/admin/warm", pg.url))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .expect("an answer")
        .status()
        .as_u16()
}

async fn warm_status(pg: &Promguard) -> Value {
    admin_get(&pg.url, "/admin/warm", TOKEN).await
}

/// A 30-day dashboard of two rate panels over the curated series.
fn month_board(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("month.json");
    let panel = |id: u32, expr: &str| {
        serde_json::json!({
            "id": id, "type": "timeseries", "title": format!("panel {id}"),
            "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8},
            "targets": [{"refId": "A", "expr": expr}]
        })
    };
    let board = serde_json::json!({
        "uid": "month", "title": "Orders, a month",
        "time": {"from": "now-30d", "to": "now"},
        "panels": [
            panel(1, "sum(rate(shop_orders_total[5m]))"),
            panel(2, "sum by (region) (rate(shop_orders_total[$__rate_interval]))"),
        ]
    });
    std::fs::write(&path, board.to_string()).expect("write dashboard");
    path
}

#[tokio::test]
async fn warm_before_fills_the_cache_so_the_windows_first_requests_are_hits() {
    // Started first: the window's times below are measured from now.
    let b = backends(BINS);
    // Warming reads VictoriaMetrics: not while another test counts its queries.
    let vm = VM_COUNTERS.read().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let board_file = month_board(dir.path());
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    // Warming starts 30 s before the window and takes a few seconds; the test stays
    // within one hour step of the panels throughout.
    clear_of_a_step_boundary(3600, 120).await;
    let opens = Utc::now() + chrono::Duration::seconds(45);
    let at = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    std::fs::write(
        policies.join("sale.yaml"),
        format!(
            "windows:\n  - {{name: drill, start: '{}', end: '{}', warm_before: 30s}}\n\
             sale:\n  rules:\n    - {{name: recent-data-only, long_term: deny}}\n",
            at(opens),
            at(opens + chrono::Duration::hours(1))
        ),
    )
    .expect("write policy");
    let pg = Promguard::in_front_of_backends(
        BINS,
        &format!(
            "policy:\n  dir: {}\n  state_file: {}\n  admin_token: {TOKEN}\n\
             warm:\n  dashboards: [{}]\n\
             cache:\n  fresh_window: 1s\n",
            policies.display(),
            dir.path().join("state.json").display(),
            board_file.display()
        ),
    );
    // An engineer's week-long panel before warming: the record's most used range.
    let end = now_ms() / 1000 / 600 * 600;
    let week = "sum by (status) (rate(shop_orders_total[5m]))";
    range(&pg.url, week, end - 7 * 86_400, end, 600, &[]).await;
    assert_eq!(
        warm_status(&pg).await["state"],
        "idle",
        "not before warm_before"
    );
    let finished = eventually(120, Duration::from_millis(500), async || {
        warm_status(&pg).await["state"] == "finished"
    })
    .await;
    let status = warm_status(&pg).await;
    assert!(finished, "{status}");
    let recorded = &status["dashboards"][1];
    assert_eq!(recorded["name"], "recorded queries", "{status}");
    assert_eq!(recorded["calls"], 1, "{status}");
    assert_eq!(recorded["failed"], 0, "{status}");
    assert!(
        status["why"]
            .as_str()
            .unwrap_or_default()
            .starts_with("window 'drill' opens at"),
        "{status}"
    );
    let board = &status["dashboards"][0];
    assert_eq!(board["name"], "Orders, a month");
    assert_eq!(
        (board["calls"].as_u64(), board["warmed"].as_u64()),
        (Some(2), Some(2)),
        "{status}"
    );
    let metrics = scrape(&pg.url).await;
    assert!(metrics.sum(r#"promguard_warm_queries_total{result="warmed"}"#) >= 2.0);
    assert!(metrics.sum("promguard_warm_bytes_total") > 0.0);

    drop(vm);
    let _quiet = VM_COUNTERS.write().await;
    let vm_before = b.vm_query_count_settled().await;
    let until = (opens - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(until).await;
    let calls = range_calls(
        &Dashboard::load(&board_file).expect("the dashboard"),
        None,
        now_ms(),
    );
    assert_eq!(calls.len(), 2);
    for (query, start, end, step) in calls {
        let (cache, _, _) = range(&pg.url, &query, start, end, step, &[]).await;
        assert_eq!(cache, "HIT", "{query} in the window");
    }
    assert_eq!(
        scrape(&pg.url)
            .await
            .sum(r#"promguard_sale_mode{source="schedule",window="drill"}"#),
        1.0,
        "the window is open"
    );
    assert_eq!(
        b.vm_query_count_settled().await,
        vm_before,
        "the long-term store received nothing in the window"
    );
}

#[tokio::test]
async fn promguard_warm_warms_every_range_panel_of_a_dashboard() {
    let _vm = VM_COUNTERS.read().await;
    let pg = Promguard::in_front_of_backends(
        BINS,
        &format!("policy:\n  admin_token: {TOKEN}\ncache:\n  fresh_window: 1s\n"),
    );
    let file = repo().join("dashboards/sla.json");
    let board = Dashboard::load(&file).expect("the curated SLA dashboard");
    let week = 7 * 86_400_000;
    let steps: Vec<i64> = range_calls(&board, Some(week), now_ms())
        .iter()
        .map(|c| c.3)
        .collect();
    clear_of_a_step_boundary(*steps.iter().min().expect("range panels"), 30).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promguard"))
        .args(["warm", "--dashboard"])
        .arg(&file)
        .args(["--range", "7d", "--url", &pg.url, "--token", TOKEN])
        .output()
        .expect("run promguard warm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = range_calls(&board, Some(week), now_ms());
    assert!(
        stdout.contains(&format!("{}: {} calls,", board.title, calls.len()))
            && stdout.contains(" 0 failed"),
        "{stdout}"
    );
    for (query, start, end, step) in calls {
        let (cache, _, _) = range(&pg.url, &query, start, end, step, &[]).await;
        assert_eq!(cache, "HIT", "{query} over {start}..{end} at {step}");
    }
}

#[tokio::test]
async fn warming_keeps_to_its_share_of_a_slow_backends_cap() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_millis(300))).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent: {{url: {}}}\n\
             admission:\n  recent: {{max_in_flight: 4, reserved: 1}}\n\
             warm: {{share: 0.5}}\n\
             policy:\n  admin_token: {TOKEN}\n",
            backend.url
        ),
    );
    let panels: Vec<Value> = (0..8)
        .map(|i| {
            serde_json::json!({
                "id": i, "type": "timeseries", "title": format!("panel {i}"),
                "targets": [{"refId": "A", "expr": format!("sum(rate(x_{i}[5m]))")}]
            })
        })
        .collect();
    let body = serde_json::json!({
        "dashboards": [{"uid": "many", "title": "Many", "panels": panels}],
        "range": "6h"
    });
    let start = || start_warm(&pg, &body);
    assert_eq!(start().await, 202);
    assert_eq!(start().await, 409, "one run at a time");
    let finished = eventually(60, Duration::from_millis(250), async || {
        warm_status(&pg).await["state"] == "finished"
    })
    .await;
    let status = warm_status(&pg).await;
    assert!(finished, "{status}");
    assert_eq!(status["concurrency"], 2, "half of the cap of 4");
    assert_eq!(status["dashboards"][0]["warmed"], 8, "{status}");
    let peak = backend
        .counters
        .peak_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 2, "the backend saw {peak} warming calls at once");
    assert_eq!(backend.requests(), 8);
}

#[tokio::test]
async fn warming_stops_when_others_queue_for_the_backend_and_when_sale_mode_comes_on() {
    let backend = FaultServer::start(Mode::Slow(Duration::from_secs(1))).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent: {{url: {}}}\n\
             admission:\n  recent: {{max_in_flight: 2, reserved: 0, max_queue: 64, max_wait: 30s}}\n\
             warm: {{share: 0.5}}\n\
             policy:\n  admin_token: {TOKEN}\n  state_file: {}\n",
            backend.url,
            dir.path().join("state.json").display()
        ),
    );
    let panels: Vec<Value> = (0..30)
        .map(|i| {
            serde_json::json!({
                "id": i, "title": format!("panel {i}"),
                "targets": [{"refId": "A", "expr": format!("sum(rate(y_{i}[5m]))")}]
            })
        })
        .collect();
    let body =
        serde_json::json!({"dashboards": [{"uid": "slow", "panels": panels}], "range": "1h"});
    let start = || start_warm(&pg, &body);
    let ended = async || {
        eventually(80, Duration::from_millis(250), async || {
            warm_status(&pg).await["state"] != "running"
        })
        .await
    };

    // Eight engineers keep the backend's two slots full and its queue non-empty
    // for 10 s, past warming's 5 s of patience.
    assert_eq!(start().await, 202);
    let url = format!("{}/api/v1/query", pg.url);
    let flood = (0..8).map(|i| {
        let url = url.clone();
        tokio::spawn(async move {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            let mut n = 0;
            while std::time::Instant::now() < until {
                let _ = client()
                    .post(&url)
                    .header("Cache-Control", "no-cache")
                    .form(&[
                        ("query", format!("up{{i=\"{i}\",n=\"{n}\"}}")),
                        ("time", "1700000000".into()),
                    ])
                    .send()
                    .await;
                n += 1;
            }
        })
    });
    let flood: Vec<_> = flood.collect();
    assert!(ended().await, "{}", warm_status(&pg).await);
    let status = warm_status(&pg).await;
    assert_eq!(status["state"], "stopped", "{status}");
    assert!(
        status["stopped"]
            .as_str()
            .unwrap_or_default()
            .starts_with("load rose: backend recent has"),
        "{status}"
    );
    assert!(
        status["dashboards"][0]["warmed"].as_u64() < Some(30),
        "{status}"
    );
    for task in flood {
        task.await.expect("the flood ends");
    }

    // The window opens while a run goes on: it stops.
    assert_eq!(start().await, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let switched = client()
        .post(format!("{}/admin/sale-mode", pg.url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"mode": "on", "for": "1h", "reason": "drill", "by": "sre"}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(switched.status(), 200);
    assert!(ended().await, "{}", warm_status(&pg).await);
    let status = warm_status(&pg).await;
    assert_eq!(
        (status["state"].as_str(), status["stopped"].as_str()),
        (Some("stopped"), Some("sale mode is on")),
        "{status}"
    );
    assert_eq!(start().await, 409, "no warming in sale mode");
    let metrics = scrape(&pg.url).await;
    assert_eq!(
        metrics.sum(r#"promguard_warm_runs_total{end="stopped"}"#),
        2.0
    );
}
