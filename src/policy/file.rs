//! Policy files: YAML in a directory, reviewed like code, compiled into a [`Policy`].
//!
//! Every `*.yaml`/`*.yml` file in the directory is read in name order and merged:
//! windows and rules are appended, exemptions united, and each mode's limits may be
//! set by one file only. Validation happens while parsing, so every error names the
//! file and the line. Reads files; nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::rules::{Judge, Limit, Rule, RuleSet};
use super::state::Mode;
use super::window::{Window, resolve};
use crate::config::{HumanDuration, RateConfig};

/// Per-user limits a mode hands to the limits stage, over the config's defaults.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModeLimits {
    /// Replaces `limits.requests` in this mode; `limits.users` overrides still win.
    pub requests: Option<RateConfig>,
    /// Replaces `limits.upstream` in this mode; `limits.users` overrides still win.
    pub upstream: Option<RateConfig>,
    /// Replaces `limits.max_in_flight` in this mode; `limits.users` overrides still
    /// win.
    pub max_in_flight: Option<usize>,
}

/// One mode's rules, exemptions and limits.
#[derive(Debug, Clone, Default)]
pub struct ModePolicy {
    /// The rules and exemptions, merged from every file.
    pub rules: RuleSet,
    /// The mode's per-user budgets over the configuration's; set by one file at most.
    pub limits: ModeLimits,
    /// Live queries of callers that are not exempt reach the backend at most
    /// once per this interval: their windows are snapped to it and their answers
    /// stay fresh for it.
    pub min_refresh: Option<Duration>,
}

/// Everything the policy files say, compiled.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Sale windows from every file, in load order.
    pub windows: Vec<Window>,
    /// What applies outside sale mode.
    pub normal: ModePolicy,
    /// What applies in sale mode (by schedule or by the switch).
    pub sale: ModePolicy,
    /// The files it came from, in load order.
    pub files: Vec<PathBuf>,
}

impl Policy {
    /// The rules, exemptions and limits of `mode`.
    pub fn mode(&self, mode: Mode) -> &ModePolicy {
        match mode {
            Mode::Normal => &self.normal,
            Mode::Sale => &self.sale,
        }
    }
}

/// A policy file that cannot be used, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file at fault: the last one read for a clash between files (a name used
    /// twice), the directory when it cannot be listed or holds no policy file.
    pub file: PathBuf,
    /// 1-based line, when the YAML parser knows it (syntax and value errors).
    pub line: Option<usize>,
    /// What is wrong, with the field's path where known.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    windows: Vec<Window>,
    normal: Option<RawMode>,
    sale: Option<RawMode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMode {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    exempt: RawExempt,
    limits: Option<ModeLimits>,
    min_refresh: Option<HumanDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExempt {
    #[serde(default)]
    dashboards: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    name: String,
    start: String,
    end: String,
    timezone: Option<String>,
    warm_before: Option<HumanDuration>,
}

/// The longest `warm_before`: warming earlier than a day ahead fills the cache
/// with answers the window's first viewers would not ask for.
const MAX_WARM_BEFORE: Duration = Duration::from_secs(24 * 3600);

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawWindow::deserialize(d)?;
        let zone = raw.timezone.as_deref();
        let at = |field: &str, text: &str| {
            resolve(text, zone).map_err(|e| {
                serde::de::Error::custom(format!("window {:?} {field}: {e}", raw.name))
            })
        };
        let start = at("start", &raw.start)?;
        let end = at("end", &raw.end)?;
        if end <= start {
            return Err(serde::de::Error::custom(format!(
                "window {:?} ends before it starts",
                raw.name
            )));
        }
        let warm_before = raw.warm_before.map(|d| d.0);
        if warm_before.is_some_and(|d| d.is_zero() || d > MAX_WARM_BEFORE) {
            return Err(serde::de::Error::custom(format!(
                "window {:?} warm_before: must be positive and at most 24h",
                raw.name
            )));
        }
        Ok(Window {
            name: raw.name,
            start,
            end,
            warm_before,
        })
    }
}

/// Settings that one file alone may set: the second file to set `what` is an error
/// naming the first.
fn set_once(seen: &mut BTreeMap<String, PathBuf>, what: String, file: &Path) -> Result<(), String> {
    match seen.get(&what) {
        Some(first) => Err(format!(
            "{what} is already set in {}; set it in one file",
            first.display()
        )),
        None => {
            seen.insert(what, file.to_path_buf());
            Ok(())
        }
    }
}

/// A rule as written: a name and exactly one limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    max_range: Option<HumanDuration>,
    max_lookback: Option<HumanDuration>,
    long_term: Option<LongTerm>,
    block: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    dry_run: bool,
    judge: Option<RawJudge>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawJudge {
    Fetch,
    Request,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum LongTerm {
    Deny,
    Allow,
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawRule::deserialize(d)?;
        let mut limits = Vec::new();
        if let Some(d) = raw.max_range {
            limits.push(Limit::MaxRange(d.0));
        }
        if let Some(d) = raw.max_lookback {
            limits.push(Limit::MaxLookback(d.0));
        }
        if raw.long_term == Some(LongTerm::Deny) {
            limits.push(Limit::DenyLongTerm);
        }
        if let Some(pattern) = &raw.block {
            let re = Regex::new(pattern).map_err(|e| {
                serde::de::Error::custom(format!("rule {:?}: invalid pattern: {e}", raw.name))
            })?;
            limits.push(Limit::Block(re));
        }
        if limits.len() != 1 {
            return Err(serde::de::Error::custom(format!(
                "rule {:?} must set exactly one of max_range, max_lookback, long_term: deny, block",
                raw.name
            )));
        }
        let limit = limits.remove(0);
        let judge = match (&limit, raw.judge) {
            // The query text is the same in every upstream call of a request.
            (Limit::Block(_), Some(RawJudge::Fetch)) => {
                return Err(serde::de::Error::custom(format!(
                    "rule {:?}: judge: fetch does not apply to block, which reads the \
                     query text; leave judge out",
                    raw.name
                )));
            }
            (Limit::Block(_), _) | (_, Some(RawJudge::Request)) => Judge::Request,
            (_, Some(RawJudge::Fetch) | None) => Judge::Fetch,
        };
        Ok(Rule {
            name: raw.name,
            limit,
            reason: raw.reason,
            dry_run: raw.dry_run,
            judge,
        })
    }
}

/// Read and compile every policy file in `dir`.
///
/// # Errors
///
/// The first unusable file, with the line where the parser knows it; an empty
/// directory is an error too, since it would silently mean "no policy".
pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
    let at_dir = |message: String| PolicyError {
        file: dir.to_path_buf(),
        line: None,
        message,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| at_dir(format!("cannot read the policy directory: {e}")))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(at_dir("no *.yaml policy files".into()));
    }
    let mut sources = Vec::with_capacity(files.len());
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| PolicyError {
            file: file.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        sources.push((file.clone(), text));
    }
    compile(&sources)
}

/// Compile policy texts (file name, YAML), merged in the given order. Pure.
///
/// # Errors
///
/// As [`load_dir`].
pub fn compile(sources: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
    let mut policy = Policy::default();
    let mut set_in: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (file, text) in sources {
        let fail = |line: Option<usize>, message: String| PolicyError {
            file: file.clone(),
            line,
            message,
        };
        let raw: RawFile = serde_yaml_ng::from_str(text)
            .map_err(|e| fail(e.location().map(|l| l.line()), e.to_string()))?;
        policy.windows.extend(raw.windows);
        for (mode_name, raw_mode, mode) in [
            ("normal", raw.normal, &mut policy.normal),
            ("sale", raw.sale, &mut policy.sale),
        ] {
            let Some(raw_mode) = raw_mode else { continue };
            mode.rules.rules.extend(raw_mode.rules);
            mode.rules
                .exempt_dashboards
                .extend(raw_mode.exempt.dashboards);
            mode.rules.exempt_users.extend(raw_mode.exempt.users);
            if let Some(limits) = raw_mode.limits {
                set_once(&mut set_in, format!("{mode_name}.limits"), file)
                    .map_err(|m| fail(None, m))?;
                mode.limits = limits;
            }
            if let Some(floor) = raw_mode.min_refresh {
                set_once(&mut set_in, format!("{mode_name}.min_refresh"), file)
                    .map_err(|m| fail(None, m))?;
                if floor.0 < Duration::from_secs(1) {
                    return Err(fail(
                        None,
                        format!("{mode_name}.min_refresh must be at least 1s"),
                    ));
                }
                mode.min_refresh = Some(floor.0);
            }
        }
        policy.files.push(file.clone());
    }
    let mut names = BTreeMap::new();
    for w in &policy.windows {
        if names.insert(w.name.as_str(), ()).is_some() {
            return Err(PolicyError {
                file: sources.last().map(|s| s.0.clone()).unwrap_or_default(),
                line: None,
                message: format!("window name {:?} is used twice", w.name),
            });
        }
    }
    for (mode_name, mode) in [("normal", &policy.normal), ("sale", &policy.sale)] {
        let mut seen = BTreeMap::new();
        for r in &mode.rules.rules {
            if seen.insert(r.name.as_str(), ()).is_some() {
                return Err(PolicyError {
                    file: sources.last().map(|s| s.0.clone()).unwrap_or_default(),
                    line: None,
                    message: format!("{mode_name} rule name {:?} is used twice", r.name),
                });
            }
        }
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_one(text: &str) -> Result<Policy, PolicyError> {
        compile(&[(PathBuf::from("p.yaml"), text.to_string())])
    }

    #[test]
    fn the_shipped_policies_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let policy = load_dir(&dir).unwrap();
        let names: Vec<_> = policy.windows.iter().map(|w| w.name.as_str()).collect();
        for expected in ["pre-sale", "singles-day", "black-friday"] {
            assert!(names.iter().any(|n| n.contains(expected)), "{names:?}");
        }
        assert!(!policy.sale.rules.rules.is_empty());
        assert!(
            policy
                .sale
                .rules
                .exempt_dashboards
                .contains(&"orders".to_string())
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = compile_one(
            "windows:\n  - name: bf\n    start: 2026-11-27T00:00:00\n    end: 2026-11-28T00:00:00\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("needs a UTC offset"), "{err}");

        let err =
            compile_one("sale:\n  rules:\n    - name: x\n      max_range: 1h\n      block: a\n")
                .unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.to_string().starts_with("p.yaml:3:"), "{err}");

        let err = compile_one("sale:\n  rules:\n    - name: x\n      block: '(('\n").unwrap_err();
        assert!(err.message.contains("invalid pattern"), "{err}");

        let err = compile_one("sael: {}\n").unwrap_err();
        assert!(err.message.contains("unknown field"), "{err}");
    }

    #[test]
    fn rules_judge_upstream_calls_unless_they_say_request() {
        let p = compile_one(
            "sale:\n  rules:\n    - {name: a, long_term: deny}\n    - {name: b, max_range: 12h, judge: request}\n    - {name: c, block: x}\n",
        )
        .unwrap();
        let judges: Vec<_> = p.sale.rules.rules.iter().map(|r| r.judge).collect();
        assert_eq!(judges, [Judge::Fetch, Judge::Request, Judge::Request]);

        let err = compile_one(
            "sale:\n  rules:\n    - name: a\n      max_lookback: 2d\n      judge: cache\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.message.contains("judge: unknown variant `cache`"),
            "{err}"
        );
        let err =
            compile_one("sale:\n  rules:\n    - name: c\n      block: x\n      judge: fetch\n")
                .unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("does not apply to block"), "{err}");
    }

    #[test]
    fn a_window_may_warm_the_cache_before_it_opens() {
        let p = compile_one(
            "windows:\n  - name: bf\n    start: '2026-11-27T00:00:00+03:00'\n    end: '2026-11-28T00:00:00+03:00'\n    warm_before: 2h\n",
        )
        .unwrap();
        assert_eq!(p.windows[0].warm_before, Some(Duration::from_secs(7200)));
        // A value that is no duration is placed on its own line; one out of bounds
        // on its window's.
        for (value, needle, line) in [
            (
                "3d",
                "window \"bf\" warm_before: must be positive and at most 24h",
                2,
            ),
            ("soon", "windows[0].warm_before: invalid duration", 5),
        ] {
            let err = compile_one(&format!(
                "windows:\n  - name: bf\n    start: '2026-11-27T00:00:00+03:00'\n    end: '2026-11-28T00:00:00+03:00'\n    warm_before: {value}\n"
            ))
            .unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(needle), "{err}");
        }
    }

    #[test]
    fn files_merge_and_limits_are_set_once() {
        let a = (
            PathBuf::from("a.yaml"),
            "sale:\n  exempt: {dashboards: [orders]}\n  limits: {max_in_flight: 2}\n  rules:\n    - {name: r1, long_term: deny}\n".to_string(),
        );
        let b = (
            PathBuf::from("b.yaml"),
            "windows:\n  - {name: bf, start: '2026-11-27T00:00:00+03:00', end: '2026-11-28T00:00:00+03:00'}\nsale:\n  exempt: {users: [oncall]}\n  rules:\n    - {name: r2, max_range: 6h, dry_run: true}\n".to_string(),
        );
        let p = compile(&[a.clone(), b]).unwrap();
        assert_eq!(p.windows.len(), 1);
        assert_eq!(p.sale.rules.rules.len(), 2);
        assert!(p.sale.rules.rules[1].dry_run);
        assert_eq!(p.sale.rules.exempt_users, ["oncall"]);
        assert_eq!(p.sale.limits.max_in_flight, Some(2));
        let twice = compile(&[
            a.clone(),
            (PathBuf::from("c.yaml"), a.1.replace("r1", "r3")),
        ]);
        assert!(twice.unwrap_err().message.contains("already set in a.yaml"));
    }

    #[test]
    fn min_refresh_is_set_once_and_at_least_a_second() {
        let p = compile_one("sale:\n  min_refresh: 1m\n").unwrap();
        assert_eq!(p.sale.min_refresh, Some(Duration::from_secs(60)));
        assert_eq!(p.normal.min_refresh, None);
        let err = compile_one("sale:\n  min_refresh: 500ms\n").unwrap_err();
        assert!(err.message.contains("at least 1s"), "{err}");
        let file = |name: &str| {
            (
                PathBuf::from(name),
                "sale: {min_refresh: 30s}\n".to_string(),
            )
        };
        let err = compile(&[file("a.yaml"), file("b.yaml")]).unwrap_err();
        assert!(
            err.message
                .contains("sale.min_refresh is already set in a.yaml"),
            "{err}"
        );
    }
}
