//! Stage 8, route: which backend answers a request, from the samples it touches.
//!
//! Input: the [`QueryShape`] (oldest touched sample), the recent backend's window and
//! whether a long-term store is configured. Output: a [`BackendId`]. Pure.

use std::time::Duration;

use crate::analysis::QueryShape;
use crate::request::Endpoint;
use crate::units::Millis;

/// The configured backends. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendId {
    /// Prometheus holding the last `window` of data at full resolution.
    Recent,
    /// A Prometheus-API-compatible store holding everything (VictoriaMetrics,
    /// Thanos, Mimir).
    LongTerm,
}

impl BackendId {
    /// Both backends, for per-backend gauges and series registered up front.
    pub const ALL: [BackendId; 2] = [BackendId::Recent, BackendId::LongTerm];

    /// The `backend` label value, also the backend's name in logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendId::Recent => "recent",
            BackendId::LongTerm => "long_term",
        }
    }
}

/// What routing needs to know about the deployment.
#[derive(Debug, Clone, Copy)]
pub struct RoutingTable {
    /// How far back the recent backend holds data (its retention, minus a margin).
    pub recent_window: Duration,
    /// Whether `backends.long_term` is configured; without it everything goes to
    /// `recent`, however old.
    pub has_long_term: bool,
}

/// Pick the backend for a request whose touched samples are described by `shape`.
///
/// Queries that read nothing (`1+1`) and endpoints whose answers live only in the
/// recent Prometheus (rules, exemplars, metadata, build info) go to `recent`.
pub fn route(
    table: &RoutingTable,
    endpoint: Endpoint,
    shape: &QueryShape,
    now: Millis,
) -> BackendId {
    if !table.has_long_term || !reads_stored_samples(endpoint) {
        return BackendId::Recent;
    }
    let window = i64::try_from(table.recent_window.as_millis()).unwrap_or(i64::MAX);
    match shape.oldest {
        Some(oldest) if oldest < now.saturating_sub(window) => BackendId::LongTerm,
        _ => BackendId::Recent,
    }
}

fn reads_stored_samples(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::Query
            | Endpoint::QueryRange
            | Endpoint::Series
            | Endpoint::Labels
            | Endpoint::LabelValues
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_731_326_400_000;
    const H: i64 = 3_600_000;

    fn table(has_long_term: bool) -> RoutingTable {
        RoutingTable {
            recent_window: Duration::from_secs(48 * 3600),
            has_long_term,
        }
    }

    fn oldest(ms: Option<Millis>) -> QueryShape {
        QueryShape {
            oldest: ms,
            ..QueryShape::default()
        }
    }

    #[test]
    fn routes_by_the_oldest_touched_sample() {
        let t = table(true);
        let cases = [
            (Endpoint::QueryRange, Some(NOW - H), BackendId::Recent),
            (Endpoint::QueryRange, Some(NOW - 48 * H), BackendId::Recent),
            (
                Endpoint::QueryRange,
                Some(NOW - 48 * H - 1),
                BackendId::LongTerm,
            ),
            (
                Endpoint::Query,
                Some(NOW - 30 * 24 * H),
                BackendId::LongTerm,
            ),
            (Endpoint::Query, None, BackendId::Recent),
            (Endpoint::Labels, Some(Millis::MIN), BackendId::LongTerm),
            (Endpoint::Series, Some(NOW - 10 * H), BackendId::Recent),
            (Endpoint::Rules, Some(Millis::MIN), BackendId::Recent),
            (
                Endpoint::QueryExemplars,
                Some(Millis::MIN),
                BackendId::Recent,
            ),
            (Endpoint::BuildInfo, Some(Millis::MIN), BackendId::Recent),
        ];
        for (endpoint, o, want) in cases {
            assert_eq!(
                route(&t, endpoint, &oldest(o), NOW),
                want,
                "{endpoint:?} {o:?}"
            );
        }
    }

    #[test]
    fn without_a_long_term_store_everything_goes_to_recent() {
        let t = table(false);
        assert_eq!(
            route(&t, Endpoint::QueryRange, &oldest(Some(0)), NOW),
            BackendId::Recent
        );
    }
}
