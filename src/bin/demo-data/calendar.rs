//! When things happen in the demo shop: Moscow-local days, the yearly sales (11 November
//! and Black Friday), the SLA backend incidents, fiscal register outages, and the shape of
//! each day's traffic. Input: a local day number and the seed; output: plain tables of
//! per-minute multipliers and per-day trend factors. No I/O.

use std::collections::HashMap;
use std::f64::consts::TAU;

use chrono::{Datelike, NaiveDate};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub const MINUTE_MS: Millis = 60_000;
pub const DAY_MS: Millis = 86_400_000;
pub const MINUTES_PER_DAY: usize = 1440;

/// The shop runs on Moscow time (UTC+3, no DST since 2014): sales open at local midnight.
const MSK_OFFSET_MS: Millis = 3 * 3_600_000;
/// 1970-01-01 in chrono's days-from-CE numbering.
const UNIX_EPOCH_CE_DAYS: i64 = 719_163;
/// Counters start at zero on this day; nothing earlier can be generated.
pub const ORIGIN: NaiveDate = NaiveDate::from_ymd_opt(2015, 1, 1).unwrap();
/// Nothing from this day on can be generated: a bound on the calendar's size.
pub const HORIZON: NaiveDate = NaiveDate::from_ymd_opt(2100, 1, 1).unwrap();
/// Traffic is scaled so that this Black Friday peaks at the target orders per minute.
const REFERENCE_BLACK_FRIDAY: NaiveDate = NaiveDate::from_ymd_opt(2025, 11, 28).unwrap();
const GROWTH_PER_YEAR: f64 = 1.3;
/// Day-of-week factors, Monday first: consumers shop a little less on Friday and Saturday.
const CONSUMER_WEEKDAY: [f64; 7] = [1.00, 0.99, 0.98, 0.97, 0.94, 0.90, 1.03];
/// Business customers order in office hours on working days.
const BUSINESS_WEEKDAY: [f64; 7] = [1.00, 1.00, 1.00, 0.98, 0.90, 0.12, 0.08];
/// Minutes of the demo incident on `--incident-day`: early afternoon, when someone is watching.
const DEMO_INCIDENT: std::ops::Range<usize> = 840..860;
/// The Black Friday window opens at local midnight; the SLA backend dies ten minutes
/// before and stays down for twenty, so the incident spans the eve and the day itself.
const BLACK_FRIDAY_EVE_INCIDENT: std::ops::Range<usize> = 1430..MINUTES_PER_DAY;
const BLACK_FRIDAY_INCIDENT: std::ops::Range<usize> = 0..10;
/// Chance that some fiscal register loses the tax service on a given day.
const OUTAGE_PROBABILITY: f64 = 0.06;

/// Independent streams of pseudo-random numbers, so that changing one use of the seed
/// does not reshuffle the others.
#[derive(Clone, Copy)]
pub enum Stream {
    DayTrend,
    LoadWiggle,
    LoadJitter,
    Outage,
    InstanceSkew,
    Stuck,
    ErpLag,
}

/// A deterministic pseudo-random number in [0, 1) for `parts` (splitmix64 chain).
pub fn noise(seed: u64, stream: Stream, parts: &[u64]) -> f64 {
    let mut h = splitmix(seed ^ (stream as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    for &part in parts {
        h = splitmix(h ^ part);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Splits a timestamp into (local day number, minute of the local day, ms into the minute).
pub fn split(t: Millis) -> (i64, usize, Millis) {
    let local = t + MSK_OFFSET_MS;
    let in_day = local.rem_euclid(DAY_MS);
    (
        local.div_euclid(DAY_MS),
        (in_day / MINUTE_MS) as usize,
        in_day % MINUTE_MS,
    )
}

/// The local day number of a calendar date.
pub fn day_number(date: NaiveDate) -> i64 {
    i64::from(date.num_days_from_ce()) - UNIX_EPOCH_CE_DAYS
}

/// The first millisecond of a local day.
pub fn day_start(day: i64) -> Millis {
    day * DAY_MS - MSK_OFFSET_MS
}

fn date(day: i64) -> NaiveDate {
    i32::try_from(day + UNIX_EPOCH_CE_DAYS)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .expect("day numbers come from validated timestamps")
}

/// Last Friday of November.
pub fn black_friday(year: i32) -> NaiveDate {
    let nov30 = NaiveDate::from_ymd_opt(year, 11, 30).expect("30 November exists");
    let back = (nov30.weekday().num_days_from_monday() + 7 - 4) % 7;
    nov30 - chrono::Days::new(u64::from(back))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Event {
    None,
    /// 10 November: the pre-sale evening ramp before Singles' Day opens at midnight.
    SinglesDayEve,
    SinglesDay,
    /// The Thursday before Black Friday: evening ramp, SLA backend dies at 23:50.
    BlackFridayEve,
    BlackFriday,
}

pub fn event(date: NaiveDate) -> Event {
    if date.month() != 11 {
        return Event::None;
    }
    let friday = black_friday(date.year());
    match date.day() {
        10 => Event::SinglesDayEve,
        11 => Event::SinglesDay,
        d if d == friday.day() - 1 => Event::BlackFridayEve,
        d if d == friday.day() => Event::BlackFriday,
        _ => Event::None,
    }
}

/// A fiscal register without a connection to the tax service, minutes [start, end).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Outage {
    pub register: usize,
    pub start: usize,
    pub end: usize,
}

impl Outage {
    pub fn covers(&self, register: usize, minute: usize) -> bool {
        self.register == register && (self.start..self.end).contains(&minute)
    }
}

/// Which trend factor a rate follows from day to day.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Trend {
    /// Consumer demand: growth, weekday, season and a little day-to-day noise.
    Consumer,
    /// The forecast: consumer demand without the noise.
    Plan,
    Business,
    /// Rates that do not grow with the business, such as CPU of a fixed fleet.
    Flat,
}

/// What is known about one local day.
pub struct Day {
    /// Index into the calendar's day shapes.
    pub shape: usize,
    pub outage: Option<Outage>,
    consumer: f64,
    plan: f64,
    business: f64,
}

impl Day {
    pub fn trend(&self, trend: Trend) -> f64 {
        match trend {
            Trend::Consumer => self.consumer,
            Trend::Plan => self.plan,
            Trend::Business => self.business,
            Trend::Flat => 1.0,
        }
    }
}

/// Per-minute multipliers for one kind of day. Days of the same kind share one shape,
/// which is what keeps counter integrals cheap (see `curve`).
pub struct DayShape {
    /// Consumer traffic; 1.0 is about a weekday's evening peak, Black Friday reaches ~9.
    pub load: Vec<f64>,
    /// What the planners forecast: `load` without noise, sale spikes underestimated.
    pub plan: Vec<f64>,
    /// Business (B2B) customers: office hours.
    pub business: Vec<f64>,
    /// 1 while the SLA backend loops on allocations, else 0.
    pub incident: Vec<f64>,
    /// Orders held up by an incident: 1 during it, draining over the following half hour.
    pub backlog: Vec<f64>,
}

/// The days from `ORIGIN` to the last day anything will be asked about.
pub struct Calendar {
    first_day: i64,
    days: Vec<Day>,
    shapes: Vec<DayShape>,
    /// The Black Friday peak of consumer load in the reference year, trend included:
    /// the yardstick for "orders per minute at the peak".
    pub reference_peak: f64,
    /// The Black Friday peak of the load shape alone: load ratios are relative to it.
    pub peak_load: f64,
}

/// What makes two days share a `DayShape`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ShapeKey {
    weekday: usize,
    event: Event,
    demo_incident: bool,
}

impl Calendar {
    /// Builds the calendar up to and including `last_day`; `demo_incident_day` gets an SLA
    /// backend incident in the early afternoon; outages pick among `registers` registers.
    pub fn new(seed: u64, registers: usize, demo_incident_day: i64, last_day: i64) -> Self {
        let first_day = day_number(ORIGIN);
        let mut keys = HashMap::new();
        let mut shapes = Vec::new();
        let days = (first_day..=last_day)
            .map(|day| {
                let date = date(day);
                let weekday = date.weekday().num_days_from_monday() as usize;
                let event = event(date);
                let key = ShapeKey {
                    // Sale days have their own shape whatever the weekday: that keeps the
                    // kinds of day, and so the tables `curve` builds, few.
                    weekday: if event == Event::None { weekday } else { 0 },
                    event,
                    demo_incident: day == demo_incident_day,
                };
                let shape = *keys.entry(key).or_insert_with(|| {
                    shapes.push(DayShape::new(seed, key));
                    shapes.len() - 1
                });
                let plan = plan_trend(date);
                let wiggle = 1.0 + 0.08 * (noise(seed, Stream::DayTrend, &[day as u64]) - 0.5);
                Day {
                    shape,
                    outage: outage(seed, day, registers),
                    consumer: plan * wiggle,
                    plan,
                    business: growth(date) * BUSINESS_WEEKDAY[weekday],
                }
            })
            .collect();
        let friday = |minute| smooth_load(minute, false, Event::BlackFriday);
        let peak_load = (0..MINUTES_PER_DAY).map(friday).fold(0.0, f64::max);
        Calendar {
            first_day,
            days,
            shapes,
            reference_peak: plan_trend(REFERENCE_BLACK_FRIDAY) * peak_load,
            peak_load,
        }
    }

    pub fn last_day(&self) -> i64 {
        self.first_day + self.days.len() as i64 - 1
    }

    /// Whether `t` falls on a day this calendar was built for.
    pub fn covers(&self, t: Millis) -> bool {
        (self.first_day..=self.last_day()).contains(&split(t).0)
    }

    pub fn days(&self) -> &[Day] {
        &self.days
    }

    /// Position of `day` in `days()`.
    ///
    /// # Panics
    /// If the day is outside the calendar; callers validate their time range first.
    pub fn index(&self, day: i64) -> usize {
        usize::try_from(day - self.first_day)
            .ok()
            .filter(|&i| i < self.days.len())
            .unwrap_or_else(|| panic!("day {day} is outside the calendar"))
    }

    /// # Panics
    /// If the day is outside the calendar.
    pub fn day(&self, day: i64) -> &Day {
        &self.days[self.index(day)]
    }

    pub fn shape(&self, index: usize) -> &DayShape {
        &self.shapes[index]
    }
}

fn growth(date: NaiveDate) -> f64 {
    let years = (day_number(date) - day_number(REFERENCE_BLACK_FRIDAY)) as f64 / 365.25;
    GROWTH_PER_YEAR.powf(years)
}

/// Consumer demand by date: growth, weekday, and a season peaking before New Year.
fn plan_trend(date: NaiveDate) -> f64 {
    let season = 1.0 + 0.08 * (TAU * (f64::from(date.ordinal()) - 355.0) / 365.25).cos();
    growth(date) * CONSUMER_WEEKDAY[date.weekday().num_days_from_monday() as usize] * season
}

fn outage(seed: u64, day: i64, registers: usize) -> Option<Outage> {
    let draw = |i: u64| noise(seed, Stream::Outage, &[day as u64, i]);
    if draw(0) >= OUTAGE_PROBABILITY {
        return None;
    }
    let minutes = |lo: f64, span: f64, u: f64| (lo + span * u) as usize;
    let length = minutes(10.0, 50.0, draw(2));
    let start = minutes(0.0, (MINUTES_PER_DAY - length) as f64, draw(3));
    Some(Outage {
        register: minutes(0.0, registers as f64, draw(1)),
        start,
        end: start + length,
    })
}

impl DayShape {
    fn new(seed: u64, key: ShapeKey) -> Self {
        let weekend = key.weekday >= 5;
        let id = key.weekday as u64 + 8 * key.event as u64 + 64 * u64::from(key.demo_incident);
        let incident = |minute: usize| {
            let window = match key.event {
                Event::BlackFridayEve => BLACK_FRIDAY_EVE_INCIDENT,
                Event::BlackFriday => BLACK_FRIDAY_INCIDENT,
                _ => 0..0,
            };
            window.contains(&minute) || (key.demo_incident && DEMO_INCIDENT.contains(&minute))
        };
        let mut shape = DayShape {
            load: Vec::with_capacity(MINUTES_PER_DAY),
            plan: Vec::with_capacity(MINUTES_PER_DAY),
            business: Vec::with_capacity(MINUTES_PER_DAY),
            incident: Vec::with_capacity(MINUTES_PER_DAY),
            backlog: Vec::with_capacity(MINUTES_PER_DAY),
        };
        let mut since_incident = f64::INFINITY;
        for minute in 0..MINUTES_PER_DAY {
            let hour = (minute as f64 + 0.5) / 60.0;
            let everyday = everyday_load(hour, weekend);
            let sale = sale_load(hour, key.event);
            shape
                .load
                .push((everyday + sale) * (1.0 + wiggle(seed, id, minute)));
            shape.plan.push(everyday + 0.9 * sale);
            shape.business.push(office_hours(hour));
            let down = incident(minute);
            since_incident = if down { 0.0 } else { since_incident + 1.0 };
            shape.incident.push(if down { 1.0 } else { 0.0 });
            shape.backlog.push((-since_incident / 12.0).exp());
        }
        shape
    }
}

fn smooth_load(minute: usize, weekend: bool, event: Event) -> f64 {
    let hour = (minute as f64 + 0.5) / 60.0;
    everyday_load(hour, weekend) + sale_load(hour, event)
}

/// Consumer traffic on an ordinary day by local hour: night trough, lunch, evening peak.
fn everyday_load(hour: f64, weekend: bool) -> f64 {
    if weekend {
        0.10 + 0.50 * bump(hour, 13.5, 3.0)
            + 0.25 * bump(hour, 17.0, 2.0)
            + 0.75 * bump(hour, 21.0, 2.2)
    } else {
        0.10 + 0.40 * bump(hour, 12.5, 2.5)
            + 0.30 * bump(hour, 16.5, 1.8)
            + 0.85 * bump(hour, 21.0, 2.0)
    }
}

/// Extra consumer traffic of the sales: evening ramps before, a spike at the midnight
/// opening decaying over a few hours, and a raised level for the rest of the day.
fn sale_load(hour: f64, event: Event) -> f64 {
    match event {
        Event::None => 0.0,
        Event::SinglesDayEve => 1.5 * smoothstep((hour - 18.0) / 6.0),
        Event::SinglesDay => 5.0 * (-hour / 1.6).exp() + 1.2 + 0.6 * bump(hour, 21.0, 2.0),
        Event::BlackFridayEve => 1.3 * smoothstep((hour - 19.0) / 5.0),
        Event::BlackFriday => 7.0 * (-hour / 2.0).exp() + 1.6 + 0.8 * bump(hour, 21.0, 2.0),
    }
}

fn office_hours(hour: f64) -> f64 {
    0.03 + 0.9 * bump(hour, 11.0, 1.6) + 0.75 * bump(hour, 15.0, 1.8)
}

/// A bell around `centre` (hours), wrapping around midnight.
fn bump(hour: f64, centre: f64, width: f64) -> f64 {
    let distance = (hour - centre + 12.0).rem_euclid(24.0) - 12.0;
    (-0.5 * (distance / width).powi(2)).exp()
}

fn smoothstep(x: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// Relative deviation of traffic from its smooth shape: a slow wiggle (knots every nine
/// minutes, smoothly joined) plus a little per-minute jitter, about ±4% in all.
fn wiggle(seed: u64, shape_id: u64, minute: usize) -> f64 {
    let x = minute as f64 / 9.0;
    let knot = x.floor();
    let at = |k: f64| noise(seed, Stream::LoadWiggle, &[shape_id, k as u64]) - 0.5;
    let (a, b) = (at(knot), at(knot + 1.0));
    let jitter = noise(seed, Stream::LoadJitter, &[shape_id, minute as u64]) - 0.5;
    0.06 * (a + (b - a) * smoothstep(x - knot)) + 0.02 * jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn black_friday_is_the_last_friday_of_november() {
        let dates = [(2023, 24), (2024, 29), (2025, 28), (2026, 27)];
        for (year, day) in dates {
            assert_eq!(
                black_friday(year),
                NaiveDate::from_ymd_opt(year, 11, day).unwrap()
            );
        }
    }

    #[test]
    fn days_are_moscow_days() {
        // 2025-11-27T21:00:00Z is midnight in Moscow, when the Black Friday window opens.
        let opening = 1_764_277_200_000;
        let (day, minute, ms) = split(opening);
        assert_eq!((date(day), minute, ms), (REFERENCE_BLACK_FRIDAY, 0, 0));
        assert_eq!(day_start(day), opening);
        assert_eq!(split(opening - 1).1, MINUTES_PER_DAY - 1);
        assert_eq!(event(date(day)), Event::BlackFriday);
        assert_eq!(event(date(day - 1)), Event::BlackFridayEve);
    }

    #[test]
    fn noise_is_deterministic_and_seeded() {
        let a = noise(7, Stream::Outage, &[1, 2]);
        assert_eq!(a, noise(7, Stream::Outage, &[1, 2]));
        assert_ne!(a, noise(8, Stream::Outage, &[1, 2]));
        assert_ne!(a, noise(7, Stream::Stuck, &[1, 2]));
        assert!((0.0..1.0).contains(&a));
    }
}
