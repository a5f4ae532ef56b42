//! Bad input is answered locally with a Prometheus-style JSON error naming the
//! problem, and never reaches a backend.

use std::time::Duration;

use promguard_testkit::{Promguard, client};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

struct Case {
    method: &'static str,
    path: &'static str,
    query: &'static str,
    body: String,
    status: u16,
    error_type: &'static str,
    mentions: &'static str,
}

fn case(
    method: &'static str,
    path: &'static str,
    query: &'static str,
    status: u16,
    error_type: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        method,
        path,
        query,
        body: String::new(),
        status,
        error_type,
        mentions,
    }
}

#[tokio::test]
async fn every_kind_of_bad_input_gets_a_json_error_and_no_backend_call() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "max_request_body: 1KiB\nbackends:\n  recent:\n    url: {}\n",
            backend.url
        ),
    );
    let mut cases = vec![
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=abc&end=1&step=1",
            400,
            "bad_data",
            "\"start\"",
        ),
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=1&end=2&step=0",
            400,
            "bad_data",
            "\"step\"",
        ),
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=1&end=2&step=-5",
            400,
            "bad_data",
            "\"step\"",
        ),
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=1&end=2",
            400,
            "bad_data",
            "\"step\"",
        ),
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=10&end=2&step=1",
            400,
            "bad_data",
            "\"end\"",
        ),
        case(
            "GET",
            "/api/v1/query_range",
            "query=up&start=0&end=86400&step=1",
            400,
            "bad_data",
            "11,000 points",
        ),
        case(
            "GET",
            "/api/v1/query",
            "query=sum(rate(x[5m])",
            400,
            "bad_data",
            "\"query\"",
        ),
        case("GET", "/api/v1/query", "", 400, "bad_data", "\"query\""),
        case(
            "GET",
            "/api/v1/query",
            "query=up&time=NaN",
            400,
            "bad_data",
            "\"time\"",
        ),
        case(
            "GET",
            "/api/v1/query",
            "query=up&timeout=soon",
            400,
            "bad_data",
            "\"timeout\"",
        ),
        case(
            "GET",
            "/api/v1/query",
            "query=%FF%FE",
            400,
            "bad_data",
            "\"query\"",
        ),
        case("GET", "/api/v1/series", "", 400, "bad_data", "\"match[]\""),
        case(
            "GET",
            "/api/v1/series",
            "match[]=rate(x[5m])",
            400,
            "bad_data",
            "\"match[]\"",
        ),
        case(
            "GET",
            "/api/v1/label/1bad/values",
            "",
            400,
            "bad_data",
            "\"name\"",
        ),
        case(
            "GET",
            "/api/v1/labels",
            "start=yesterday",
            400,
            "bad_data",
            "\"start\"",
        ),
        case(
            "POST",
            "/api/v1/admin/tsdb/delete_series",
            "match[]=up",
            403,
            "forbidden",
            "admin",
        ),
        case(
            "POST",
            "/api/v1/admin/tsdb/snapshot",
            "",
            403,
            "forbidden",
            "admin",
        ),
        case("POST", "/api/v1/write", "", 403, "forbidden", "write"),
        case(
            "POST",
            "/api/v1/import/prometheus",
            "",
            403,
            "forbidden",
            "write",
        ),
        case("POST", "/-/reload", "", 403, "forbidden", "admin"),
        case("POST", "/-/quit", "", 403, "forbidden", "admin"),
        case(
            "DELETE",
            "/api/v1/query",
            "query=up",
            405,
            "bad_data",
            "GET or POST",
        ),
        case(
            "POST",
            "/api/v1/label/job/values",
            "",
            405,
            "bad_data",
            "GET",
        ),
        case("GET", "/graph", "", 404, "not_found", "/graph"),
    ];
    cases.push(Case {
        body: format!("query={}", "x".repeat(4096)),
        ..case(
            "POST",
            "/api/v1/query",
            "",
            400,
            "bad_data",
            "larger than the limit",
        )
    });

    for c in &cases {
        let url = format!("{}{}?{}", pg.url, c.path, c.query);
        let response = client()
            .request(c.method.parse().expect("method"), &url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(c.body.clone())
            .send()
            .await
            .expect("promguard answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} {}: not JSON ({e}): {text}", c.method, c.path));
        let what = format!("{} {}?{}", c.method, c.path, c.query);
        assert_eq!(status, c.status, "{what}: {text}");
        assert_eq!(body["status"], "error", "{what}");
        assert_eq!(body["errorType"], c.error_type, "{what}");
        let error = body["error"].as_str().expect("error message");
        assert!(
            error.contains(c.mentions),
            "{what}: {error:?} lacks {:?}",
            c.mentions
        );
    }
    assert_eq!(
        backend.requests(),
        0,
        "bad input must never reach the backend"
    );

    // And promguard still serves good requests afterwards.
    let ok = client()
        .get(format!("{}/api/v1/query?query=up", pg.url))
        .send()
        .await
        .expect("promguard answers");
    assert_eq!(ok.status(), 200);
    assert_eq!(backend.requests(), 1);
}

#[tokio::test]
async fn wrong_credentials_are_refused_not_downgraded() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &format!(
            "backends:\n  recent:\n    url: {}\nidentity:\n  users:\n    alice: apass\n  bearer_tokens:\n    alerting: tok\n",
            backend.url
        ),
    );
    let url = format!("{}/api/v1/query?query=up", pg.url);
    let wrong = client()
        .get(&url)
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 401);
    let body: serde_json::Value = wrong.json().await.expect("json");
    assert_eq!(body["errorType"], "unauthorized");
    let token = client()
        .get(&url)
        .bearer_auth("guess")
        .send()
        .await
        .expect("answer");
    assert_eq!(token.status(), 401);
    assert_eq!(backend.requests(), 0);
    let right = client()
        .get(&url)
        .basic_auth("alice", Some("apass"))
        .send()
        .await
        .expect("answer");
    assert_eq!(right.status(), 200);
    let bot = client()
        .get(&url)
        .bearer_auth("tok")
        .send()
        .await
        .expect("answer");
    assert_eq!(bot.status(), 200);
}
