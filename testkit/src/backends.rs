//! The real Prometheus and VictoriaMetrics the tests and benches run against, started
//! by `scripts/backends.sh` on free loopback ports and loaded with generated data.
//!
//! [`backends`] starts one pair per process on first use (2 days at 30 s in
//! Prometheus, 60 days at 1 h in VictoriaMetrics) and a watchdog stops them when the
//! process exits, however it exits. [`run_backends_script`] starts a pair of any size
//! (the storm bench's three years).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{Bins, free_port, http::scrape, repo};

/// The shared real backends.
pub struct Backends {
    pub prometheus: String,
    pub victoria: String,
    /// Where a test lists a promguard for the shared Prometheus to scrape (file_sd JSON).
    pub promguard_targets: PathBuf,
}

/// The shared backends: started on first use; later callers get the same ones, or the
/// same start-up failure without trying again.
///
/// # Panics
///
/// When they did not start; `scripts/backends.sh`'s log is on stderr.
pub fn backends(bins: Bins) -> &'static Backends {
    static BACKENDS: OnceLock<Result<Backends, String>> = OnceLock::new();
    match BACKENDS.get_or_init(|| start_backends(bins)) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn start_backends(bins: Bins) -> Result<Backends, String> {
    // An hour more than the 2-day routing window, so a query whose lookback
    // reaches just past the window's edge still finds data in Prometheus.
    let dir = std::env::temp_dir().join(format!("promguard-e2e-{}", std::process::id()));
    let started = run_backends_script(
        bins,
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
    /// # Errors
    ///
    /// When the script printed no `name`.
    pub fn var(&self, name: &str) -> Result<String, String> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
            .ok_or_else(|| format!("backends.sh printed no {name}: {}", self.stdout))
    }
}

/// Start Prometheus, VictoriaMetrics and the demo-data exporter with
/// `scripts/backends.sh` on free ports, in `dir`, with `args` for the data's size;
/// block until they answer queries. A watchdog stops them and removes `dir` when this
/// process exits, however it exits.
///
/// # Errors
///
/// When the script cannot run or fails; its log is on stderr.
pub fn run_backends_script(
    bins: Bins,
    dir: &Path,
    args: &[&str],
) -> Result<StartedBackends, String> {
    let script = repo().join("scripts/backends.sh");
    let bin_dir = Path::new(bins.demo_data)
        .parent()
        .ok_or_else(|| format!("{} has no directory", bins.demo_data))?;
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
        .arg(bin_dir)
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

impl Backends {
    /// VictoriaMetrics' own count of query requests it has served.
    pub async fn vm_query_count(&self) -> f64 {
        let page = scrape(&self.victoria).await;
        ["query", "series", "label"]
            .iter()
            .map(|p| page.sum(&format!("vm_http_requests_total{{path=\"/api/v1/{p}")))
            .sum()
    }

    /// [`Backends::vm_query_count`] once it has settled: VictoriaMetrics counts a
    /// request only after answering it, a moment after the client has the answer.
    ///
    /// # Panics
    ///
    /// When it still changes after 10 s (the caller must hold [`VM_COUNTERS`]
    /// alone).
    pub async fn vm_query_count_settled(&self) -> f64 {
        let mut last = self.vm_query_count().await;
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = self.vm_query_count().await;
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("VictoriaMetrics' query count never settled (last {last})");
    }
}
