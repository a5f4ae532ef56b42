//! PNG plots of the arms over time, drawn with plotters' bitmap backend (pure Rust:
//! no Python or system plotting library on the bench machine). Text needs a
//! TrueType font: DejaVu Sans from Debian's fonts-dejavu-core, or STORM_FONT.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::arms::Arm;
use crate::report::ArmResult;

const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (1400, 900);

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Write the three plots into `dir`; returns the files written.
///
/// # Errors
///
/// No usable font, or a drawing or encoding failure.
pub fn write_all(results: &[ArmResult], dir: &Path) -> Result<Vec<PathBuf>, String> {
    register_font()?;
    let files = [
        (
            "storm-in-flight.png",
            in_flight as fn(&[ArmResult], &Path) -> PlotResult,
        ),
        ("storm-curated-p99.png", curated_p99),
        ("storm-upstream-rate.png", upstream_rate),
    ];
    files
        .iter()
        .map(|(name, draw)| {
            let path = dir.join(name);
            draw(results, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        })
        .collect()
}

fn register_font() -> Result<(), String> {
    let path = std::env::var("STORM_FONT").unwrap_or_else(|_| DEFAULT_FONT.into());
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "no font for the plots at {path} ({e}): install fonts-dejavu-core or set STORM_FONT"
        )
    })?;
    // plotters keeps fonts for the life of the process.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
        .map_err(|_| format!("{path} is not a usable TrueType font"))
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn x_max(results: &[ArmResult]) -> f64 {
    results
        .iter()
        .flat_map(|r| r.timeline.last())
        .map(|s| seconds(s.at_ms))
        .fold(1.0, f64::max)
}

/// One colour per arm, the same in every plot whichever arms ran.
fn color(arm: Arm) -> RGBColor {
    match arm {
        Arm::Direct => RGBColor(214, 39, 40),
        Arm::Nginx => RGBColor(255, 127, 14),
        Arm::Quickstart => RGBColor(148, 103, 189),
        Arm::Identity => RGBColor(23, 190, 207),
        Arm::Tuned => RGBColor(31, 119, 180),
        Arm::Unsplit => RGBColor(127, 127, 127),
        Arm::Before => RGBColor(227, 119, 194),
        Arm::Sale => RGBColor(44, 160, 44),
        Arm::Warmed => RGBColor(188, 189, 34),
        Arm::Fleet => RGBColor(140, 86, 75),
    }
}

/// A panel of the in-flight plot: its title and each arm's values over time (`None`
/// where not known).
type Panel = (&'static str, fn(&ArmResult) -> Vec<(u64, Option<f64>)>);

/// promguard's caps on backend `i` among the arms that ran, each with the arms
/// that had it.
fn caps(results: &[ArmResult], i: usize) -> Vec<(usize, Vec<&'static str>)> {
    let mut caps: Vec<(usize, Vec<&'static str>)> = Vec::new();
    for arm in results.iter().map(|r| r.arm) {
        let Some(cap) = arm.caps().map(|c| c[i]) else {
            continue;
        };
        match caps.iter_mut().find(|(c, _)| *c == cap) {
            Some((_, arms)) => arms.push(arm.name()),
            None => caps.push((cap, vec![arm.name()])),
        }
    }
    caps
}

/// In flight at each backend, with each promguard arm's cap.
fn in_flight(results: &[ArmResult], path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 1));
    let panels: [Panel; 2] = [
        (
            "Prometheus: API queries running or queued in its engine (from its query log)",
            |r| {
                r.prometheus_in_flight()
                    .into_iter()
                    .map(|(at, n)| (at, Some(n)))
                    .collect()
            },
        ),
        (
            "VictoriaMetrics: selects running (vm_concurrent_select_current; it queues the rest); gaps: no /metrics answer in 2 s",
            |r| {
                r.timeline
                    .iter()
                    .map(|s| (s.at_ms, s.backends.victoria.map(|g| g.in_flight)))
                    .collect()
            },
        ),
    ];
    let x_max = x_max(results);
    for (i, (area, (title, values))) in areas.iter().zip(panels).enumerate() {
        let lines: Vec<Vec<(u64, Option<f64>)>> = results.iter().map(values).collect();
        let caps = caps(results, i);
        let y_max = lines
            .iter()
            .flatten()
            .filter_map(|(_, v)| *v)
            .chain(caps.iter().map(|(cap, _)| *cap as f64))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the arm")
            .y_desc("in flight")
            .draw()?;
        for (r, line) in results.iter().zip(&lines) {
            let c = color(r.arm);
            // A backend too busy to answer its /metrics leaves a gap in its line.
            let known = line.split(|(_, v)| v.is_none());
            for (i, run) in known.filter(|run| !run.is_empty()).enumerate() {
                let points = run.iter().filter_map(|(at, v)| Some((seconds(*at), (*v)?)));
                let drawn = chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
                if i == 0 {
                    drawn
                        .label(r.arm.name())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
                }
            }
        }
        for (cap, arms) in caps {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, cap as f64), (x_max, cap as f64)],
                    8,
                    6,
                    BLACK.stroke_width(1),
                ))?
                .label(format!("cap {cap}: {}", arms.join(", ")))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// Curated panels' p99 per 10-second window, on a log scale, with the 300 ms target.
fn curated_p99(results: &[ArmResult], path: &Path) -> PlotResult {
    let windows: Vec<Vec<(u64, f64)>> = results
        .iter()
        .map(|r| r.curated_p99_by_window(10_000))
        .collect();
    over_time(
        results,
        &windows,
        path,
        &LogChart {
            caption: "Curated dashboards (orders, sla): p99 latency per 10 s window",
            x_desc: "seconds into the arm (requests by the time they were sent)",
            y_desc: "p99, ms (log scale)",
            y_max_at_least: 1000.0,
            reference: Some((300.0, "target: 300 ms")),
        },
    )
}

/// Queries per second reaching the backends, on a log scale.
fn upstream_rate(results: &[ArmResult], path: &Path) -> PlotResult {
    let rates: Vec<Vec<(u64, f64)>> = results.iter().map(ArmResult::upstream_rate).collect();
    over_time(
        results,
        &rates,
        path,
        &LogChart {
            caption: "Queries reaching Prometheus (its query log) + VictoriaMetrics (its counters), per 2 s",
            x_desc: "seconds into the arm",
            y_desc: "queries/s (log scale; 0 drawn at 0.1)",
            y_max_at_least: 10.0,
            reference: None,
        },
    )
}

/// What an arm-by-arm line chart on a log scale says.
struct LogChart<'a> {
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    /// The y axis reaches at least this far, so small values are not blown up.
    y_max_at_least: f64,
    /// A dashed horizontal line: its value and legend.
    reference: Option<(f64, &'a str)>,
}

/// One line per arm of `(ms into the arm, value)` points, values below 0.1 drawn
/// at 0.1.
fn over_time(
    results: &[ArmResult],
    lines: &[Vec<(u64, f64)>],
    path: &Path,
    spec: &LogChart<'_>,
) -> PlotResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = lines
        .iter()
        .flatten()
        .map(|(_, v)| *v)
        .fold(spec.y_max_at_least, f64::max)
        * 1.5;
    let x_max = x_max(results);
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (0.1..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .draw()?;
    for (r, points) in results.iter().zip(lines) {
        let c = color(r.arm);
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(at, v)| (seconds(*at), v.max(0.1))),
                c.stroke_width(2),
            ))?
            .label(r.arm.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    if let Some((value, label)) = spec.reference {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, value), (x_max, value)],
                8,
                6,
                BLACK.stroke_width(1),
            ))?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 18))
        .draw()
}
