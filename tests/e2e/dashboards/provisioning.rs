//! The files around the dashboards, read as Grafana and promguard read them: the
//! provisioned data source (`dashboards/provisioning/`) and the sale policy
//! (`policies/november.yaml`) the dashboards must fit.

use std::collections::BTreeMap;

use promguard::grafana::DataSource;
use promguard::grafana::interval::parse_interval;
use promguard_testkit::repo;
use serde::Deserialize;

/// The data source Grafana is provisioned with.
#[derive(Deserialize)]
struct DatasourceFile {
    datasources: Vec<Datasource>,
}

#[derive(Deserialize)]
pub struct Datasource {
    pub uid: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    #[serde(rename = "jsonData")]
    pub json_data: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(rename = "secureJsonData")]
    pub secure_json_data: BTreeMap<String, String>,
}

pub fn provisioned_datasource() -> Datasource {
    let path = repo().join("dashboards/provisioning/datasources/promguard.yaml");
    let text = std::fs::read_to_string(&path).expect("read the data source provisioning");
    let mut file: DatasourceFile =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(file.datasources.len(), 1, "one data source");
    file.datasources.remove(0)
}

/// The provisioned data source as Grafana sizes its queries: its scrape interval is
/// the floor of `intervalMs` and the base of `$__rate_interval` for targets without
/// their own min step.
pub fn data_source() -> DataSource {
    let ds = provisioned_datasource();
    let value = ds.json_data["timeInterval"]
        .as_str()
        .expect("jsonData.timeInterval is set");
    DataSource {
        scrape_interval_ms: parse_interval(value)
            .unwrap_or_else(|e| panic!("jsonData.timeInterval: {e}")),
    }
}

/// The sale-mode upstream burst of the repository's policies: how many upstream calls
/// one user may make at once on a sale night.
pub fn sale_upstream_burst() -> usize {
    let policy = sale_policy();
    let burst = policy["limits"]["upstream"]["burst"]
        .as_u64()
        .expect("policies/november.yaml sets sale.limits.upstream.burst");
    usize::try_from(burst).expect("a small burst")
}

pub fn sale_policy() -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(repo().join("policies/november.yaml"))
        .expect("read policies/november.yaml");
    let policy: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    policy["sale"].clone()
}
