//! nginx with proxy_cache in front of the backends: the baseline the hits and storm
//! benches measure promguard's cache against; and nginx as a plain round-robin
//! balancer in front of the storm bench's fleet of promguard replicas.
//!
//! Renders `nginx/nginx.conf` with one `nginx/cached-server.conf` block per backend
//! (or one `nginx/balancer-server.conf` block) into a temporary prefix, runs nginx
//! (Debian package nginx-light) in the foreground with as many workers as cores
//! (promguard's runtime uses as many threads), and stops it on drop.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

const MAIN: &str = include_str!("nginx/nginx.conf");
const SERVER: &str = include_str!("nginx/cached-server.conf");
const BALANCER: &str = include_str!("nginx/balancer-server.conf");

/// A running nginx, stopped on drop.
pub struct Nginx {
    /// One URL per backend given to [`Nginx::start`], in the same order; the
    /// balancer's alone for [`Nginx::balance`].
    pub urls: Vec<String>,
    child: Child,
    prefix: tempfile::TempDir,
}

impl Nginx {
    /// Start nginx caching every successful answer for `ttl` (nginx syntax, `30s`),
    /// with one server per `(name, backend URL)`.
    ///
    /// # Panics
    ///
    /// When nginx cannot be started or does not listen within 10 s.
    pub fn start(backends: &[(&str, &str)], ttl: &str) -> Self {
        let prefix = prefix();
        let mut servers = String::new();
        let mut urls = Vec::new();
        for (name, backend) in backends {
            let port = free_port();
            let upstream = backend
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            servers.push_str(
                &SERVER
                    .replace("{{NAME}}", name)
                    .replace("{{UPSTREAM}}", &upstream)
                    .replace("{{PORT}}", &port.to_string())
                    .replace("{{TTL}}", ttl),
            );
            urls.push(format!("http://127.0.0.1:{port}"));
        }
        Self::run(prefix, &servers, urls)
    }

    /// Start nginx balancing every request round-robin over `replicas` (their base
    /// URLs), caching nothing; its one URL is `urls[0]`. `name` names the upstream.
    ///
    /// # Panics
    ///
    /// When nginx cannot be started or does not listen within 10 s.
    pub fn balance(name: &str, replicas: &[&str]) -> Self {
        let prefix = prefix();
        let port = free_port();
        let members: String = replicas
            .iter()
            .map(|url| {
                let addr = url.trim_start_matches("http://").trim_end_matches('/');
                format!("        server {addr};\n")
            })
            .collect();
        let server = BALANCER
            .replace("{{NAME}}", name)
            .replace("{{REPLICAS}}", &members)
            .replace("{{PORT}}", &port.to_string());
        Self::run(prefix, &server, vec![format!("http://127.0.0.1:{port}")])
    }

    /// Render the main template around `servers` into `prefix`, start nginx there and
    /// wait until it listens on every one of `urls`.
    fn run(prefix: tempfile::TempDir, servers: &str, urls: Vec<String>) -> Self {
        let root = prefix.path().display().to_string();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = MAIN
            .replace("{{SERVERS}}", servers)
            .replace("{{WORKERS}}", &workers.to_string())
            .replace("{{PREFIX}}", &root);
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(prefix.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx (Debian package nginx-light)");
        let mut nginx = Nginx {
            urls,
            child,
            prefix,
        };
        nginx.wait_listening();
        nginx
    }

    /// The master's pid; its workers are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for url in &self.urls {
            let addr = url.trim_start_matches("http://");
            while TcpStream::connect(addr).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("nginx exited with {status}: {}", self.error_log());
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {addr}: {}",
                    self.error_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL would orphan the workers, which keep serving; `-s stop` is SIGTERM
        // to the master, which takes its workers down with it.
        let stopped = Command::new("nginx")
            .arg("-p")
            .arg(self.prefix.path())
            .arg("-c")
            .arg(self.prefix.path().join("nginx.conf"))
            .args(["-s", "stop"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped || !exits_within(&mut self.child, Duration::from_secs(10)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A temporary prefix nginx's workers can use.
fn prefix() -> tempfile::TempDir {
    let prefix = tempfile::tempdir().expect("create the nginx prefix");
    // Workers drop root privileges (to nobody) and must reach their cache and temp
    // directories below the prefix.
    std::fs::set_permissions(prefix.path(), std::fs::Permissions::from_mode(0o777))
        .expect("open the nginx prefix to its workers");
    prefix
}

fn exits_within(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
