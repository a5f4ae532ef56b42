//! The `promguard` command: `serve` the proxy or `check-config` a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use url::Url;

use promguard::app::{AppState, app};
use promguard::config::{BackendConfig, Config, HumanDuration, LogFormat, parse_human_duration};
use promguard::metrics::Metrics;

#[derive(Parser)]
#[command(
    version,
    about = "A Prometheus query proxy that guards metrics backends during sales"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(Box<ServeArgs>),
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The YAML file to check.
        file: PathBuf,
    },
}

/// Flags override the file's values; with `--recent-url` no file is needed at all.
#[derive(Args)]
struct ServeArgs {
    /// YAML configuration file (see promguard.example.yaml).
    #[arg(long, env = "PROMGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Base URL of the Prometheus holding recent data.
    #[arg(long)]
    recent_url: Option<Url>,
    /// How far back the recent Prometheus holds data, e.g. 2d.
    #[arg(long, value_parser = parse_human_duration)]
    recent_window: Option<HumanDuration>,
    /// Base URL of the long-term store (VictoriaMetrics, Thanos, Mimir).
    #[arg(long)]
    long_term_url: Option<Url>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!(
                "{}: OK (recent {}, long_term {})",
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
        Command::Serve(args) => {
            let config = resolve_config(*args)?;
            init_tracing(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve(config))
        }
    }
}

fn resolve_config(args: ServeArgs) -> anyhow::Result<Config> {
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
    config.validate()?;
    Ok(config)
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("PROMGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = Arc::new(AppState::new(&config, Metrics::new())?);
    // Rate-limit buckets of users who have gone quiet are full again; forget them
    // so the map holds only active users.
    let janitor = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            janitor.limits.retain_recent();
        }
    });
    if config.identity.grafana.is_none() {
        tracing::warn!(
            "identity.grafana is not configured: X-Grafana-User is ignored, and dashboard \
             headers are believed for priority since they cannot be verified"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        listen = %config.listen,
        recent = %config.backends.recent.url,
        recent_window = ?config.backends.recent.window.0,
        long_term = config.backends.long_term.as_ref().map(|b| b.url.as_str()),
        "promguard listening"
    );
    let draining = Arc::new(tokio::sync::Notify::new());
    let notify = draining.clone();
    let server = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        promguard::shutdown::signal().await;
        notify.notify_one();
    });
    let grace = config.shutdown_grace.0;
    tokio::select! {
        result = server => result.context("serving")?,
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "drain timed out; exiting with requests still in flight");
        }
    }
    tracing::info!("promguard stopped");
    Ok(())
}
