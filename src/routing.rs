//! Stage 8, route: which backend answers a request, and each of its upstream
//! calls, from the samples it touches.
//!
//! Input: the [`QueryShape`] (oldest touched sample), the recent backend's window and
//! whether a long-term store is configured. Output: a [`BackendId`]; and, for the
//! answer that goes out, the [`Sources`] that contributed to it. Pure.

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
    /// `routing.split_fetches`: each upstream call of a range query goes to the
    /// backend that holds what that call reads, so the live tail of a long panel
    /// comes from the recent Prometheus. Off: every call goes where the request
    /// was routed.
    pub split_fetches: bool,
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

/// The backend for one upstream call (`shape`: what the call reads, analysed only
/// when it can change the answer) of a request routed to `request`. With
/// `split_fetches` a call is routed on its own, but never further back than its
/// request: a request routed to `recent` never reaches the long-term store.
pub fn route_fetch(
    table: &RoutingTable,
    request: BackendId,
    endpoint: Endpoint,
    shape: impl FnOnce() -> QueryShape,
    now: Millis,
) -> BackendId {
    if !table.split_fetches || request == BackendId::Recent {
        return request;
    }
    route(table, endpoint, &shape(), now)
}

/// How the upstream calls of a range request are routed ([`fetches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetches {
    /// Every call goes where the request was routed (`split_fetches: false`, or
    /// one backend only).
    AsRequest,
    /// Each call is routed by what it reads ([`route_fetch`]); a call spanning
    /// `recent_from`, the first evaluation time whose reads all lie inside the
    /// recent window, is cut there, so what the recent Prometheus holds comes from
    /// it. `None` when the whole request reads recent data anyway.
    Split {
        /// The cut, an evaluation time (not yet on the request's grid).
        recent_from: Option<Millis>,
    },
}

/// How the calls of a request routed to `request`, reading `shape` when evaluated
/// from `start`, are routed at `now`. An evaluation at `t` reads back to
/// `t − (start − oldest)`, so from `recent_from` on it reads only what the recent
/// window holds.
pub fn fetches(
    table: &RoutingTable,
    request: BackendId,
    shape: &QueryShape,
    start: Millis,
    now: Millis,
) -> Fetches {
    if !table.split_fetches || !table.has_long_term {
        return Fetches::AsRequest;
    }
    let recent_from = match (request, shape.oldest) {
        (BackendId::LongTerm, Some(oldest)) => {
            let window = i64::try_from(table.recent_window.as_millis()).unwrap_or(i64::MAX);
            Some(
                now.saturating_sub(window)
                    .saturating_add(start.saturating_sub(oldest)),
            )
        }
        _ => None,
    };
    Fetches::Split { recent_from }
}

/// The backends whose answers make up one response: one for a plain answer, both
/// for a range stitched from long-term extents and a recent tail. Feeds the
/// `X-Promguard-Backend` header; kept with stored answers and extents (as
/// [`Sources::bits`] in the fleet's cache) so a hit names them too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources(u8);

impl Sources {
    /// The one backend `id`.
    pub fn of(id: BackendId) -> Self {
        Sources(match id {
            BackendId::Recent => 1,
            BackendId::LongTerm => 2,
        })
    }

    /// Both sets together.
    #[must_use]
    pub fn and(self, other: Sources) -> Self {
        Sources(self.0 | other.0)
    }

    /// As a number, for the fleet's cache.
    pub fn bits(self) -> i64 {
        i64::from(self.0)
    }

    /// Read back from [`Sources::bits`]; bits that name no backend are dropped.
    pub fn from_bits(bits: i64) -> Self {
        Sources(u8::try_from(bits & 3).unwrap_or(0))
    }

    /// The header value: the backends' names, the older data's first.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            1 => "recent",
            2 => "long_term",
            3 => "long_term, recent",
            _ => "none",
        }
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
            split_fetches: true,
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

    #[test]
    fn a_call_goes_where_its_own_reads_are_but_never_further_back_than_its_request() {
        let t = table(true);
        let tail = oldest(Some(NOW - 2 * H));
        let old = oldest(Some(NOW - 30 * 24 * H));
        let fetch = |t: &RoutingTable, request, shape: &QueryShape| {
            route_fetch(t, request, Endpoint::QueryRange, || shape.clone(), NOW)
        };
        assert_eq!(fetch(&t, BackendId::LongTerm, &tail), BackendId::Recent);
        assert_eq!(fetch(&t, BackendId::LongTerm, &old), BackendId::LongTerm);
        assert_eq!(
            fetch(&t, BackendId::Recent, &old),
            BackendId::Recent,
            "a request the rules judged as recent never reaches the long-term store"
        );
        let whole = RoutingTable {
            split_fetches: false,
            ..t
        };
        assert_eq!(
            fetch(&whole, BackendId::LongTerm, &tail),
            BackendId::LongTerm
        );
    }

    #[test]
    fn a_long_panel_is_cut_where_its_reads_enter_the_recent_window() {
        let t = table(true);
        // 30 days of rate(x[5m]) with the default lookback: each step reads 5 min back.
        let start = NOW - 30 * 24 * H;
        let shape = oldest(Some(start - 5 * 60_000));
        let cut = NOW - 48 * H + 5 * 60_000;
        assert_eq!(
            fetches(&t, BackendId::LongTerm, &shape, start, NOW),
            Fetches::Split {
                recent_from: Some(cut)
            }
        );
        // The part from the cut on reads only recent data, so it goes to Prometheus.
        let tail = oldest(Some(cut - 5 * 60_000));
        assert_eq!(
            route_fetch(&t, BackendId::LongTerm, Endpoint::QueryRange, || tail, NOW),
            BackendId::Recent
        );
        assert_eq!(
            fetches(&t, BackendId::Recent, &oldest(Some(NOW - H)), NOW - H, NOW),
            Fetches::Split { recent_from: None }
        );
        let whole = RoutingTable {
            split_fetches: false,
            ..t
        };
        assert_eq!(
            fetches(&whole, BackendId::LongTerm, &shape, start, NOW),
            Fetches::AsRequest
        );
        assert_eq!(
            fetches(&table(false), BackendId::Recent, &shape, start, NOW),
            Fetches::AsRequest
        );
    }

    #[test]
    fn sources_name_every_backend_once() {
        let recent = Sources::of(BackendId::Recent);
        let long_term = Sources::of(BackendId::LongTerm);
        assert_eq!(recent.as_str(), "recent");
        assert_eq!(long_term.and(recent).as_str(), "long_term, recent");
        assert_eq!(recent.and(recent), recent);
        assert_eq!(
            Sources::from_bits(long_term.and(recent).bits()),
            long_term.and(recent)
        );
        assert_eq!(Sources::from_bits(-1).as_str(), "long_term, recent");
        assert_eq!(Sources::default().as_str(), "none");
    }
}
