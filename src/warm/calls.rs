//! What one warming run asks: the range queries Grafana will send for each panel
//! of a dashboard, or those the record holds, as Grafana writes them at a given
//! "now". Pure.
//!
//! Only range targets are warmed: their old extents are what a sale window makes
//! expensive, and they stay in the cache. An instant target asks at "now", so an
//! answer warmed before the window is not the one asked in it.

use std::sync::Arc;

use crate::grafana::{Call, Dashboard, DataSource, Screen};
use crate::units::Millis;

use super::record::Seen;

/// Panels are sized for a full-HD screen, Grafana's step for a panel's width
/// there; a narrower screen may round to another step, which the record of
/// served queries covers.
const SCREEN: Screen = Screen { width_px: 1920 };

/// One range query to warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmCall {
    /// The panel it stands for, for the report.
    pub panel: String,
    /// The form Grafana posts to `/api/v1/query_range`.
    pub form: Vec<(&'static str, String)>,
}

/// The calls of one dashboard (or of the record), with what could not be built.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// The dashboard's title (uid when untitled), or `recorded queries`.
    pub name: String,
    /// The calls, in panel order.
    pub calls: Vec<WarmCall>,
    /// Targets that could not be turned into a call, with why.
    pub problems: Vec<String>,
}

/// Every range call of `board`'s panels at `now`, over its own time range or
/// `range_ms`, its variables as saved.
pub fn dashboard(board: &Dashboard, range_ms: Option<i64>, now: Millis) -> Job {
    let name = if board.title.is_empty() {
        board.uid.clone()
    } else {
        board.title.clone()
    };
    let variables = board.opened();
    let mut job = Job {
        name,
        ..Job::default()
    };
    for panel in board.query_panels() {
        for target in &panel.targets {
            let calls = board.calls_over(
                panel,
                target,
                &variables,
                DataSource::GRAFANA_DEFAULT,
                SCREEN,
                range_ms,
            );
            match calls {
                Ok(calls) => job.calls.extend(
                    calls
                        .iter()
                        .filter(|call| matches!(call, Call::Range { .. }))
                        .map(|call| WarmCall {
                            panel: format!("{} ({})", panel.title, target.ref_id),
                            form: call.http(now).params,
                        }),
                ),
                Err(e) => job
                    .problems
                    .push(format!("panel {:?} {}: {e}", panel.title, target.ref_id)),
            }
        }
    }
    job
}

/// The recorded queries `top` holds, each over its own range ending at `now`.
pub fn recorded(top: &[(Seen, u64)], now: Millis) -> Job {
    Job {
        name: "recorded queries".into(),
        calls: top
            .iter()
            .map(|(seen, uses)| {
                let call = Call::Range {
                    expr: Arc::clone(&seen.query),
                    range_ms: seen.range_ms,
                    step_ms: seen.step_ms,
                };
                WarmCall {
                    panel: format!(
                        "{} ({uses} uses{})",
                        seen.query,
                        seen.dashboard
                            .as_deref()
                            .map(|d| format!(", dashboard {d}"))
                            .unwrap_or_default()
                    ),
                    form: call.http(now).params,
                }
            })
            .collect(),
        problems: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// 2026-11-27T09:00:00Z.
    const NOW: Millis = 1_795_770_000_000;

    #[test]
    fn a_hand_edited_dashboard_is_warmed_or_reported_never_a_panic() {
        let board = Dashboard::parse(
            r#"{"time": {"from": "now-1000000d", "to": "now"}, "panels": [
                {"title": "wide", "gridPos": {"x": 0, "y": 0, "w": 9223372036854775807, "h": 1},
                 "maxDataPoints": -5, "interval": "0s",
                 "targets": [{"refId": "A", "expr": "up", "interval": "100000000w"}]},
                {"title": "typo", "targets": [{"refId": "B", "expr": "rate(x[$nope])"}]},
                {"title": "odd time", "timeFrom": "1y", "targets": [{"refId": "C", "expr": "up"}]},
                {"title": "other data source", "targets": [{"refId": "D"}]}
            ]}"#,
        )
        .unwrap();
        let job = dashboard(&board, None, NOW);
        assert_eq!(job.calls.len(), 1, "{job:?}");
        let step: i64 = job.calls[0].form[3].1.parse::<f64>().unwrap() as i64;
        assert!(step > 0);
        assert_eq!(job.problems.len(), 2, "{:?}", job.problems);
        assert!(job.problems[0].contains("undefined variable $nope"));
        assert!(job.problems[1].contains("\"1y\""));
    }

    #[test]
    fn a_dashboard_warms_each_range_target_as_grafana_sends_it() {
        let board =
            Dashboard::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/orders.json"))
                .unwrap();
        let job = dashboard(&board, Some(30 * 86_400_000), NOW);
        assert!(job.problems.is_empty(), "{:?}", job.problems);
        assert!(!job.calls.is_empty());
        for call in &job.calls {
            let param = |name: &str| {
                call.form
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.parse::<f64>().unwrap())
                    .unwrap()
            };
            let (start, end, step) = (param("start"), param("end"), param("step"));
            assert_eq!(start % step, 0.0, "aligned to the step: {call:?}");
            assert!(end - start <= 30.0 * 86_400.0 && end <= NOW as f64 / 1000.0);
            let query = &call.form[0].1;
            assert!(!query.contains('$'), "variables expanded: {query}");
        }
        let recorded_job = recorded(
            &[(
                Seen {
                    query: "sum(rate(x[5m]))".into(),
                    step_ms: 3_600_000,
                    range_ms: 7 * 86_400_000,
                    dashboard: None,
                },
                4,
            )],
            NOW,
        );
        assert_eq!(
            recorded_job.calls[0].form,
            [
                ("query", "sum(rate(x[5m]))".to_string()),
                ("start", "1795165200".to_string()),
                ("end", "1795770000".to_string()),
                ("step", "3600".to_string()),
            ]
        );
    }
}
