//! Issue 3: what a cache hit costs through promguard, against nginx's proxy_cache
//! serving the same response.
//!
//! Both sit in front of the same Prometheus; both are warmed with the same panel
//! request (form POST, as Grafana sends it) over data old enough that neither
//! refetches during the run (promguard keeps settled answers for `extent_ttl`,
//! nginx is told to keep them for an hour), and every response is checked to be a
//! hit (`X-Cache: HIT` from both). A lean load generator (hyper's HTTP/1.1
//! connections, one keep-alive connection per worker, on one thread) then sends the
//! request back to back at fixed concurrency for a fixed time, alternating the arms
//! round by round (A B, B A, ...) so machine noise hits both alike. Per arm: hit
//! throughput, p50/p99/p99.9 latency of whole responses, and the server's own CPU
//! time per hit from /proc (nginx: master and workers).
//!
//! The generator shares the 2 cores with the server under test, as any local load
//! test must; CPU per hit is the figure that does not depend on that. Neither arm
//! compresses (promguard never does; nginx's gzip is off) and neither logs requests.
//! The load is closed-loop, so latency percentiles are per response, without
//! coordinated-omission correction.
//!
//! Run: `cargo bench --bench hits`; HITS_SECS per cell (5), HITS_ROUNDS (3).
//! Writes `benches/results/hits.md`.

#[allow(dead_code)] // the shared end-to-end harness; this bench uses part of it
#[path = "../tests/e2e/harness.rs"]
mod harness;
#[path = "storm/nginx.rs"]
mod nginx;
#[path = "storm/procstat.rs"]
mod procstat;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use harness::{Promguard, backends, now_secs, repo};
use nginx::Nginx;

const CONCURRENCY: [usize; 2] = [1, 32];
/// The per-user request budget counts cache hits; a load generator is one "user"
/// sending thousands per second, which the budget is not about.
const CONFIG: &str = "limits:\n  requests: {per_second: 1000000, burst: 1000000}\n";

/// A panel request and what it is called in the report.
struct Panel {
    name: &'static str,
    body: Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arm {
    Promguard,
    Nginx,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Promguard => "promguard",
            Arm::Nginx => "nginx proxy_cache",
        }
    }
}

/// One arm at one concurrency, summed over rounds.
struct Cell {
    latency: Histogram<u64>,
    requests: u64,
    misses: u64,
    seconds: f64,
    cpu: f64,
    body_bytes: usize,
}

impl Cell {
    fn new() -> Self {
        Cell {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            requests: 0,
            misses: 0,
            seconds: 0.0,
            cpu: 0.0,
            body_bytes: 0,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = Duration::from_secs(env("HITS_SECS", 5));
    let rounds = env("HITS_ROUNDS", 3) as usize;
    let b = backends();
    let pg = Promguard::in_front_of_backends(CONFIG);
    let proxy = Nginx::start(&[("prometheus", &b.prometheus)], "1h");
    let servers = [
        (Arm::Promguard, pg.url.clone(), pg.pid()),
        (Arm::Nginx, proxy.urls[0].clone(), proxy.pid()),
    ];

    // Settled data: both caches keep it for the whole run.
    let end = (now_secs() - 1800) / 60 * 60;
    let form = |range: i64, step: i64| {
        Bytes::from(
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("query", "sum by (region) (rate(shop_orders_total[5m]))")
                .append_pair("start", &(end - range).to_string())
                .append_pair("end", &end.to_string())
                .append_pair("step", &step.to_string())
                .finish(),
        )
    };
    let panels = [
        Panel {
            name: "1 h panel at 15 s",
            body: form(3600, 15),
        },
        Panel {
            name: "24 h panel at 60 s",
            body: form(86_400, 60),
        },
    ];

    let mut out = format!(
        "Cache hits: promguard against nginx proxy_cache in front of the same Prometheus, \
         {rounds} alternating rounds of {} s per cell, {} cores shared by server and load \
         generator (one thread, one keep-alive HTTP/1.1 connection per worker), release build, \
         machine load average {:.2} before the run. Every response was checked to be a hit. \
         CPU is the server's own (/proc), per hit.\n\n\
         | response | concurrency | arm | hits/s | p50 | p99 | p99.9 | server CPU per hit | not hits |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        seconds.as_secs(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        procstat::load_average().unwrap_or(f64::NAN),
    );
    for panel in &panels {
        for (_, url, _) in &servers {
            warm(url, &panel.body).await;
        }
        for concurrency in CONCURRENCY {
            let mut cells = [Cell::new(), Cell::new()];
            for round in 0..rounds {
                let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let (_, url, pid) = &servers[i];
                    run(url, *pid, &panel.body, concurrency, seconds, &mut cells[i]).await;
                }
            }
            for (i, cell) in cells.iter().enumerate() {
                let q = |q: f64| cell.latency.value_at_quantile(q) as f64 / 1000.0;
                let _ = writeln!(
                    out,
                    "| {} ({} KiB) | {concurrency} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms | {:.1} µs | {} |",
                    panel.name,
                    cell.body_bytes / 1024,
                    servers[i].0.name(),
                    cell.requests as f64 / cell.seconds,
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    cell.cpu * 1e6 / cell.requests.max(1) as f64,
                    cell.misses,
                );
            }
            eprintln!("hits: {} at concurrency {concurrency} done", panel.name);
        }
    }
    let mib = |bytes: Option<u64>| bytes.unwrap_or(0) as f64 / 1048576.0;
    let _ = writeln!(
        out,
        "\nPeak resident memory over the run: promguard {:.0} MiB, nginx {:.0} MiB (master and \
         workers added up).",
        mib(procstat::peak_rss_bytes(pg.pid())),
        mib(Some(procstat::peak_rss_bytes_with_children(proxy.pid()))),
    );
    print!("{out}");
    std::fs::write(repo().join("benches/results/hits.md"), out)
        .expect("write benches/results/hits.md");
}

/// Fill the cache and check that the next answer is a hit.
async fn warm(url: &str, body: &Bytes) {
    let mut sender = connect(url).await;
    for attempt in 0..3 {
        let (hit, _) = send(&mut sender, url, body).await;
        if hit && attempt > 0 {
            return;
        }
    }
    panic!("{url} does not answer the panel from its cache");
}

/// `concurrency` workers sending `body` back to back for `seconds`; adds to `cell`.
async fn run(
    url: &str,
    pid: u32,
    body: &Bytes,
    concurrency: usize,
    seconds: Duration,
    cell: &mut Cell,
) {
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        senders.push(connect(url).await);
    }
    // One request per connection before the clock starts: connections are warm.
    for sender in &mut senders {
        send(sender, url, body).await;
    }
    let cpu = procstat::cpu_seconds_with_children(pid);
    let started = Instant::now();
    let deadline = started + seconds;
    let workers = senders.into_iter().map(|mut sender| {
        let (url, body) = (url.to_string(), body.clone());
        tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut misses, mut bytes) = (0, 0);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let (hit, size) = send(&mut sender, &url, &body).await;
                latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                misses += u64::from(!hit);
                bytes = size;
            }
            (latency, misses, bytes)
        })
    });
    for worker in workers.collect::<Vec<_>>() {
        let (latency, misses, bytes) = worker.await.expect("a load worker panicked");
        cell.requests += latency.len();
        cell.latency.add(&latency).expect("same histogram bounds");
        cell.misses += misses;
        cell.body_bytes = bytes;
    }
    cell.seconds += started.elapsed().as_secs_f64();
    cell.cpu += procstat::cpu_seconds_with_children(pid) - cpu;
}

async fn connect(url: &str) -> http1::SendRequest<Full<Bytes>> {
    let addr = url.trim_start_matches("http://");
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// POST the panel's form; whether the answer was a cache hit, and its size.
async fn send(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    url: &str,
    body: &Bytes,
) -> (bool, usize) {
    sender.ready().await.expect("the connection stays open");
    let request = Request::post("/api/v1/query_range")
        .header(hyper::header::HOST, url.trim_start_matches("http://"))
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(body.clone()))
        .expect("a valid request");
    let response = sender
        .send_request(request)
        .await
        .expect("the server answers");
    assert!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    let hit = response
        .headers()
        .get("x-cache")
        .is_some_and(|v| v.as_bytes() == b"HIT");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("read the body")
        .to_bytes();
    (hit, body.len())
}
