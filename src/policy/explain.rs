//! `promguard policy explain`: what the policy would do with a query at a time,
//! and why, so teams can check their dashboards before a sale: as the request
//! reads cold, and, given a cache that holds its extents up to a time, what it
//! would still fetch. Pure.

use std::time::Duration;

use serde::Serialize;

use super::file::Policy;
use super::rules::{Decision, RuleSet, human};
use super::state::{Effective, effective};
use super::verdict::{Asker, Refused, Verdict, judge_fetch, verdict};
use crate::analysis::QueryShape;
use crate::cache::extent::{Grid, cut_at};
use crate::request::{Endpoint, Query, RequestKind};
use crate::routing::{BackendId, Fetches, RoutingTable, fetches};
use crate::units::Millis;

/// The query and who asks it.
pub struct Question<'a> {
    /// The query as a request would carry it: text, parse (if any) and canonical form.
    pub query: &'a Query,
    /// Evaluation span: `start..=end` for a range query, `time..=time` for an instant one.
    pub start: Millis,
    /// Last evaluation time; equal to `start` for an instant query.
    pub end: Millis,
    /// The range query's step (MetricsQL's `[Ni]` ranges count in it).
    pub step_ms: i64,
    /// Explain it as `query_range` rather than `query` (evaluated at `start`).
    pub range_query: bool,
    /// The moment of the question: picks the mode by the schedule, and is "now" for
    /// routing.
    pub at: Millis,
    /// Who asks, for the rules' exempt users.
    pub user: &'a str,
    /// The dashboard it comes from, for the rules' exempt dashboards; taken as given.
    pub dashboard: Option<&'a str>,
    /// For a range query: the cache holds its extents up to this time, so only
    /// what follows is fetched.
    pub cached_until: Option<Millis>,
}

/// One upstream call the cache would make, and what the rules say about it.
#[derive(Debug, Serialize, PartialEq)]
pub struct Call {
    /// First evaluation time, Unix seconds.
    pub from: f64,
    /// Last evaluation time, Unix seconds.
    pub to: f64,
    /// Where it would go: `recent` or `long_term`.
    pub backend: &'static str,
    /// `fetch`, or `held` when a rule holds it back.
    pub decision: &'static str,
    /// The rule that holds it back.
    pub rule: Option<String>,
}

/// The request given a cache that holds its extents up to a time.
#[derive(Debug, Serialize)]
pub struct Cached {
    /// Up to when the cache holds the extents, Unix seconds.
    pub until: f64,
    /// `serve` (every call allowed), `serve from cache with a warning` (some held
    /// back; the cache answers what it holds), or `refuse`.
    pub decision: &'static str,
    /// The calls it would still make.
    pub fetches: Vec<Call>,
    /// The warning Grafana would show on the panel, when a call is held back.
    pub warning: Option<String>,
}

/// Every fact behind the decision.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `allow`, `refuse`, or `exempt` (the asker is exempt from the mode's rules).
    pub decision: &'static str,
    /// The mode the schedule gives at `at` (a manual switch is not consulted),
    /// flattened into the JSON.
    #[serde(flatten)]
    pub mode: Effective,
    /// Where the query would go: `recent` or `long_term`.
    pub backend: &'static str,
    /// Oldest and newest sample timestamps the query can touch, Unix seconds.
    pub oldest: Option<f64>,
    /// The newest, also Unix seconds; after `at` with a negative offset.
    pub newest: Option<f64>,
    /// How far before `at` the oldest touched sample lies.
    pub lookback_seconds: Option<i64>,
    /// The same span in words (`30 days`).
    pub lookback: Option<String>,
    /// The selector that reaches furthest back, with its function
    /// (`rate(orders_total[30d])`).
    pub furthest: Option<String>,
    /// `parsed`, or `tolerant scan` when promguard's parser cannot read the query
    /// (MetricsQL, newer functions): bounds are then conservative.
    pub analysis: &'static str,
    /// The rule that refused it, if one did.
    pub rule: Option<String>,
    /// The refusal as Grafana would show it on the panel.
    pub message: Option<String>,
    /// Dry-run rules that would have refused it.
    pub dry_run: Vec<String>,
    /// For allowed live queries: how often at most they reach the backend.
    pub min_refresh: Option<String>,
    /// The upstream calls a cache holding nothing of it would make.
    pub fetches: Vec<Call>,
    /// With `cached_until`: what it would fetch from a cache holding that much.
    pub cached: Option<Cached>,
}

/// What `policy` would do with `q` in the mode its schedule gives at `q.at`: the
/// pipeline's own verdict (analysis, routing, rules), with the facts behind it.
pub fn explain(
    policy: &Policy,
    routing: &RoutingTable,
    lookback_delta: Duration,
    q: &Question<'_>,
) -> Explanation {
    let at = chrono::DateTime::from_timestamp_millis(q.at).unwrap_or_default();
    let mode = effective(&policy.windows, None, at);
    let (endpoint, kind) = if q.range_query {
        (
            Endpoint::QueryRange,
            RequestKind::Range {
                query: q.query.clone(),
                start: q.start,
                end: q.end,
                step_ms: q.step_ms,
            },
        )
    } else {
        (
            Endpoint::Query,
            RequestKind::Instant {
                query: q.query.clone(),
                time: q.start,
            },
        )
    };
    let mode_policy = policy.mode(mode.mode);
    let asker = Asker {
        user: q.user,
        dashboard: q.dashboard,
    };
    let Verdict {
        shape,
        backend,
        decision,
    } = verdict(
        endpoint,
        &kind,
        &mode_policy.rules,
        routing,
        lookback_delta,
        asker,
        q.at,
    );
    let calls = Calls {
        rules: &mode_policy.rules,
        routing,
        lookback_delta,
        asker,
        kind: &kind,
        endpoint,
        backend,
        shape: &shape,
        at: q.at,
    };
    let (mut decision, mut rule, mut message, mut dry_run) = match decision {
        Decision::Refuse(r) => ("refuse", Some(r.rule), Some(r.message), Vec::new()),
        Decision::Exempt => ("exempt", None, None, Vec::new()),
        Decision::Allow { would_refuse } => (
            "allow",
            None,
            None,
            would_refuse.into_iter().map(|r| r.message).collect(),
        ),
    };
    let mut cold = Vec::new();
    let mut cached = None;
    if decision == "allow" {
        // Cold, the cache holds nothing to answer from: the first held call refuses.
        for judged in calls.judged(None) {
            if let Some(r) = judged.held.refused
                && decision == "allow"
            {
                (decision, rule, message) = ("refuse", Some(r.rule), Some(r.message));
            }
            dry_run.extend(judged.held.dry_run);
            cold.push(judged.call);
        }
        cached = q
            .cached_until
            .filter(|_| q.range_query)
            .map(|until| calls.cached(until, &mode));
    }
    let lookback_ms = shape.oldest.map(|o| q.at.saturating_sub(o));
    Explanation {
        decision,
        mode,
        backend: backend.as_str(),
        oldest: shape.oldest.map(|o| o as f64 / 1000.0),
        newest: shape.newest.map(|n| n as f64 / 1000.0),
        lookback_seconds: lookback_ms.map(|ms| ms / 1000),
        lookback: lookback_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| human(Duration::from_millis(ms))),
        furthest: shape.furthest.map(|f| f.describe()),
        analysis: if shape.tolerant {
            "tolerant scan"
        } else {
            "parsed"
        },
        rule,
        message,
        min_refresh: mode_policy
            .min_refresh
            .filter(|_| decision == "allow")
            .map(human),
        dry_run,
        fetches: cold,
        cached,
    }
}

/// One call worked out and judged.
struct Judged {
    /// Its first and last evaluation times.
    span: (Millis, Millis),
    call: Call,
    held: Held,
}

/// What a call's judgement holds.
struct Held {
    /// The enforcing rule that holds it back.
    refused: Option<super::rules::Refusal>,
    /// Dry-run rules that would.
    dry_run: Vec<String>,
}

/// Everything needed to work out and judge the upstream calls of the question.
struct Calls<'a> {
    rules: &'a RuleSet,
    routing: &'a RoutingTable,
    lookback_delta: Duration,
    asker: Asker<'a>,
    kind: &'a RequestKind,
    endpoint: Endpoint,
    backend: BackendId,
    shape: &'a QueryShape,
    at: Millis,
}

impl Calls<'_> {
    /// The calls for what a cache holding extents up to `cached_until` lacks
    /// (everything, with `None`), cut where the pipeline cuts them, each judged.
    fn judged(&self, cached_until: Option<Millis>) -> Vec<Judged> {
        let spans = match *self.kind {
            RequestKind::Range {
                start,
                end,
                step_ms,
                ..
            } => {
                let grid = Grid::new(start, step_ms);
                let from = cached_until.map_or(start, |t| start.max(t.saturating_add(1)));
                let Some(want) = grid.span_within(from, end) else {
                    return Vec::new();
                };
                match fetches(self.routing, self.backend, self.shape, start, self.at) {
                    Fetches::Split {
                        recent_from: Some(at),
                    } => cut_at(&grid, vec![want], at),
                    _ => vec![want],
                }
                .into_iter()
                .map(|s| (s.from, s.to))
                .collect()
            }
            RequestKind::Instant { time, .. } => vec![(time, time)],
            _ => Vec::new(),
        };
        spans
            .into_iter()
            .map(|(from, to)| {
                let kind = match self.kind {
                    RequestKind::Range { query, step_ms, .. } => RequestKind::Range {
                        query: query.clone(),
                        start: from,
                        end: to,
                        step_ms: *step_ms,
                    },
                    other => other.clone(),
                };
                let (backend, decision) = judge_fetch(
                    self.endpoint,
                    &kind,
                    self.backend,
                    self.rules,
                    self.routing,
                    self.lookback_delta,
                    self.asker,
                    self.at,
                );
                let held = match decision {
                    Decision::Refuse(r) => Held {
                        refused: Some(r),
                        dry_run: Vec::new(),
                    },
                    Decision::Allow { would_refuse } => Held {
                        refused: None,
                        dry_run: would_refuse.into_iter().map(|r| r.message).collect(),
                    },
                    Decision::Exempt => Held {
                        refused: None,
                        dry_run: Vec::new(),
                    },
                };
                let call = Call {
                    from: from as f64 / 1000.0,
                    to: to as f64 / 1000.0,
                    backend: backend.as_str(),
                    decision: if held.refused.is_some() {
                        "held"
                    } else {
                        "fetch"
                    },
                    rule: held.refused.as_ref().map(|r| r.rule.clone()),
                };
                Judged {
                    span: (from, to),
                    call,
                    held,
                }
            })
            .collect()
    }

    /// The question given a cache holding its extents up to `until`.
    fn cached(&self, until: Millis, mode: &Effective) -> Cached {
        let start = match self.kind {
            RequestKind::Range { start, .. } => *start,
            _ => until,
        };
        let judged = self.judged(Some(until));
        let mut held = judged.iter().filter(|j| j.held.refused.is_some());
        let first = held.next();
        let last = held.next_back().or(first);
        let (decision, warning) = match (first, last) {
            (Some(_), _) if until < start => ("refuse", None),
            (Some(first), Some(last)) => {
                let (message, rule, limit) = first
                    .held
                    .refused
                    .as_ref()
                    .map(|r| (r.message.clone(), r.rule.clone(), r.limit))
                    .unwrap_or_default();
                let refused = Refused {
                    mode: mode.describe(),
                    message,
                    advice: String::new(),
                    rule,
                    limit,
                };
                (
                    "serve from cache with a warning",
                    Some(refused.held(first.span.0, last.span.1)),
                )
            }
            _ => ("serve", None),
        };
        Cached {
            until: until as f64 / 1000.0,
            decision,
            fetches: judged.into_iter().map(|j| j.call).collect(),
            warning,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_30_day_panel_during_black_friday_is_refused_and_routed_to_long_term() {
        let policy =
            super::super::file::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
                .unwrap();
        let at = 1_795_770_000_000; // 2026-11-27T12:00:00+03:00
        let parser = crate::request::QueryParser::default();
        let query = |text: &str| {
            let (expr, canonical) = parser.parse(text).unwrap();
            Query {
                text: text.to_string(),
                expr,
                canonical,
            }
        };
        let long = query("sum(rate(shop_orders_total[30d]))");
        let routing = RoutingTable {
            recent_window: Duration::from_secs(2 * 86_400),
            has_long_term: true,
            split_fetches: true,
        };
        let q = Question {
            query: &long,
            start: at - 3_600_000,
            end: at,
            step_ms: 60_000,
            range_query: true,
            at,
            user: "bob",
            dashboard: None,
            cached_until: None,
        };
        let e = explain(&policy, &routing, Duration::from_secs(300), &q);
        assert_eq!(e.decision, "refuse");
        assert_eq!(e.mode.window.as_deref(), Some("black-friday-2026"));
        assert_eq!(e.backend, "long_term");
        assert_eq!(e.rule.as_deref(), Some("recent-data-only"));
        assert_eq!(
            e.oldest,
            Some((at - 3_600_000 - 30 * 86_400_000) as f64 / 1000.0)
        );
        assert_eq!(e.newest, Some(at as f64 / 1000.0));
        let exempt = explain(
            &policy,
            &routing,
            Duration::from_secs(300),
            &Question {
                dashboard: Some("orders"),
                ..q
            },
        );
        assert_eq!(exempt.decision, "exempt");
        assert_eq!(exempt.min_refresh, None);
        let short = query("sum(rate(shop_orders_total[5m]))");
        let allowed = explain(
            &policy,
            &routing,
            Duration::from_secs(300),
            &Question { query: &short, ..q },
        );
        assert_eq!(allowed.decision, "allow");
        assert_eq!(allowed.min_refresh.as_deref(), Some("60 seconds"));
        assert_eq!(allowed.analysis, "parsed");
        let metricsql = query("sum(rate(shop_orders_total[30d])) keep_metric_names");
        let scanned = explain(
            &policy,
            &routing,
            Duration::from_secs(300),
            &Question {
                query: &metricsql,
                ..q
            },
        );
        assert_eq!(scanned.analysis, "tolerant scan");
        assert_eq!(scanned.decision, "refuse", "conservative, as the proxy is");
        assert_eq!(scanned.backend, "long_term");
    }

    #[test]
    fn a_30_day_panel_is_refused_cold_and_served_when_its_extents_are_cached() {
        let policy =
            super::super::file::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
                .unwrap();
        let at = 1_795_770_000_000; // 2026-11-27T12:00:00+03:00
        let (expr, canonical) = crate::request::QueryParser::default()
            .parse("sum(rate(shop_orders_total[5m]))")
            .unwrap();
        let query = Query {
            text: "sum(rate(shop_orders_total[5m]))".into(),
            expr,
            canonical,
        };
        let routing = RoutingTable {
            recent_window: Duration::from_secs(2 * 86_400),
            has_long_term: true,
            split_fetches: true,
        };
        let hour = 3_600_000;
        let q = Question {
            query: &query,
            start: at - 30 * 24 * hour,
            end: at,
            step_ms: hour,
            range_query: true,
            at,
            user: "bob",
            dashboard: None,
            cached_until: Some(at - 3 * hour),
        };
        let e = explain(&policy, &routing, Duration::from_secs(300), &q);
        // Cold: two calls, the old one held by the long-term rule, the recent 2
        // days by the panel-length rule, so nothing can answer it.
        assert_eq!(e.decision, "refuse");
        let held: Vec<_> = e
            .fetches
            .iter()
            .map(|c| (c.backend, c.rule.as_deref()))
            .collect();
        assert_eq!(
            held,
            [
                ("long_term", Some("recent-data-only")),
                ("recent", Some("panels-up-to-12h"))
            ]
        );
        // Open since the afternoon: only the last 3 hours, from Prometheus.
        let cached = e.cached.unwrap();
        assert_eq!(cached.decision, "serve");
        assert_eq!(
            cached.fetches,
            [Call {
                from: (at - 2 * hour) as f64 / 1000.0,
                to: at as f64 / 1000.0,
                backend: "recent",
                decision: "fetch",
                rule: None,
            }]
        );
        // Cached up to 10 days ago: the old part is held back, with a warning.
        let older = explain(
            &policy,
            &routing,
            Duration::from_secs(300),
            &Question {
                cached_until: Some(at - 10 * 24 * hour),
                ..q
            },
        )
        .cached
        .unwrap();
        assert_eq!(older.decision, "serve from cache with a warning");
        let warning = older.warning.unwrap();
        assert!(
            warning.starts_with("promguard: no data from 2026-11-17T10:00:00Z to 2026-11-27T09:00:00Z: refused by rule 'recent-data-only'"),
            "{warning}"
        );
        assert!(
            warning.contains("in sale mode (window 'black-friday-2026'"),
            "{warning}"
        );
    }
}
