//! The verdict on one request: what it reads (analyse), where it goes (route), and
//! what the rules of the mode in force say about it (decide), from the typed
//! request and who asks; and the rules' judgement of each upstream call the cache
//! makes for it ([`judge_fetch`]). The pipeline and `policy explain` both use these
//! functions, so what explain says is what the proxy does. Pure.

use std::time::Duration;

use crate::analysis::{self, QueryShape};
use crate::request::{Endpoint, RequestKind};
use crate::routing::{BackendId, RoutingTable, route, route_fetch};
use crate::units::{Millis, format_rfc3339};

use super::rules::{Decision, Facts, Judge, RuleSet};

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

/// A request or an upstream call the rules refuse, as the caller is told: a 422
/// for a request, or the warning on an answer the cache served without the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{mode}: {message}. {advice}")]
pub struct Refused {
    /// The mode, its window and until when, e.g. `sale mode (window 'black-friday', …)`.
    pub mode: String,
    /// The rule and what the query reads, from the rule's refusal.
    pub message: String,
    /// What to do instead: narrow the range, or use the curated dashboards.
    pub advice: String,
    /// The rule's name, for the metrics' `rule` label.
    pub rule: String,
    /// The kind of limit, for the metrics' `limit` label.
    pub limit: &'static str,
}

impl Refused {
    /// The warning on an answer served from the cache because this refusal held
    /// back the call for `from..=to`: which rule, which span, and until when.
    pub fn held(&self, from: Millis, to: Millis) -> String {
        format!(
            "promguard: no data from {} to {}: {} in {}",
            format_rfc3339(from),
            format_rfc3339(to),
            self.message,
            self.mode
        )
    }
}

/// Analyse, route and decide `kind` (sent to `endpoint`) at `now`, by the rules
/// that judge requests.
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
    let decision = rules.decide(&facts(kind, &shape, backend, asker, now), Judge::Request);
    Verdict {
        shape,
        backend,
        decision,
    }
}

/// What the rules that judge upstream calls say about one call, `kind`, of a
/// request routed to `request`: the call read as it reads, routed as it is
/// routed (the backend it goes to, and the decision).
#[allow(clippy::too_many_arguments)]
pub fn judge_fetch(
    endpoint: Endpoint,
    kind: &RequestKind,
    request: BackendId,
    rules: &RuleSet,
    routing: &RoutingTable,
    lookback_delta: Duration,
    asker: Asker<'_>,
    now: Millis,
) -> (BackendId, Decision) {
    let shape = shape_of(kind, lookback_delta);
    let backend = route_fetch(routing, request, endpoint, || shape.clone(), now);
    let decision = rules.decide(&facts(kind, &shape, backend, asker, now), Judge::Fetch);
    (backend, decision)
}

fn facts<'a>(
    kind: &'a RequestKind,
    shape: &'a QueryShape,
    backend: BackendId,
    asker: Asker<'a>,
    now: Millis,
) -> Facts<'a> {
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
    Facts {
        now,
        user: asker.user,
        dashboard: asker.dashboard,
        range,
        oldest: shape.oldest,
        furthest: shape.furthest.as_ref(),
        backend,
        query: query.map(|q| q.text.as_str()),
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
