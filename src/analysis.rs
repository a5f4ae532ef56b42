//! Stage 3, analyse: which samples a PromQL expression can touch.
//!
//! Input: the parsed expression and its evaluation span (`start..=end`, equal for an
//! instant query). Output: a [`QueryShape`] with the oldest and newest sample
//! timestamps any selector can read, resolving range selectors, subqueries (nested),
//! offsets and `@` modifiers. Queries promguard's parser cannot read are analysed
//! from the tolerant scan instead, conservatively. Routing, policy and the cache key
//! all share it. Pure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use promql_parser::parser::{AtModifier, Expr, Offset, VectorSelector};

use crate::request::{Expression, Query};
use crate::scan::Scanned;
use crate::units::{Millis, millis};

/// Prometheus' default `--query.lookback-delta`: how far back an instant selector
/// looks for the latest sample.
pub const DEFAULT_LOOKBACK_DELTA: Duration = Duration::from_secs(300);

/// What an expression reads, as time bounds over the samples it can touch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryShape {
    /// Oldest sample timestamp any selector can touch; `None` when the expression
    /// reads no series at all (`1+1`, `vector(1)`, `time()`).
    pub oldest: Option<Millis>,
    /// Newest sample timestamp any selector can touch.
    pub newest: Option<Millis>,
    /// The selector that reaches furthest back, for messages that explain a
    /// decision.
    pub furthest: Option<Furthest>,
    /// `@ start()` or `@ end()` appear: every step depends on the whole range, so
    /// the range must not be split.
    pub uses_range_bounds: bool,
    /// Number of series selectors, a first proxy for cost.
    pub selectors: usize,
    /// Analysed from the tolerant scan, not a syntax tree: the bounds are
    /// conservative (every range and offset added up).
    pub tolerant: bool,
}

impl QueryShape {
    /// The span of sample time touched, for metadata calls that name it directly.
    pub fn from_span(start: Option<Millis>, end: Option<Millis>) -> Self {
        QueryShape {
            oldest: Some(start.unwrap_or(Millis::MIN)),
            newest: Some(end.unwrap_or(Millis::MAX)),
            ..QueryShape::default()
        }
    }
}

/// The selector that reaches furthest back. Only a refusal or `policy explain`
/// prints it, so it is found on every request but spelled out only then.
#[derive(Debug, Clone, PartialEq)]
pub enum Furthest {
    /// A selector of a parsed expression.
    Selector {
        /// The whole expression.
        expr: Arc<Expr>,
        /// Which selector, counted in the walk's order: that order depends on the
        /// tree only, not on the times it is evaluated at.
        index: usize,
    },
    /// Already spelled out (the tolerant scan's selector).
    Text(Arc<str>),
}

impl Furthest {
    /// As written, with its enclosing function: `rate(orders_total[30d])`.
    pub fn describe(&self) -> String {
        match self {
            Furthest::Selector { expr, index } => {
                let mut walker = Walker::new((0, 0), Duration::ZERO, Some(*index));
                walker.walk(expr, (0, 0), None, 0);
                walker.described.unwrap_or_default()
            }
            Furthest::Text(text) => text.to_string(),
        }
    }
}

/// Analyse `query` evaluated over `start..=end` at `step_ms` (the step matters
/// only to MetricsQL ranges written in steps, such as `[1i]`).
pub fn analyse_query(
    query: &Query,
    start: Millis,
    end: Millis,
    step_ms: i64,
    lookback_delta: Duration,
) -> QueryShape {
    match &query.expr {
        Expression::Parsed(expr) => analyse(expr, start, end, lookback_delta),
        Expression::Scanned(scanned) => {
            analyse_scanned(scanned, start, end, step_ms, lookback_delta)
        }
    }
}

/// Analyse a parsed `expr` evaluated over `start..=end`.
pub fn analyse(
    expr: &Arc<Expr>,
    start: Millis,
    end: Millis,
    lookback_delta: Duration,
) -> QueryShape {
    let mut walker = Walker::new((start, end), lookback_delta, None);
    walker.walk(expr, (start, end), None, 0);
    let mut shape = walker.shape;
    shape.furthest = walker.furthest.map(|index| Furthest::Selector {
        expr: expr.clone(),
        index,
    });
    shape
}

/// The scan's facts as a shape, erring towards reading more: however ranges,
/// subqueries and offsets nest, the oldest sample lies no further back than all
/// of them added up (plus the lookback delta) from the earliest evaluation time
/// or `@` timestamp, and no later than the negative offsets added to the latest.
pub fn analyse_scanned(
    scanned: &Scanned,
    start: Millis,
    end: Millis,
    step_ms: i64,
    lookback_delta: Duration,
) -> QueryShape {
    let mut shape = QueryShape {
        uses_range_bounds: scanned.uses_range_bounds,
        tolerant: true,
        furthest: scanned.furthest.clone().map(Furthest::Text),
        ..QueryShape::default()
    };
    if !scanned.selects_series {
        return shape;
    }
    let back = scanned
        .ranges
        .at_step(step_ms)
        .saturating_add(scanned.offsets_back.at_step(step_ms))
        .saturating_add(millis(lookback_delta));
    let first = scanned.at_min.map_or(start, |at| at.min(start));
    let last = scanned.at_max.map_or(end, |at| at.max(end));
    shape.oldest = Some(first.saturating_sub(back));
    shape.newest = Some(last.saturating_add(scanned.offsets_ahead.at_step(step_ms)));
    shape.selectors = 1;
    shape
}

/// Deeper trees than this are not walked further: the scan's nesting bound keeps
/// real ones far below it, and a walk must never exhaust the stack.
const MAX_WALK_DEPTH: usize = 4096;

struct Walker {
    /// The top-level evaluation span: `@ start()` and `@ end()` always refer to it,
    /// even inside subqueries.
    query: (Millis, Millis),
    lookback: i64,
    shape: QueryShape,
    /// The index of the selector reaching furthest back so far.
    furthest: Option<usize>,
    /// Spell out the selector with this index as it is passed.
    wanted: Option<usize>,
    described: Option<String>,
}

impl Walker {
    fn new(query: (Millis, Millis), lookback_delta: Duration, wanted: Option<usize>) -> Self {
        Walker {
            query,
            lookback: millis(lookback_delta),
            shape: QueryShape::default(),
            furthest: None,
            wanted,
            described: None,
        }
    }

    /// Visit `expr` evaluated at steps within `eval`; `call` is the enclosing
    /// function, named in the `furthest` description.
    fn walk(&mut self, expr: &Expr, eval: (Millis, Millis), call: Option<&str>, depth: usize) {
        if depth > MAX_WALK_DEPTH {
            // Beyond the bound: assume the worst, that it reads everything.
            self.touch(Millis::MIN, Millis::MAX, || {
                "a deeply nested expression".into()
            });
            return;
        }
        let depth = depth + 1;
        match expr {
            Expr::VectorSelector(vs) => {
                let (s, e) = self.shift(eval, vs.at.as_ref(), vs.offset.as_ref());
                self.touch(s.saturating_sub(self.lookback), e, || {
                    describe(vs, call, None)
                });
            }
            Expr::MatrixSelector(ms) => {
                let (s, e) = self.shift(eval, ms.vs.at.as_ref(), ms.vs.offset.as_ref());
                let range = millis(ms.range);
                self.touch(s.saturating_sub(range), e, || {
                    describe(&ms.vs, call, Some(ms.range))
                });
            }
            Expr::Subquery(sq) => {
                let (s, e) = self.shift(eval, sq.at.as_ref(), sq.offset.as_ref());
                // The inner expression is evaluated at steps covering (t - range, t]
                // for every outer step t.
                self.walk(
                    &sq.expr,
                    (s.saturating_sub(millis(sq.range)), e),
                    call,
                    depth,
                );
            }
            Expr::Call(c) => {
                for arg in &c.args.args {
                    self.walk(arg, eval, Some(c.func.name), depth);
                }
            }
            Expr::Aggregate(a) => {
                if let Some(param) = &a.param {
                    self.walk(param, eval, call, depth);
                }
                self.walk(&a.expr, eval, call, depth);
            }
            Expr::Binary(b) => {
                self.walk(&b.lhs, eval, call, depth);
                self.walk(&b.rhs, eval, call, depth);
            }
            Expr::Unary(u) => self.walk(&u.expr, eval, call, depth),
            Expr::Paren(p) => self.walk(&p.expr, eval, call, depth),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }

    /// Apply `@` then `offset` to an evaluation span.
    fn shift(
        &mut self,
        eval: (Millis, Millis),
        at: Option<&AtModifier>,
        offset: Option<&Offset>,
    ) -> (Millis, Millis) {
        let (s, e) = match at {
            None => eval,
            Some(AtModifier::Start) => {
                self.shape.uses_range_bounds = true;
                (self.query.0, self.query.0)
            }
            Some(AtModifier::End) => {
                self.shape.uses_range_bounds = true;
                (self.query.1, self.query.1)
            }
            Some(AtModifier::At(t)) => {
                let t = system_time_millis(*t);
                (t, t)
            }
        };
        let shift = match offset {
            None => 0,
            Some(Offset::Pos(d)) => millis(*d),
            Some(Offset::Neg(d)) => -millis(*d),
        };
        (s.saturating_sub(shift), e.saturating_sub(shift))
    }

    fn touch(&mut self, oldest: Millis, newest: Millis, describe: impl FnOnce() -> String) {
        let index = self.shape.selectors;
        self.shape.selectors += 1;
        if self.wanted == Some(index) {
            self.described = Some(describe());
        }
        if self.shape.oldest.is_none_or(|o| oldest < o) {
            self.shape.oldest = Some(oldest);
            self.furthest = Some(index);
        }
        if self.shape.newest.is_none_or(|n| newest > n) {
            self.shape.newest = Some(newest);
        }
    }
}

fn describe(vs: &VectorSelector, call: Option<&str>, range: Option<Duration>) -> String {
    let bare = VectorSelector {
        offset: None,
        at: None,
        ..vs.clone()
    };
    let mut text = match range {
        Some(r) => format!("{bare}[{}]", promql_parser::util::display_duration(&r)),
        None => bare.to_string(),
    };
    if let Some(at) = &vs.at {
        text.push_str(&format!(" {at}"));
    }
    if let Some(offset) = &vs.offset {
        text.push_str(&format!(" offset {offset}"));
    }
    match call {
        Some(f) => format!("{f}({text})"),
        None => text,
    }
}

/// `@` timestamps may lie before the epoch.
fn system_time_millis(t: SystemTime) -> Millis {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => millis(d),
        Err(before) => -millis(before.duration()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;
    const D: i64 = 24 * H;
    /// A fixed "end of panel" instant, 2024-11-11T12:00:00Z.
    const T: i64 = 1_731_326_400_000;

    fn shape(q: &str, start: i64, end: i64) -> QueryShape {
        let expr = Arc::new(promql_parser::parser::parse(q).unwrap());
        analyse(&expr, start, end, DEFAULT_LOOKBACK_DELTA)
    }

    /// (query, start, end, expected oldest, expected newest)
    #[test]
    fn oldest_and_newest_samples() {
        let cases: &[(&str, i64, i64, i64, i64)] = &[
            ("up", T - H, T, T - H - 5 * MIN, T),
            ("rate(x[5m])", T - H, T, T - H - 5 * MIN, T),
            ("rate(x[30d])", T - H, T, T - H - 30 * D, T),
            ("x offset 1y", T, T, T - 365 * D - 5 * MIN, T - 365 * D),
            ("x offset -1h", T - H, T, T - H + H - 5 * MIN, T + H),
            (
                "rate(x[5m] offset 1d)",
                T - H,
                T,
                T - H - D - 5 * MIN,
                T - D,
            ),
            (
                "max_over_time(rate(x[5m])[1d:5m])",
                T - H,
                T,
                T - H - D - 5 * MIN,
                T,
            ),
            (
                "max_over_time(rate(x[5m])[1d:5m] offset 1w)",
                T - H,
                T,
                T - H - 7 * D - D - 5 * MIN,
                T - 7 * D,
            ),
            (
                "avg_over_time(max_over_time(x[1h])[1d:1h])[7d:1d]",
                T,
                T,
                T - 7 * D - D - H,
                T,
            ),
            ("x @ 1000", T - H, T, 1_000_000 - 5 * MIN, 1_000_000),
            ("x @ start()", T - H, T, T - H - 5 * MIN, T - H),
            ("rate(x[1h] @ end())", T - D, T, T - H, T),
            ("x @ -10", T, T, -10_000 - 5 * MIN, -10_000),
            (
                "rate(a[5m]) / rate(b[1h] offset 1d)",
                T - H,
                T,
                T - H - D - H,
                T,
            ),
            ("absent_over_time(x[90d])", T, T, T - 90 * D, T),
            ("predict_linear(x[6h], 3600)", T - H, T, T - H - 6 * H, T),
            ("topk(5, rate(x[2h]))", T, T, T - 2 * H, T),
            (
                "quantile_over_time(0.9, x[1h:1m] @ 1731240000)",
                T,
                T,
                1_731_240_000_000 - H - 5 * MIN,
                1_731_240_000_000,
            ),
            // Negative offsets on range selectors read ahead of the evaluation time.
            (
                "rate(x[1h] offset -30m)",
                T - H,
                T,
                T - H - H + 30 * MIN,
                T + 30 * MIN,
            ),
            // `@` then offset: the offset applies to the pinned time.
            (
                "x @ 1000 offset 1m",
                T,
                T,
                1_000_000 - MIN - 5 * MIN,
                1_000_000 - MIN,
            ),
            // `@ end()` inside a subquery still means the top-level query's end.
            (
                "max_over_time(rate(x[5m] @ end())[1d:])",
                T - H,
                T,
                T - 5 * MIN,
                T,
            ),
            // `@ start()` on a subquery pins its whole inner span.
            (
                "max_over_time(x[2h:5m] @ start())",
                T - D,
                T,
                T - D - 2 * H - 5 * MIN,
                T - D,
            ),
            // Nested subqueries with offsets at both levels.
            (
                "max_over_time(min_over_time(x[10m] offset 1h)[1d:1h] offset 1d)",
                T,
                T,
                T - D - D - H - 10 * MIN,
                T - D - H,
            ),
            // Binary operations mix their operands' reach.
            (
                "sum(rate(a[5m])) / sum(rate(a[5m] offset 1w)) > on() vector(1)",
                T - H,
                T,
                T - H - 7 * D - 5 * MIN,
                T,
            ),
            ("-x offset 2h", T, T, T - 2 * H - 5 * MIN, T - 2 * H),
            (
                "(x @ start()) and on() (y offset -1d)",
                T - H,
                T,
                T - H - 5 * MIN,
                T + D,
            ),
            (
                r#"label_replace(rate(x[15m]), "dst", "$1", "src", "(.*)")"#,
                T - H,
                T,
                T - H - 15 * MIN,
                T,
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m])))",
                T - H,
                T,
                T - H - 5 * MIN,
                T,
            ),
            ("topk(3, max_over_time(x[6h]))", T, T, T - 6 * H, T),
            ("timestamp(x offset 5m)", T, T, T - 10 * MIN, T - 5 * MIN),
            ("sum_over_time(x[1d:1h] @ 0)", T, T, -D - 5 * MIN, 0),
        ];
        for &(q, start, end, oldest, newest) in cases {
            let s = shape(q, start, end);
            assert_eq!(s.oldest, Some(oldest), "oldest of {q}");
            assert_eq!(s.newest, Some(newest), "newest of {q}");
        }
    }

    #[test]
    fn queries_without_selectors_touch_nothing() {
        for q in ["1+1", "vector(1)", "time()", "scalar(vector(2)) * 3"] {
            let s = shape(q, 4000, 4000);
            assert_eq!(s.oldest, None, "{q}");
            assert_eq!(s.selectors, 0, "{q}");
        }
    }

    #[test]
    fn furthest_names_the_selector_and_its_function() {
        let s = shape(
            "sum(rate(orders_total[5m])) / sum(rate(orders_total[30d] offset 1d))",
            T - H,
            T,
        );
        assert_eq!(
            s.furthest.map(|f| f.describe()).as_deref(),
            Some("rate(orders_total[30d] offset 1d)")
        );
        assert_eq!(s.selectors, 2);
    }

    #[test]
    fn scanned_queries_read_at_least_as_far_as_the_tree_says() {
        use crate::scan::{ScanLimits, scan};
        let scanned = |q: &str, start, end| {
            analyse_scanned(
                &scan(q, ScanLimits::default()).unwrap(),
                start,
                end,
                60_000,
                DEFAULT_LOOKBACK_DELTA,
            )
        };
        // Every parseable case of the table: the scan's bounds contain the tree's.
        for q in [
            "rate(x[30d])",
            "max_over_time(rate(x[5m])[1d:5m] offset 1w)",
            "avg_over_time(max_over_time(x[1h])[1d:1h])[7d:1d]",
            "x @ 1000 offset 1m",
            "rate(x[1h] offset -30m)",
            "(x @ start()) and on() (y offset -1d)",
            "sum_over_time(x[1d:1h] @ 0)",
        ] {
            let tree = shape(q, T - H, T);
            let scan = scanned(q, T - H, T);
            assert!(scan.oldest <= tree.oldest, "{q}: {scan:?} vs {tree:?}");
            assert!(scan.newest >= tree.newest, "{q}: {scan:?} vs {tree:?}");
            assert_eq!(scan.uses_range_bounds, tree.uses_range_bounds, "{q}");
            assert!(scan.tolerant);
        }
        let mql = scanned("rate(x) keep_metric_names", T - H, T);
        assert_eq!(mql.oldest, Some(T - H - 5 * MIN));
        let steps = scanned("rate(x[10i])", T, T);
        assert_eq!(steps.oldest, Some(T - 10 * MIN - 5 * MIN));
        assert_eq!(scanned("time() + 1", T, T).oldest, None);
    }

    #[test]
    fn deep_trees_are_walked_only_so_far() {
        // Parsing and dropping a tree this deep needs a big stack; promguard's own
        // requests never get there (the scan's nesting bound), but the walk must
        // not depend on that.
        let oldest = std::thread::Builder::new()
            .stack_size(512 << 20)
            .spawn(|| {
                let deep = format!("{}x{}", "(".repeat(5000), ")".repeat(5000));
                let expr = Arc::new(promql_parser::parser::parse(&deep).unwrap());
                let shape = analyse(&expr, T, T, DEFAULT_LOOKBACK_DELTA);
                let described = shape.furthest.map(|f| f.describe());
                (shape.oldest, described)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            oldest,
            (Some(Millis::MIN), Some("a deeply nested expression".into()))
        );
    }

    #[test]
    fn range_bound_modifiers_are_flagged() {
        assert!(shape("x @ end()", T - H, T).uses_range_bounds);
        assert!(shape("max_over_time(x[1h:] @ start())", T - H, T).uses_range_bounds);
        assert!(!shape("x @ 100", T - H, T).uses_range_bounds);
    }
}
