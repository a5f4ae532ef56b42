//! The Helm chart: rendered by Helm's own SDK with several value sets, every object
//! validated against the Kubernetes schemas, the promised pieces present, and the
//! rendered config and policies accepted by this promguard (scripts/check-chart.sh).

use std::process::Command;

use promguard_testkit::repo;

#[test]
fn the_helm_chart_renders_and_validates() {
    let out = Command::new("bash")
        .arg(repo().join("scripts/check-chart.sh"))
        .env("PROMGUARD_BIN", env!("CARGO_BIN_EXE_promguard"))
        .output()
        .expect("run scripts/check-chart.sh");
    assert!(
        out.status.success(),
        "the chart check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
