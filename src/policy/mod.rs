//! Policies: sale windows, the rule sets of normal and sale mode, the SRE switch.
//!
//! [`Policies`] holds the compiled policy (swapped whole on reload; an invalid edit
//! never replaces a valid policy), the per-mode user limits built from it, and the
//! persisted override. The pure parts live in [`window`], [`rules`], [`file`](mod@file) and
//! [`state`]; this module does the file and clock I/O around them.

pub mod explain;
pub mod file;
pub mod rules;
pub mod state;
pub mod verdict;
pub mod window;

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;

use crate::config::{LimitsConfig, PolicyConfig};
use crate::limits::Quotas;
use file::{ModeLimits, Policy, PolicyError, load_dir};
use rules::RuleSet;
use state::{AuditEntry, Effective, Mode, Override, OverrideFile, Persisted, effective};

/// A compiled policy with the quotas each mode hands to the limits stage (the
/// budgets' state lives in the [`crate::limits::Limiter`], which outlives reloads).
pub struct Compiled {
    /// What the policy files say: the windows and each mode's rules and budgets.
    pub policy: Policy,
    normal_limits: Quotas,
    sale_limits: Quotas,
}

impl Compiled {
    fn new(policy: Policy, base: &LimitsConfig) -> Self {
        Compiled {
            normal_limits: Quotas::new(&merged(base, &policy.normal.limits)),
            sale_limits: Quotas::new(&merged(base, &policy.sale.limits)),
            policy,
        }
    }

    /// The rules and exemptions of `mode`.
    pub fn rules(&self, mode: Mode) -> &RuleSet {
        &self.policy.mode(mode).rules
    }

    /// How often a live query of a caller who is not exempt may reach a backend.
    pub fn min_refresh(&self, mode: Mode) -> Option<Duration> {
        self.policy.mode(mode).min_refresh
    }

    /// The per-user quotas of `mode`: the configuration's `limits`, with the mode's
    /// own from the policy over them.
    pub fn limits(&self, mode: Mode) -> &Quotas {
        match mode {
            Mode::Normal => &self.normal_limits,
            Mode::Sale => &self.sale_limits,
        }
    }
}

fn merged(base: &LimitsConfig, mode: &ModeLimits) -> LimitsConfig {
    LimitsConfig {
        requests: mode.requests.unwrap_or(base.requests),
        upstream: mode.upstream.unwrap_or(base.upstream),
        max_in_flight: mode.max_in_flight.unwrap_or(base.max_in_flight),
        ..base.clone()
    }
}

/// Why the switch refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// `on` or `off` without `for`: a manual switch must end by itself.
    #[error("sale-mode on/off needs a duration (\"for\", e.g. \"6h\")")]
    NeedsDuration,
    /// `for` is zero or longer than `policy.max_override`.
    #[error(
        "\"for\" must be positive and at most {} (policy.max_override); switch again \
         when it runs out",
        crate::units::format_duration(*max)
    )]
    TooLong {
        /// `policy.max_override`, quoted in the message.
        max: Duration,
    },
    /// The state file could not be written, so nothing changed (500).
    #[error("the switch could not be saved, so it is unchanged: {0}")]
    Persist(String),
}

/// What an SRE asks the switch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    /// Sale mode for the given duration, whatever the schedule says.
    On,
    /// Normal mode for the given duration, even inside a sale window.
    Off,
    /// Back to the schedule: clears the manual switch.
    Auto,
}

/// A switch worked out but not yet made ([`Policies::plan_switch`]).
#[derive(Debug, Clone)]
pub struct Switch {
    /// The state it makes: the new override and the audit trail with its entry.
    pub state: Persisted,
    /// The mode in force once it is made.
    pub after: Effective,
    /// Its audit entry.
    pub entry: AuditEntry,
}

/// The policy runtime shared by the pipeline, the admin API and the reloader.
pub struct Policies {
    dir: Option<PathBuf>,
    base_limits: LimitsConfig,
    current: RwLock<Arc<Compiled>>,
    fingerprint: Mutex<u64>,
    file: OverrideFile,
    state: Mutex<Persisted>,
    reloads: IntCounterVec,
    /// The longest a manual override may last.
    max_override: Duration,
}

impl Policies {
    /// Load the policy directory (if configured) and the persisted override. A
    /// damaged state file is set aside, logged and counted in `state_file_errors`,
    /// and promguard runs on the schedule.
    ///
    /// # Errors
    ///
    /// An invalid policy file: at start-up there is no older valid policy to fall
    /// back on, so promguard refuses to start.
    pub fn new(
        config: &PolicyConfig,
        limits: &LimitsConfig,
        reloads: IntCounterVec,
        state_file_errors: &IntCounter,
    ) -> Result<Self, String> {
        let policy = match &config.dir {
            Some(dir) => load_dir(dir).map_err(|e| e.to_string())?,
            None => Policy::default(),
        };
        let file = OverrideFile {
            path: config.state_file.clone(),
        };
        let (state, problem) = file.load_or_set_aside(Utc::now());
        if let Some(problem) = problem {
            state_file_errors.inc();
            tracing::error!(
                file = %file.path.display(),
                %problem,
                "the sale-mode state file is damaged: starting without a manual override, \
                 on the schedule; check the audit trail in the file set aside"
            );
        }
        Ok(Policies {
            fingerprint: Mutex::new(config.dir.as_ref().map_or(0, |d| fingerprint(d))),
            dir: config.dir.clone(),
            current: RwLock::new(Arc::new(Compiled::new(policy, limits))),
            base_limits: limits.clone(),
            file,
            state: Mutex::new(state),
            reloads,
            max_override: config.max_override.0,
        })
    }

    /// The policy in force; cheap, a clone of an `Arc`.
    pub fn active(&self) -> Arc<Compiled> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The mode at `now`.
    pub fn mode(&self, now: DateTime<Utc>) -> Effective {
        let active = self.active();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        effective(&active.policy.windows, state.manual.as_ref(), now)
    }

    /// Read the policy directory again. An invalid edit keeps the policy in force,
    /// is logged with file and line, and counted.
    ///
    /// # Errors
    ///
    /// The [`PolicyError`] of the invalid file.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        *self.fingerprint.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint(dir);
        match load_dir(dir) {
            Ok(policy) => {
                let compiled = Arc::new(Compiled::new(policy, &self.base_limits));
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = compiled;
                self.reloads.with_label_values(&["success"]).inc();
                tracing::info!(dir = %dir.display(), "policy reloaded");
                Ok(())
            }
            Err(e) => {
                self.reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    file = %e.file.display(),
                    line = e.line,
                    error = %e.message,
                    "invalid policy; the previous policy stays in force"
                );
                Err(e)
            }
        }
    }

    /// Reload when the files changed since the last look. Polling the content,
    /// rather than watching inodes, also sees Kubernetes' ConfigMap symlink swaps.
    pub fn reload_if_changed(&self) {
        let Some(dir) = &self.dir else { return };
        let now = fingerprint(dir);
        let before = *self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if now != before {
            let _ = self.reload();
        }
    }

    /// Switch sale mode by hand (`on`/`off` for `duration`) or back to the schedule
    /// (`auto`). Persisted before it takes effect, and audited.
    ///
    /// # Errors
    ///
    /// [`SwitchError`]: a missing or too long duration for on/off, or a state file
    /// that cannot be written (the switch is then not changed).
    pub fn set(
        &self,
        setting: Setting,
        duration: Option<Duration>,
        reason: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<(Effective, AuditEntry), SwitchError> {
        let switch = self.plan_switch(setting, duration, reason, by, now)?;
        self.apply(switch.state.clone())?;
        Ok((switch.after, switch.entry))
    }

    /// What a switch would make the state, without making it: the fleet writes it
    /// to Redis first, then every replica adopts it.
    ///
    /// # Errors
    ///
    /// [`SwitchError`]: a missing or too long duration for on/off.
    pub fn plan_switch(
        &self,
        setting: Setting,
        duration: Option<Duration>,
        reason: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Switch, SwitchError> {
        let windows = self.active().policy.windows.clone();
        let state = self.persisted();
        let before = effective(&windows, state.manual.as_ref(), now);
        let manual = match setting {
            Setting::Auto => None,
            Setting::On | Setting::Off => {
                let duration = duration.ok_or(SwitchError::NeedsDuration)?;
                let too_long = SwitchError::TooLong {
                    max: self.max_override,
                };
                if duration.is_zero() || duration > self.max_override {
                    return Err(too_long);
                }
                let until = chrono::Duration::from_std(duration)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or(too_long)?;
                Some(Override {
                    mode: if setting == Setting::On {
                        Mode::Sale
                    } else {
                        Mode::Normal
                    },
                    until,
                    reason: reason.to_string(),
                    by: by.to_string(),
                    at: now,
                })
            }
        };
        let after = effective(&windows, manual.as_ref(), now);
        let entry = AuditEntry {
            at: now,
            by: by.to_string(),
            reason: reason.to_string(),
            from: before.describe(),
            to: after.describe(),
        };
        let mut next = state;
        next.change(manual, entry.clone());
        Ok(Switch {
            state: next,
            after,
            entry,
        })
    }

    /// Make `next` the state: saved to the state file first, then in force.
    ///
    /// # Errors
    ///
    /// [`SwitchError::Persist`] when the file cannot be written; nothing changes.
    pub fn apply(&self, next: Persisted) -> Result<(), SwitchError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.file.save(&next).map_err(SwitchError::Persist)?;
        if let Some(entry) = next.audit.last().filter(|_| next != *state) {
            tracing::warn!(
                by = entry.by,
                reason = entry.reason,
                from = entry.from,
                to = entry.to,
                "sale mode changed"
            );
        }
        *state = next;
        Ok(())
    }

    /// Take the fleet's state (from Redis): in force at once, and copied to the
    /// state file, the replica's fallback for when Redis is unreachable. A copy that
    /// cannot be written is logged; the fleet's state is in force regardless.
    pub fn adopt(&self, next: Persisted) {
        if let Err(SwitchError::Persist(e)) = self.apply(next.clone()) {
            tracing::error!(error = %e, "cannot copy the fleet's sale-mode state to the state file");
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = next;
        }
    }

    /// The override and audit trail in force.
    pub fn persisted(&self) -> Persisted {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Mode, schedule and audit trail, for the admin API and the CLI.
    pub fn status(&self, now: DateTime<Utc>) -> serde_json::Value {
        let active = self.active();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mode = effective(&active.policy.windows, state.manual.as_ref(), now);
        serde_json::json!({
            "mode": mode,
            "description": mode.describe(),
            "override": state.manual,
            "windows": active.policy.windows.iter().map(|w| serde_json::json!({
                "name": w.name, "start": w.start, "end": w.end,
            })).collect::<Vec<_>>(),
            "files": active.policy.files,
            "audit": state.audit,
        })
    }
}

/// A hash of the policy files' names and contents.
fn fingerprint(dir: &std::path::Path) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            path.hash(&mut hasher);
            std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
        }
    }
    hasher.finish()
}
