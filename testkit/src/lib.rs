//! Tooling shared by promguard's end-to-end tests (`tests/e2e/`) and its benches
//! (`benches/`): nothing here is part of the proxy, which uses this crate only as a
//! dev-dependency.
//!
//! - [`backends`](mod@backends): the real Prometheus and VictoriaMetrics, loaded with generated data
//!   by `scripts/backends.sh`, started once per process.
//! - [`promguard`]: promguard processes started from a config or from flags.
//! - [`http`]: the HTTP client, Grafana-shaped forms, `/metrics` scrapes, polling.
//! - [`compare`]: comparing API answers exactly or within a tolerance.
//! - [`rng`]: a seeded generator, so randomised tests replay.
//! - [`nginx`], [`procstat`]: the benches' nginx baseline and /proc accounting.
//! - [`redis`](mod@redis): a real redis-server for the fleet's tests and bench.
//!
//! Binaries: Cargo tells only the root package's own tests and benches where
//! `promguard` and `demo-data` were built, so each of them passes [`Bins`] (from
//! [`bins!`]) to whatever starts a process.

pub mod backends;
pub mod compare;
pub mod http;
pub mod nginx;
pub mod procstat;
pub mod promguard;
pub mod redis;
pub mod rng;

use std::net::TcpListener;
use std::path::Path;
use std::time::SystemTime;

pub use backends::{Backends, StartedBackends, VM_COUNTERS, backends, run_backends_script};
pub use compare::{assert_same_answer, differs, points_where, sorted_by_metric};
pub use http::{Scrape, admin_get, client, eventually, get, header, post_form, range, scrape};
pub use promguard::Promguard;
pub use rng::Rng;

/// Where the root package's binaries were built.
#[derive(Debug, Clone, Copy)]
pub struct Bins {
    /// The proxy.
    pub promguard: &'static str,
    /// The demo data generator and exporter `scripts/backends.sh` runs.
    pub demo_data: &'static str,
}

impl Bins {
    /// These binaries with the promguard the environment variable `var` names
    /// instead, when it is set: how the benches measure another build.
    pub fn promguard_from_env(self, var: &str) -> Option<Bins> {
        let path = std::env::var(var).ok()?;
        Some(Bins {
            promguard: Box::leak(path.into_boxed_str()),
            ..self
        })
    }
}

/// The [`Bins`] of the package whose test or bench expands it: `env!` is evaluated
/// where the macro is used, and Cargo sets `CARGO_BIN_EXE_*` only for the root
/// package's own targets.
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            promguard: env!("CARGO_BIN_EXE_promguard"),
            demo_data: env!("CARGO_BIN_EXE_demo-data"),
        }
    };
}

/// The repository's root, where `scripts/`, `dashboards/` and `policies/` are.
///
/// # Panics
///
/// Never: this crate's manifest is always one directory below the root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lives in the repository's root")
}

/// A port nothing listens on right now.
///
/// # Panics
///
/// When no ephemeral port on loopback can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on loopback")
}

pub fn now_secs() -> i64 {
    now_ms().div_euclid(1000)
}

/// The wall clock in Unix milliseconds, as Grafana's time range has "now".
///
/// # Panics
///
/// When the clock is before 1970.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("a clock before the year 292 million")
}
