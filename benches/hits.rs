//! Issue 3: what a cache hit costs through promguard, against nginx's proxy_cache
//! serving the same response.
//!
//! Both sit in front of the same Prometheus; both are warmed with the same panel
//! request (form POST, as Grafana sends it) over data old enough that neither
//! refetches during the run (promguard keeps settled answers for `extent_ttl`,
//! nginx is told to keep them for an hour), and every response is checked to be a
//! hit (`X-Cache: HIT` from both), and gzipped when the client asked for it. A lean
//! load generator (hyper's HTTP/1.1
//! connections, one keep-alive connection per worker, on one thread) then sends the
//! request back to back at fixed concurrency for a fixed time, alternating the arms
//! round by round (A B, B A, ...) so machine noise hits both alike. Per arm: hit
//! throughput, p50/p99/p99.9 latency of whole responses, and the server's own CPU
//! time per hit from /proc (nginx: master and workers).
//!
//! Each panel is served twice over: plain, and gzipped, since Grafana's client always
//! asks for gzip. promguard gzips a stored answer once and keeps the copy; nginx
//! passes the client's Accept-Encoding to Prometheus, caches its gzipped answer (the
//! encoding is part of the cache key) and sends the file as it is. The generator shares
//! the 2 cores with the server under test, as any local load test must; CPU per hit is
//! the figure that does not depend on that. Neither arm logs requests.
//! The load is closed-loop, so latency percentiles are per response, without
//! coordinated-omission correction.
//!
//! Run: `cargo bench --bench hits`; HITS_SECS per cell (5), HITS_ROUNDS (3).
//! Writes `benches/results/hits.md`. HITS_BASELINE=/path/to/an/older/promguard adds
//! that binary as a third arm, in the same rotation: a regression check in one run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use promguard_testkit::nginx::Nginx;
use promguard_testkit::{Bins, Promguard, backends, now_secs, procstat, repo};

/// This package's binaries, which the testkit starts.
const BINS: Bins = promguard_testkit::bins!();

const CONCURRENCY: [usize; 2] = [1, 32];
/// The per-user request budget counts cache hits; a load generator is one "user"
/// sending thousands per second, which the budget is not about.
const CONFIG: &str = "limits:\n  requests: {per_second: 1000000, burst: 1000000}\n";

/// How the client asks for the body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    const ALL: [Encoding; 2] = [Encoding::Identity, Encoding::Gzip];

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "plain",
            Encoding::Gzip => "gzip",
        }
    }
}

/// A panel request and what it is called in the report.
struct Panel {
    name: &'static str,
    body: Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arm {
    Promguard,
    Nginx,
    /// An older promguard (HITS_BASELINE).
    Baseline,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Promguard => "promguard",
            Arm::Nginx => "nginx proxy_cache",
            Arm::Baseline => "promguard baseline",
        }
    }
}

/// One arm at one concurrency, summed over rounds.
struct Cell {
    latency: Histogram<u64>,
    requests: u64,
    /// Answers that were not hits, or not gzipped when gzip was asked for.
    unexpected: u64,
    seconds: f64,
    cpu: f64,
    body_bytes: usize,
}

impl Cell {
    fn new() -> Self {
        Cell {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            requests: 0,
            unexpected: 0,
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
    let b = backends(BINS);
    let pg = Promguard::in_front_of_backends(BINS, CONFIG);
    let proxy = Nginx::start(&[("prometheus", &b.prometheus)], "1h");
    let baseline = BINS
        .promguard_from_env("HITS_BASELINE")
        .map(|bins| Promguard::in_front_of_backends(bins, CONFIG));
    let mut servers = vec![
        (Arm::Promguard, pg.url.clone(), pg.pid()),
        (Arm::Nginx, proxy.urls[0].clone(), proxy.pid()),
    ];
    if let Some(older) = &baseline {
        servers.push((Arm::Baseline, older.url.clone(), older.pid()));
    }

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
         machine load average {:.2} before the run. Every response was checked to be a hit \
         (and gzipped when asked); \"unexpected\" counts those that were not. CPU is the \
         server's own (/proc), per hit. Sizes are bytes on the wire.\n\n\
         | response | encoding | concurrency | arm | hits/s | p50 | p99 | p99.9 | server CPU per hit | unexpected |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        seconds.as_secs(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        procstat::load_average().unwrap_or(f64::NAN),
    );
    for panel in &panels {
        for encoding in Encoding::ALL {
            for (_, url, _) in &servers {
                warm(url, &panel.body, encoding).await;
            }
            for concurrency in CONCURRENCY {
                let mut cells: Vec<Cell> = servers.iter().map(|_| Cell::new()).collect();
                for round in 0..rounds {
                    // Each round starts with the next arm, so none always goes first.
                    for k in 0..servers.len() {
                        let i = (round + k) % servers.len();
                        let (_, url, pid) = &servers[i];
                        let load = Load {
                            url,
                            body: &panel.body,
                            encoding,
                            concurrency,
                            seconds,
                        };
                        load.run(*pid, &mut cells[i]).await;
                    }
                }
                for (i, cell) in cells.iter().enumerate() {
                    let q = |q: f64| cell.latency.value_at_quantile(q) as f64 / 1000.0;
                    let _ = writeln!(
                        out,
                        "| {} ({} KiB) | {} | {concurrency} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms | {:.1} µs | {} |",
                        panel.name,
                        cell.body_bytes / 1024,
                        encoding.name(),
                        servers[i].0.name(),
                        cell.requests as f64 / cell.seconds,
                        q(0.5),
                        q(0.99),
                        q(0.999),
                        cell.cpu * 1e6 / cell.requests.max(1) as f64,
                        cell.unexpected,
                    );
                }
                eprintln!(
                    "hits: {} {} at concurrency {concurrency} done",
                    panel.name,
                    encoding.name()
                );
            }
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
async fn warm(url: &str, body: &Bytes, encoding: Encoding) {
    let mut sender = connect(url).await;
    for attempt in 0..3 {
        let (expected, _) = send(&mut sender, url, body, encoding).await;
        if expected && attempt > 0 {
            return;
        }
    }
    panic!(
        "{url} does not answer the panel ({}) from its cache",
        encoding.name()
    );
}

/// One arm at one concurrency for one round.
struct Load<'a> {
    url: &'a str,
    body: &'a Bytes,
    encoding: Encoding,
    concurrency: usize,
    seconds: Duration,
}

impl Load<'_> {
    /// Workers sending the request back to back for `seconds`; adds to `cell`, with
    /// the CPU time of the server at `pid`.
    async fn run(&self, pid: u32, cell: &mut Cell) {
        let mut senders = Vec::with_capacity(self.concurrency);
        for _ in 0..self.concurrency {
            senders.push(connect(self.url).await);
        }
        // One request per connection before the clock starts: connections are warm.
        for sender in &mut senders {
            send(sender, self.url, self.body, self.encoding).await;
        }
        let cpu = procstat::cpu_seconds_with_children(pid);
        let started = Instant::now();
        let deadline = started + self.seconds;
        let workers = senders.into_iter().map(|mut sender| {
            let (url, body, encoding) = (self.url.to_string(), self.body.clone(), self.encoding);
            tokio::spawn(async move {
                let mut latency =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let (mut unexpected, mut bytes) = (0, 0);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let (expected, size) = send(&mut sender, &url, &body, encoding).await;
                    latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    unexpected += u64::from(!expected);
                    bytes = size;
                }
                (latency, unexpected, bytes)
            })
        });
        for worker in workers.collect::<Vec<_>>() {
            let (latency, unexpected, bytes) = worker.await.expect("a load worker panicked");
            cell.requests += latency.len();
            cell.latency.add(&latency).expect("same histogram bounds");
            cell.unexpected += unexpected;
            cell.body_bytes = bytes;
        }
        cell.seconds += started.elapsed().as_secs_f64();
        cell.cpu += procstat::cpu_seconds_with_children(pid) - cpu;
    }
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

/// POST the panel's form; whether the answer was a cache hit in the encoding asked
/// for, and its size on the wire.
async fn send(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    url: &str,
    body: &Bytes,
    encoding: Encoding,
) -> (bool, usize) {
    sender.ready().await.expect("the connection stays open");
    let mut request = Request::post("/api/v1/query_range")
        .header(hyper::header::HOST, url.trim_start_matches("http://"))
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
    if encoding == Encoding::Gzip {
        request = request.header(hyper::header::ACCEPT_ENCODING, "gzip");
    }
    let request = request
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
    let header = |name| response.headers().get(name).map(|v| v.as_bytes());
    let hit = header("x-cache") == Some(b"HIT".as_slice());
    let gzipped = header("content-encoding") == Some(b"gzip".as_slice());
    let expected = hit && gzipped == (encoding == Encoding::Gzip);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("read the body")
        .to_bytes();
    (expected, body.len())
}
