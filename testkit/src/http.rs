//! HTTP as the tests and benches speak it: one client, Grafana-shaped form POSTs,
//! `/metrics` pages, and polling for a condition.

use std::time::Duration;

use serde_json::Value;

/// A client with a 60 s timeout: a test never hangs on a request.
///
/// # Panics
///
/// When the TLS-free client cannot be built (never in practice).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build test client")
}

/// POST a form, the way Grafana sends panel queries; returns (status,
/// X-Promguard-Backend, body).
///
/// # Panics
///
/// When there is no answer or its body is not JSON.
pub async fn post_form(
    url: &str,
    form: &[(&str, String)],
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut req = client().post(url).form(form);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    into_parts(req.send().await.expect("request reaches promguard")).await
}

/// GET with query parameters; returns (status, X-Promguard-Backend, body).
///
/// # Panics
///
/// As [`post_form`].
pub async fn get(url: &str, query: &[(&str, String)]) -> (u16, Option<String>, Value) {
    into_parts(
        client()
            .get(url)
            .query(query)
            .send()
            .await
            .expect("request reaches promguard"),
    )
    .await
}

async fn into_parts(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let backend = response
        .headers()
        .get("x-promguard-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.bytes().await.expect("read body");
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, backend, json)
}

/// GET an admin endpoint (`path`, such as `/admin/warm`) with the bearer `token`;
/// its JSON body.
///
/// # Panics
///
/// When there is no answer or its body is not JSON.
pub async fn admin_get(base: &str, path: &str, token: &str) -> Value {
    client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("a JSON body")
}

/// POST a range query; returns (X-Cache, X-Promguard-Backend, body).
///
/// # Panics
///
/// When the answer is not a 200 with a JSON body.
pub async fn range(
    base: &str,
    query: &str,
    start: i64,
    end: i64,
    step: i64,
    extra: &[(&str, &str)],
) -> (String, String, Value) {
    let mut form = vec![
        ("query", query.to_string()),
        ("start", start.to_string()),
        ("end", end.to_string()),
        ("step", step.to_string()),
    ];
    form.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let response = client()
        .post(format!("{base}/api/v1/query_range"))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200, "{query} {start}..{end}/{step}");
    let (cache, backend) = (
        header(&response, "x-cache"),
        header(&response, "x-promguard-backend"),
    );
    let text = response.text().await.expect("body");
    (cache, backend, serde_json::from_str(&text).expect("JSON"))
}

/// The value of `response`'s header `name` as text, `"none"` when it has none.
pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string()
}

/// A `/metrics` page in Prometheus text format.
pub struct Scrape(pub String);

impl Scrape {
    /// The sum of every sample whose line starts with `prefix` (a metric name, or
    /// a name with its first labels, which the text format prints sorted).
    pub fn sum(&self, prefix: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Read the `/metrics` page of promguard or a backend at `base`.
///
/// # Panics
///
/// When there is no page.
pub async fn scrape(base: &str) -> Scrape {
    Scrape(
        client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("a /metrics page")
            .text()
            .await
            .expect("its text"),
    )
}

/// Check `holds` up to `tries` times, `pause` apart, until it is true; whether it
/// became true.
pub async fn eventually(
    tries: usize,
    pause: Duration,
    mut holds: impl AsyncFnMut() -> bool,
) -> bool {
    for _ in 0..tries {
        if holds().await {
            return true;
        }
        tokio::time::sleep(pause).await;
    }
    false
}
