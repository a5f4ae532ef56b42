//! The curated dashboards (`dashboards/*.json`), the recording rules they read
//! (`dashboards/rules/`) and the Grafana provisioning that points them at promguard.
//!
//! - `provisioning`: reads the data source and policy files the dashboards rely on.
//! - `lints`: offline checks of the dashboards, rules and provisioning.
//! - `sale_night`: end to end, every panel of every curated dashboard through the
//!   real promguard in sale mode.
//!
//! Grafana itself, from the dashboard JSON schema to the requests it sends, is the
//! promguard's model (`promguard::grafana`), the one the storm bench uses.

mod lints;
mod provisioning;
mod sale_night;

use promguard::grafana::{Dashboard, Screen};
use promguard_testkit::repo;

/// The uids the example policies exempt in sale mode; each is `dashboards/<uid>.json`.
const CURATED: [&str; 3] = ["orders", "sla", "promguard"];
/// The provisioned Prometheus data source every panel goes through.
const DATASOURCE_UID: &str = "promguard";
/// The custom header the provisioned data source proves itself with.
const SECRET_HEADER: &str = "X-Promguard-Grafana-Secret";
/// Grafana sizes a panel's step by its width in pixels: a full-HD screen.
const SCREEN: Screen = Screen { width_px: 1920 };

/// `dashboards/<uid>.json`.
fn curated(uid: &str) -> Dashboard {
    Dashboard::load(&repo().join(format!("dashboards/{uid}.json")))
        .unwrap_or_else(|e| panic!("{e}"))
}
