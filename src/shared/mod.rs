//! The fleet: what replicas share through Redis when `shared.redis.url` is set.
//!
//! - [`l2`]: the fleet's cache behind each replica's own, and the lock that makes
//!   one replica fetch what several miss at once;
//! - [`fleet`]: backend caps and per-user upstream budgets that hold for the whole
//!   fleet;
//! - [`mode`]: one sale-mode switch and audit trail;
//! - [`members`]: which replicas are live;
//! - [`redis`]: the connection, with a timeout on every call and a breaker;
//! - [`envelope`]: the format of cached values.
//!
//! Without Redis configured none of this exists and promguard runs as one
//! replica. With Redis configured but failing, each replica runs on its own (see
//! [`fleet`] for the caps) and rejoins when Redis answers; no request fails, or
//! waits past its normal time, because of Redis.

pub mod envelope;
pub mod fleet;
pub mod l2;
pub mod members;
pub mod mode;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use serde_json::json;

use crate::config::Config;
use crate::policy::{Policies, Switch};
use fleet::Fleet;
use l2::L2;
use members::Members;
use mode::SharedMode;
use redis::{Redis, Unavailable};

/// How often a replica writes its heartbeat, probes Redis and extends its leases.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a replica looks for a new sale-mode state.
pub const MODE_POLL: Duration = Duration::from_millis(500);

/// Everything shared with the fleet.
pub struct Shared {
    /// The connection.
    pub redis: Arc<Redis>,
    /// The fleet's cache.
    pub l2: Arc<L2>,
    /// The fleet's caps and budgets.
    pub fleet: Fleet,
    members: Members,
    mode: SharedMode,
    /// This replica's name in the fleet.
    pub replica: String,
    /// The version of the fleet's sale-mode state in force here; 0 for none.
    applied: AtomicU64,
    /// A switch made here while Redis could not be reached: in force on this
    /// replica only until a look at Redis makes it the fleet's, or finds that the
    /// fleet switched again later.
    held: Mutex<Option<Switch>>,
}

/// This replica's name: the host name (a pod's name in Kubernetes) and the
/// process id.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "promguard".into());
    format!("{host}-{}", std::process::id())
}

impl Shared {
    /// The fleet's state for `config`, or `None` when no Redis is configured.
    ///
    /// # Errors
    ///
    /// An unusable Redis URL, or metrics that cannot be registered.
    pub fn new(config: &Config, registry: &Registry) -> Result<Option<Arc<Self>>, String> {
        let Some(settings) = &config.shared.redis else {
            return Ok(None);
        };
        let redis = Arc::new(Redis::new(&settings.url.0, settings.timeout.0, registry)?);
        let replica = replica_name();
        let prefix = &settings.key_prefix;
        let max_value = usize::try_from(settings.max_value_bytes.0).unwrap_or(usize::MAX);
        // Nothing larger than the largest answer a backend may give is ever stored.
        let max_payload = std::iter::once(&config.backends.recent)
            .chain(config.backends.long_term.as_ref())
            .map(|b| usize::try_from(b.max_response.0).unwrap_or(usize::MAX))
            .max()
            .unwrap_or(usize::MAX);
        let l2 = Arc::new(L2::new(
            redis.clone(),
            prefix,
            &replica,
            max_value,
            max_payload,
            registry,
        )?);
        let fleet = Fleet::new(
            redis.clone(),
            prefix,
            &replica,
            [
                config.admission.recent.clone(),
                config.admission.long_term.clone(),
            ],
            config.shared.expected_replicas,
        );
        Ok(Some(Arc::new(Shared {
            members: Members::new(redis.clone(), prefix, &replica),
            mode: SharedMode::new(redis.clone(), prefix),
            redis,
            l2,
            fleet,
            replica,
            applied: AtomicU64::new(0),
            held: Mutex::new(None),
        })))
    }

    /// Probe Redis (connecting if need be), write the heartbeat, learn the live
    /// replicas and extend this replica's leases. Run every second.
    pub async fn heartbeat(&self) {
        if self.redis.probe().await.is_err() {
            return;
        }
        if let Ok(live) = self.members.beat(self.reported_version()).await {
            self.fleet.set_members(live);
        }
        self.fleet.extend_leases().await;
    }

    /// Adopt the fleet's sale-mode state if it changed since the last look; seed a
    /// Redis that holds none with this replica's. Run twice a second.
    pub async fn sync_mode(&self, policies: &Policies) {
        let held = lock(&self.held).clone();
        if let Some(switch) = held {
            self.push_held(policies, &switch).await;
            return;
        }
        match self.mode.version().await {
            Ok(Some(version)) if version != self.applied.load(Ordering::Relaxed) => {
                self.adopt(policies).await;
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => {
                if self.mode.seed(&policies.persisted()).await.is_ok() {
                    self.adopt(policies).await;
                }
            }
        }
    }

    /// Make a switch held through an outage the fleet's, as it would have been
    /// with Redis up, unless the fleet switched again later (the later decision
    /// stands) or the switch reached Redis after all (its reply was what timed
    /// out). A Redis that came back empty is seeded with this replica's state,
    /// the held switch and its audit trail included.
    async fn push_held(&self, policies: &Policies, switch: &Switch) {
        let Ok(fleet) = self.mode.read().await else {
            return;
        };
        let audit = fleet.as_ref().map(|(_, state)| &state.audit[..]);
        let landed = audit.is_some_and(|a| a.contains(&switch.entry));
        let overtaken = audit
            .and_then(<[_]>::last)
            .is_some_and(|last| last.at > switch.entry.at);
        let done = if fleet.is_none() {
            self.mode.seed(&policies.persisted()).await.is_ok()
        } else if landed || overtaken {
            true
        } else {
            self.mode
                .switch(switch.state.manual.as_ref(), &switch.entry)
                .await
                .is_ok()
        };
        if !done {
            return;
        }
        if overtaken && !landed {
            tracing::warn!(
                by = switch.entry.by,
                to = switch.entry.to,
                "a sale-mode switch made on this replica while redis was unreachable was \
                 overtaken by a later switch of the fleet; this replica follows the fleet"
            );
        } else {
            tracing::warn!(
                by = switch.entry.by,
                to = switch.entry.to,
                "the sale-mode switch made on this replica while redis was unreachable is \
                 now the fleet's"
            );
        }
        *lock(&self.held) = None;
        self.adopt(policies).await;
    }

    /// Keep `switch`, in force on this replica only because Redis could not be
    /// reached, for the next look at Redis.
    pub fn hold(&self, switch: Switch) {
        *lock(&self.held) = Some(switch);
    }

    /// The state version this replica reports in its heartbeat: none (0) while it
    /// holds a switch the others do not have, so no status counts it as theirs.
    fn reported_version(&self) -> u64 {
        if lock(&self.held).is_some() {
            0
        } else {
            self.applied.load(Ordering::Relaxed)
        }
    }

    async fn adopt(&self, policies: &Policies) {
        if let Ok(Some((version, state))) = self.mode.read().await {
            policies.adopt(state);
            self.applied.store(version, Ordering::Relaxed);
        }
    }

    /// Make `switch` the fleet's: written to Redis, then adopted here (the other
    /// replicas adopt it at their next look).
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used; nothing was switched anywhere.
    pub async fn switch(&self, policies: &Policies, switch: &Switch) -> Result<(), Unavailable> {
        self.mode
            .switch(switch.state.manual.as_ref(), &switch.entry)
            .await?;
        self.adopt(policies).await;
        Ok(())
    }

    /// Redis, and the replicas with whether each has the state in force here, for
    /// `GET /admin/sale-mode`. Read afresh from Redis (the list of the last
    /// heartbeat when it cannot be read); a replica reports a new state at its
    /// next heartbeat, within a second of adopting it.
    pub async fn status(&self) -> serde_json::Value {
        let applied = self.reported_version();
        let held = lock(&self.held).is_some();
        if let Ok(live) = self.members.beat(applied).await {
            self.fleet.set_members(live);
        }
        let replicas: Vec<serde_json::Value> = self
            .members
            .live()
            .into_iter()
            .map(|beat| {
                json!({
                    "replica": beat.replica,
                    "mode_version": beat.mode_version,
                    "same_state": beat.replica == self.replica
                        || (!held && beat.mode_version == applied),
                    "this_replica": beat.replica == self.replica,
                })
            })
            .collect();
        json!({
            "redis": if self.redis.is_up() { "up" } else { "unreachable" },
            "target": self.redis.target(),
            "replica": self.replica,
            "mode_version": applied,
            "held_switch": held,
            "replicas": replicas,
        })
    }
}

/// A poisoned lock only means a panic elsewhere; the value is still usable.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
