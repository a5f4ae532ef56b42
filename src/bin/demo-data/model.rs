//! The demo shop's metrics: the series catalogue (names and labels are a contract with the
//! dashboards and tests) and the value of each sample at a time. Counters integrate the
//! `shop`'s rates (see `curve`); gauges read the calendar directly. No I/O.

use std::collections::HashMap;

use crate::calendar::{Calendar, MINUTE_MS, Millis, Stream, Trend, noise, split};
use crate::curve::Curve;
use crate::shop::{
    BUCKETS, BUSINESS_SHARE, CODES, CONSUMER_CHANNELS, ErpEntity, PAID, REGIONS, REGISTERS, Rate,
    SERVICES, SHIPPED, STAGES, STATUSES, Scale, WAREHOUSES,
};

/// How a family is typed in the exposition formats.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

pub struct Family {
    /// The name queries use; counters end in `_total`.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub metrics: Vec<Metric>,
}

/// One label set: a single sample, or a histogram's buckets, `_count` and `_sum`, which
/// OpenMetrics wants together at each timestamp.
pub struct Metric {
    pub samples: Vec<Sample>,
}

/// One time series. Label values are plain ASCII words and numbers, never needing escapes.
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    value: Value,
}

#[derive(Clone, Copy)]
enum Value {
    /// Events counted: whole numbers.
    Count {
        curve: usize,
        weight: f64,
    },
    /// Seconds accumulated (CPU, latency sums), to the millisecond.
    Seconds {
        curve: usize,
        weight: f64,
    },
    Gauge(Gauge),
}

#[derive(Clone, Copy)]
enum Gauge {
    Constant(f64),
    Forecast { share: f64 },
    Stuck { stage: usize, region: usize },
    ErpLag(ErpEntity),
    RegisterConnected { register: usize },
}

/// All series of the demo and what is needed to evaluate them.
pub struct Model {
    calendar: Calendar,
    scale: Scale,
    curves: Vec<Curve>,
    families: Vec<Family>,
    seed: u64,
}

impl Model {
    /// A model valid up to the end of local day `last_day`, with `instances` instances per
    /// service and a demo SLA backend incident on `demo_incident_day`.
    pub fn new(seed: u64, instances: usize, demo_incident_day: i64, last_day: i64) -> Self {
        let calendar = Calendar::new(seed, REGISTERS.len(), demo_incident_day, last_day);
        let scale = Scale::new(calendar.reference_peak, calendar.peak_load);
        let mut curves = Curves {
            calendar: &calendar,
            scale: &scale,
            curves: Vec::new(),
            index: HashMap::new(),
        };
        let families = vec![
            orders(&mut curves),
            forecast(),
            stuck(),
            breaches(&mut curves),
            http_requests(&mut curves, seed, instances),
            http_duration(&mut curves, seed, instances),
            cpu_seconds(&mut curves, seed, instances),
            cpu_cores(seed, instances),
            fulfilled(&mut curves),
            sla_targets(),
            erp_lag(),
            receipts(&mut curves),
            registers_connected(),
        ];
        let curves = curves.curves;
        Model {
            calendar,
            scale,
            curves,
            families,
            seed,
        }
    }

    pub fn families(&self) -> &[Family] {
        &self.families
    }

    pub fn series_count(&self) -> usize {
        self.families
            .iter()
            .flat_map(|f| &f.metrics)
            .map(|m| m.samples.len())
            .sum()
    }

    /// Whether the model can evaluate samples at `t`.
    pub fn covers(&self, t: Millis) -> bool {
        self.calendar.covers(t)
    }

    /// The value of `sample` at `t`.
    ///
    /// # Panics
    /// If `t` is not covered by the model.
    pub fn value(&self, sample: &Sample, t: Millis) -> f64 {
        match sample.value {
            Value::Count { curve, weight } => {
                (weight * self.curves[curve].at(&self.calendar, t)).floor()
            }
            Value::Seconds { curve, weight } => {
                to_millis(weight * self.curves[curve].at(&self.calendar, t))
            }
            Value::Gauge(gauge) => self.gauge(gauge, t),
        }
    }

    fn gauge(&self, gauge: Gauge, t: Millis) -> f64 {
        let (day, minute, _) = split(t);
        let day = self.calendar.day(day);
        let shape = self.calendar.shape(day.shape);
        let ratio = shape.load[minute] / self.scale.peak_load;
        match gauge {
            Gauge::Constant(value) => value,
            Gauge::Forecast { share } => {
                let consumer = day.trend(Trend::Plan) * shape.plan[minute];
                let business = BUSINESS_SHARE * day.trend(Trend::Business) * shape.business[minute];
                to_millis(share * 60.0 * self.scale.orders * (consumer + business))
            }
            Gauge::Stuck { stage, region } => {
                let typical = STAGES[stage].stuck.at(ratio, shape.backlog[minute]);
                let jitter = noise(
                    self.seed,
                    Stream::Stuck,
                    &[stage as u64, region as u64, (t / MINUTE_MS) as u64],
                );
                (REGIONS[region].1 * typical * day.trend(Trend::Plan) + 3.0 * jitter).floor()
            }
            Gauge::ErpLag(entity) => {
                let seconds = |period: Millis| (t.rem_euclid(period) as f64) / 1000.0;
                to_millis(match entity {
                    ErpEntity::Orders => {
                        let jitter = noise(self.seed, Stream::ErpLag, &[(t / MINUTE_MS) as u64]);
                        3.0 + 2.0 * jitter + 240.0 * ratio.powi(3)
                    }
                    // Prices and stock arrive in batches: the lag is a sawtooth.
                    ErpEntity::Prices => 5.0 + seconds(15 * MINUTE_MS),
                    ErpEntity::Stock => 2.0 + seconds(5 * MINUTE_MS) + 60.0 * ratio * ratio,
                })
            }
            Gauge::RegisterConnected { register } => {
                let offline = day.outage.is_some_and(|o| o.covers(register, minute));
                if offline { 0.0 } else { 1.0 }
            }
        }
    }
}

fn to_millis(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Builds each distinct curve once, however many series share it.
struct Curves<'a> {
    calendar: &'a Calendar,
    scale: &'a Scale,
    curves: Vec<Curve>,
    index: HashMap<Rate, usize>,
}

impl Curves<'_> {
    fn curve(&mut self, rate: Rate) -> usize {
        if let Some(&i) = self.index.get(&rate) {
            return i;
        }
        let scale = self.scale;
        let curve = Curve::new(
            self.calendar,
            rate.trend(),
            rate.register(),
            |day, outage, minute| rate.per_second(scale, day, outage, minute),
        );
        self.curves.push(curve);
        self.index.insert(rate, self.curves.len() - 1);
        self.curves.len() - 1
    }

    fn count(&mut self, rate: Rate, weight: f64) -> Value {
        Value::Count {
            curve: self.curve(rate),
            weight,
        }
    }

    fn seconds(&mut self, rate: Rate, weight: f64) -> Value {
        Value::Seconds {
            curve: self.curve(rate),
            weight,
        }
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .map(|&(name, value)| (name, value.to_owned()))
        .collect()
}

fn single(name: &'static str, labels: Vec<(&'static str, String)>, value: Value) -> Metric {
    Metric {
        samples: vec![Sample {
            name,
            labels,
            value,
        }],
    }
}

fn family(name: &'static str, help: &'static str, kind: Kind, metrics: Vec<Metric>) -> Family {
    Family {
        name,
        help,
        kind,
        metrics,
    }
}

/// Per-instance shares of a service's traffic: near equal, a little skewed as real load
/// balancing is. Normalised so the service total does not depend on `--instances`.
fn instances(seed: u64, service: usize, count: usize) -> Vec<(String, f64)> {
    let skew: Vec<f64> = (0..count)
        .map(|i| 0.88 + 0.24 * noise(seed, Stream::InstanceSkew, &[service as u64, i as u64]))
        .collect();
    let total: f64 = skew.iter().sum();
    let name = SERVICES[service].name;
    skew.iter()
        .enumerate()
        .map(|(i, s)| (format!("{name}-{}", i + 1), s / total))
        .collect()
}

fn orders(curves: &mut Curves) -> Family {
    let channels = CONSUMER_CHANNELS
        .iter()
        .map(|&(channel, share)| (channel, Rate::ConsumerOrders, share))
        .chain([("b2b", Rate::BusinessOrders, 1.0)]);
    let mut metrics = Vec::new();
    for (channel, rate, channel_share) in channels {
        for &(status, reached) in &STATUSES {
            for &(region, region_share) in &REGIONS {
                let value = curves.count(rate, channel_share * reached * region_share);
                let labels =
                    labels(&[("status", status), ("region", region), ("channel", channel)]);
                metrics.push(single("shop_orders_total", labels, value));
            }
        }
    }
    family(
        "shop_orders_total",
        "Orders that reached each status.",
        Kind::Counter,
        metrics,
    )
}

fn forecast() -> Family {
    let metrics = REGIONS
        .iter()
        .map(|&(region, share)| {
            let value = Value::Gauge(Gauge::Forecast { share });
            single(
                "shop_orders_forecast_per_minute",
                labels(&[("region", region)]),
                value,
            )
        })
        .collect();
    let help = "Planned orders per minute (the forecast the sale was prepared for).";
    family(
        "shop_orders_forecast_per_minute",
        help,
        Kind::Gauge,
        metrics,
    )
}

fn stuck() -> Family {
    let mut metrics = Vec::new();
    for (stage, s) in STAGES.iter().enumerate() {
        for (region, &(name, _)) in REGIONS.iter().enumerate() {
            let value = Value::Gauge(Gauge::Stuck { stage, region });
            metrics.push(single(
                "shop_orders_stuck",
                labels(&[("stage", s.name), ("region", name)]),
                value,
            ));
        }
    }
    family(
        "shop_orders_stuck",
        "Orders past the deadline of their current stage.",
        Kind::Gauge,
        metrics,
    )
}

fn breaches(curves: &mut Curves) -> Family {
    let mut metrics = Vec::new();
    for (stage, s) in STAGES.iter().enumerate() {
        for &(region, share) in &REGIONS {
            let value = curves.count(Rate::Breaches { stage }, share);
            let labels = labels(&[("stage", s.name), ("region", region)]);
            metrics.push(single("shop_order_deadline_breaches_total", labels, value));
        }
    }
    let help = "Orders that missed the deadline of a stage.";
    family(
        "shop_order_deadline_breaches_total",
        help,
        Kind::Counter,
        metrics,
    )
}

fn http_requests(curves: &mut Curves, seed: u64, count: usize) -> Family {
    let mut metrics = Vec::new();
    for (service, s) in SERVICES.iter().enumerate() {
        for (instance, share) in instances(seed, service, count) {
            for (code, &code_name) in CODES.iter().enumerate() {
                for (method, method_share) in [("GET", 1.0 - s.post_share), ("POST", s.post_share)]
                {
                    let value =
                        curves.count(Rate::Requests { service, code }, share * method_share);
                    let labels = labels(&[
                        ("service", s.name),
                        ("instance", &instance),
                        ("code", code_name),
                        ("method", method),
                    ]);
                    metrics.push(single("http_requests_total", labels, value));
                }
            }
        }
    }
    family(
        "http_requests_total",
        "HTTP requests served.",
        Kind::Counter,
        metrics,
    )
}

fn http_duration(curves: &mut Curves, seed: u64, count: usize) -> Family {
    let mut metrics = Vec::new();
    for (service, s) in SERVICES.iter().enumerate() {
        for (instance, share) in instances(seed, service, count) {
            let common = [("service", s.name), ("instance", instance.as_str())];
            let bounds = BUCKETS.iter().map(|&(_, le)| le).chain(["+Inf"]);
            let mut samples: Vec<Sample> = bounds
                .enumerate()
                .map(|(bucket, le)| Sample {
                    name: "http_request_duration_seconds_bucket",
                    labels: labels(&[common[0], common[1], ("le", le)]),
                    value: curves.count(Rate::Latency { service, bucket }, share),
                })
                .collect();
            samples.push(Sample {
                name: "http_request_duration_seconds_count",
                labels: labels(&common),
                value: curves.count(
                    Rate::Latency {
                        service,
                        bucket: BUCKETS.len(),
                    },
                    share,
                ),
            });
            samples.push(Sample {
                name: "http_request_duration_seconds_sum",
                labels: labels(&common),
                value: curves.seconds(Rate::LatencySum { service }, share),
            });
            metrics.push(Metric { samples });
        }
    }
    let help = "HTTP request latency.";
    family(
        "http_request_duration_seconds",
        help,
        Kind::Histogram,
        metrics,
    )
}

fn cpu_seconds(curves: &mut Curves, seed: u64, count: usize) -> Family {
    let mut metrics = Vec::new();
    for (service, s) in SERVICES.iter().enumerate() {
        // Every instance runs at the fleet's utilisation, so none exceeds its cores.
        let value = curves.seconds(Rate::Cpu { service }, 1.0);
        for (instance, _) in instances(seed, service, count) {
            let labels = labels(&[("service", s.name), ("instance", &instance)]);
            metrics.push(single("process_cpu_seconds_total", labels, value));
        }
    }
    family(
        "process_cpu_seconds_total",
        "CPU time used by the process.",
        Kind::Counter,
        metrics,
    )
}

fn cpu_cores(seed: u64, count: usize) -> Family {
    let mut metrics = Vec::new();
    for (service, s) in SERVICES.iter().enumerate() {
        for (instance, _) in instances(seed, service, count) {
            let labels = labels(&[("service", s.name), ("instance", &instance)]);
            metrics.push(single(
                "service_cpu_cores",
                labels,
                Value::Gauge(Gauge::Constant(s.cores)),
            ));
        }
    }
    family(
        "service_cpu_cores",
        "CPU cores available to the instance.",
        Kind::Gauge,
        metrics,
    )
}

fn fulfilled(curves: &mut Curves) -> Family {
    let mut metrics = Vec::new();
    for (warehouse, w) in WAREHOUSES.iter().enumerate() {
        for (result, late) in [("on_time", false), ("late", true)] {
            let value = curves.count(Rate::Fulfilled { warehouse, late }, w.share * SHIPPED);
            let labels = labels(&[("warehouse", w.name), ("result", result)]);
            metrics.push(single("fulfilment_orders_total", labels, value));
        }
    }
    let help = "Orders shipped by a warehouse, on time or late against the fulfilment SLA.";
    family("fulfilment_orders_total", help, Kind::Counter, metrics)
}

fn sla_targets() -> Family {
    let metrics = WAREHOUSES
        .iter()
        .map(|w| {
            let value = Value::Gauge(Gauge::Constant(w.sla_target));
            single(
                "fulfilment_sla_target_ratio",
                labels(&[("warehouse", w.name)]),
                value,
            )
        })
        .collect();
    let help = "Share of orders a warehouse has agreed to ship on time.";
    family("fulfilment_sla_target_ratio", help, Kind::Gauge, metrics)
}

fn erp_lag() -> Family {
    let metrics = ErpEntity::ALL
        .iter()
        .map(|&entity| {
            let labels = labels(&[("system", "1c"), ("entity", entity.as_str())]);
            single(
                "erp_sync_lag_seconds",
                labels,
                Value::Gauge(Gauge::ErpLag(entity)),
            )
        })
        .collect();
    let help = "Age of the newest data synchronised with the ERP.";
    family("erp_sync_lag_seconds", help, Kind::Gauge, metrics)
}

fn receipts(curves: &mut Curves) -> Family {
    let mut metrics = Vec::new();
    for (register, &(name, share)) in REGISTERS.iter().enumerate() {
        for (result, error) in [("registered", false), ("error", true)] {
            let value = curves.count(Rate::Receipts { register, error }, share * PAID);
            let labels = labels(&[("register", name), ("result", result)]);
            metrics.push(single("fiscal_receipts_total", labels, value));
        }
    }
    let help = "Fiscal receipts sent to the tax service through a register.";
    family("fiscal_receipts_total", help, Kind::Counter, metrics)
}

fn registers_connected() -> Family {
    let metrics = REGISTERS
        .iter()
        .enumerate()
        .map(|(register, &(name, _))| {
            let value = Value::Gauge(Gauge::RegisterConnected { register });
            single(
                "fiscal_register_connected",
                labels(&[("register", name)]),
                value,
            )
        })
        .collect();
    let help = "1 while the fiscal register is connected to the tax service.";
    family("fiscal_register_connected", help, Kind::Gauge, metrics)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::OnceLock;

    use chrono::NaiveDate;

    use super::*;
    use crate::calendar::{day_number, day_start};

    pub(crate) fn day(year: i32, month: u32, day: u32) -> i64 {
        day_number(NaiveDate::from_ymd_opt(year, month, day).unwrap())
    }

    /// Moscow local time.
    pub(crate) fn at(date: (i32, u32, u32), hour: i64, minute: i64) -> Millis {
        day_start(day(date.0, date.1, date.2)) + (hour * 60 + minute) * MINUTE_MS
    }

    const DEMO_INCIDENT_DAY: (i32, u32, u32) = (2026, 11, 20);

    /// The default demo (8 instances), built once: building it is the slow part in debug.
    pub(crate) fn model() -> &'static Model {
        static MODEL: OnceLock<Model> = OnceLock::new();
        MODEL.get_or_init(|| {
            let (y, m, d) = DEMO_INCIDENT_DAY;
            Model::new(1, 8, day(y, m, d), day(2026, 12, 31))
        })
    }

    fn samples<'a>(model: &'a Model, name: &'a str) -> impl Iterator<Item = &'a Sample> {
        model
            .families()
            .iter()
            .flat_map(|f| &f.metrics)
            .flat_map(|m| &m.samples)
            .filter(move |s| s.name == name)
    }

    fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
        sample
            .labels
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v)
    }

    /// Per-second increase over the five minutes from `t` of the counters `keep` selects.
    fn rate(name: &str, keep: impl Fn(&Sample) -> bool, t: Millis) -> f64 {
        let model = model();
        let increase: f64 = samples(model, name)
            .filter(|s| keep(s))
            .map(|s| model.value(s, t + 5 * MINUTE_MS) - model.value(s, t))
            .sum();
        increase / 300.0
    }

    fn created_per_minute(t: Millis) -> f64 {
        60.0 * rate("shop_orders_total", |s| label(s, "status") == "created", t)
    }

    fn counters(model: &Model) -> impl Iterator<Item = &Sample> {
        model
            .families()
            .iter()
            .filter(|f| f.kind != Kind::Gauge)
            .flat_map(|f| &f.metrics)
            .flat_map(|m| &m.samples)
    }

    #[test]
    fn catalogue_has_the_promised_size_and_plain_labels() {
        let model = model();
        assert!(
            (2000..=3000).contains(&model.series_count()),
            "{}",
            model.series_count()
        );
        for family in model.families() {
            assert_eq!(
                family.kind == Kind::Counter,
                family.name.ends_with("_total"),
                "{}",
                family.name
            );
            for sample in family.metrics.iter().flat_map(|m| &m.samples) {
                assert!(sample.name.starts_with(family.name));
                for (_, value) in &sample.labels {
                    let plain = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
                    assert!(value.chars().all(plain), "{value:?} would need escaping");
                }
            }
        }
    }

    #[test]
    fn counters_never_decrease_across_sales_incidents_and_midnights() {
        let model = model();
        let (y, m, d) = DEMO_INCIDENT_DAY;
        let windows = [
            (at((2025, 11, 27), 20, 0), at((2025, 11, 28), 4, 0)),
            (at((y, m, d), 13, 30), at((y, m, d), 15, 0)),
        ];
        for (start, end) in windows {
            for sample in counters(model) {
                let mut previous = model.value(sample, start);
                for t in (start..=end).step_by(30_000).skip(1) {
                    let value = model.value(sample, t);
                    assert!(
                        value >= previous,
                        "{} {:?} fell at {t}",
                        sample.name,
                        sample.labels
                    );
                    previous = value;
                }
            }
        }
    }

    #[test]
    fn values_do_not_depend_on_how_far_the_model_reaches() {
        // `serve` builds its model ten years ahead, the generators up to --end.
        let short = Model::new(1, 8, day(2026, 11, 20), day(2026, 11, 21));
        let ts = [
            at((2023, 11, 24), 0, 7),
            at((2026, 11, 20), 14, 10),
            at((2026, 11, 21), 23, 59) + 59_999,
        ];
        for (a, b) in counters(model()).zip(counters(&short)) {
            for t in ts {
                assert_eq!(model().value(a, t), short.value(b, t), "{} at {t}", a.name);
            }
        }
    }

    #[test]
    fn orders_spike_on_sale_days() {
        let friday = (2025, 11, 28);
        let peak = (0..30)
            .map(|m| created_per_minute(at(friday, 0, m)))
            .fold(0.0, f64::max);
        assert!(
            (4000.0..5600.0).contains(&peak),
            "Black Friday peak {peak}/min"
        );
        let week_before = created_per_minute(at((2025, 11, 21), 0, 20));
        assert!(created_per_minute(at(friday, 0, 20)) > 5.0 * week_before);
        assert!(
            created_per_minute(at((2025, 11, 11), 0, 20))
                > 4.0 * created_per_minute(at((2025, 11, 4), 0, 20))
        );
        let eve = created_per_minute(at((2025, 11, 10), 23, 30));
        assert!(
            eve > 1.8 * created_per_minute(at((2025, 11, 3), 23, 30)),
            "pre-sale ramp"
        );
        let evening = created_per_minute(at((2025, 11, 19), 20, 30));
        assert!(
            (300.0..900.0).contains(&evening),
            "an ordinary evening: {evening}/min"
        );
    }

    #[test]
    fn composer_takes_about_38000_rps_at_the_peak() {
        let composer = |s: &Sample| label(s, "service") == "composer";
        let peak = (10..30)
            .map(|m| rate("http_requests_total", composer, at((2025, 11, 28), 0, m)))
            .fold(0.0, f64::max);
        assert!((33_000.0..41_000.0).contains(&peak), "{peak} rps");
    }

    #[test]
    fn sla_backend_fails_and_pegs_its_cores_during_incidents() {
        let sla = |s: &Sample| label(s, "service") == "sla-backend";
        let sla_5xx = |s: &Sample| sla(s) && label(s, "code").starts_with('5');
        let error_share =
            |t| rate("http_requests_total", sla_5xx, t) / rate("http_requests_total", sla, t);
        let (y, m, d) = DEMO_INCIDENT_DAY;
        // Ten minutes before the Black Friday window, and the demo incident at 14:00.
        for t in [
            at((2025, 11, 27), 23, 52),
            at((2024, 11, 28), 23, 52),
            at((y, m, d), 14, 5),
        ] {
            assert!(error_share(t) > 0.3, "5xx share {} at {t}", error_share(t));
            for instance in samples(model(), "process_cpu_seconds_total").filter(|s| sla(s)) {
                let cores =
                    (model().value(instance, t + 300_000) - model().value(instance, t)) / 300.0;
                assert!((1.95..=2.0).contains(&cores), "{cores} cores at {t}");
            }
            let stuck: f64 = samples(model(), "shop_orders_stuck")
                .map(|s| model().value(s, t + 300_000))
                .sum();
            assert!(stuck > 150.0, "{stuck} orders stuck at {t}");
        }
        let quiet = error_share(at((y, m, d - 7), 14, 5));
        assert!(quiet < 0.02, "5xx share {quiet} on an ordinary afternoon");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let model = model();
        let histogram = model
            .families()
            .iter()
            .find(|f| f.kind == Kind::Histogram)
            .unwrap();
        for t in [at((2025, 11, 28), 0, 5), at((2026, 3, 3), 4, 44) + 12_345] {
            for metric in &histogram.metrics {
                let values: Vec<f64> = metric.samples.iter().map(|s| model.value(s, t)).collect();
                let (buckets, count) = (&values[..BUCKETS.len() + 1], values[BUCKETS.len() + 1]);
                assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
                assert_eq!(buckets[BUCKETS.len()], count);
            }
        }
    }

    #[test]
    fn forecast_tracks_orders_on_an_ordinary_day() {
        let t = at((2026, 11, 18), 20, 0);
        let forecast: f64 = samples(model(), "shop_orders_forecast_per_minute")
            .map(|s| model().value(s, t))
            .sum();
        let actual = created_per_minute(t);
        assert!(
            (actual / forecast - 1.0).abs() < 0.15,
            "actual {actual} vs forecast {forecast}"
        );
    }

    #[test]
    fn receipts_fail_while_a_register_is_offline() {
        let model = model();
        let (day, outage) = (day(2026, 1, 1)..)
            .find_map(|d| model.calendar.day(d).outage.map(|o| (d, o)))
            .unwrap();
        let register = REGISTERS[outage.register].0;
        let t = day_start(day) + (outage.start as i64 + 2) * MINUTE_MS;
        let connected = samples(model, "fiscal_register_connected")
            .find(|s| label(s, "register") == register)
            .unwrap();
        assert_eq!(model.value(connected, t), 0.0);
        assert_eq!(
            model.value(connected, day_start(day) + outage.end as i64 * MINUTE_MS),
            1.0
        );
        let receipts = |result: &'static str| {
            move |s: &Sample| label(s, "register") == register && label(s, "result") == result
        };
        let (ok, failed) = (
            rate("fiscal_receipts_total", receipts("registered"), t),
            rate("fiscal_receipts_total", receipts("error"), t),
        );
        assert!(
            failed > 0.0 && ok == 0.0,
            "registered {ok}/s, failed {failed}/s"
        );
    }
}
