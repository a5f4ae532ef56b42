//! The command line as a person meets it: the messages of common mistakes, each
//! error said once and without a backtrace, every shipped configuration passing its
//! own check, and a start-up log, without colour codes in a pipe, that names an
//! unreachable backend.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use promguard_testkit::{Promguard, free_port, repo};

use crate::BINS;

/// promguard with `args`, in the checkout, with a backtrace asked for (it must not
/// print one) and none of the variables that would change its defaults.
fn promguard(args: &[&str]) -> Output {
    Command::new(BINS.promguard)
        .args(args)
        .current_dir(repo())
        .env("RUST_BACKTRACE", "1")
        .env_remove("PROMGUARD_ADMIN_TOKEN")
        .env_remove("PROMGUARD_URL")
        .env_remove("PROMGUARD_CONFIG")
        .output()
        .expect("run promguard")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_shipped_configuration_passes_check_config() {
    // The Helm chart's rendered configuration is checked the same way by
    // tests/e2e/chart.rs (scripts/check-chart.sh).
    for file in ["promguard.example.yaml", "scripts/demo.yaml"] {
        let out = promguard(&["check-config", file]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(": OK") && stdout.contains("policies policies"),
            "{stdout}"
        );
    }
}

#[test]
fn a_missing_file_is_said_once_without_a_backtrace() {
    let out = promguard(&["check-config", "/nonexistent/promguard.yaml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("/nonexistent/promguard.yaml").count(),
        1,
        "{err}"
    );
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("Stack"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn an_unset_secret_variable_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("promguard.yaml");
    std::fs::write(
        &file,
        "backends: {recent: {url: 'http://127.0.0.1:9090'}}\n\
         identity: {grafana: {secret_header: X-S, secret: {env: PROMGUARD_TEST_UNSET_SECRET}}}\n",
    )
    .expect("write");
    let out = promguard(&["check-config", &file.display().to_string()]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("PROMGUARD_TEST_UNSET_SECRET is not set") && err.contains("set it"),
        "{err}"
    );
}

#[test]
fn a_url_without_its_scheme_is_corrected() {
    let out = promguard(&["serve", "--recent-url", "127.0.0.1:9090"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("write it with its scheme, e.g. http://127.0.0.1:9090"),
        "{err}"
    );
    assert!(!err.contains("relative URL without a base"), "{err}");
}

#[test]
fn who_switches_sale_mode_defaults_to_user_and_says_so_when_unset() {
    let out = Command::new(BINS.promguard)
        .args([
            "sale-mode",
            "on",
            "--for",
            "1h",
            "--reason",
            "test",
            "--token",
            "t",
        ])
        .args(["--url", &format!("http://127.0.0.1:{}", free_port())])
        .env_remove("USER")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run promguard");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("give --by NAME") && err.contains("$USER"),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");

    let help = promguard(&["sale-mode", "on", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    let usage = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .expect("usage");
    assert!(!usage.contains("--by"), "--by is optional: {usage}");
    assert!(help.contains("[default: $USER]"), "{help}");
    assert!(
        help.contains("Why, in a few words"),
        "--reason is described: {help}"
    );
}

#[test]
fn serve_help_names_its_defaults_and_the_policy_flags() {
    let out = promguard(&["serve", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for text in [
        "--policies",
        "--admin-token",
        "--state-file",
        "[default: 127.0.0.1:9091]",
        "promguard-state/sale-mode.json",
    ] {
        assert!(help.contains(text), "serve --help lacks {text}:\n{help}");
    }
}

#[test]
fn an_unreachable_backend_is_named_in_the_start_up_log() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let pg = Promguard::with_flags(BINS, &["--recent-url", &dead]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg.log_lines_with("backend is not reachable") == 0 {
        assert!(
            Instant::now() < deadline,
            "no warning about {dead} in the start-up log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pg.log_lines_with(&dead), 1);
    // Its log goes to a pipe here, as to a file or `kubectl logs`: no colour codes.
    assert_eq!(
        pg.log_lines_with("\u{1b}["),
        0,
        "ANSI escapes in a piped log"
    );
}
