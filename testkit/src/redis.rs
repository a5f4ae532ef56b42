//! A real `redis-server` (Debian package `redis-server`) on a free loopback port,
//! for the fleet's tests and bench: started in a temporary directory without
//! persistence, stoppable and restartable on the same port, killed on drop.
//! `redis-cli` (installed with it) reads and writes keys by hand.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A running redis-server, killed on drop.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Whether it speaks TLS only, with a certificate for 127.0.0.1 signed by
    /// [`RedisServer::ca_file`].
    tls: bool,
}

impl RedisServer {
    /// Start one on a free port.
    ///
    /// # Panics
    ///
    /// When redis-server cannot be started or does not listen within 10 s.
    pub fn start() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("create the redis directory"),
            tls: false,
        };
        server.run();
        server
    }

    /// Start one that speaks only TLS, with a new CA (made with `openssl`, which
    /// Debian's ca-certificates brings) and a certificate for 127.0.0.1.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`], or when the certificates cannot be made.
    pub fn start_tls() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("create the redis directory"),
            tls: true,
        };
        let dir = server.dir.path();
        // One openssl command line; no argument has a space.
        let openssl = |line: &str| {
            let out = Command::new("openssl")
                .args(line.split_whitespace())
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {line}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // P-256 keys without a passphrase, for the CA and for the server.
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(&format!(
            "req -x509 {new_key} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca"
        ));
        openssl(&format!(
            "req {new_key} -keyout server.key -out server.csr -subj /CN=127.0.0.1"
        ));
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("write the certificate extension");
        openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
             -days 2 -extfile san.ext",
        );
        server.run();
        server
    }

    /// The CA that signed a TLS server's certificate, for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn run(&mut self) {
        let port = self.port.to_string();
        let listen: &[&str] = if self.tls {
            &[
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
            ]
        } else {
            &["--port", &port]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(listen)
            .current_dir(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server (Debian package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server is not listening on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its URL for promguard's `shared.redis.url`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Its process id while it runs (for /proc accounting), `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill it (SIGKILL, as a crashed or unreachable Redis), and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, with what its last `SAVE` wrote (empty
    /// without one).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Run `redis-cli` with `args` against it; its standard output.
    ///
    /// # Panics
    ///
    /// When redis-cli cannot be run or fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(if self.tls {
                &["--tls", "--cacert", "ca.pem"][..]
            } else {
                &[]
            })
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
