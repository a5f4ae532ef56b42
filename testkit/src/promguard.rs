//! promguard processes: the real binary, started from a config file or from flags on
//! a free port, with its log kept for assertions and killed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Bins, backends, free_port};

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
    ///
    /// # Panics
    ///
    /// When it cannot be started or does not listen within 20 s; its log is on stderr.
    pub fn start(bins: Bins, config: &str) -> Self {
        Self::from_config(bins, config, None, &[])
    }

    /// The same, under a file limit (RLIMIT_NOFILE, soft and hard) of `limit`.
    ///
    /// # Panics
    ///
    /// As [`Promguard::start`].
    pub fn start_with_file_limit(bins: Bins, config: &str, limit: u64) -> Self {
        Self::from_config(bins, config, Some(limit), &[])
    }

    /// The same, with `env` added to its environment.
    ///
    /// # Panics
    ///
    /// As [`Promguard::start`].
    pub fn start_with_env(bins: Bins, config: &str, env: &[(&str, &str)]) -> Self {
        Self::from_config(bins, config, None, env)
    }

    fn from_config(
        bins: Bins,
        config: &str,
        file_limit: Option<u64>,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("create a working directory");
        let file = dir.path().join("promguard.yaml");
        std::fs::write(&file, format!("listen: 127.0.0.1:{port}\n{config}"))
            .expect("write the config");
        Self::spawn(
            bins,
            port,
            dir,
            &["--config".as_ref(), file.as_os_str()],
            file_limit,
            env,
        )
    }

    /// Start promguard from command-line flags alone, without a config file, as the
    /// README's quick start does (`--listen` is added here).
    ///
    /// # Panics
    ///
    /// As [`Promguard::start`].
    pub fn with_flags(bins: Bins, flags: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let args: Vec<&OsStr> = ["--listen", &listen]
            .iter()
            .chain(flags)
            .map(|arg| OsStr::new(*arg))
            .collect();
        Self::spawn(
            bins,
            port,
            tempfile::tempdir().expect("create a working directory"),
            &args,
            None,
            &[],
        )
    }

    fn spawn(
        bins: Bins,
        port: u16,
        dir: tempfile::TempDir,
        args: &[&OsStr],
        file_limit: Option<u64>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(bins.promguard);
        command.envs(env.iter().copied());
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
    ///
    /// # Panics
    ///
    /// As [`Promguard::start`] and [`backends()`].
    pub fn in_front_of_backends(bins: Bins, extra: &str) -> Self {
        Self::with_recent_window(bins, "2d", extra)
    }

    /// The same, routing to the long-term store anything older than `window`.
    ///
    /// # Panics
    ///
    /// As [`Promguard::start`] and [`backends()`].
    pub fn with_recent_window(bins: Bins, window: &str, extra: &str) -> Self {
        let b = backends(bins);
        Self::start(
            bins,
            &format!(
                "backends:\n  recent:\n    url: {}\n    window: {window}\n  long_term:\n    url: {}\n{extra}",
                b.prometheus, b.victoria
            ),
        )
    }

    /// Wait until it reports `promguard_redis_up 1` (its heartbeat connects within a
    /// second of start-up).
    ///
    /// # Panics
    ///
    /// When it does not within `within`.
    pub async fn until_redis_up(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while crate::scrape(&self.url).await.sum("promguard_redis_up") < 1.0 {
            assert!(
                Instant::now() < deadline,
                "{} never reached redis",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
