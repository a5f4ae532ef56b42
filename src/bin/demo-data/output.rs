//! Writes the model's samples in three formats: OpenMetrics with timestamps (for
//! `promtool tsdb create-blocks-from openmetrics`), VictoriaMetrics JSON lines (for
//! `/api/v1/import`) and the Prometheus text exposition of one instant (for scrapes).
//! Output streams to any `Write`; callers buffer it.

use std::io::{self, Write};

use crate::calendar::Millis;
use crate::model::{Family, Kind, Metric, Model, Sample};

/// Timestamps on multiples of `step` within `[start, end]`, so that runs over different
/// ranges sample the same instants.
pub struct Grid {
    start: Millis,
    end: Millis,
    step: Millis,
}

impl Grid {
    /// # Panics
    /// If `step` is not a positive whole number of seconds: OpenMetrics timestamps here
    /// are whole seconds.
    pub fn new(start: Millis, end: Millis, step: Millis) -> Self {
        assert!(step > 0 && step % 1000 == 0, "step must be whole seconds");
        Grid { start, end, step }
    }

    fn times(&self) -> impl Iterator<Item = Millis> {
        let first = self.start + (self.step - self.start.rem_euclid(self.step)) % self.step;
        (first..=self.end).step_by(self.step as usize)
    }
}

/// Some of a family's label sets: the unit files are split by, so that a family with
/// many series can spread over several files (each file names it again).
pub type Slice<'a> = (&'a Family, &'a [Metric]);

/// `families`' label sets in at most `parts` contiguous runs of about the same number
/// of series (never empty, never more runs than label sets).
pub fn split(families: &[Family], parts: usize) -> Vec<Vec<Slice<'_>>> {
    let total: usize = families
        .iter()
        .flat_map(|f| &f.metrics)
        .map(|m| m.samples.len())
        .sum();
    let parts = parts.max(1);
    let mut runs = Vec::with_capacity(parts);
    let mut run: Vec<Slice<'_>> = Vec::new();
    let mut so_far = 0;
    for family in families {
        let mut first = 0;
        for (i, metric) in family.metrics.iter().enumerate() {
            so_far += metric.samples.len();
            // Close the run once it holds its share of everything so far.
            if so_far * parts >= total * (runs.len() + 1) && runs.len() + 1 < parts {
                run.push((family, &family.metrics[first..=i]));
                runs.push(std::mem::take(&mut run));
                first = i + 1;
            }
        }
        if first < family.metrics.len() {
            run.push((family, &family.metrics[first..]));
        }
    }
    if !run.is_empty() || runs.is_empty() {
        runs.push(run);
    }
    runs
}

/// What a writer produced, for the log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub series: usize,
    pub samples: usize,
}

/// OpenMetrics text of a part: families contiguous, each label set's points in time
/// order, histogram buckets, count and sum together per timestamp, `# EOF` last.
/// `done` hears how many series each label set added, for progress.
pub fn openmetrics(
    model: &Model,
    part: &[Slice<'_>],
    grid: &Grid,
    out: &mut impl Write,
    done: &mut impl FnMut(usize),
) -> io::Result<Written> {
    let mut written = Written::default();
    for &(family, metrics) in part {
        // OpenMetrics names the counter family without the `_total` of its samples.
        let name = match family.kind {
            Kind::Counter => family
                .name
                .strip_suffix("_total")
                .expect("counter names end in _total"),
            Kind::Gauge | Kind::Histogram => family.name,
        };
        writeln!(out, "# HELP {name} {}", family.help)?;
        writeln!(out, "# TYPE {name} {}", family.kind.as_str())?;
        for metric in metrics {
            let series: Vec<String> = metric.samples.iter().map(series).collect();
            for t in grid.times() {
                for (sample, series) in metric.samples.iter().zip(&series) {
                    writeln!(out, "{series} {} {}", model.value(sample, t), t / 1000)?;
                    written.samples += 1;
                }
            }
            written.series += series.len();
            done(series.len());
        }
    }
    writeln!(out, "# EOF")?;
    Ok(written)
}

/// VictoriaMetrics JSON lines of a part: one line per series with all its values and
/// timestamps (ms). `done` hears of each series written.
pub fn vm_import(
    model: &Model,
    part: &[Slice<'_>],
    grid: &Grid,
    out: &mut impl Write,
    done: &mut impl FnMut(usize),
) -> io::Result<Written> {
    let mut written = Written::default();
    for sample in part
        .iter()
        .flat_map(|(_, metrics)| metrics.iter())
        .flat_map(|m| &m.samples)
    {
        write!(out, r#"{{"metric":{{"__name__":"{}""#, sample.name)?;
        for (name, value) in &sample.labels {
            write!(out, r#","{name}":"{value}""#)?;
        }
        out.write_all(br#"},"values":["#)?;
        for (i, t) in grid.times().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(out, "{comma}{}", model.value(sample, t))?;
            written.samples += 1;
        }
        out.write_all(br#"],"timestamps":["#)?;
        for (i, t) in grid.times().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(out, "{comma}{t}")?;
        }
        out.write_all(b"]}\n")?;
        written.series += 1;
        done(1);
    }
    Ok(written)
}

/// Prometheus text exposition (format 0.0.4) of the values at `t`, without timestamps:
/// the scraper stamps them.
pub fn exposition(model: &Model, t: Millis, out: &mut impl Write) -> io::Result<()> {
    for family in model.families() {
        writeln!(out, "# HELP {} {}", family.name, family.help)?;
        writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str())?;
        for sample in family.metrics.iter().flat_map(|m| &m.samples) {
            writeln!(out, "{} {}", series(sample), model.value(sample, t))?;
        }
    }
    Ok(())
}

/// `name{label="value",...}`; label values never need escaping (see `Sample`).
fn series(sample: &Sample) -> String {
    let labels: Vec<String> = sample
        .labels
        .iter()
        .map(|(name, value)| format!(r#"{name}="{value}""#))
        .collect();
    format!("{}{{{}}}", sample.name, labels.join(","))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::tests::{at, model};

    const HOUR: Millis = 3_600_000;

    /// Every label set of `families`, as one part.
    fn whole(families: &[Family]) -> Vec<Slice<'_>> {
        families.iter().map(|f| (f, f.metrics.as_slice())).collect()
    }

    fn written(write: impl FnOnce(&mut Vec<u8>) -> io::Result<Written>) -> (String, Written) {
        let mut out = Vec::new();
        let written = write(&mut out).unwrap();
        (String::from_utf8(out).unwrap(), written)
    }

    #[test]
    fn parts_hold_every_series_once_in_order_and_about_evenly() {
        let families = model().families();
        let all: Vec<&str> = families
            .iter()
            .flat_map(|f| &f.metrics)
            .flat_map(|m| &m.samples)
            .map(|s| s.name)
            .collect();
        for parts in [1, 3, 10, 100_000] {
            let runs = split(families, parts);
            assert!(!runs.is_empty() && runs.len() <= parts, "{parts}");
            let names: Vec<&str> = runs
                .iter()
                .flatten()
                .flat_map(|(_, metrics)| metrics.iter())
                .flat_map(|m| &m.samples)
                .map(|s| s.name)
                .collect();
            assert_eq!(names, all, "{parts} parts");
        }
        let sizes: Vec<usize> = split(families, 10)
            .iter()
            .map(|run| {
                run.iter()
                    .flat_map(|(_, m)| m.iter())
                    .map(|m| m.samples.len())
                    .sum()
            })
            .collect();
        assert_eq!(sizes.len(), 10);
        let largest = sizes.iter().max().copied().unwrap_or(0);
        // Histograms come in label sets of a few dozen series: a part is off by at most one.
        assert!(largest <= all.len() / 10 + 64, "{sizes:?}");
    }

    #[test]
    fn grid_is_aligned_to_multiples_of_the_step() {
        let times = |start, end, step| Grid::new(start, end, step).times().collect::<Vec<_>>();
        assert_eq!(times(1_000, 2 * HOUR + 1_000, HOUR), [HOUR, 2 * HOUR]);
        assert_eq!(times(0, 60_000, 30_000), [0, 30_000, 60_000]);
        assert_eq!(times(-HOUR, -1, HOUR), [-HOUR]);
    }

    #[test]
    fn openmetrics_has_contiguous_families_and_ends_with_eof() {
        let t = at((2025, 11, 28), 0, 0);
        let (text, count) = written(|out| {
            openmetrics(
                model(),
                &whole(model().families()),
                &Grid::new(t, t + 60_000, 30_000),
                out,
                &mut |_| {},
            )
        });
        assert_eq!(
            count,
            Written {
                series: model().series_count(),
                samples: 3 * model().series_count()
            }
        );
        assert!(text.ends_with("\n# EOF\n"));
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert!(
            types.contains(&"shop_orders counter"),
            "counter families drop _total: {types:?}"
        );
        assert!(types.contains(&"http_request_duration_seconds histogram"));
        let mut seen = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            let family = types
                .iter()
                .map(|t| t.split(' ').next().unwrap())
                .find(|f| name.starts_with(f))
                .unwrap();
            if seen.last() != Some(&family) {
                assert!(!seen.contains(&family), "{family} is interleaved");
                seen.push(family);
            }
            let timestamp = line.rsplit(' ').next().unwrap();
            assert!(
                timestamp.parse::<i64>().unwrap() * 1000 >= t,
                "timestamps are seconds"
            );
        }
    }

    #[test]
    fn every_format_gives_the_same_value_at_the_same_instant() {
        // Around the Black Friday opening: the 30 s backfill, the 1 h import, and a scrape.
        let opening = at((2025, 11, 28), 0, 0);
        let (start, end) = (opening - HOUR, opening + HOUR);
        let (om, _) = written(|out| {
            openmetrics(
                model(),
                &whole(model().families()),
                &Grid::new(start, end, 30_000),
                out,
                &mut |_| {},
            )
        });
        let fine: HashMap<(&str, i64), f64> = om
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|line| {
                let mut fields = line.rsplitn(3, ' ');
                let (ts, value, series) = (
                    fields.next().unwrap(),
                    fields.next().unwrap(),
                    fields.next().unwrap(),
                );
                (
                    (series, ts.parse::<i64>().unwrap() * 1000),
                    value.parse().unwrap(),
                )
            })
            .collect();
        let (vm, _) = written(|out| {
            vm_import(
                model(),
                &whole(model().families()),
                &Grid::new(start, end, HOUR),
                out,
                &mut |_| {},
            )
        });
        let mut scrape = Vec::new();
        exposition(model(), opening, &mut scrape).unwrap();
        let scrape = String::from_utf8(scrape).unwrap();
        let live: HashMap<&str, f64> = scrape
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                l.rsplit_once(' ')
                    .map(|(series, value)| (series, value.parse().unwrap()))
                    .unwrap()
            })
            .collect();
        let samples = model()
            .families()
            .iter()
            .flat_map(|f| &f.metrics)
            .flat_map(|m| &m.samples);
        let mut lines = 0;
        for (line, sample) in vm.lines().zip(samples) {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(json["metric"]["__name__"], sample.name);
            let key = series(sample);
            let timestamps = json["timestamps"].as_array().unwrap();
            assert_eq!(timestamps.len(), 3);
            for (t, value) in timestamps.iter().zip(json["values"].as_array().unwrap()) {
                let (t, value) = (t.as_i64().unwrap(), value.as_f64().unwrap());
                assert_eq!(fine[&(key.as_str(), t)], value, "{key} at {t}");
                if t == opening {
                    assert_eq!(live[key.as_str()], value, "{key} scraped");
                }
            }
            lines += 1;
        }
        assert_eq!(lines, model().series_count());
    }
}
