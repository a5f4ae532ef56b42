//! The command line: its flags and subcommands, and every subcommand but `serve`
//! (checking configuration and policy files, explaining a policy decision,
//! switching sale mode through a running promguard's admin API). `main.rs` runs
//! the proxy itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use url::Url;

use promguard::config::{
    BackendConfig, Config, HumanDuration, LogFormat, RedisConfig, Secret, parse_human_duration,
};
use promguard::policy::explain::{Question, explain};
use promguard::policy::file::load_dir;
use promguard::request::{Query, QueryParser};
use promguard::routing::RoutingTable;
use promguard::units::{parse_api_duration, parse_time};

#[derive(Parser)]
#[command(
    version,
    about = "A Prometheus query proxy that guards metrics backends during sales"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve(Box<ServeArgs>),
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The YAML file to check.
        file: PathBuf,
    },
    /// Check policy files, or explain what they would do with a query.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Switch sale mode on a running promguard (through its admin API).
    SaleMode(Box<SaleModeArgs>),
    /// Fill a running promguard's cache with every range panel of Grafana
    /// dashboards, as Grafana will ask for them (through its admin API), and wait
    /// for it to finish.
    Warm(Box<WarmArgs>),
}

#[derive(Args)]
pub struct WarmArgs {
    /// A Grafana dashboard JSON file (exported, or as the API returns it); repeat
    /// for several.
    #[arg(long, required = true)]
    dashboard: Vec<PathBuf>,
    /// The time range to warm, e.g. 30d [default: each dashboard's own].
    #[arg(long, value_parser = parse_human_duration)]
    range: Option<HumanDuration>,
    /// promguard's address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:9091",
        env = "PROMGUARD_URL",
        value_parser = http_url
    )]
    url: Url,
    /// The admin token.
    #[arg(long, env = "PROMGUARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file in a directory.
    Check {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Print the decision, mode, window, backend, lookback and deciding rule.
    Explain(Box<ExplainArgs>),
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The policy directory.
    #[arg(long)]
    policies: PathBuf,
    /// When the query would run (RFC 3339 or Unix seconds); default now.
    #[arg(long)]
    at: Option<String>,
    /// The PromQL.
    #[arg(long)]
    query: String,
    /// Range query start (RFC 3339 or Unix seconds).
    #[arg(long, requires = "end", conflicts_with = "time")]
    start: Option<String>,
    /// Range query end.
    #[arg(long, requires = "start")]
    end: Option<String>,
    /// Range query step (the decision depends on it only for MetricsQL ranges
    /// written in steps, such as `[1i]`); default 60s.
    #[arg(long)]
    step: Option<String>,
    /// Instant query time; default `--at`.
    #[arg(long)]
    time: Option<String>,
    /// Who asks.
    #[arg(long, default_value = "anonymous")]
    user: String,
    /// The dashboard uid the panel belongs to.
    #[arg(long)]
    dashboard: Option<String>,
    /// Also show what a range query would fetch, and whether it is served, when
    /// the cache holds its extents up to this time (RFC 3339 or Unix seconds):
    /// a panel that was open before the window.
    #[arg(long, requires = "start")]
    cached_until: Option<String>,
    /// How far back the recent Prometheus holds data.
    #[arg(long, value_parser = parse_human_duration, default_value = "15d")]
    recent_window: HumanDuration,
    /// There is no long-term store: everything goes to the recent Prometheus.
    #[arg(long)]
    no_long_term: bool,
    /// text or json.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
pub struct SaleModeArgs {
    #[command(subcommand)]
    command: SaleModeCommand,
    /// promguard's address.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9091",
        env = "PROMGUARD_URL",
        value_parser = http_url
    )]
    url: Url,
    /// The admin token.
    #[arg(
        long,
        global = true,
        env = "PROMGUARD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(Subcommand)]
enum SaleModeCommand {
    /// Force sale mode on for a while.
    On(Switch),
    /// Force sale mode off for a while, even inside a scheduled window.
    Off(Switch),
    /// Follow the schedule again.
    Auto {
        /// Why, in a few words (kept in the audit trail).
        #[arg(long)]
        reason: String,
        /// Who switches (kept in the audit trail) [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Print the mode, its source, the windows and the audit trail.
    Status,
}

#[derive(Args)]
struct Switch {
    /// How long, e.g. 6h (at most policy.max_override, 30d by default).
    #[arg(long = "for", value_parser = parse_human_duration)]
    duration: HumanDuration,
    /// Why, in a few words (kept in the audit trail).
    #[arg(long)]
    reason: String,
    /// Who switches (kept in the audit trail) [default: $USER].
    #[arg(long)]
    by: Option<String>,
}

/// Who switches: `--by`, else `$USER`.
fn who(by: &Option<String>) -> anyhow::Result<String> {
    match by {
        Some(name) if !name.trim().is_empty() => Ok(name.clone()),
        _ => std::env::var("USER")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .context("say who switches: give --by NAME (it defaults to $USER, which is not set)"),
    }
}

/// Flags override the file's values; with `--recent-url` no file is needed at all.
/// The defaults named in the help are the configuration's (a test keeps them true).
#[derive(Args)]
pub struct ServeArgs {
    /// YAML configuration file (see promguard.example.yaml).
    #[arg(long, env = "PROMGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:9091].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Base URL of the Prometheus holding recent data, e.g. http://127.0.0.1:9090.
    #[arg(long, value_parser = http_url)]
    recent_url: Option<Url>,
    /// How far back the recent Prometheus holds data, e.g. 2d [default: 15d].
    #[arg(long, value_parser = parse_human_duration)]
    recent_window: Option<HumanDuration>,
    /// Base URL of the long-term store (VictoriaMetrics, Thanos, Mimir) [default:
    /// none, everything goes to the recent Prometheus].
    #[arg(long, value_parser = http_url)]
    long_term_url: Option<Url>,
    /// Directory of policy files (sale windows and rules) [default: none, no rules].
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Bearer token for /admin/... (sale-mode switch, policy reload) [default: none,
    /// the admin API is off].
    #[arg(long, env = "PROMGUARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Where the sale-mode override and its audit trail are kept [default:
    /// promguard-state/sale-mode.json, relative to the working directory].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Redis shared by every replica of the fleet (cache, caps, budgets, the
    /// sale-mode switch), e.g. redis://redis:6379 [default: none, this replica is
    /// on its own].
    #[arg(long, env = "PROMGUARD_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
}

/// A backend or promguard URL: absolute, http or https. `127.0.0.1:9090` without
/// a scheme is the common slip, so the error says what to write instead.
fn http_url(text: &str) -> Result<Url, String> {
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(url),
        Ok(_) | Err(url::ParseError::RelativeUrlWithoutBase) => Err(format!(
            "{text:?} is not an http(s) URL; write it with its scheme, e.g. http://{}",
            text.trim_start_matches('/')
        )),
        Err(e) => Err(format!("{text:?} is not a URL: {e}")),
    }
}

/// Run every subcommand but `serve`.
///
/// # Errors
///
/// What the subcommand reports: an invalid file, an unreachable promguard.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            // Everything serve would refuse at start-up without touching the
            // network: the policies too.
            let policies = match &config.policy.dir {
                Some(dir) => {
                    let policy = load_dir(dir)?;
                    format!(
                        "{} ({} files, {} windows)",
                        dir.display(),
                        policy.files.len(),
                        policy.windows.len()
                    )
                }
                None => "none".to_string(),
            };
            println!(
                "{}: OK (recent {}, long_term {}, policies {policies})",
                file.display(),
                config.backends.recent.url,
                config
                    .backends
                    .long_term
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |b| b.url.to_string())
            );
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Check { dir },
        } => {
            let policy = load_dir(&dir)?;
            println!(
                "{}: OK ({} files, {} windows, {} normal rules, {} sale rules)",
                dir.display(),
                policy.files.len(),
                policy.windows.len(),
                policy.normal.rules.rules.len(),
                policy.sale.rules.rules.len()
            );
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Explain(args),
        } => explain_command(*args),
        Command::SaleMode(args) => sale_mode_command(*args),
        Command::Warm(args) => warm_command(*args),
        Command::Serve(_) => bail!("serve runs in main"),
    }
}

/// The configuration `serve` runs with: the file's, overridden by flags.
///
/// # Errors
///
/// An unreadable or invalid file, or no backend given at all.
pub fn resolve_config(args: ServeArgs) -> anyhow::Result<Config> {
    let mut config = match (&args.config, &args.recent_url) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(url)) => Config::with_recent(url.clone()),
        (None, None) => bail!("give --config FILE, or at least --recent-url URL"),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(url) = args.recent_url {
        config.backends.recent.url = url;
    }
    if let Some(window) = args.recent_window {
        config.backends.recent.window = window;
    }
    if let Some(url) = args.long_term_url {
        match &mut config.backends.long_term {
            Some(lt) => lt.url = url,
            None => config.backends.long_term = Some(BackendConfig::new(url)),
        }
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(dir) = args.policies {
        config.policy.dir = Some(dir);
    }
    if let Some(token) = args.admin_token.filter(|t| !t.is_empty()) {
        config.policy.admin_token = Some(Secret(token));
    }
    if let Some(file) = args.state_file {
        config.policy.state_file = file;
    }
    if let Some(url) = args.redis_url.filter(|u| !u.is_empty()) {
        match &mut config.shared.redis {
            Some(redis) => redis.url = Secret(url),
            None => config.shared.redis = Some(RedisConfig::with_url(url)),
        }
    }
    config.validate()?;
    Ok(config)
}

fn explain_command(args: ExplainArgs) -> anyhow::Result<()> {
    let policy = load_dir(&args.policies)?;
    let time = |param: &str, text: &str| {
        parse_time(text).map_err(|e| anyhow::anyhow!("invalid --{param}: {e}"))
    };
    let at = match &args.at {
        Some(t) => time("at", t)?,
        None => chrono::Utc::now().timestamp_millis(),
    };
    let (expr, canonical) = QueryParser::default()
        .parse(&args.query)
        .map_err(|e| anyhow::anyhow!("invalid --query: {e}"))?;
    let query = Query {
        text: args.query.clone(),
        expr,
        canonical,
    };
    let (start, end, range_query) = match (&args.start, &args.end, &args.time) {
        (Some(s), Some(e), _) => (time("start", s)?, time("end", e)?, true),
        (_, _, Some(t)) => {
            let t = time("time", t)?;
            (t, t, false)
        }
        _ => (at, at, false),
    };
    let step_ms = match &args.step {
        Some(step) => parse_api_duration(step)
            .map(|d| promguard::units::millis(d).max(1))
            .map_err(|e| anyhow::anyhow!("invalid --step: {e}"))?,
        None => 60_000,
    };
    let routing = RoutingTable {
        recent_window: args.recent_window.0,
        has_long_term: !args.no_long_term,
        split_fetches: true,
    };
    let e = explain(
        &policy,
        &routing,
        promguard::analysis::DEFAULT_LOOKBACK_DELTA,
        &Question {
            query: &query,
            start,
            end,
            step_ms,
            range_query,
            at,
            user: &args.user,
            dashboard: args.dashboard.as_deref(),
            cached_until: args
                .cached_until
                .as_deref()
                .map(|t| time("cached-until", t))
                .transpose()?,
        },
    );
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Output::Text => {
            println!("decision:  {}", e.decision);
            println!("mode:      {}", e.mode.describe());
            println!("backend:   {}", e.backend);
            if let (Some(back), Some(oldest), Some(newest)) = (&e.lookback, e.oldest, e.newest) {
                println!("lookback:  {back} (samples from {oldest} to {newest}, Unix seconds)");
            }
            if let Some(f) = &e.furthest {
                println!("furthest:  {f}");
            }
            if e.analysis != "parsed" {
                println!(
                    "analysis:  {} (promguard's parser cannot read this query; its bounds \
                     add up every range and offset, and the backend judges the query)",
                    e.analysis
                );
            }
            if let Some(m) = &e.message {
                println!("why:       {m}");
            }
            for d in &e.dry_run {
                println!("dry run:   {d}");
            }
            if let Some(r) = &e.min_refresh {
                println!("refresh:   from the backend at most every {r} while live");
            }
            let calls = |calls: &[promguard::policy::explain::Call]| {
                for c in calls {
                    println!(
                        "  {} .. {} from {}: {}{}",
                        c.from,
                        c.to,
                        c.backend,
                        c.decision,
                        c.rule
                            .as_ref()
                            .map(|r| format!(" by rule '{r}'"))
                            .unwrap_or_default()
                    );
                }
            };
            if !e.fetches.is_empty() {
                println!("fetches (nothing cached):");
                calls(&e.fetches);
            }
            if let Some(c) = &e.cached {
                println!("cached up to {}: {}", c.until, c.decision);
                calls(&c.fetches);
                if let Some(w) = &c.warning {
                    println!("warning:   {w}");
                }
            }
        }
    }
    Ok(())
}

fn sale_mode_command(args: SaleModeArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .context("give --token or set PROMGUARD_ADMIN_TOKEN")?;
    let url = args.url.join("admin/sale-mode")?;
    let body = match &args.command {
        SaleModeCommand::Status => None,
        SaleModeCommand::On(s) | SaleModeCommand::Off(s) => Some(serde_json::json!({
            "mode": if matches!(args.command, SaleModeCommand::On(_)) { "on" } else { "off" },
            "for": format!("{}s", s.duration.0.as_secs()),
            "reason": s.reason,
            "by": who(&s.by)?,
        })),
        SaleModeCommand::Auto { reason, by } => Some(serde_json::json!({
            "mode": "auto", "reason": reason, "by": who(by)?,
        })),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, text) = runtime.block_on(async {
        let client = reqwest::Client::new();
        let request = match &body {
            None => client.get(url.clone()),
            Some(b) => client
                .post(url.clone())
                .header("content-type", "application/json")
                .body(b.to_string()),
        };
        let response = request.bearer_auth(&token).send().await?;
        let status = response.status();
        anyhow::Ok((status, response.text().await?))
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    println!("{}", serde_json::to_string_pretty(&value)?);
    if !status.is_success() {
        bail!("promguard answered {status}");
    }
    Ok(())
}

fn warm_command(args: WarmArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .context("give --token or set PROMGUARD_ADMIN_TOKEN")?;
    let mut dashboards = Vec::with_capacity(args.dashboard.len());
    for path in &args.dashboard {
        // Checked here, so a file that is not a dashboard is named before anything runs.
        promguard::grafana::Dashboard::load(path).map_err(|e| anyhow::anyhow!(e))?;
        let text = std::fs::read_to_string(path)?;
        dashboards.push(serde_json::from_str::<serde_json::Value>(&text)?);
    }
    let mut body = serde_json::json!({ "dashboards": dashboards });
    if let Some(range) = args.range {
        body["range"] = format!("{}s", range.0.as_secs()).into();
    }
    let url = args.url.join("admin/warm")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let response = client
            .post(url.clone())
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("promguard answered {status}: {text}");
        }
        let mut reported = 0;
        loop {
            let run: serde_json::Value = client
                .get(url.clone())
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            let dashboards = run["dashboards"].as_array().cloned().unwrap_or_default();
            let running = run["state"] == "running";
            // A dashboard is done once a later one has started, or the run ended.
            let done = if running {
                dashboards
                    .iter()
                    .rposition(|d| {
                        d["warmed"].as_u64().unwrap_or(0)
                            + d["cached"].as_u64().unwrap_or(0)
                            + d["failed"].as_u64().unwrap_or(0)
                            > 0
                    })
                    .unwrap_or(0)
            } else {
                dashboards.len()
            };
            for d in dashboards.iter().take(done).skip(reported) {
                println!(
                    "{}: {} calls, {} warmed ({} bytes), {} already cached, {} failed",
                    d["name"].as_str().unwrap_or("?"),
                    d["calls"],
                    d["warmed"],
                    d["bytes"],
                    d["cached"],
                    d["failed"]
                );
                for problem in d["problems"].as_array().into_iter().flatten() {
                    println!("  {}", problem.as_str().unwrap_or_default());
                }
            }
            reported = reported.max(done);
            if !running {
                match run["stopped"].as_str() {
                    Some(why) => bail!("warming stopped: {why}"),
                    None => return anyhow::Ok(()),
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
}

/// An error for a person at a terminal: the message, then each cause that adds
/// something (sources whose text the message already quotes are left out), and no
/// backtrace, whatever `RUST_BACKTRACE` says.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_defaults_serve_help_names_are_the_configurations() {
        let help = Cli::command()
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string();
        let config = Config::with_recent("http://127.0.0.1:9090".parse().expect("url"));
        for default in [
            config.listen.to_string(),
            format!("{}d", config.backends.recent.window.0.as_secs() / 86_400),
            config.policy.state_file.display().to_string(),
        ] {
            assert!(
                help.contains(&default),
                "serve --help lacks {default}:\n{help}"
            );
        }
        for flag in ["--policies", "--admin-token", "--state-file"] {
            assert!(help.contains(flag), "{flag}");
        }
    }

    #[test]
    fn a_url_without_its_scheme_is_explained() {
        let err = http_url("127.0.0.1:9090").unwrap_err();
        assert!(err.contains("http://127.0.0.1:9090"), "{err}");
        assert!(http_url("ftp://host/").is_err());
        assert!(http_url("https://prom.example:9090/prefix").is_ok());
    }

    #[test]
    fn errors_read_once_each() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(io).context("cannot read /nope.yaml: No such file");
        assert_eq!(describe(&err), "cannot read /nope.yaml: No such file");
        let err = anyhow::anyhow!("outer").context("top");
        assert_eq!(describe(&err), "top: outer");
    }
}
