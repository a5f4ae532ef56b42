//! Hostile input against the real binary: nothing may crash promguard, pin a core,
//! hold memory, walk past its path checks or credentials, or stop it from starting.
//! Every case gets a Prometheus-style JSON error, nothing reaches the (counting)
//! backend that should not, and the process answers normally afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use promguard_testkit::{Promguard, client, scrape};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

/// One raw HTTP/1.1 exchange: the path goes on the wire exactly as written (HTTP
/// client libraries normalise `..` and `%2e` before sending, which is the point).
/// On a blocking thread, so the test's fault backend keeps running meanwhile.
async fn raw(base: &str, method: &str, target: &str, body: &str) -> (u16, String) {
    let (base, method, target, body) = (
        base.to_string(),
        method.to_string(),
        target.to_string(),
        body.to_string(),
    );
    tokio::task::spawn_blocking(move || raw_blocking(&base, &method, &target, &body))
        .await
        .expect("the raw exchange")
}

fn raw_blocking(base: &str, method: &str, target: &str, body: &str) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).expect("connect to promguard");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !body.is_empty() {
        head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).expect("send");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// The body must be a Prometheus API error of `error_type` whose message says `mentions`.
fn assert_error(body: &str, error_type: &str, mentions: &str, what: &str) {
    // Chunked bodies carry a size line first; the JSON is the part in braces.
    let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
    let v: Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert_eq!(v["status"], "error", "{what}: {body}");
    assert_eq!(v["errorType"], error_type, "{what}: {body}");
    let message = v["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "{what}: {message:?} lacks {mentions:?}"
    );
}

/// promguard still answers a plain query through its backend.
async fn still_serves(pg: &Promguard) {
    let ok = client()
        .get(format!("{}/api/v1/query?query=up&time=1700000000", pg.url))
        .send()
        .await
        .expect("promguard answers");
    assert_eq!(ok.status(), 200, "a normal query after the hostile ones");
}

fn form(query: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("query", query)
        .append_pair("time", "1700000000")
        .finish()
}

#[tokio::test]
async fn deep_and_out_of_range_queries_are_refused_before_the_parser() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let nested =
        |open: &str, close: &str, n: usize| format!("{}up{}", open.repeat(n), close.repeat(n));
    let deep = [
        nested("(", ")", 7_500),
        nested("abs(", ")", 5_000),
        nested("max_over_time(", "[5m:1m])", 2_000),
        nested("sum(", ")", 5_000),
        vec!["1"; 10_000].join("+"),
    ];
    for query in &deep {
        let what = format!("{}...", &query[..20]);
        let (status, body) = raw(&pg.url, "POST", "/api/v1/query", &form(query)).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_error(&body, "bad_data", "query.max_depth", &what);
    }
    for query in [
        "up[1e300]",
        "up offset 1e300",
        "up[1e300:1m]",
        "up[5m:1e300]",
    ] {
        let (status, body) = raw(&pg.url, "POST", "/api/v1/query", &form(query)).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_error(&body, "bad_data", "292 years", query);
    }
    // Well inside the bounds, the same shapes are queries like any other.
    for query in [nested("abs(", ")", 100), vec!["1"; 100].join("+")] {
        let (status, body) = raw(&pg.url, "POST", "/api/v1/query", &form(&query)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        backend.requests(),
        2,
        "only the two acceptable queries were forwarded"
    );
    still_serves(&pg).await;
}

#[tokio::test]
async fn spans_beyond_any_backend_are_refused_and_wide_ones_plan_in_bounded_work() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let (status, body) = raw(
        &pg.url,
        "GET",
        "/api/v1/query_range?query=up&start=0&end=9000000000000000&step=1000000000000",
        "",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_error(
        &body,
        "bad_data",
        "years 1 to 9999",
        "a span past year 9999",
    );
    assert_eq!(backend.requests(), 0);
    // 11,000 points over the whole of years 1 to 9999 is a valid request: it is
    // planned in a few hundred chunks, forwarded, and answered.
    let started = std::time::Instant::now();
    let (status, body) = raw(
        &pg.url,
        "GET",
        "/api/v1/query_range?query=up&start=-62130767310&end=253401697620&step=28697814",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at all, not after the client gave up"
    );
    assert_eq!(backend.requests(), 1);
    still_serves(&pg).await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn refused_queries_hold_no_memory() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\nquery:\n  memo_bytes: 4MiB\n",
            backend.url
        ),
    );
    still_serves(&pg).await;
    let before = rss_kib(pg.pid());
    let http = client();
    for i in 0..150 {
        // Distinct invalid queries: 900 KiB (over query.max_length) and 100 KiB
        // (unbalanced), the shapes that used to fill the memo.
        for (size, text) in [
            (900 << 10, format!("sum({i}")),
            (100 << 10, format!("rate(x{i}[5m]")),
        ] {
            let padding = " ".repeat(size - text.len());
            let response = http
                .post(format!("{}/api/v1/query", pg.url))
                .form(&[("query", format!("{text}{padding}")), ("time", "1".into())])
                .send()
                .await
                .expect("answer");
            assert_eq!(response.status(), 400);
        }
    }
    let grown = rss_kib(pg.pid()).saturating_sub(before);
    assert!(
        grown < 48 << 10,
        "300 refused queries (75 MiB of text) grew resident memory by {grown} KiB"
    );
    assert_eq!(backend.requests(), 1);
    still_serves(&pg).await;
}

#[tokio::test]
async fn paths_that_would_be_normalised_are_refused_and_never_forwarded() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!("backends:\n  recent:\n    url: {}\n", backend.url),
    );
    let paths = [
        "/api/v1/../../-/quit",
        "/api/v1/%2e%2e/%2e%2e/-/quit",
        "/api/v1/status/../admin/tsdb/snapshot",
        "/api/v1/labels/../../../federate",
        "/api/v1/%61dmin/tsdb/snapshot",
        "/api/v1/admin%2Ftsdb%2Fsnapshot",
        "/api/v1//admin/tsdb/snapshot",
        "/api/v1/./query",
        "/api/v1/status/%2E%2E/query_range",
        // The sale-mode bypass: a refused query_range under another path.
        "/api/v1/status/../query_range?query=sum(rate(x%5B30d%5D))&start=1700000000&end=1700003600&step=60",
    ];
    for path in paths {
        for method in ["GET", "POST"] {
            let body = if method == "POST" { "query=up" } else { "" };
            let (status, text) = raw(&pg.url, method, path, body).await;
            assert_eq!(status, 400, "{method} {path}: {text}");
            assert_error(&text, "bad_data", "canonical", &format!("{method} {path}"));
        }
    }
    // Canonical writes and admin calls stay 403.
    for path in ["/api/v1/admin/tsdb/snapshot", "/-/quit", "/federate"] {
        let (status, text) = raw(&pg.url, "POST", path, "").await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    assert_eq!(backend.requests(), 0, "nothing reached the backend");
    still_serves(&pg).await;
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test]
async fn credentials_promguard_cannot_verify_are_refused_with_401() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\nidentity:\n  users:\n    alice: apass\n  bearer_tokens:\n    alerting: tok-1\n",
            backend.url
        ),
    );
    let no_colon = base64::engine::general_purpose::STANDARD.encode("justauser");
    let refused = [
        "Basic !!!notbase64!!!".to_string(),
        format!("Basic {no_colon}"),
        format!("basic {}", basic("alice", "wrong")),
        "bearer nope".to_string(),
        "Negotiate abc".to_string(),
        "Basic".to_string(),
    ];
    for value in &refused {
        let response = client()
            .get(format!("{}/api/v1/query?query=up&time=1", pg.url))
            .header("authorization", value)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 401, "{value}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{value}"
        );
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["errorType"], "unauthorized", "{value}");
    }
    assert_eq!(backend.requests(), 0);
    for value in [
        format!("basic {}", basic("alice", "apass")),
        format!("BASIC {}", basic("alice", "apass")),
        "bearer tok-1".to_string(),
    ] {
        let response = client()
            .get(format!("{}/api/v1/query?query=up&time=1", pg.url))
            .header("authorization", &value)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 200, "{value}");
    }
}

#[tokio::test]
async fn the_admin_switch_refuses_durations_it_cannot_honour() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let state = tempfile::tempdir().expect("state dir");
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\npolicy:\n  admin_token: t0ken\n  state_file: {}\n",
            backend.url,
            state.path().join("sale-mode.json").display()
        ),
    );
    let switch = |duration: &str| {
        client()
            .post(format!("{}/admin/sale-mode", pg.url))
            .bearer_auth("t0ken")
            .json(
                &serde_json::json!({"mode": "on", "for": duration, "reason": "test", "by": "sre"}),
            )
            .send()
    };
    for bad in [
        "-1",
        "NaN",
        "1e300",
        "300000y",
        "4294967295y",
        "0s",
        "31d",
        "",
    ] {
        let response = switch(bad).await.expect("answer");
        assert_eq!(response.status(), 400, "for {bad:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["errorType"], "bad_data", "for {bad:?}");
    }
    let response = switch("6h").await.expect("answer");
    assert_eq!(response.status(), 200);
    still_serves(&pg).await;
}

#[tokio::test]
async fn a_damaged_state_file_is_set_aside_and_promguard_starts_on_schedule() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    for damaged in [
        &b""[..],
        b"{\"override\": {\"mode\": \"sale\", \"unt",
        b"\x00garbage\xff",
    ] {
        let state = tempfile::tempdir().expect("state dir");
        let file = state.path().join("sale-mode.json");
        std::fs::write(&file, damaged).expect("write the damaged file");
        let pg = Promguard::start(
            BINS,
            &format!(
                "backends:\n  recent:\n    url: {}\npolicy:\n  admin_token: t0ken\n  state_file: {}\n",
                backend.url,
                file.display()
            ),
        );
        let status: Value = client()
            .get(format!("{}/admin/sale-mode", pg.url))
            .bearer_auth("t0ken")
            .send()
            .await
            .expect("answer")
            .json()
            .await
            .expect("json");
        assert_eq!(status["mode"]["mode"], "normal");
        assert_eq!(status["mode"]["source"], "schedule");
        let kept: Vec<_> = std::fs::read_dir(state.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("sale-mode.json.corrupt-")
            })
            .collect();
        assert_eq!(kept.len(), 1, "the damaged file is kept for the audit");
        assert_eq!(std::fs::read(kept[0].path()).expect("read"), damaged);
        let metrics = scrape(&pg.url).await;
        assert_eq!(metrics.sum("promguard_policy_state_file_errors_total"), 1.0);
        still_serves(&pg).await;
    }
}
