//! The demo shop itself: its regions, services, warehouses and registers, and how each
//! counted thing (orders, requests, CPU, receipts) flows per second at a minute of a day.
//! Input: a day's shape and a minute; output: a rate. No I/O.

use std::f64::consts::PI;

use crate::calendar::{DayShape, Outage, Trend};

/// Created orders per minute, whole shop, at the reference Black Friday's opening peak.
const ORDERS_AT_PEAK_PER_MINUTE: f64 = 5_000.0;
/// Requests per second at the front service (`composer`) at the same peak.
const COMPOSER_RPS_AT_PEAK: f64 = 38_000.0;
/// Business orders relative to consumer orders at their respective peaks.
pub const BUSINESS_SHARE: f64 = 0.05;
/// Order acceptance slows while the SLA backend is down.
const INCIDENT_ORDER_DIP: f64 = 0.3;
const SLA_BACKEND: usize = 6;

pub const REGIONS: [(&str, f64); 8] = [
    ("moscow", 0.32),
    ("spb", 0.16),
    ("kazan", 0.07),
    ("novosibirsk", 0.09),
    ("ekaterinburg", 0.09),
    ("krasnodar", 0.10),
    ("samara", 0.07),
    ("vladivostok", 0.10),
];
/// Consumer channels and their shares; `b2b` follows office hours instead.
pub const CONSUMER_CHANNELS: [(&str, f64); 3] =
    [("web", 0.36), ("app", 0.44), ("marketplace", 0.20)];
/// Each status is reached by a few percent fewer orders than the one before.
pub const STATUSES: [(&str, f64); 5] = [
    ("created", 1.00),
    ("paid", 0.95),
    ("assembled", 0.93),
    ("shipped", 0.91),
    ("delivered", 0.88),
];
pub const PAID: f64 = STATUSES[1].1;
pub const SHIPPED: f64 = STATUSES[3].1;

/// How a quantity responds to load: its value at rest, the extra at the Black Friday
/// peak (growing with the square of the load ratio), and the extra behind an incident.
#[derive(Clone, Copy)]
pub struct Response {
    rest: f64,
    peak: f64,
    incident: f64,
}

impl Response {
    const fn new((rest, peak, incident): (f64, f64, f64)) -> Self {
        Response {
            rest,
            peak,
            incident,
        }
    }

    pub fn at(self, ratio: f64, backlog: f64) -> f64 {
        self.rest + self.peak * ratio * ratio + self.incident * backlog
    }
}

/// A deadline stage: `breach` is the share of orders missing its deadline, `stuck` the
/// number of orders past it across the shop (at the reference year's volume).
pub struct Stage {
    pub name: &'static str,
    breach: Response,
    pub stuck: Response,
}

const fn stage(name: &'static str, breach: (f64, f64, f64), stuck: (f64, f64, f64)) -> Stage {
    Stage {
        name,
        breach: Response::new(breach),
        stuck: Response::new(stuck),
    }
}

#[rustfmt::skip]
pub const STAGES: [Stage; 4] = [
    //     name        breach share:         stuck orders:
    //                 rest   peak  incident  rest  peak   incident
    stage("payment",  (0.004, 0.02, 0.03),   (6.0,  40.0,  30.0)),
    stage("assembly", (0.008, 0.06, 0.10),   (10.0, 300.0, 400.0)),
    stage("handover", (0.005, 0.04, 0.05),   (8.0,  180.0, 250.0)),
    stage("delivery", (0.010, 0.03, 0.0),    (14.0, 60.0,  0.0)),
];

pub struct Service {
    pub name: &'static str,
    /// Requests relative to `composer`.
    share: f64,
    median_latency: f64,
    /// CPU cores each instance may use.
    pub cores: f64,
    pub post_share: f64,
}

const fn service(
    name: &'static str,
    share: f64,
    median_latency: f64,
    cores: f64,
    post_share: f64,
) -> Service {
    Service {
        name,
        share,
        median_latency,
        cores,
        post_share,
    }
}

#[rustfmt::skip]
pub const SERVICES: [Service; 10] = [
    //       name              share   median  cores  POST share
    service("composer",        1.0,    0.045,  8.0,   0.10),
    service("catalog",         0.55,   0.018,  4.0,   0.02),
    service("search",          0.30,   0.060,  8.0,   0.05),
    service("cart",            0.12,   0.025,  4.0,   0.50),
    service("checkout",        0.03,   0.120,  4.0,   0.70),
    service("payments",        0.012,  0.250,  4.0,   0.90),
    service("sla-backend",     0.05,   0.030,  2.0,   0.30),
    service("warehouse-api",   0.02,   0.080,  4.0,   0.60),
    service("erp-sync",        0.0015, 0.400,  2.0,   0.80),
    service("fiscal-gateway",  0.004,  0.300,  2.0,   1.00),
];

pub const CODES: [&str; 6] = ["200", "400", "404", "429", "500", "503"];
/// Histogram bucket bounds, written exactly as Prometheus client libraries write them so
/// that backfilled and scraped `le` labels match.
#[rustfmt::skip]
pub const BUCKETS: [(f64, &str); 11] = [
    (0.005, "0.005"), (0.01, "0.01"), (0.025, "0.025"), (0.05, "0.05"), (0.1, "0.1"),
    (0.25, "0.25"), (0.5, "0.5"), (1.0, "1"), (2.5, "2.5"), (5.0, "5"), (10.0, "10"),
];

pub struct Warehouse {
    pub name: &'static str,
    pub share: f64,
    /// Share of orders shipped late on a quiet day.
    late: f64,
    pub sla_target: f64,
}

const fn warehouse(name: &'static str, share: f64, late: f64, sla_target: f64) -> Warehouse {
    Warehouse {
        name,
        share,
        late,
        sla_target,
    }
}

#[rustfmt::skip]
pub const WAREHOUSES: [Warehouse; 6] = [
    //         name          share  late   SLA target
    warehouse("podolsk",     0.30,  0.020, 0.95),
    warehouse("shushary",    0.16,  0.030, 0.95),
    warehouse("kazan",       0.12,  0.025, 0.95),
    warehouse("koltsovo",    0.14,  0.030, 0.95),
    warehouse("tolmachevo",  0.14,  0.040, 0.93),
    warehouse("krasnodar",   0.14,  0.030, 0.95),
];

/// Fiscal registers (KKT) and their shares of receipts.
pub const REGISTERS: [(&str, f64); 4] = [
    ("kkt-msk-01", 0.35),
    ("kkt-msk-02", 0.30),
    ("kkt-spb-01", 0.20),
    ("kkt-ekb-01", 0.15),
];

/// What the ERP (1C) exchanges with the shop.
#[derive(Clone, Copy)]
pub enum ErpEntity {
    Orders,
    Prices,
    Stock,
}

impl ErpEntity {
    pub const ALL: [ErpEntity; 3] = [ErpEntity::Orders, ErpEntity::Prices, ErpEntity::Stock];

    pub fn as_str(self) -> &'static str {
        match self {
            ErpEntity::Orders => "orders",
            ErpEntity::Prices => "prices",
            ErpEntity::Stock => "stock",
        }
    }
}

/// Per-second rates per unit of load and trend, fixed by the peak targets.
pub struct Scale {
    pub orders: f64,
    requests: f64,
    /// Load ratios (for errors, latency, backlogs) are relative to this.
    pub peak_load: f64,
}

impl Scale {
    /// `reference_peak` is trend times load at the reference Black Friday's peak,
    /// `peak_load` the load alone (see `Calendar`).
    pub fn new(reference_peak: f64, peak_load: f64) -> Self {
        Scale {
            orders: ORDERS_AT_PEAK_PER_MINUTE / 60.0 / reference_peak,
            requests: COMPOSER_RPS_AT_PEAK / reference_peak,
            peak_load,
        }
    }
}

/// The rate behind a counter, before the per-series weight (a label's share).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    ConsumerOrders,
    BusinessOrders,
    Breaches {
        stage: usize,
    },
    Requests {
        service: usize,
        code: usize,
    },
    /// Requests of `service` no slower than `BUCKETS[bucket]`; one past the end is `+Inf`.
    Latency {
        service: usize,
        bucket: usize,
    },
    LatencySum {
        service: usize,
    },
    Cpu {
        service: usize,
    },
    Fulfilled {
        warehouse: usize,
        late: bool,
    },
    Receipts {
        register: usize,
        error: bool,
    },
}

impl Rate {
    pub fn trend(self) -> Trend {
        match self {
            Rate::BusinessOrders => Trend::Business,
            Rate::Cpu { .. } => Trend::Flat,
            _ => Trend::Consumer,
        }
    }

    /// The register whose outages this rate depends on.
    pub fn register(self) -> Option<usize> {
        match self {
            Rate::Receipts { register, .. } => Some(register),
            _ => None,
        }
    }

    /// Per second at `minute` of a day of this `day` shape, before the day's trend.
    pub fn per_second(
        self,
        scale: &Scale,
        day: &DayShape,
        outage: Option<Outage>,
        minute: usize,
    ) -> f64 {
        let load = day.load[minute];
        // Error rates and latency follow the load relative to the sale peak, not the
        // yearly growth: capacity grows with the business.
        let ratio = load / scale.peak_load;
        let incident = day.incident[minute];
        let backlog = day.backlog[minute];
        let dip = 1.0 - INCIDENT_ORDER_DIP * incident;
        let orders = scale.orders * load * dip;
        let requests = |service: usize| scale.requests * SERVICES[service].share * load;
        let sla_down = |service: usize| {
            if service == SLA_BACKEND {
                incident
            } else {
                0.0
            }
        };
        match self {
            Rate::ConsumerOrders => orders,
            Rate::BusinessOrders => scale.orders * BUSINESS_SHARE * day.business[minute] * dip,
            Rate::Breaches { stage } => orders * STAGES[stage].breach.at(ratio, backlog),
            Rate::Requests { service, code } => {
                requests(service) * code_shares(ratio, sla_down(service))[code]
            }
            Rate::Latency { service, bucket } => {
                let latency = Latency::new(service, ratio, sla_down(service));
                requests(service)
                    * BUCKETS
                        .get(bucket)
                        .map_or(1.0, |&(le, _)| latency.share_within(le))
            }
            Rate::LatencySum { service } => {
                requests(service) * Latency::new(service, ratio, sla_down(service)).mean()
            }
            Rate::Cpu { service } => {
                let busy = 0.08 + 0.6 * ratio.min(1.0);
                // The incident: a loop on allocations eats every core it has.
                SERVICES[service].cores * (busy + (1.0 - busy) * sla_down(service))
            }
            Rate::Fulfilled { warehouse, late } => {
                let late_share = WAREHOUSES[warehouse].late + 0.12 * ratio * ratio + 0.08 * backlog;
                orders * if late { late_share } else { 1.0 - late_share }
            }
            Rate::Receipts { register, error } => {
                let offline = outage.is_some_and(|o| o.covers(register, minute));
                let failing = if offline {
                    1.0
                } else {
                    0.002 + 0.004 * ratio * ratio
                };
                orders * if error { failing } else { 1.0 - failing }
            }
        }
    }
}

/// Shares of responses by `CODES`: 5xx rise with load, and almost half fail while the
/// SLA backend is down (`down` is 1 then, for that service only).
fn code_shares(ratio: f64, down: f64) -> [f64; 6] {
    let server_errors = 0.001 + 0.008 * ratio * ratio + 0.45 * down;
    let throttled = 0.0005 + 0.01 * ratio.powi(3);
    let (bad_request, not_found) = (0.006, 0.012);
    let ok = 1.0 - bad_request - not_found - throttled - server_errors;
    [
        ok,
        bad_request,
        not_found,
        throttled,
        0.6 * server_errors,
        0.4 * server_errors,
    ]
}

/// Log-logistic response times: closed-form CDF and mean, and a heavy tail when the
/// shape parameter drops during an incident.
struct Latency {
    median: f64,
    shape: f64,
}

impl Latency {
    fn new(service: usize, ratio: f64, down: f64) -> Self {
        Latency {
            median: SERVICES[service].median_latency
                * (1.0 + 0.8 * ratio * ratio)
                * (1.0 + 24.0 * down),
            shape: 4.0 - 1.5 * down,
        }
    }

    fn share_within(&self, seconds: f64) -> f64 {
        1.0 / (1.0 + (self.median / seconds).powf(self.shape))
    }

    fn mean(&self) -> f64 {
        let b = PI / self.shape;
        self.median * b / b.sin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_consistent() {
        assert_eq!(SERVICES[SLA_BACKEND].name, "sla-backend");
        let sums = [
            REGIONS.iter().map(|r| r.1).sum::<f64>(),
            CONSUMER_CHANNELS.iter().map(|c| c.1).sum(),
            WAREHOUSES.iter().map(|w| w.share).sum(),
            REGISTERS.iter().map(|r| r.1).sum(),
        ];
        for sum in sums {
            assert!((sum - 1.0).abs() < 1e-9, "shares add up to {sum}");
        }
        for ratio in [0.0, 0.5, 1.0] {
            for down in [0.0, 1.0] {
                let shares = code_shares(ratio, down);
                assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                assert!(shares.iter().all(|&s| s > 0.0), "{shares:?}");
            }
        }
    }
}
