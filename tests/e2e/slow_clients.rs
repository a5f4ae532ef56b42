//! Slow and idle clients cannot hold promguard's connections for ever: half-sent
//! heads are cut at the header timeout, idle keep-alive connections at the idle
//! timeout; past the connection bound a client gets a clear 503 at once; and out
//! of file descriptors promguard backs off, logs once and recovers.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use promguard_testkit::{Promguard, eventually, scrape};

use crate::BINS;
use crate::faults::{FaultServer, Mode};

/// A configuration with a `server:` section and a fault backend that answers an
/// empty vector at once; `extra` goes at the end.
fn config(backend: &str, server: &str, extra: &str) -> String {
    format!("server:\n{server}backends:\n  recent:\n    url: {backend}\n{extra}")
}

fn addr(pg: &Promguard) -> &str {
    pg.url.trim_start_matches("http://")
}

/// An instant query on a connection of its own: status and JSON body. Errors if
/// promguard does not answer within 10 s.
async fn query(pg: &Promguard) -> reqwest::Result<(u16, reqwest::header::HeaderMap, Value)> {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(format!("{}/api/v1/query?query=up", pg.url))
        .send()
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await?;
    Ok((status, headers, body))
}

async fn answers_200(pg: &Promguard) -> bool {
    matches!(query(pg).await, Ok((200, _, _)))
}

/// A slow-loris client: connects and sends part of a request head.
async fn half_open(pg: &Promguard) -> TcpStream {
    let mut stream = TcpStream::connect(addr(pg)).await.expect("connect");
    stream
        .write_all(b"GET /api/v1/query?query=up HTTP/1.1\r\nHost: promguard\r\n")
        .await
        .expect("send half a head");
    stream
}

/// Whether promguard closes `stream` (end of stream or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// Send a keep-alive instant query on `stream` and read the answer: its status.
async fn exchange(stream: &mut TcpStream) -> u16 {
    stream
        .write_all(b"GET /api/v1/query?query=up HTTP/1.1\r\nHost: promguard\r\n\r\n")
        .await
        .expect("send a request");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, length) = loop {
        let n = stream.read(&mut buf).await.expect("read the answer");
        assert!(n > 0, "connection closed before the answer");
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("the answer has a Content-Length");
            break (end + 4, length);
        }
    };
    while received.len() < head_end + length {
        let n = stream.read(&mut buf).await.expect("read the body");
        assert!(n > 0, "connection closed inside the body");
        received.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&received[..head_end]).into_owned();
    status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line")
}

#[tokio::test]
async fn half_sent_heads_are_closed_after_the_header_timeout() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &config(&backend.url, "  header_read_timeout: 1s\n", ""),
    );
    let mut slow = Vec::new();
    for _ in 0..5 {
        slow.push(half_open(&pg).await);
    }
    for (n, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(20)).await,
            "slow connection {n} is still open"
        );
    }
    assert!(answers_200(&pg).await, "promguard still answers");
}

#[tokio::test]
async fn kept_alive_connections_outlive_the_header_timeout_until_the_idle_timeout() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "  header_read_timeout: 1s\n  idle_timeout: 5s\n",
            "",
        ),
    );
    let mut conn = TcpStream::connect(addr(&pg)).await.expect("connect");
    assert_eq!(exchange(&mut conn).await, 200);
    // Idle for more than twice the header timeout: the connection is still good.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(exchange(&mut conn).await, 200, "reused after idling");
    assert!(
        closed_within(&mut conn, Duration::from_secs(30)).await,
        "an idle connection is closed at the idle timeout"
    );
}

#[tokio::test]
async fn http2_connections_idle_past_the_header_timeout() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "  header_read_timeout: 1s\n  idle_timeout: 1m\n",
            "",
        ),
    );
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP/2 client");
    for n in 0..2 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        let response = client
            .get(format!("{}/api/v1/query?query=up", pg.url))
            .send()
            .await
            .expect("an answer over HTTP/2");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200, "request {n}");
    }
    let open = scrape(&pg.url)
        .await
        .sum("promguard_server_open_connections");
    assert_eq!(open, 2.0, "the HTTP/2 connection and the scrape's");
}

#[tokio::test]
async fn past_the_bound_new_connections_get_a_503_at_once() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let pg = Promguard::start(
        BINS,
        &config(
            &backend.url,
            "  max_connections: 8\n  header_read_timeout: 1m\n",
            "",
        ),
    );
    // Let the harness's start-up probe give its slot back, so that the eight
    // slow clients take all eight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_open(&pg).await);
    }
    let (status, headers, body) = query(&pg).await.expect("the refusal arrives at once");
    assert_eq!(status, 503);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["connection"], "close");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        body,
        serde_json::json!({
            "status": "error",
            "errorType": "unavailable",
            "error": "promguard has 8 connections open, its limit; retry shortly"
        })
    );

    drop(held);
    // Until promguard has seen the slow clients go, a new connection may still
    // find the bound reached: each such refusal is counted too.
    let mut refused = 1.0;
    let answered = eventually(50, Duration::from_millis(100), async || {
        match query(&pg).await {
            Ok((200, _, _)) => true,
            Ok((503, _, _)) => {
                refused += 1.0;
                false
            }
            _ => false,
        }
    })
    .await;
    assert!(
        answered,
        "queries are answered once the slow clients are gone"
    );
    let page = scrape(&pg.url).await;
    assert_eq!(
        page.sum("promguard_server_refused_connections_total"),
        refused
    );
    assert_eq!(
        page.sum(r#"promguard_limit_settings{limit="max_connections",scope="server"}"#),
        8.0
    );
    let only_the_scrape = eventually(50, Duration::from_millis(100), async || {
        scrape(&pg.url)
            .await
            .sum("promguard_server_open_connections")
            == 1.0
    })
    .await;
    assert!(only_the_scrape, "closed connections leave the gauge");
}

/// The configuration for the file-limit tests: few backend descriptors kept back,
/// slow clients held for the whole test.
fn small_reserve(backend: &str) -> String {
    config(
        backend,
        "  header_read_timeout: 1m\n",
        "    max_idle_connections: 2\nadmission:\n  recent:\n    max_in_flight: 2\n    reserved: 1\n",
    )
}

#[tokio::test]
async fn a_low_file_limit_lowers_the_bound_so_descriptors_never_run_out() {
    const FILE_LIMIT: u64 = 128;
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let mut pg = Promguard::start_with_file_limit(BINS, &small_reserve(&backend.url), FILE_LIMIT);
    // More slow clients than the process has descriptors.
    let mut held = Vec::new();
    for _ in 0..FILE_LIMIT + 30 {
        held.push(half_open(&pg).await);
    }
    // Refusals past the few that may wait for the client are written without
    // reading the request, and may reach a client as a reset; a retry gets the 503.
    let mut refusal = None;
    for _ in 0..20 {
        match query(&pg).await {
            Ok((503, _, body)) => {
                refusal = Some(body);
                break;
            }
            Ok((status, _, body)) => panic!("{status} {body}"),
            Err(e) => assert!(!e.is_timeout(), "a refusal, not a hang"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let body = refusal.expect("a 503 refusal");
    let bound: u64 = body["error"]
        .as_str()
        .and_then(|e| e.strip_prefix("promguard has "))
        .and_then(|e| e.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the refusal names the bound: {body}"));
    assert!(bound > 0 && bound < FILE_LIMIT, "bound {bound}");
    assert!(pg.is_running());

    drop(held);
    let answered = eventually(50, Duration::from_millis(100), async || {
        answers_200(&pg).await
    })
    .await;
    assert!(
        answered,
        "queries are answered once the slow clients are gone"
    );
    let page = scrape(&pg.url).await;
    assert_eq!(
        page.sum(r#"promguard_limit_settings{limit="max_connections",scope="server"}"#),
        bound as f64
    );
    assert_eq!(page.sum("promguard_server_accept_errors_total"), 0.0);
    assert!(page.sum("promguard_server_refused_connections_total") >= 30.0);
    assert_eq!(pg.log_lines_with("server.max_connections lowered"), 1);
}

#[tokio::test]
async fn out_of_descriptors_promguard_backs_off_logs_once_and_recovers() {
    let backend = FaultServer::start(Mode::Slow(Duration::ZERO)).await;
    let mut pg = Promguard::start(BINS, &small_reserve(&backend.url));
    // Take the descriptors away from under the bound, as a leak or a burst of
    // backend connections would: a few left above those open now.
    let pid = pg.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list promguard's descriptors")
        .count() as u64;
    let limit = open + 4;
    rlimit::prlimit(
        i32::try_from(pid).expect("a Linux pid"),
        rlimit::Resource::NOFILE,
        Some((limit, limit)),
        None,
    )
    .expect("lower promguard's file limit");
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(half_open(&pg).await);
    }
    let logged = eventually(50, Duration::from_millis(100), async || {
        pg.log_lines_with("accept failed") > 0
    })
    .await;
    assert!(logged, "the accept error is logged");
    // Accepts keep failing while the slow clients hold every descriptor.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pg.is_running(), "promguard survives running out");

    drop(held);
    let answered = eventually(50, Duration::from_millis(100), async || {
        answers_200(&pg).await
    })
    .await;
    assert!(answered, "queries are answered once descriptors are free");
    assert_eq!(pg.log_lines_with("accept failed"), 1, "logged once");
    let errors = scrape(&pg.url)
        .await
        .sum("promguard_server_accept_errors_total");
    assert!(errors >= 2.0, "every failure is counted: {errors}");
}
