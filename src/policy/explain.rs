//! `promguard policy explain`: what the policy would do with a query at a time,
//! and why, so teams can check their dashboards before a sale. Pure.

use std::time::Duration;

use serde::Serialize;

use super::file::Policy;
use super::rules::{Decision, human};
use super::state::{Effective, effective};
use super::verdict::{Asker, Verdict, verdict};
use crate::request::{Endpoint, Query, RequestKind};
use crate::routing::RoutingTable;
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
        Asker {
            user: q.user,
            dashboard: q.dashboard,
        },
        q.at,
    );
    let (decision, rule, message, dry_run) = match decision {
        Decision::Refuse(r) => ("refuse", Some(r.rule), Some(r.message), Vec::new()),
        Decision::Exempt => ("exempt", None, None, Vec::new()),
        Decision::Allow { would_refuse } => (
            "allow",
            None,
            None,
            would_refuse.into_iter().map(|r| r.message).collect(),
        ),
    };
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
}
