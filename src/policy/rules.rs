//! Stage 6, decide: whether the active rule set allows a query, and each upstream
//! call it causes.
//!
//! Input: the compiled [`RuleSet`] of the current mode, the [`Judge`] stage, and
//! the [`Facts`] of one request or of one upstream call (who, which dashboard,
//! range, oldest touched sample, backend, PromQL). Output: a [`Decision`]: allowed
//! (with the dry-run rules that would have refused it), or refused by one rule
//! with a message that says what to do instead. Most rules judge the calls that
//! reach a backend, after the cache, so a panel the cache holds stays viewable;
//! a rule with `judge: request` (and every blocked pattern) judges the request as
//! asked. Pure.

use std::time::Duration;

use regex::Regex;

use crate::analysis::Furthest;
use crate::routing::BackendId;
use crate::units::Millis;

/// What a rule limits.
#[derive(Debug, Clone)]
pub enum Limit {
    /// `end - start` of a range query.
    MaxRange(Duration),
    /// How far before now the oldest touched sample may lie.
    MaxLookback(Duration),
    /// No reads of the long-term store.
    DenyLongTerm,
    /// The normalised PromQL matches this pattern.
    Block(Regex),
}

impl Limit {
    /// The metric label for this kind of limit.
    pub fn as_str(&self) -> &'static str {
        match self {
            Limit::MaxRange(_) => "max_range",
            Limit::MaxLookback(_) => "max_lookback",
            Limit::DenyLongTerm => "long_term",
            Limit::Block(_) => "blocked_pattern",
        }
    }
}

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// Each upstream call the cache would make for a request: what reaches the
    /// backend. The default for `max_range`, `max_lookback` and `long_term`.
    Fetch,
    /// The request as asked, before the cache: a hard cap whatever the cache
    /// holds. Always the case for blocked patterns, which read the query text.
    Request,
}

/// One rule of a policy file: one limit, enforced or a dry run.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique within its mode; named in refusals and in the `rule` metric label.
    pub name: String,
    /// What it refuses.
    pub limit: Limit,
    /// Shown to the user; says why the rule exists.
    pub reason: Option<String>,
    /// Log and count what it would refuse, without refusing.
    pub dry_run: bool,
    /// Whether it judges the request or its upstream calls.
    pub judge: Judge,
}

/// The rules of one mode, with who is exempt from them.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// In file order; the first enforcing rule that matches refuses.
    pub rules: Vec<Rule>,
    /// Dashboard uids whose queries skip the rules and keep the normal-mode budgets.
    pub exempt_dashboards: Vec<String>,
    /// User names (on-call, alerting) whose queries skip the rules and keep the
    /// normal-mode budgets.
    pub exempt_users: Vec<String>,
}

/// What the decision needs to know about one request.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The request's "now", Unix milliseconds; lookbacks are measured from it.
    pub now: Millis,
    /// The caller's user name, matched against the exempt users.
    pub user: &'a str,
    /// Only set when the dashboard header can be believed.
    pub dashboard: Option<&'a str>,
    /// `end - start` for range queries.
    pub range: Option<Duration>,
    /// Oldest sample any selector can touch; `None` when the query reads none.
    pub oldest: Option<Millis>,
    /// The selector reaching furthest back, spelled out only for a refusal.
    pub furthest: Option<&'a Furthest>,
    /// Where routing sends the request; `long_term: deny` refuses `long_term`.
    pub backend: BackendId,
    /// Canonical PromQL, for blocked patterns.
    pub query: Option<&'a str>,
}

/// One rule's verdict on a request, with the sentence explaining it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule's name.
    pub rule: String,
    /// The kind of limit ([`Limit::as_str`]), the `limit` metric label.
    pub limit: &'static str,
    /// What the user sees on the panel: the rule, what the query reads against the
    /// limit, and the rule's reason.
    pub message: String,
    /// A dry-run rule's: the request goes ahead, only logged and counted.
    pub dry_run: bool,
}

/// What the rules of the mode in force say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `would_refuse` lists dry-run rules that matched.
    Allow {
        /// Dry-run rules that matched, to log and count.
        would_refuse: Vec<Refusal>,
    },
    /// Allowed because the caller is exempt.
    Exempt,
    /// Refused by the first enforcing rule that matched (422).
    Refuse(Refusal),
}

impl RuleSet {
    /// Apply the rules that judge at `stage` in order: the first enforcing rule
    /// that matches refuses; dry-run matches are collected.
    pub fn decide(&self, facts: &Facts<'_>, stage: Judge) -> Decision {
        if self.exempt_users.iter().any(|u| u == facts.user)
            || facts
                .dashboard
                .is_some_and(|d| self.exempt_dashboards.iter().any(|e| e == d))
        {
            return Decision::Exempt;
        }
        let mut would_refuse = Vec::new();
        for rule in self.rules.iter().filter(|r| r.judge == stage) {
            let Some(what) = violation(&rule.limit, facts) else {
                continue;
            };
            let mut message = format!("refused by rule '{}': {what}", rule.name);
            if let Some(reason) = &rule.reason {
                message.push_str(&format!(" ({reason})"));
            }
            let refusal = Refusal {
                rule: rule.name.clone(),
                limit: rule.limit.as_str(),
                message,
                dry_run: rule.dry_run,
            };
            if rule.dry_run {
                would_refuse.push(refusal);
            } else {
                return Decision::Refuse(refusal);
            }
        }
        Decision::Allow { would_refuse }
    }
}

impl RuleSet {
    /// Whether any rule judges upstream calls: only then must the cache ask
    /// before each call it makes for a caller these rules bind.
    pub fn judges_fetches(&self) -> bool {
        self.rules.iter().any(|r| r.judge == Judge::Fetch)
    }
}

/// Why `facts` break `limit`, in words, or `None` when they do not.
fn violation(limit: &Limit, facts: &Facts<'_>) -> Option<String> {
    let via = || {
        facts
            .furthest
            .map(|f| format!(" via {}", f.describe()))
            .unwrap_or_default()
    };
    match limit {
        Limit::MaxRange(max) => {
            let range = facts.range?;
            (range > *max).then(|| {
                format!(
                    "the panel's time range is {}, the limit is {}",
                    human(range),
                    human(*max)
                )
            })
        }
        Limit::MaxLookback(max) => {
            let back = Duration::from_millis(u64::try_from(facts.now - facts.oldest?).ok()?);
            (back > *max).then(|| {
                format!(
                    "this query reads {} back{}, the limit is {}",
                    human(back),
                    via(),
                    human(*max)
                )
            })
        }
        Limit::DenyLongTerm => (facts.backend == BackendId::LongTerm).then(|| {
            let back = facts
                .oldest
                .and_then(|o| u64::try_from(facts.now - o).ok())
                .map(|ms| format!(" ({} back{})", human(Duration::from_millis(ms)), via()))
                .unwrap_or_default();
            format!("this query needs the long-term store{back}, which is closed to queries now")
        }),
        Limit::Block(pattern) => {
            let query = facts.query?;
            pattern
                .is_match(query)
                .then(|| format!("the query matches the blocked pattern /{pattern}/"))
        }
    }
}

/// `30 days`, `6 hours`, `90 minutes`: the largest unit that reads naturally.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match secs {
        s if s >= 2 * 86_400 => plural(s / 86_400, "day"),
        s if s >= 2 * 3_600 => plural(s / 3_600, "hour"),
        s if s >= 2 * 60 => plural(s / 60, "minute"),
        s => plural(s, "second"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;

    const NOW: Millis = 1_795_000_000_000;
    const DAY: u64 = 86_400;

    fn rule(name: &str, limit: Limit, dry_run: bool) -> Rule {
        Rule {
            name: name.into(),
            judge: match limit {
                Limit::Block(_) => Judge::Request,
                _ => Judge::Fetch,
            },
            limit,
            reason: None,
            dry_run,
        }
    }

    fn sale_rules() -> RuleSet {
        RuleSet {
            rules: vec![
                rule(
                    "no-regex-name",
                    Limit::Block(Regex::new(r"__name__=~").unwrap()),
                    true,
                ),
                rule("recent-only", Limit::DenyLongTerm, false),
                rule(
                    "short-ranges",
                    Limit::MaxRange(Duration::from_secs(6 * 3600)),
                    false,
                ),
                rule(
                    "short-lookback",
                    Limit::MaxLookback(Duration::from_secs(2 * DAY)),
                    false,
                ),
            ],
            exempt_dashboards: vec!["orders".into()],
            exempt_users: vec!["oncall".into()],
        }
    }

    static SHORT: LazyLock<Furthest> = LazyLock::new(|| Furthest::Text("rate(x[5m])".into()));
    static LONG: LazyLock<Furthest> =
        LazyLock::new(|| Furthest::Text("rate(orders_total[30d])".into()));

    fn facts<'a>() -> Facts<'a> {
        Facts {
            now: NOW,
            user: "bob",
            dashboard: Some("mine"),
            range: Some(Duration::from_secs(3600)),
            oldest: Some(NOW - 3_900_000),
            furthest: Some(&SHORT),
            backend: BackendId::Recent,
            query: Some("sum(rate(x[5m]))"),
        }
    }

    #[test]
    fn a_short_recent_query_passes() {
        assert_eq!(
            sale_rules().decide(&facts(), Judge::Fetch),
            Decision::Allow {
                would_refuse: vec![]
            }
        );
    }

    #[test]
    fn a_30_day_selector_is_refused_with_what_it_reads() {
        let f = Facts {
            oldest: Some(NOW - 30 * 86_400_000 - 3_600_000),
            furthest: Some(&LONG),
            backend: BackendId::LongTerm,
            ..facts()
        };
        let Decision::Refuse(r) = sale_rules().decide(&f, Judge::Fetch) else {
            panic!("refused")
        };
        assert_eq!(r.rule, "recent-only");
        assert!(
            r.message
                .contains("30 days back via rate(orders_total[30d])"),
            "{}",
            r.message
        );
    }

    #[test]
    fn ranges_and_lookbacks_are_checked_in_order() {
        let long_range = Facts {
            range: Some(Duration::from_secs(7 * DAY)),
            ..facts()
        };
        match sale_rules().decide(&long_range, Judge::Fetch) {
            Decision::Refuse(r) => {
                assert_eq!(r.rule, "short-ranges");
                assert!(
                    r.message.contains("7 days, the limit is 6 hours"),
                    "{}",
                    r.message
                );
            }
            other => panic!("{other:?}"),
        }
        let deep = Facts {
            oldest: Some(NOW - 3 * 86_400_000),
            ..facts()
        };
        assert!(
            matches!(sale_rules().decide(&deep, Judge::Fetch), Decision::Refuse(r) if r.rule == "short-lookback")
        );
    }

    #[test]
    fn exemptions_and_dry_runs() {
        let far = Facts {
            backend: BackendId::LongTerm,
            ..facts()
        };
        assert_eq!(
            sale_rules().decide(
                &Facts {
                    dashboard: Some("orders"),
                    ..far
                },
                Judge::Fetch
            ),
            Decision::Exempt
        );
        assert_eq!(
            sale_rules().decide(
                &Facts {
                    user: "oncall",
                    ..far
                },
                Judge::Request
            ),
            Decision::Exempt
        );
        let scan = Facts {
            query: Some(r#"count({__name__=~"shop_.*"})"#),
            ..facts()
        };
        match sale_rules().decide(&scan, Judge::Request) {
            Decision::Allow { would_refuse } => {
                assert_eq!(would_refuse.len(), 1);
                assert!(would_refuse[0].dry_run);
                assert_eq!(would_refuse[0].rule, "no-regex-name");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_rule_judges_only_at_its_own_stage() {
        let mut rules = sale_rules();
        let long_range = Facts {
            range: Some(Duration::from_secs(7 * DAY)),
            ..facts()
        };
        assert!(matches!(
            rules.decide(&long_range, Judge::Request),
            Decision::Allow { .. }
        ));
        assert!(rules.judges_fetches());
        rules.rules[2].judge = Judge::Request;
        assert!(
            matches!(rules.decide(&long_range, Judge::Request), Decision::Refuse(r) if r.rule == "short-ranges")
        );
        assert!(matches!(
            rules.decide(&long_range, Judge::Fetch),
            Decision::Allow { .. }
        ));
        let scan = Facts {
            query: Some(r#"count({__name__=~"shop_.*"})"#),
            ..facts()
        };
        assert_eq!(
            rules.decide(&scan, Judge::Fetch),
            Decision::Allow {
                would_refuse: vec![]
            },
            "a blocked pattern reads the query text, which the request already showed"
        );
        rules.rules.retain(|r| r.judge == Judge::Request);
        assert!(!rules.judges_fetches());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(30 * DAY)), "30 days");
        assert_eq!(human(Duration::from_secs(DAY)), "24 hours");
        assert_eq!(human(Duration::from_secs(5400)), "90 minutes");
        assert_eq!(human(Duration::from_secs(1)), "1 second");
    }
}
