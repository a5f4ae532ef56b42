//! `demo-data`: synthetic metrics of an online shop (orders, SLA backend, HTTP services,
//! warehouses, ERP sync, fiscal registers) for the promguard demo and integration tests.
//!
//! Every series is a deterministic function of time and `--seed`: counters are closed-form
//! integrals of per-minute rates (`curve`), so a counter read at time t is the same in the
//! 30 s Prometheus backfill, the 1 h VictoriaMetrics import and a live scrape of `serve`.
//! `calendar` holds the sales and incidents, `shop` what flows through the shop, `model`
//! the series catalogue and `output` the three text formats.

mod calendar;
mod curve;
mod model;
mod output;
mod shop;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::NaiveDate;
use clap::{Args, CommandFactory, Parser, Subcommand};

use calendar::{DAY_MS, HORIZON, Millis, ORIGIN, day_number, day_start, split};
use model::Model;
use output::Grid;

/// How far ahead `serve` can answer: it is a demo, restarted long before ten years pass.
const SERVE_HORIZON_DAYS: i64 = 3660;

#[derive(Parser)]
#[command(
    name = "demo-data",
    about = "Synthetic e-commerce metrics for the promguard demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write OpenMetrics text for `promtool tsdb create-blocks-from openmetrics`
    Openmetrics(RangeArgs),
    /// Write VictoriaMetrics JSON lines for `POST /api/v1/import`
    VmImport(RangeArgs),
    /// Serve the current values at /metrics for Prometheus and VictoriaMetrics to scrape
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:9200
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Args)]
struct RangeArgs {
    /// File to write; with --parts N, the files OUT.1 to OUT.N
    #[arg(long)]
    out: PathBuf,
    /// Split the series over this many files of about the same size (whole metric
    /// families in each), so that whoever loads them can tell how far it got
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    parts: u16,
    /// First timestamp, UNIX seconds (samples are aligned to multiples of --step)
    #[arg(long)]
    start: i64,
    /// Last timestamp, UNIX seconds
    #[arg(long)]
    end: i64,
    /// Distance between samples: a number with unit s, m, h or d (30s, 1h)
    #[arg(long, value_parser = parse_step)]
    step: Millis,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct ModelArgs {
    /// Instances per service
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    instances: u16,
    /// Seed of the noise, outages and instance skew
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Moscow date (YYYY-MM-DD) of the demo SLA backend incident, 14:00-14:20 local time
    /// [default: the day before --end; for serve, yesterday]. Give the same date to every
    /// subcommand of one demo: it changes counters from that day on.
    #[arg(long)]
    incident_day: Option<NaiveDate>,
}

impl ModelArgs {
    /// A model covering up to local day `last_day`; the demo incident defaults to the day
    /// before `anchor_day`, so it lies in the last two days of the generated range.
    fn build(&self, anchor_day: i64, last_day: i64) -> Model {
        let incident_day = self.incident_day.map_or(anchor_day - 1, day_number);
        Model::new(
            self.seed,
            usize::from(self.instances),
            incident_day,
            last_day,
        )
    }
}

fn parse_step(text: &str) -> Result<Millis, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: Millis = number
        .parse()
        .map_err(|_| format!("expected e.g. 30s or 1h, got {text:?}"))?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => DAY_MS,
        _ => return Err(format!("unit of {text:?} must be s, m, h or d")),
    };
    match number.checked_mul(unit_ms) {
        Some(step) if step > 0 => Ok(step),
        _ => Err(format!(
            "step {text:?} must be positive and not absurdly large"
        )),
    }
}

#[derive(Clone, Copy)]
enum Format {
    OpenMetrics,
    VmImport,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Openmetrics(args) => generate(&args, Format::OpenMetrics),
        Command::VmImport(args) => generate(&args, Format::VmImport),
        Command::Serve { listen, model } => serve(listen, &model),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo-data: {error}");
            ExitCode::FAILURE
        }
    }
}

fn generate(args: &RangeArgs, format: Format) -> io::Result<()> {
    let origin = day_start(day_number(ORIGIN)) / 1000;
    let horizon = day_start(day_number(HORIZON)) / 1000;
    if !(origin <= args.start && args.start <= args.end && args.end < horizon) {
        let message =
            format!("need {origin} ({ORIGIN}) <= --start <= --end < {horizon} ({HORIZON})");
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit();
    }
    let began = Instant::now();
    let (start, end) = (args.start * 1000, args.end * 1000);
    let end_day = split(end).0;
    let model = args.model.build(end_day, end_day);
    let grid = Grid::new(start, end, args.step);
    let parts = output::split(model.families(), usize::from(args.parts));
    let mut progress = Progress::new(&args.out, model.series_count());
    let mut written = output::Written::default();
    for (i, part) in parts.iter().enumerate() {
        let path = if parts.len() == 1 {
            args.out.clone()
        } else {
            let mut name = args.out.clone().into_os_string();
            name.push(format!(".{}", i + 1));
            PathBuf::from(name)
        };
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(with_path)?);
        let mut done = |series| progress.advance(series);
        let part = match format {
            Format::OpenMetrics => output::openmetrics(&model, part, &grid, &mut out, &mut done),
            Format::VmImport => output::vm_import(&model, part, &grid, &mut out, &mut done),
        }
        .and_then(|part| out.flush().map(|()| part))
        .map_err(with_path)?;
        written.series += part.series;
        written.samples += part.samples;
    }
    eprintln!(
        "demo-data: wrote {} series, {} samples to {}{} in {:.1?}",
        written.series,
        written.samples,
        args.out.display(),
        if parts.len() == 1 {
            String::new()
        } else {
            format!(".1 to .{}", parts.len())
        },
        began.elapsed()
    );
    Ok(())
}

/// Progress of a long write on stderr, a line every few seconds with the share done
/// and an estimate of the time left, so that a demo loading for minutes is seen to
/// move.
struct Progress {
    name: String,
    total: usize,
    done: usize,
    began: Instant,
    said: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(3);

    fn new(out: &Path, total: usize) -> Self {
        let name = out.file_name().map_or_else(
            || out.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let now = Instant::now();
        Progress {
            name,
            total: total.max(1),
            done: 0,
            began: now,
            said: now,
        }
    }

    fn advance(&mut self, series: usize) {
        self.done += series;
        if self.said.elapsed() < Self::EVERY || self.done >= self.total {
            return;
        }
        self.said = Instant::now();
        let elapsed = self.began.elapsed().as_secs_f64();
        let share = self.done as f64 / self.total as f64;
        eprintln!(
            "demo-data: {}: {:.0}% after {elapsed:.0} s, about {:.0} s left",
            self.name,
            share * 100.0,
            elapsed * (1.0 - share) / share
        );
    }
}

fn now() -> Millis {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    Millis::try_from(since_epoch.as_millis()).expect("clock before year 292 million")
}

fn serve(listen: SocketAddr, args: &ModelArgs) -> io::Result<()> {
    let today = split(now()).0;
    let model = Arc::new(args.build(today, today + SERVE_HORIZON_DAYS));
    let series = model.series_count();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(model);
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
        eprintln!("demo-data: serving {series} series at http://{listen}/metrics");
        // No graceful shutdown: scrapes are stateless, so SIGTERM's default exit is fine.
        axum::serve(listener, app).await
    })
}

async fn metrics(State(model): State<Arc<Model>>) -> Response {
    let t = now();
    if !model.covers(t) {
        let message = "demo-data: the clock is past the model's horizon; restart the exporter\n";
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    }
    let mut body = Vec::with_capacity(512 * 1024);
    output::exposition(&model, t, &mut body).expect("writing to a Vec cannot fail");
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_take_a_unit() {
        assert_eq!(parse_step("30s"), Ok(30_000));
        assert_eq!(parse_step("1h"), Ok(3_600_000));
        assert_eq!(parse_step("2d"), Ok(2 * DAY_MS));
        for bad in [
            "",
            "30",
            "s",
            "0s",
            "1.5h",
            "-1h",
            "1y",
            "99999999999999999d",
        ] {
            assert!(parse_step(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
