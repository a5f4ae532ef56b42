//! Small fault backends for the failure cases real backends cannot be made to show
//! on demand: hanging, answering garbage, answering slowly. Each counts requests,
//! tracks peak concurrency and notices when promguard closes a connection early.
//! Health probes (promguard's start-up check, `/-/ready`) are answered at once and
//! not counted: the faults are in answering queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy)]
pub enum Mode {
    /// Read the request and never answer.
    Hang,
    /// Answer 200 with a body that is not a Prometheus API envelope.
    Garbage,
    /// Answer an empty vector after a delay.
    Slow(Duration),
    /// Answer at once with a valid vector of about this many bytes.
    Big(usize),
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    /// Connections the client closed before we answered.
    pub abandoned: AtomicUsize,
    /// Calls answered in full.
    pub completed: AtomicUsize,
    /// When set, every mode answers garbage: a backend that broke mid-run.
    pub broken: AtomicBool,
}

pub struct FaultServer {
    pub url: String,
    pub counters: Arc<Counters>,
}

const EMPTY_VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;

impl FaultServer {
    pub async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault server");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, mode, c.clone()));
            }
        });
        FaultServer { url, counters }
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, mode: Mode, counters: Arc<Counters>) {
    let Some(request_line) = read_request(&mut stream).await else {
        return;
    };
    if request_line.starts_with("get /-/ready ") {
        respond(&mut stream, "text/plain", "ready").await;
        return;
    }
    counters.requests.fetch_add(1, Ordering::SeqCst);
    let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counters.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    let mode = if counters.broken.load(Ordering::SeqCst) {
        Mode::Garbage
    } else {
        mode
    };
    match mode {
        Mode::Hang => {
            wait_for_close(&mut stream).await;
            counters.abandoned.fetch_add(1, Ordering::SeqCst);
        }
        Mode::Garbage => respond(&mut stream, "text/html", "<html>502 Bad Gateway</html>").await,
        Mode::Big(size) => {
            let body = format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"pad":"{}"}},"value":[1,"1"]}}]}}}}"#,
                "x".repeat(size)
            );
            respond(&mut stream, "application/json", &body).await;
            counters.completed.fetch_add(1, Ordering::SeqCst);
        }
        Mode::Slow(delay) => {
            tokio::select! {
                () = tokio::time::sleep(delay) => {
                    respond(&mut stream, "application/json", EMPTY_VECTOR).await;
                    counters.completed.fetch_add(1, Ordering::SeqCst);
                }
                () = wait_for_close(&mut stream) => {
                    counters.abandoned.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// Read headers and a Content-Length body: the request line, or `None` if the peer
/// left first.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return None;
        };
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return head.lines().next().map(str::to_string);
        }
    }
}

async fn wait_for_close(stream: &mut TcpStream) {
    let mut chunk = [0u8; 512];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            return;
        }
    }
}

async fn respond(stream: &mut TcpStream, content_type: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
