//! The verdict on one request: what it reads (analyse), where it goes (route), and
//! what the rules of the mode in force say about it (decide), from the typed
//! request and who asks. The pipeline and `policy explain` both use this one
//! function, so what explain says is what the proxy does. Pure.

use std::time::Duration;

use crate::analysis::{self, QueryShape};
use crate::request::{Endpoint, RequestKind};
use crate::routing::{BackendId, RoutingTable, route};
use crate::units::Millis;

use super::rules::{Decision, Facts, RuleSet};

/// The step an instant query's MetricsQL `[Ni]` ranges count in: VictoriaMetrics
/// uses 5 minutes for instant queries.
const INSTANT_STEP_MS: i64 = 300_000;

/// Who asks, as far as the rules may believe it.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The caller's user name, for the rules' exempt users.
    pub user: &'a str,
    /// Only when the dashboard header can be believed.
    pub dashboard: Option<&'a str>,
}

/// Everything decided about one request before the cache.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Which samples the query touches; routing, the rules and the cache read it.
    pub shape: QueryShape,
    /// Where routing sends it.
    pub backend: BackendId,
    /// What the rules of the mode in force say.
    pub decision: Decision,
}

/// Analyse, route and decide `kind` (sent to `endpoint`) at `now`.
pub fn verdict(
    endpoint: Endpoint,
    kind: &RequestKind,
    rules: &RuleSet,
    routing: &RoutingTable,
    lookback_delta: Duration,
    asker: Asker<'_>,
    now: Millis,
) -> Verdict {
    let shape = shape_of(kind, lookback_delta);
    let backend = route(routing, endpoint, &shape, now);
    let (range, query) = match kind {
        RequestKind::Range {
            query, start, end, ..
        } => (
            Some(Duration::from_millis(
                u64::try_from(end - start).unwrap_or(0),
            )),
            Some(query),
        ),
        RequestKind::Instant { query, .. } | RequestKind::Exemplars { query, .. } => {
            (None, Some(query))
        }
        _ => (None, None),
    };
    let decision = rules.decide(&Facts {
        now,
        user: asker.user,
        dashboard: asker.dashboard,
        range,
        oldest: shape.oldest,
        furthest: shape.furthest.as_ref(),
        backend,
        query: query.map(|q| q.text.as_str()),
    });
    Verdict {
        shape,
        backend,
        decision,
    }
}

/// Which samples a request can touch.
pub fn shape_of(kind: &RequestKind, lookback_delta: Duration) -> QueryShape {
    match kind {
        RequestKind::Instant { query, time } => {
            analysis::analyse_query(query, *time, *time, INSTANT_STEP_MS, lookback_delta)
        }
        RequestKind::Range {
            query,
            start,
            end,
            step_ms,
        } => analysis::analyse_query(query, *start, *end, *step_ms, lookback_delta),
        RequestKind::Metadata { start, end, .. } | RequestKind::Exemplars { start, end, .. } => {
            QueryShape::from_span(*start, *end)
        }
        RequestKind::Static => QueryShape::default(),
    }
}
