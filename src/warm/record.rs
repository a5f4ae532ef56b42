//! The record of long range queries promguard served: which query, at which step,
//! over how long a range, from which dashboard, and how often. Warming replays the
//! most used ones before a window opens. Bounded: past `capacity` entries the
//! least used (then the least recent) is forgotten.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::units::Millis;

/// One recorded range query: what Grafana sends for a panel, whatever its end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Seen {
    /// The query as sent.
    pub query: Arc<str>,
    /// Its step.
    pub step_ms: i64,
    /// Its range's length, `end − start`.
    pub range_ms: i64,
    /// The dashboard it came from, when the request said.
    pub dashboard: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy)]
struct Uses {
    count: u64,
    last: Millis,
}

/// The bounded record.
#[derive(Debug)]
pub struct Record {
    seen: Mutex<HashMap<Seen, Uses>>,
    capacity: usize,
}

impl Record {
    /// A record of at most `capacity` queries (none with zero).
    pub fn new(capacity: usize) -> Self {
        Record {
            seen: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Count one use of `seen` at `now`.
    pub fn note(&self, seen: Seen, now: Millis) {
        if self.capacity == 0 {
            return;
        }
        let mut all = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(uses) = all.get_mut(&seen) {
            uses.count += 1;
            uses.last = now;
            return;
        }
        if all.len() >= self.capacity {
            let least = all
                .iter()
                .min_by_key(|(_, u)| (u.count, u.last))
                .map(|(k, _)| k.clone());
            if let Some(least) = least {
                all.remove(&least);
            }
        }
        all.insert(
            seen,
            Uses {
                count: 1,
                last: now,
            },
        );
    }

    /// The `n` most used, most used first (ties: the most recent first).
    pub fn top(&self, n: usize) -> Vec<(Seen, u64)> {
        let all = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut ranked: Vec<_> = all.iter().map(|(k, u)| (k.clone(), *u)).collect();
        ranked.sort_by(|a, b| {
            (b.1.count, b.1.last)
                .cmp(&(a.1.count, a.1.last))
                .then_with(|| a.0.query.cmp(&b.0.query))
        });
        ranked
            .into_iter()
            .take(n)
            .map(|(k, u)| (k, u.count))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(query: &str) -> Seen {
        Seen {
            query: query.into(),
            step_ms: 3_600_000,
            range_ms: 30 * 86_400_000,
            dashboard: Some("mine".into()),
        }
    }

    #[test]
    fn the_most_used_come_first_and_the_least_used_are_forgotten() {
        let record = Record::new(2);
        for t in 0..3 {
            record.note(seen("a"), t);
        }
        record.note(seen("b"), 10);
        record.note(seen("b"), 11);
        // Full: "c" replaces the least used, "b".
        record.note(seen("c"), 12);
        let top: Vec<_> = record
            .top(5)
            .into_iter()
            .map(|(s, n)| (s.query.to_string(), n))
            .collect();
        assert_eq!(top, [("a".to_string(), 3), ("c".to_string(), 1)]);
        assert_eq!(record.top(1).len(), 1);
        let off = Record::new(0);
        off.note(seen("a"), 0);
        assert!(off.top(5).is_empty());
    }
}
