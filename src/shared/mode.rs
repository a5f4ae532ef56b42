//! The fleet's sale-mode switch: the SRE's override and the audit trail in Redis,
//! so a switch made through any replica is in force on every one within a second,
//! survives restarts of them all, and is audited once for the fleet.
//!
//! Three keys: a version (incremented by every switch), the override (JSON, absent
//! when the schedule rules) and the audit trail (a list of JSON entries, the last
//! hundred). A switch writes all three in one transaction. Every replica polls the
//! version twice a second and, when it changed, reads the state and adopts it
//! (also into its own state file, its copy for when Redis is unreachable). A Redis
//! that holds no state (new, or flushed) is seeded with the replica's own.

use std::sync::Arc;

use super::redis::{Redis, Unavailable};
use crate::policy::state::{AuditEntry, Override, Persisted};

/// Audit entries the fleet keeps, as the state file does.
const AUDIT_KEPT: isize = 100;

const SEED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] ~= '' then redis.call('SET', KEYS[2], ARGV[1]) end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('SET', KEYS[1], 1)
return 1";

/// The fleet's copy of the switch.
pub struct SharedMode {
    redis: Arc<Redis>,
    version: String,
    manual: String,
    audit: String,
    seed: redis::Script,
}

impl SharedMode {
    /// The switch's keys on `redis` under `prefix`.
    pub fn new(redis: Arc<Redis>, prefix: &str) -> Self {
        SharedMode {
            redis,
            version: format!("{prefix}mode:version"),
            manual: format!("{prefix}mode:override"),
            audit: format!("{prefix}mode:audit"),
            seed: redis::Script::new(SEED),
        }
    }

    /// The fleet's state version; `None` when Redis holds none.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used.
    pub async fn version(&self) -> Result<Option<u64>, Unavailable> {
        self.redis
            .query("mode_version", redis::cmd("GET").arg(&self.version))
            .await
    }

    /// The fleet's state and its version, `None` when Redis holds none or holds
    /// something that does not parse (then the replica keeps its own).
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used.
    pub async fn read(&self) -> Result<Option<(u64, Persisted)>, Unavailable> {
        let mut read = redis::pipe();
        read.cmd("GET")
            .arg(&self.version)
            .cmd("GET")
            .arg(&self.manual)
            .cmd("LRANGE")
            .arg(&self.audit)
            .arg(0)
            .arg(-1);
        let (version, manual, audit): (Option<u64>, Option<String>, Vec<String>) =
            self.redis.pipeline("mode_read", &read).await?;
        let Some(version) = version else {
            return Ok(None);
        };
        let manual: Option<Override> = match manual {
            Some(text) => match serde_json::from_str(&text) {
                Ok(m) => Some(m),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        let audit: Option<Vec<AuditEntry>> =
            audit.iter().map(|e| serde_json::from_str(e).ok()).collect();
        Ok(audit.map(|audit| (version, Persisted { manual, audit })))
    }

    /// Make `manual` the fleet's override and append `entry` to its audit trail;
    /// returns the new version.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used: the switch then reached no other
    /// replica.
    pub async fn switch(
        &self,
        manual: Option<&Override>,
        entry: &AuditEntry,
    ) -> Result<u64, Unavailable> {
        let entry = serde_json::to_string(entry).map_err(|e| Unavailable(e.to_string()))?;
        let mut write = redis::pipe();
        write.atomic();
        match manual {
            Some(m) => {
                let text = serde_json::to_string(m).map_err(|e| Unavailable(e.to_string()))?;
                write.cmd("SET").arg(&self.manual).arg(text).ignore();
            }
            None => {
                write.cmd("DEL").arg(&self.manual).ignore();
            }
        }
        write
            .cmd("RPUSH")
            .arg(&self.audit)
            .arg(entry)
            .ignore()
            .cmd("LTRIM")
            .arg(&self.audit)
            .arg(-AUDIT_KEPT)
            .arg(-1)
            .ignore()
            .cmd("INCR")
            .arg(&self.version);
        let (version,): (u64,) = self.redis.pipeline("mode_switch", &write).await?;
        Ok(version)
    }

    /// Give a Redis that holds no state this replica's; a Redis that holds one is
    /// left alone.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used.
    pub async fn seed(&self, state: &Persisted) -> Result<(), Unavailable> {
        let manual = match &state.manual {
            Some(m) => serde_json::to_string(m).map_err(|e| Unavailable(e.to_string()))?,
            None => String::new(),
        };
        let mut seed = self.seed.key(&self.version);
        seed.key(&self.manual).key(&self.audit).arg(manual);
        for entry in &state.audit {
            seed.arg(serde_json::to_string(entry).map_err(|e| Unavailable(e.to_string()))?);
        }
        self.redis.script::<i64>("mode_seed", &seed).await.map(drop)
    }
}
