//! End-to-end tests: the real promguard binary against real Prometheus and
//! VictoriaMetrics (started by `scripts/backends.sh` with generated data), and
//! against small fault servers for failures real backends cannot show on demand.
//! The harness is the testkit's (`testkit/`); the fault servers are this crate's.

mod bad_input;
mod busy;
mod cache;
mod chart;
mod cli;
mod coalescing;
mod compat;
mod dashboards;
mod demo;
mod differential;
mod faults;
mod fleet;
mod grafana_defaults;
mod grafana_session;
mod hostile;
mod limits;
mod sale_mode;
mod slow_clients;
mod split_fetches;
mod upstream_faults;
mod warm;

/// This package's binaries, which the testkit starts.
const BINS: promguard_testkit::Bins = promguard_testkit::bins!();
