//! Counters as closed-form integrals of a rate: `rate(t) = trend(day) * shape(kind of day,
//! minute)`, constant within each minute. Days of one kind share a table of per-minute
//! prefix sums, and each day's starting value is summed once from `ORIGIN`, so a counter
//! at any millisecond costs two lookups and is the same whatever step it is read at.
//! Input: the calendar and a rate function; output: counter values. No I/O.

use std::collections::HashMap;

use crate::calendar::{
    Calendar, DayShape, MINUTE_MS, MINUTES_PER_DAY, Millis, Outage, Trend, split,
};

/// The integral of one rate (per second) from `ORIGIN`.
pub struct Curve {
    trend: Trend,
    /// Integral at the start of each calendar day.
    day_start: Vec<f64>,
    /// Per calendar day, which of `tables` holds its prefix sums.
    day_table: Vec<u32>,
    /// Per kind of day: integral of the shape from midnight to each minute, 1441 entries.
    tables: Vec<Vec<f64>>,
}

impl Curve {
    /// `rate(shape, outage, minute)` is the rate before the day's trend factor. Outages
    /// are passed only for `register`, so curves that ignore them share tables across them.
    pub fn new(
        calendar: &Calendar,
        trend: Trend,
        register: Option<usize>,
        rate: impl Fn(&DayShape, Option<Outage>, usize) -> f64,
    ) -> Self {
        let days = calendar.days();
        let mut kinds = HashMap::new();
        let mut tables: Vec<Vec<f64>> = Vec::new();
        let mut day_start = Vec::with_capacity(days.len());
        let mut day_table = Vec::with_capacity(days.len());
        let mut total = 0.0;
        for day in days {
            let outage = day.outage.filter(|o| Some(o.register) == register);
            let table = *kinds.entry((day.shape, outage)).or_insert_with(|| {
                let shape = calendar.shape(day.shape);
                let mut sums = Vec::with_capacity(MINUTES_PER_DAY + 1);
                let mut sum = 0.0;
                sums.push(sum);
                for minute in 0..MINUTES_PER_DAY {
                    sum += rate(shape, outage, minute) * 60.0;
                    sums.push(sum);
                }
                tables.push(sums);
                u32::try_from(tables.len() - 1).expect("a few kinds of day")
            });
            day_start.push(total);
            day_table.push(table);
            total += day.trend(trend) * tables[table as usize][MINUTES_PER_DAY];
        }
        Curve {
            trend,
            day_start,
            day_table,
            tables,
        }
    }

    /// The counter at `t`: whole days, whole minutes, then linear within the minute.
    ///
    /// # Panics
    /// If `t` is outside the calendar.
    pub fn at(&self, calendar: &Calendar, t: Millis) -> f64 {
        let (day, minute, ms) = split(t);
        let i = calendar.index(day);
        let sums = &self.tables[self.day_table[i] as usize];
        let within =
            sums[minute] + (sums[minute + 1] - sums[minute]) * (ms as f64 / MINUTE_MS as f64);
        self.day_start[i] + calendar.days()[i].trend(self.trend) * within
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::{DAY_MS, ORIGIN, day_number, day_start};

    #[test]
    fn a_constant_rate_integrates_to_rate_times_time() {
        let calendar = Calendar::new(1, 1, 0, 16_500);
        let curve = Curve::new(&calendar, Trend::Flat, None, |_, _, _| 2.0);
        let day = 16_450;
        let t0 = day_start(day);
        let before = curve.at(&calendar, t0);
        assert_eq!(before, 2.0 * 86_400.0 * (day - day_number(ORIGIN)) as f64);
        for offset in [
            1,
            29_999,
            60_000,
            90_500,
            DAY_MS - 1,
            DAY_MS,
            3 * DAY_MS + 7,
        ] {
            let expected = before + 2.0 * offset as f64 / 1000.0;
            let got = curve.at(&calendar, t0 + offset);
            assert!(
                (got - expected).abs() < 1e-6,
                "{offset}: {got} vs {expected}"
            );
        }
    }
}
