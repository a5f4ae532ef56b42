//! The README's quick start as a new user meets it: `scripts/demo.sh` (on free ports,
//! with a few hours of data instead of years), every command its banner prints, and
//! the README's marked shell block, run as printed against it. Also that the demo's
//! history meets the live scrapes without a gap, and that it writes nothing outside
//! its directory and stops everything on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use promguard_testkit::{free_port, repo};

use crate::BINS;

/// The marker in README.md before the shell block this test runs.
const README_MARKER: &str = "<!-- tested: tests/e2e/demo.rs";
/// The banner's last line; the live summary follows.
const BANNER_END: &str = "promguard's counters every 10 s:";

/// The demo, stopped with SIGTERM (its own clean-up path) on drop.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Demo {
    fn start(dir: &Path, ports: &Ports) -> Demo {
        let bin_dir = Path::new(BINS.promguard)
            .parent()
            .expect("binary directory");
        let mut child = Command::new("bash")
            .arg(repo().join("scripts/demo.sh"))
            .args(["--dir".as_ref(), dir.as_os_str()])
            .args(["--port", &ports.promguard.to_string()])
            .args(["--prometheus-port", &ports.prometheus.to_string()])
            .args(["--vm-port", &ports.vm.to_string()])
            .args(["--exporter-port", &ports.exporter.to_string()])
            .args(["--recent", "3h", "--long-term", "3d"])
            .args(["--bin-dir".as_ref(), bin_dir.as_os_str()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run scripts/demo.sh");
        let stdout = child.stdout.take().expect("stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[demo] {line}");
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Demo { child, lines }
    }

    /// The banner, up to the line before the live summary.
    fn banner(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == BANNER_END => return banner,
                Ok(line) => banner.push(line),
                Err(e) => panic!("the demo printed no banner ({e}); so far: {banner:#?}"),
            }
        }
    }

    /// SIGTERM, as a `kill` or a terminal closing would send, and its exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) && self.stop().is_none() {
            let _ = self.child.kill();
        }
    }
}

struct Ports {
    promguard: u16,
    prometheus: u16,
    vm: u16,
    exporter: u16,
}

/// Run `script` with bash as a person would paste it, in the checkout.
fn sh(script: &str) -> (bool, String) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(repo())
        .env("USER", "demo-test")
        .env_remove("PROMGUARD_ADMIN_TOKEN")
        .env_remove("PROMGUARD_URL")
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The command the banner prints that contains `needle`.
fn command<'a>(commands: &'a [String], needle: &str) -> &'a str {
    commands
        .iter()
        .find(|c| c.contains(needle))
        .unwrap_or_else(|| panic!("the banner has no command with {needle:?}: {commands:#?}"))
}

fn run_ok(script: &str) -> String {
    let (ok, out) = sh(script);
    assert!(ok, "failed: {script}\n{out}");
    out
}

/// The value of a `name  url` line of the banner.
fn banner_url(banner: &[String], name: &str) -> String {
    banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {name} in the banner: {banner:#?}"))
        .to_string()
}

/// Range query `query` over `span` seconds ending a minute ago (VictoriaMetrics holds
/// back the newest seconds) at 30 s steps, straight at `backend`: its one series'
/// values.
fn last_values(backend: &str, query: &str, span: i64) -> Vec<f64> {
    let end = promguard_testkit::now_secs() - 60;
    let script = format!(
        "curl -fsSG {backend}/api/v1/query_range --data-urlencode {query} -d start={} -d end={end} -d step=30",
        end - span,
        query = shell_quote(&format!("query={query}")),
    );
    let body: serde_json::Value = serde_json::from_str(&run_ok(&script)).expect("JSON");
    let result = body["data"]["result"].as_array().expect("a matrix");
    assert_eq!(result.len(), 1, "{query} on {backend}: {body}");
    result[0]["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|p| {
            p[1].as_str()
                .and_then(|v| v.parse().ok())
                .expect("a number")
        })
        .collect()
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The README's marked block, with the demo's ports for the default ones and the
/// test's binaries for the release build's.
fn readme_block(ports: &Ports) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let after = readme
        .split_once(README_MARKER)
        .expect("README.md has the marked block")
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("a ```sh block after the marker")
        .0;
    let bin_dir = Path::new(BINS.promguard)
        .parent()
        .expect("binary directory");
    block
        .replace("$PWD/target/release", &bin_dir.display().to_string())
        .replace("127.0.0.1:9091", &format!("127.0.0.1:{}", ports.promguard))
}

#[test]
fn the_demo_works_as_its_banner_and_the_readme_say() {
    let dir = tempfile::tempdir().expect("demo directory");
    let ports = Ports {
        promguard: free_port(),
        prometheus: free_port(),
        vm: free_port(),
        exporter: free_port(),
    };
    let mut demo = Demo::start(dir.path(), &ports);
    let banner = demo.banner();
    let commands: Vec<String> = banner
        .iter()
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect();

    // "Orders per minute by region, now": answered, one series per region, and a
    // repeat within the instant step is a hit.
    let instant = command(&commands, "/api/v1/query --data-urlencode");
    let first = run_ok(instant);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("x-promguard-backend: recent"), "{first}");
    let regions = first.matches("\"region\"").count();
    assert!(regions >= 8, "one value per region: {first}");
    let hit = (0..4).any(|_| run_ok(instant).contains("x-cache: HIT"));
    assert!(
        hit,
        "repeating an instant query without time= is a cache hit"
    );

    let month = command(&commands, "-D - -o /dev/null");
    let out = run_ok(month);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("x-promguard-backend: long_term"), "{out}");

    let on = run_ok(command(&commands, "sale-mode on"));
    assert!(on.contains("\"source\": \"manual\""), "{on}");
    let cached = commands
        .iter()
        .find(|c| c.contains("status=\"created\"") && c.contains("-o /dev/null -w"))
        .expect("the banner repeats the month in sale mode");
    let cached = run_ok(cached);
    assert_eq!(
        cached.trim(),
        "HTTP 200",
        "the month in the cache is answered"
    );
    let refused = run_ok(command(&commands, "-w '\\nHTTP %{http_code}\\n'"));
    assert!(refused.contains("HTTP 422"), "{refused}");
    assert!(
        refused.contains("refused by rule 'recent-data-only'"),
        "{refused}"
    );
    let curated = run_ok(command(&commands, "X-Dashboard-Uid: orders"));
    assert_eq!(
        curated.trim(),
        "HTTP 200",
        "the curated dashboard is exempt"
    );
    let status = run_ok(command(&commands, "sale-mode status"));
    assert!(status.contains("demo: the sale started early"), "{status}");
    let auto = run_ok(command(&commands, "sale-mode auto"));
    assert!(auto.contains("\"source\": \"schedule\""), "{auto}");
    let explain = run_ok(command(&commands, "policy explain"));
    assert!(explain.contains("decision:  refuse"), "{explain}");
    assert!(explain.contains("panels-up-to-12h"), "{explain}");
    assert_eq!(
        commands.len(),
        9,
        "every printed command is checked: {commands:#?}"
    );

    // The README's block, as printed, against the demo (its own ports).
    let (ok, out) = sh(&readme_block(&ports));
    assert!(ok, "the README's commands failed:\n{out}");
    assert!(out.contains("refused by rule"), "{out}");
    assert!(
        out.contains("HTTP/1.1 200"),
        "the month in the cache is answered in sale mode: {out}"
    );

    // The generated history reaches the first live scrape: over the last 2 h (the
    // data ends minutes ago), every 30 s step has the same number of series with a
    // sample within a minute, raw and recorded, in both backends.
    let prometheus = banner_url(&banner, "Prometheus");
    let victoria = banner_url(&banner, "VictoriaMetrics");
    for (backend, query) in [
        (&prometheus, "count(count_over_time(shop_orders_total[1m]))"),
        (
            &prometheus,
            "count(count_over_time(region_channel_status:shop_orders:rate1m[1m]))",
        ),
        (&victoria, "count(count_over_time(shop_orders_total[1m]))"),
    ] {
        let values = last_values(backend, query, 7200);
        assert_eq!(
            values.len(),
            241,
            "a point every 30 s from {backend}: {query}"
        );
        assert!(
            values.iter().all(|v| *v == values[0]),
            "no gap in {query} on {backend}: {values:?}"
        );
    }

    let status = demo.stop().expect("the demo stops on SIGTERM");
    assert_eq!(status.code(), Some(143), "{status}");
    assert!(
        dir.path().join("state/sale-mode.json").is_file(),
        "the sale-mode state is kept in the demo's directory"
    );
    assert!(
        !repo().join("promguard-state").exists(),
        "nothing is written into the checkout"
    );
    for port in [ports.promguard, ports.prometheus, ports.vm, ports.exporter] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is free again"
        );
    }
}

#[test]
fn a_busy_port_is_named_with_the_option_that_moves_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("address").port();
    let dir = tempfile::tempdir().expect("demo directory");
    let out = Command::new("bash")
        .arg(repo().join("scripts/demo.sh"))
        .args(["--dir".as_ref(), dir.path().as_os_str()])
        .env("PROMGUARD_DEMO_PORT", free_port().to_string())
        .env("PROMGUARD_DEMO_PROMETHEUS_PORT", port.to_string())
        .output()
        .expect("run scripts/demo.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("port {port} (Prometheus) on 127.0.0.1 is in use"))
            && stderr.contains("--prometheus-port N or PROMGUARD_DEMO_PROMETHEUS_PORT=N"),
        "{stderr}"
    );
}
