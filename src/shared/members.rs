//! Which replicas are live: each writes a heartbeat into Redis every second, with
//! the version of the fleet's sale-mode state it has applied, and reads everyone
//! else's. The count sizes the fallback share of each cap; the list answers
//! `GET /admin/sale-mode` ("which replicas are live, and do they all see the same
//! state").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::lock;
use super::redis::{Redis, Unavailable};
use crate::units::now_millis;

/// A replica that has not written a heartbeat for this long is gone.
pub const GONE_AFTER: Duration = Duration::from_secs(5);

/// What a replica says of itself in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The replica's name (host name and process id).
    pub replica: String,
    /// The version of the fleet's sale-mode state it has applied; 0 for none.
    pub mode_version: u64,
    /// When it wrote this, Unix milliseconds on its clock.
    pub at_ms: i64,
}

/// The fleet's membership, as this replica last saw it.
pub struct Members {
    redis: Arc<Redis>,
    prefix: String,
    replica: String,
    live: Mutex<Vec<Heartbeat>>,
}

impl Members {
    /// Membership on `redis` under `prefix`, this replica named `replica`.
    pub fn new(redis: Arc<Redis>, prefix: &str, replica: &str) -> Self {
        Members {
            redis,
            prefix: prefix.to_string(),
            replica: replica.to_string(),
            live: Mutex::new(Vec::new()),
        }
    }

    /// Write this replica's heartbeat (with the sale-mode version it applied) and
    /// read the live replicas'. Returns how many are live.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis cannot be used; the last list stays.
    pub async fn beat(&self, mode_version: u64) -> Result<usize, Unavailable> {
        let now = now_millis();
        let gone = now - i64::try_from(GONE_AFTER.as_millis()).unwrap_or(5000);
        let index = format!("{}members", self.prefix);
        let mine = Heartbeat {
            replica: self.replica.clone(),
            mode_version,
            at_ms: now,
        };
        let text = serde_json::to_string(&mine).map_err(|e| Unavailable(e.to_string()))?;
        let mut write = redis::pipe();
        write
            .cmd("ZADD")
            .arg(&index)
            .arg(now)
            .arg(&self.replica)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(gone)
            .ignore()
            .cmd("SET")
            .arg(self.member_key(&self.replica))
            .arg(text)
            .arg("PX")
            .arg(u64::try_from(GONE_AFTER.as_millis()).unwrap_or(5000))
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&index)
            .arg(gone)
            .arg("+inf");
        let (names,): (Vec<String>,) = self.redis.pipeline("heartbeat", &write).await?;
        let mut read = redis::cmd("MGET");
        for name in &names {
            read.arg(self.member_key(name));
        }
        let beats: Vec<Option<String>> = if names.is_empty() {
            Vec::new()
        } else {
            self.redis.query("heartbeat_read", &read).await?
        };
        let mut live: Vec<Heartbeat> = beats
            .into_iter()
            .flatten()
            .filter_map(|b| serde_json::from_str(&b).ok())
            .collect();
        live.sort_by(|a, b| a.replica.cmp(&b.replica));
        let count = live.len().max(1);
        *lock(&self.live) = live;
        Ok(count)
    }

    fn member_key(&self, replica: &str) -> String {
        format!("{}member:{replica}", self.prefix)
    }

    /// The replicas seen live at the last heartbeat.
    pub fn live(&self) -> Vec<Heartbeat> {
        lock(&self.live).clone()
    }
}
