//! The `promguard` command: parse the flags, load the configuration, build the
//! state and serve. Every other subcommand lives in [`cli`].

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use promguard::app::app;
use promguard::config::{Config, LogFormat};
use promguard::identity::IdentityMode;
use promguard::metrics::Metrics;
use promguard::state::AppState;

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::describe(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let config = cli::resolve_config(*args)?;
            init_tracing(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // Sized for the deepest query the configuration allows
                // (config::MAX_QUERY_DEPTH) with a wide margin; untouched stack
                // pages cost no memory.
                .thread_stack_size(16 << 20)
                .build()
                .context("starting the async runtime")?
                .block_on(serve(config))
        }
        other => cli::run(other),
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("PROMGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: in a file, a pipe or `kubectl logs`
    // escape codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = Arc::new(AppState::new(&config, Metrics::new()).map_err(anyhow::Error::msg)?);
    state.spawn_maintenance(config.policy.reload_interval.0);
    let identity = state.identifier.mode();
    let identity_line = format!(
        "identity mode {}: {}; limits.unverified: {}",
        identity.as_str(),
        identity.describe(),
        config.limits.unverified.as_str()
    );
    match identity {
        IdentityMode::Grafana => tracing::info!("{identity_line}"),
        IdentityMode::Unverified => tracing::warn!("{identity_line}"),
    }
    let settings = promguard::server::prepare(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        listen = %config.listen,
        recent = %config.backends.recent.url,
        recent_window = ?config.backends.recent.window.0,
        long_term = config.backends.long_term.as_ref().map(|b| b.url.as_str()),
        max_connections = settings.max_connections,
        "promguard listening"
    );
    state.spawn_startup_probe();
    let draining = Arc::new(tokio::sync::Notify::new());
    let notify = draining.clone();
    let server = promguard::server::serve(
        listener,
        app(state.clone()),
        settings,
        &state.metrics,
        async move {
            promguard::shutdown::signal().await;
            notify.notify_one();
        },
    );
    let grace = config.shutdown_grace.0;
    tokio::select! {
        () = server => {}
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "drain timed out; exiting with requests still in flight");
        }
    }
    tracing::info!("promguard stopped");
    Ok(())
}
