//! End-to-end tests: the real promguard binary against real Prometheus and
//! VictoriaMetrics (started by `scripts/backends.sh` with generated data), and
//! against small fault servers for failures real backends cannot show on demand.

mod bad_input;
mod cache;
mod chart;
mod coalescing;
mod compat;
mod dashboards;
mod differential;
mod faults;
mod grafana_defaults;
mod grafana_session;
mod harness;
mod hostile;
mod limits;
mod sale_mode;
mod slow_clients;
mod upstream_faults;
