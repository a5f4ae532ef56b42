//! Test harness: real backends, the real promguard binary, and answer comparison.
//!
//! The backends (Prometheus + VictoriaMetrics loaded with generated data) are
//! started once per test process by `scripts/backends.sh` and stopped by a watchdog
//! when the process exits. Each test starts its own promguard on a free port.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on loopback")
}

pub fn now_secs() -> i64 {
    now_ms().div_euclid(1000)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Unix seconds as Grafana's Prometheus data source writes a time (`formatTime`, Go's
/// shortest float form): `1795770042`, `1795770042.12`, `1795770042.123`.
pub fn grafana_seconds(ms: i64) -> String {
    let (whole, fraction) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{fraction:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// The shared real backends.
pub struct Backends {
    pub prometheus: String,
    pub victoria: String,
    /// Where a test lists a promguard for the shared Prometheus to scrape (file_sd JSON).
    pub promguard_targets: PathBuf,
}

/// Start the backends on first use; later callers get the same ones, or the same
/// start-up failure without trying again.
pub fn backends() -> &'static Backends {
    static BACKENDS: OnceLock<Result<Backends, String>> = OnceLock::new();
    match BACKENDS.get_or_init(start_backends) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn start_backends() -> Result<Backends, String> {
    // An hour more than the 2-day routing window, so a query whose lookback
    // reaches just past the window's edge still finds data in Prometheus.
    let dir = std::env::temp_dir().join(format!("promguard-e2e-{}", std::process::id()));
    let started = run_backends_script(
        &dir,
        &["--instances", "1", "--recent", "49h", "--long-term", "60d"],
    )?;
    Ok(Backends {
        prometheus: started.var("PROMETHEUS_URL")?,
        victoria: started.var("VM_URL")?,
        promguard_targets: started.var("PROMGUARD_TARGETS_DIR")?.into(),
    })
}

/// What `scripts/backends.sh start` printed: `NAME=value` lines.
pub struct StartedBackends {
    stdout: String,
}

impl StartedBackends {
    pub fn var(&self, name: &str) -> Result<String, String> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
            .ok_or_else(|| format!("backends.sh printed no {name}: {}", self.stdout))
    }
}

/// Start Prometheus, VictoriaMetrics and the exporter with `scripts/backends.sh`
/// on free ports, in `dir`, with `args` for the data's size; block until they
/// answer queries. A watchdog stops them and removes `dir` when this process
/// exits, however it exits.
pub fn run_backends_script(dir: &Path, args: &[&str]) -> Result<StartedBackends, String> {
    let script = repo().join("scripts/backends.sh");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_demo-data"))
        .parent()
        .expect("binary has a directory")
        .to_path_buf();
    // The watchdog outlives us on purpose, so it is never waited for.
    #[allow(clippy::zombie_processes)]
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash {script} stop --dir {dir}; rm -rf {dir}",
            pid = std::process::id(),
            script = script.display(),
            dir = dir.display(),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the backend watchdog: {e}"))?;
    let output = Command::new("bash")
        .arg(&script)
        .args(["start", "--dir"])
        .arg(dir)
        .args(["--prom-port", &free_port().to_string()])
        .args(["--vm-port", &free_port().to_string()])
        .args(["--exporter-port", &free_port().to_string()])
        .args(args)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run scripts/backends.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "scripts/backends.sh start failed ({}); its log is above",
            output.status
        ));
    }
    Ok(StartedBackends {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}

/// Tests that query VictoriaMetrics hold this shared; a test that reads VM's own
/// request counters to prove promguard sent nothing holds it exclusively.
pub static VM_COUNTERS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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

/// VictoriaMetrics' own count of query requests it has served.
pub async fn vm_query_count() -> f64 {
    let page = scrape(&backends().victoria).await;
    ["query", "series", "label"]
        .iter()
        .map(|p| page.sum(&format!("vm_http_requests_total{{path=\"/api/v1/{p}")))
        .sum()
}

/// A running promguard process, killed on drop.
pub struct Promguard {
    pub url: String,
    child: Child,
    /// Its log lines (warnings and errors) so far.
    log: Arc<Mutex<Vec<String>>>,
    /// Its working directory, holding the config file if it has one. A default
    /// relative path (the sale-mode state file) then reads and writes nothing of the
    /// repository's.
    _dir: tempfile::TempDir,
}

impl Promguard {
    /// Start promguard with `config` (YAML; `listen` is added here).
    pub fn start(config: &str) -> Self {
        Self::from_config(config, None)
    }

    /// The same, under a file limit (RLIMIT_NOFILE, soft and hard) of `limit`.
    pub fn start_with_file_limit(config: &str, limit: u64) -> Self {
        Self::from_config(config, Some(limit))
    }

    fn from_config(config: &str, file_limit: Option<u64>) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("create a working directory");
        let file = dir.path().join("promguard.yaml");
        std::fs::write(&file, format!("listen: 127.0.0.1:{port}\n{config}"))
            .expect("write the config");
        Self::spawn(
            port,
            dir,
            &["--config".as_ref(), file.as_os_str()],
            file_limit,
        )
    }

    /// Start promguard from command-line flags alone, without a config file, as the
    /// README's quick start does (`--listen` is added here).
    pub fn with_flags(flags: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let args: Vec<&OsStr> = ["--listen", &listen]
            .iter()
            .chain(flags)
            .map(|arg| OsStr::new(*arg))
            .collect();
        Self::spawn(
            port,
            tempfile::tempdir().expect("create a working directory"),
            &args,
            None,
        )
    }

    fn spawn(port: u16, dir: tempfile::TempDir, args: &[&OsStr], file_limit: Option<u64>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_promguard"));
        command
            .arg("serve")
            .args(args)
            .current_dir(dir.path())
            .env("PROMGUARD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(limit) = file_limit {
            // SAFETY: setrlimit is a single system call, safe between fork and exec.
            unsafe {
                command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
            }
        }
        let mut child = command.spawn().expect("spawn promguard");
        // Keep promguard's log (stdout) and any start-up error (stderr) for the
        // test, and forward them to the test output for failures, without
        // blocking promguard.
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for output in stdout.into_iter().chain(stderr) {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    eprintln!("[promguard:{port}] {line}");
                    if let Ok(mut log) = log.lock() {
                        log.push(line);
                    }
                }
            });
        }
        let url = format!("http://127.0.0.1:{port}");
        wait_listening(&url, &mut child);
        Promguard {
            url,
            child,
            log,
            _dir: dir,
        }
    }

    /// How many of its log lines so far contain `text`.
    pub fn log_lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .map_or(0, |log| log.iter().filter(|l| l.contains(text)).count())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Start promguard in front of the shared real backends, with `extra` config.
    pub fn in_front_of_backends(extra: &str) -> Self {
        Self::with_recent_window("2d", extra)
    }

    /// The same, routing to the long-term store anything older than `window`.
    pub fn with_recent_window(window: &str, extra: &str) -> Self {
        let b = backends();
        Self::start(&format!(
            "backends:\n  recent:\n    url: {}\n    window: {window}\n  long_term:\n    url: {}\n{extra}",
            b.prometheus, b.victoria
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Promguard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(url: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = format!("{url}/-/healthy");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("promguard exited early with {status}");
        }
        if probe::get_ok(&healthy).unwrap_or(false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("promguard did not start listening at {url}");
}

/// A minimal blocking GET for start-up polling, outside any async runtime.
mod probe {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub fn get_ok(url: &str) -> std::io::Result<bool> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = TcpStream::connect(host)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.starts_with("HTTP/1.1 200"))
    }
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

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build test client")
}

/// POST a form, the way Grafana sends panel queries.
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

/// Compare two API answers. Prometheus answers must be equal exactly (as strings);
/// VictoriaMetrics' own cache changes the last digits between calls, so sample
/// values may differ by a relative `tolerance`.
pub fn assert_same_answer(got: &Value, want: &Value, tolerance: f64, what: &str) {
    if let Some(path) = differs(got, want, tolerance) {
        panic!("{what}: answers differ at {path}\n got: {got}\nwant: {want}");
    }
}

/// Where two answers differ (as [`assert_same_answer`] compares them), if they do.
pub fn differs(got: &Value, want: &Value, tolerance: f64) -> Option<String> {
    same(got, want, tolerance, String::new()).err()
}

fn same(a: &Value, b: &Value, tol: f64, path: String) -> Result<(), String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return Err(format!("{path} (keys)"));
            }
            for (k, v) in x {
                let w = y.get(k).ok_or_else(|| format!("{path}.{k} (missing)"))?;
                same(v, w, tol, format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!("{path} (length {} vs {})", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .try_for_each(|(i, (v, w))| same(v, w, tol, format!("{path}[{i}]")))
        }
        (Value::String(x), Value::String(y)) if x != y && tol > 0.0 => {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(p), Ok(q)) if (p - q).abs() <= tol * p.abs().max(q.abs()) => Ok(()),
                _ => Err(path),
            }
        }
        _ if a == b => Ok(()),
        _ => Err(path),
    }
}

/// Sort a result array by its `metric` labels, since some endpoints (series, VM's
/// matrices) do not promise an order.
pub fn sorted_by_metric(mut v: Value) -> Value {
    if let Some(arr) = v.pointer_mut("/data/result").and_then(Value::as_array_mut) {
        arr.sort_by_key(|s| s["metric"].to_string());
    }
    if let Some(arr) = v.pointer_mut("/data").and_then(Value::as_array_mut) {
        arr.sort_by_key(|s| s.to_string());
    }
    v
}

/// xorshift64*: a seeded, dependency-free generator so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> i64 {
        (self.next() % n) as i64
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// POST a range query; returns (X-Cache, X-Promguard-Backend, body).
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
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    };
    let (cache, backend) = (header("x-cache"), header("x-promguard-backend"));
    let text = response.text().await.expect("body");
    (cache, backend, serde_json::from_str(&text).expect("JSON"))
}
