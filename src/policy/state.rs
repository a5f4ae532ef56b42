//! Sale mode: the schedule, the SRE's manual override, and which one is in force.
//!
//! [`effective`] is pure: windows plus an optional override at an instant give the
//! mode, its source and until when. [`OverrideFile`] persists the override and the
//! audit trail atomically (write, fsync, rename), so a restart keeps both.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::window::{Window, active};

/// The two rule sets. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No sale window is open and no switch says otherwise: the normal rules apply.
    Normal,
    /// A sale window is open, or an SRE switched sale mode on.
    Sale,
}

impl Mode {
    /// The `mode` label value, and the mode's name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Sale => "sale",
        }
    }
}

/// Why the current mode is in force. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Decided by the sale windows of the policy files.
    Schedule,
    /// Decided by an SRE's switch that has not run out.
    Manual,
}

impl Source {
    /// The `source` label value of `promguard_sale_mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Manual => "manual",
        }
    }
}

/// An SRE's decision to force a mode until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// The mode it forces.
    pub mode: Mode,
    /// When it runs out and the schedule is back; at most `policy.max_override`
    /// after `at`.
    pub until: DateTime<Utc>,
    /// Why, as the SRE gave it; required, for the audit.
    pub reason: String,
    /// Who switched, as the SRE gave it; required, for the audit.
    pub by: String,
    /// When the switch was made.
    pub at: DateTime<Utc>,
}

/// One change of the switch: who, when, why, from what to what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When the switch was made.
    pub at: DateTime<Utc>,
    /// Who made it, as given in the admin call; only the admin token is checked.
    pub by: String,
    /// Why, as given; shown in `/-/status` and by the CLI.
    pub reason: String,
    /// The mode in force just before, as [`Effective::describe`] puts it.
    pub from: String,
    /// The mode in force just after, likewise.
    pub to: String,
}

/// The mode in force and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    /// Sale or normal: which rule set and budgets apply.
    pub mode: Mode,
    /// Whether the schedule or a manual switch decided it.
    pub source: Source,
    /// The scheduled window in force (or being overridden), if any.
    pub window: Option<String>,
    /// When this mode ends unless something changes.
    pub until: Option<DateTime<Utc>>,
    /// The SRE's reason, when a manual switch decided it.
    pub reason: Option<String>,
}

impl Effective {
    /// "sale mode (window 'black-friday', until 2026-11-30T03:00:00Z)"
    pub fn describe(&self) -> String {
        let mut text = format!("{} mode", self.mode.as_str());
        let mut parts = Vec::new();
        match self.source {
            Source::Manual => parts.push("switched by hand".to_string()),
            Source::Schedule => {
                if let Some(w) = &self.window {
                    parts.push(format!("window '{w}'"));
                }
            }
        }
        if let Some(until) = self.until {
            parts.push(format!("until {}", until.to_rfc3339()));
        }
        if !parts.is_empty() {
            text.push_str(&format!(" ({})", parts.join(", ")));
        }
        text
    }
}

/// The mode at `now`: an unexpired override wins, else the schedule.
pub fn effective(windows: &[Window], manual: Option<&Override>, now: DateTime<Utc>) -> Effective {
    let scheduled = active(windows, now);
    let window = scheduled.as_ref().map(|a| a.window.name.clone());
    match manual.filter(|o| now < o.until) {
        Some(o) => Effective {
            mode: o.mode,
            source: Source::Manual,
            window,
            until: Some(o.until),
            reason: Some(o.reason.clone()),
        },
        None => match scheduled {
            Some(a) => Effective {
                mode: Mode::Sale,
                source: Source::Schedule,
                window,
                until: Some(a.until),
                reason: None,
            },
            None => Effective {
                mode: Mode::Normal,
                source: Source::Schedule,
                window: None,
                until: windows.iter().map(|w| w.start).filter(|s| *s > now).min(),
                reason: None,
            },
        },
    }
}

/// Audit entries kept in the state file and the status output.
const AUDIT_KEPT: usize = 100;

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// The SRE's switch; it may have run out, which [`effective`] checks.
    #[serde(rename = "override")]
    pub manual: Option<Override>,
    /// The changes of the switch, oldest first, at most the last hundred.
    #[serde(default)]
    pub audit: Vec<AuditEntry>,
}

impl Persisted {
    /// Record a change of the override; the newest audit entries are kept.
    pub fn change(&mut self, manual: Option<Override>, entry: AuditEntry) {
        self.manual = manual;
        self.audit.push(entry);
        if self.audit.len() > AUDIT_KEPT {
            let excess = self.audit.len() - AUDIT_KEPT;
            self.audit.drain(..excess);
        }
    }
}

/// The state file.
#[derive(Debug, Clone)]
pub struct OverrideFile {
    /// Where the state lives (`policy.state_file`); written atomically.
    pub path: PathBuf,
}

impl OverrideFile {
    /// Read the state; a missing file is an empty state.
    ///
    /// # Errors
    ///
    /// When the file exists but cannot be read or parsed.
    pub fn load(&self) -> Result<Persisted, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", self.path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted::default()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    /// Read the state, never failing: a file that cannot be read or parsed is moved
    /// aside (kept for the audit, next to the original with a `.corrupt-<time>`
    /// suffix) and the state starts empty, so promguard runs on the schedule.
    /// Returns the state and, when the file was bad, what happened to it.
    pub fn load_or_set_aside(&self, now: DateTime<Utc>) -> (Persisted, Option<String>) {
        let error = match self.load() {
            Ok(state) => return (state, None),
            Err(e) => e,
        };
        let aside = self.path.with_file_name(format!(
            "{}.corrupt-{}",
            self.path
                .file_name()
                .map_or_else(|| "state".into(), |n| n.to_string_lossy()),
            now.format("%Y%m%dT%H%M%SZ")
        ));
        let what = match std::fs::rename(&self.path, &aside) {
            Ok(()) => format!("{error}; moved to {}", aside.display()),
            Err(e) => format!("{error}; could not move it aside ({e})"),
        };
        (Persisted::default(), Some(what))
    }

    /// Replace the state atomically: a crash leaves the old file or the new one.
    ///
    /// # Errors
    ///
    /// Any I/O failure, with the path.
    pub fn save(&self, state: &Persisted) -> Result<(), String> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let fail = |e: std::io::Error| format!("{}: {e}", self.path.display());
        std::fs::create_dir_all(dir).map_err(fail)?;
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(&bytes).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        // The rename itself must reach the disk for the new state to survive a crash.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn windows() -> Vec<Window> {
        vec![Window {
            name: "black-friday".into(),
            start: utc("2026-11-27T00:00:00Z"),
            end: utc("2026-11-28T00:00:00Z"),
            warm_before: None,
        }]
    }

    fn manual(mode: Mode, until: &str) -> Override {
        Override {
            mode,
            until: utc(until),
            reason: "r".into(),
            by: "sre".into(),
            at: utc("2026-11-01T00:00:00Z"),
        }
    }

    #[test]
    fn schedule_override_and_expiry() {
        let w = windows();
        let during = utc("2026-11-27T12:00:00Z");
        let e = effective(&w, None, during);
        assert_eq!((e.mode, e.source), (Mode::Sale, Source::Schedule));
        assert_eq!(e.until, Some(utc("2026-11-28T00:00:00Z")));
        assert!(
            e.describe().contains("window 'black-friday'"),
            "{}",
            e.describe()
        );

        let off = manual(Mode::Normal, "2026-11-27T13:00:00Z");
        let e = effective(&w, Some(&off), during);
        assert_eq!((e.mode, e.source), (Mode::Normal, Source::Manual));
        // Expired: the schedule is back.
        let e = effective(&w, Some(&off), utc("2026-11-27T13:00:00Z"));
        assert_eq!((e.mode, e.source), (Mode::Sale, Source::Schedule));

        let before = effective(&w, None, utc("2026-11-20T00:00:00Z"));
        assert_eq!(before.mode, Mode::Normal);
        assert_eq!(
            before.until,
            Some(utc("2026-11-27T00:00:00Z")),
            "next window start"
        );
    }

    #[test]
    fn the_state_file_round_trips_and_keeps_the_newest_audit() {
        let dir = tempfile::tempdir().unwrap();
        let file = OverrideFile {
            path: dir.path().join("state/sale-mode.json"),
        };
        assert_eq!(file.load().unwrap(), Persisted::default());
        let mut state = Persisted::default();
        for i in 0..(AUDIT_KEPT + 5) {
            state.change(
                Some(manual(Mode::Sale, "2026-11-27T13:00:00Z")),
                AuditEntry {
                    at: utc("2026-11-27T12:00:00Z"),
                    by: format!("sre{i}"),
                    reason: "drill".into(),
                    from: "normal".into(),
                    to: "sale".into(),
                },
            );
        }
        file.save(&state).unwrap();
        let loaded = file.load().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.audit.len(), AUDIT_KEPT);
        assert_eq!(loaded.audit[0].by, "sre5");
        std::fs::write(&file.path, b"{not json").unwrap();
        assert!(file.load().is_err());
    }

    #[test]
    fn a_damaged_state_file_is_set_aside_and_the_state_starts_empty() {
        let now = utc("2026-11-27T12:00:00Z");
        for damaged in [
            &b""[..],
            b"{\"override\": {\"mode\": \"sa",
            b"\x00\xff garbage",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let file = OverrideFile {
                path: dir.path().join("sale-mode.json"),
            };
            std::fs::write(&file.path, damaged).unwrap();
            let (state, problem) = file.load_or_set_aside(now);
            assert_eq!(state, Persisted::default());
            let problem = problem.expect("reported");
            assert!(problem.contains("moved to"), "{problem}");
            assert!(!file.path.exists());
            let aside = dir.path().join("sale-mode.json.corrupt-20261127T120000Z");
            assert_eq!(
                std::fs::read(&aside).unwrap(),
                damaged,
                "kept for the audit"
            );
            // And the next save works.
            file.save(&Persisted::default()).unwrap();
            assert_eq!(file.load_or_set_aside(now), (Persisted::default(), None));
        }
    }
}
