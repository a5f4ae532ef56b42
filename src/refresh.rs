//! The refresh floor (policy `min_refresh`): between policy and cache, live
//! queries of callers that are not exempt are moved onto a coarser clock.
//!
//! A personal panel refreshing every 10 s asks for a window that slides with
//! every step, so each refresh is a new answer and a new tail fetch, even when
//! nothing it shows has changed much. Moving the window back, by whole steps of
//! its own grid, until its end is on a multiple of the floor makes every refresh
//! within one floor interval the same question, which the cache then answers
//! once: the panel costs the backend one refresh per floor at most, and shows the
//! same length of time ending at most one floor earlier. Grafana's
//! own `min_refresh_interval` does the same by refusing faster refresh rates; this
//! applies it from the proxy, only to whom the policy chooses. Pure.

use std::time::Duration;

use crate::cache::extent::Grid;
use crate::request::{ApiRequest, RequestKind};
use crate::units::Millis;

/// A live instant query at a shared instant: `time` moved down to a multiple of
/// `step` (`cache.instant_step`), or `None` when nothing moves. Grafana sends stat,
/// gauge and table panels as instant queries at "now" to the millisecond, so
/// without this no two viewers ever ask the same question; with it, every viewer's
/// panel within one step is one answer, evaluated at most `step` ago. Instant
/// queries at older times keep their exact time. For every caller.
pub fn share_instant(req: &ApiRequest, step: Duration, live_after: Millis) -> Option<ApiRequest> {
    match req.kind {
        RequestKind::Instant { .. } => snap(req, step, live_after),
        _ => None,
    }
}

/// `req` with its evaluation times moved back to a multiple of `floor`, or
/// `None` when nothing moves. Only live queries move (a range ending, or an
/// instant at, later than `live_after`): older answers never change and are
/// cached exactly as asked.
pub fn snap(req: &ApiRequest, floor: Duration, live_after: Millis) -> Option<ApiRequest> {
    let floor = i64::try_from(floor.as_millis()).ok().filter(|f| *f > 0)?;
    let down = |t: Millis| t.div_euclid(floor).saturating_mul(floor);
    match req.kind {
        RequestKind::Range {
            start,
            end,
            step_ms,
            ..
        } if end > live_after => {
            // The window moves back by whole steps: it stays on the grid (and in
            // the extents) the caller asked for, and keeps its length, so its
            // point count, its range for the rules and its key within one floor
            // interval do not change.
            let to = Grid::new(start, step_ms).at_or_before(down(end));
            (to != end).then(|| req.with_span(start - (end - to), to))
        }
        RequestKind::Instant { time, .. } if time > live_after => {
            let at = down(time);
            (at != time).then(|| req.at(at))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{QueryParser, parse};
    use crate::units::format_time;
    use axum::http::Method;

    const MINUTE: Duration = Duration::from_secs(60);
    /// 2026-11-27T09:00:00Z, a whole minute.
    const T: Millis = 1_795_770_000_000;

    fn range(start: Millis, end: Millis, step: &str) -> ApiRequest {
        let params = [
            ("query", "sum(rate(shop_orders_total[5m]))".to_string()),
            ("start", format_time(start)),
            ("end", format_time(end)),
            ("step", step.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        parse(
            &Method::POST,
            "/api/v1/query_range",
            params,
            T,
            &QueryParser::default(),
        )
        .unwrap()
    }

    fn span(req: &ApiRequest) -> (Millis, Millis) {
        match req.kind {
            RequestKind::Range { start, end, .. } => (start, end),
            _ => panic!("not a range query"),
        }
    }

    fn param(req: &ApiRequest, name: &str) -> Vec<String> {
        req.encode()
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn refreshes_within_one_floor_become_the_same_question() {
        let live = T - 300_000;
        let at = |end: Millis| {
            let req = range(end - 3_600_000, end, "15");
            snap(&req, MINUTE, live).unwrap_or(req)
        };
        let first = at(T + 15_000);
        assert_eq!(span(&first), (T - 3_600_000, T));
        for end in [T + 30_000, T + 45_000] {
            assert_eq!(span(&at(end)), span(&first));
        }
        assert_eq!(span(&at(T + 60_000)), (T - 3_540_000, T + 60_000));
        assert_eq!(param(&first, "start"), [format_time(T - 3_600_000)]);
        assert_eq!(param(&first, "end"), [format_time(T)]);
        assert_eq!(param(&first, "step"), [format_time(15_000)]);
    }

    #[test]
    fn snapped_windows_stay_on_the_callers_step_grid() {
        // A 7 s step from an odd start: the grid is start + k·7 s.
        let start = T - 600_000 + 3_000;
        let req = range(start, start + 7_000 * 80, "7");
        let snapped = snap(&req, MINUTE, T - 3_600_000).unwrap();
        let (from, to) = span(&snapped);
        assert_eq!((from - start) % 7_000, 0);
        assert_eq!((to - start) % 7_000, 0);
        assert!(from <= start && to <= start + 7_000 * 80);
        assert!(start + 7_000 * 80 - to < 60_000 + 7_000);
        assert_eq!(
            to - from,
            7_000 * 80,
            "the same length, so the same point count"
        );
    }

    #[test]
    fn old_and_already_aligned_windows_are_left_alone() {
        let old = range(T - 86_400_000, T - 3_600_000 + 15_000, "15");
        assert!(snap(&old, MINUTE, T - 300_000).is_none());
        let aligned = range(T - 3_600_000, T, "15");
        assert!(snap(&aligned, MINUTE, T - 300_000).is_none());
    }

    #[test]
    fn live_instants_share_a_grid_and_old_ones_keep_their_time() {
        let instant = |time: Millis| {
            let params = vec![
                (
                    "query".to_string(),
                    "sum(rate(shop_orders_total[5m]))".to_string(),
                ),
                ("time".to_string(), format_time(time)),
            ];
            parse(
                &Method::POST,
                "/api/v1/query",
                params,
                T + 30_000,
                &QueryParser::default(),
            )
            .unwrap()
        };
        let step = Duration::from_secs(5);
        let live = T - 300_000;
        let time_of = |req: &ApiRequest| match req.kind {
            RequestKind::Instant { time, .. } => time,
            _ => panic!("instant"),
        };
        // Every time within one 5 s cell, to the millisecond, becomes its start.
        for t in [T + 25_000, T + 25_001, T + 27_123, T + 29_999] {
            let shared = share_instant(&instant(t), step, live).unwrap_or_else(|| instant(t));
            assert_eq!(time_of(&shared), T + 25_000, "{t}");
            assert_eq!(param(&shared, "time"), [format_time(T + 25_000)]);
        }
        assert_eq!(
            time_of(
                &share_instant(&instant(T + 30_000), step, live)
                    .unwrap_or_else(|| instant(T + 30_000))
            ),
            T + 30_000
        );
        // The live window's edge: just inside moves, at or before it does not.
        assert!(share_instant(&instant(live + 1_234), step, live).is_some());
        assert!(share_instant(&instant(live - 1_234), step, live).is_none());
        assert!(share_instant(&instant(T - 86_400_123), step, live).is_none());
        // Range queries are not instants.
        let r = range(T - 3_600_000, T + 1_234, "15");
        assert!(share_instant(&r, step, live).is_none());
    }

    #[test]
    fn instant_queries_at_now_move_to_the_floor() {
        let params = vec![
            ("query".to_string(), "up".to_string()),
            ("time".to_string(), format_time(T + 42_123)),
        ];
        let req = parse(
            &Method::GET,
            "/api/v1/query",
            params,
            T + 42_123,
            &QueryParser::default(),
        )
        .unwrap();
        let snapped = snap(&req, MINUTE, T - 300_000).unwrap();
        assert!(matches!(snapped.kind, RequestKind::Instant { time: T, .. }));
        assert_eq!(param(&snapped, "time"), [format_time(T)]);
    }
}
