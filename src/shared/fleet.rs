//! Limits that hold for the whole fleet: each backend's in-flight cap (with its
//! reserved slots) and each user's upstream budget and in-flight calls.
//!
//! A cap is a set of leases in Redis, one per upstream call in flight: a sorted set
//! whose scores are the leases' expiry on Redis' own clock. Taking a lease (a Lua
//! script, so it is atomic) drops expired ones, counts the rest, and adds one only
//! below the cap (below the cap less the reserved slots, unless the caller is of the
//! critical class). Each replica extends the leases it holds every second, so a
//! replica that dies frees its slots within [`LEASE_TTL`] (the heartbeat,
//! [`super::HEARTBEAT`], extends them well before). A user's upstream budget
//! is the same GCRA as the replica's own ([`crate::limits`]), its state a theoretical
//! arrival time in Redis.
//!
//! When Redis cannot be reached (the heartbeat's probe fails), each replica falls
//! back to its share of each cap: the cap divided by the replicas it last saw live
//! (or `shared.expected_replicas` before it saw any), at least one slot, and to its
//! own per-user limits. A lease call that fails while Redis is reachable (slow under
//! load) is retried like a full cap: a share taken beside the leases the others
//! still hold would put the backend over the cap.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use super::lock;
use super::redis::Redis;
use crate::admission::Class;
use crate::config::{GateConfig, RateConfig};
use crate::limits::{Budget, LimitError};
use crate::routing::BackendId;

/// How long a lease lives unless its replica extends it.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long a caller waiting for a fleet slot sleeps between tries, at first and at
/// most.
const RETRY_FIRST: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_millis(50);

const TAKE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0";

const EXTEND: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 0";

/// GCRA on Redis' clock, in microseconds: -1 when a token was spent, else how
/// long until the next one is due.
const SPEND: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tolerance then return math.ceil(tat - now - tolerance) end
redis.call('SET', KEYS[1], string.format('%.0f', tat + emission), 'PX', math.ceil((tat - now + emission) / 1000) + 1000)
return -1";

/// A backend's fleet cap was full until the caller's deadline (HTTP 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetFull;

/// The fleet's limits.
pub struct Fleet {
    redis: Arc<Redis>,
    prefix: String,
    replica: String,
    next: AtomicU64,
    /// Leases this replica holds, by set, to extend them.
    held: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    /// Replicas seen live at the last heartbeat; 0 before the first.
    members: AtomicUsize,
    expected_replicas: usize,
    caps: [GateConfig; 2],
    /// Slots in use under the fallback share, by backend.
    local: [Arc<AtomicUsize>; 2],
    take: Script,
    extend: Script,
    spend: Script,
}

/// A slot held under the fleet's cap; dropping it gives it back.
pub enum FleetSlot {
    /// A lease in Redis.
    Lease(Lease),
    /// One of this replica's fallback share, while Redis is failing.
    Local(LocalSlot),
}

/// A lease in one of the fleet's sets.
pub struct Lease {
    redis: Arc<Redis>,
    held: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    set: String,
    member: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(members) = lock(&self.held).get_mut(&self.set) {
            members.remove(&self.member);
        }
        let (redis, set, member) = (
            self.redis.clone(),
            std::mem::take(&mut self.set),
            std::mem::take(&mut self.member),
        );
        // Outside a runtime (a shutdown) the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = redis
                    .query::<i64>("lease_release", redis::cmd("ZREM").arg(&set).arg(&member))
                    .await;
            });
        }
    }
}

/// A slot of the fallback share.
pub struct LocalSlot(Arc<AtomicUsize>);

impl Drop for LocalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn index(backend: BackendId) -> usize {
    match backend {
        BackendId::Recent => 0,
        BackendId::LongTerm => 1,
    }
}

impl Fleet {
    /// The fleet's limits on `redis` under `prefix`, for the caps `recent` and
    /// `long_term` (each backend's admission settings), falling back to a share
    /// computed with `expected_replicas` until the first heartbeat.
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        replica: &str,
        caps: [GateConfig; 2],
        expected_replicas: usize,
    ) -> Self {
        Fleet {
            redis,
            prefix: prefix.to_string(),
            replica: replica.to_string(),
            next: AtomicU64::new(0),
            held: Arc::default(),
            members: AtomicUsize::new(0),
            expected_replicas: expected_replicas.max(1),
            caps,
            local: [Arc::default(), Arc::default()],
            take: Script::new(TAKE),
            extend: Script::new(EXTEND),
            spend: Script::new(SPEND),
        }
    }

    /// Record how many replicas the heartbeat saw live.
    pub fn set_members(&self, live: usize) {
        self.members.store(live, Ordering::Relaxed);
    }

    /// The fallback share of a cap, and of its reserved slots.
    fn share(&self, cap: &GateConfig) -> (usize, usize) {
        let replicas = match self.members.load(Ordering::Relaxed) {
            0 => self.expected_replicas,
            n => n,
        };
        let share = (cap.max_in_flight / replicas).max(1);
        (share, cap.reserved * share / cap.max_in_flight.max(1))
    }

    async fn try_lease(&self, set: &str, limit: usize) -> Result<Option<Lease>, ()> {
        let member = format!(
            "{}:{}",
            self.replica,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut take = self.take.key(set);
        take.arg(limit)
            .arg(u64::try_from(LEASE_TTL.as_millis()).unwrap_or(5000))
            .arg(&member);
        match self.redis.script::<i64>("lease_take", &take).await {
            Ok(1) => {
                lock(&self.held)
                    .entry(set.to_string())
                    .or_default()
                    .insert(member.clone());
                Ok(Some(Lease {
                    redis: self.redis.clone(),
                    held: self.held.clone(),
                    set: set.to_string(),
                    member,
                }))
            }
            Ok(_) => Ok(None),
            Err(_) => Err(()),
        }
    }

    /// A slot under `backend`'s fleet cap for a request of `class`, waiting until
    /// `deadline`; the critical class may use the reserved slots. `on_wait` runs
    /// once, when the first try finds the cap full.
    ///
    /// # Errors
    ///
    /// [`FleetFull`] when none freed up in time.
    pub async fn admit(
        &self,
        backend: BackendId,
        class: Class,
        deadline: tokio::time::Instant,
        on_wait: impl FnOnce(),
    ) -> Result<FleetSlot, FleetFull> {
        let mut on_wait = Some(on_wait);
        let cap = &self.caps[index(backend)];
        let set = format!("{}slots:{}", self.prefix, backend.as_str());
        let limit = |max: usize, reserved: usize| match class {
            Class::Critical => max,
            _ => max.saturating_sub(reserved).max(1),
        };
        let mut pause = RETRY_FIRST;
        loop {
            match self
                .try_lease(&set, limit(cap.max_in_flight, cap.reserved))
                .await
            {
                Ok(Some(lease)) => return Ok(FleetSlot::Lease(lease)),
                Ok(None) => {}
                Err(()) if self.redis.reachable() => {}
                Err(()) => {
                    let (share, reserved) = self.share(cap);
                    let used = &self.local[index(backend)];
                    let limit = limit(share, reserved);
                    if used
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n < limit).then_some(n + 1)
                        })
                        .is_ok()
                    {
                        return Ok(FleetSlot::Local(LocalSlot(used.clone())));
                    }
                }
            }
            if let Some(waits) = on_wait.take() {
                waits();
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(FleetFull);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// Spend one token of `user`'s upstream budget across the fleet. Without Redis
    /// only the replica's own budget applies.
    ///
    /// # Errors
    ///
    /// [`LimitError::Rate`] when the fleet-wide budget is spent.
    pub async fn spend_upstream(
        &self,
        user: &Arc<str>,
        rate: RateConfig,
    ) -> Result<(), LimitError> {
        let emission = 1_000_000 / u64::from(rate.per_second.max(1));
        let tolerance = emission * u64::from(rate.burst.max(1) - 1);
        let key = format!("{}budget:upstream:{user}", self.prefix);
        let mut spend = self.spend.key(&key);
        spend.arg(emission).arg(tolerance);
        match self.redis.script::<i64>("budget_spend", &spend).await {
            Ok(due) if due >= 0 => Err(LimitError::Rate {
                user: user.clone(),
                budget: Budget::Upstream,
                per_second: rate.per_second,
                burst: rate.burst,
                retry_after: Duration::from_micros(u64::try_from(due).unwrap_or(0)),
            }),
            _ => Ok(()),
        }
    }

    /// One of `user`'s `limit` upstream calls in flight across the fleet, waiting at
    /// most `wait`. `None` when Redis cannot be used: the replica's own count
    /// applies alone.
    ///
    /// # Errors
    ///
    /// [`LimitError::Concurrency`] when none freed up in time.
    pub async fn user_slot(
        &self,
        user: &Arc<str>,
        limit: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LimitError> {
        let set = format!("{}inflight:{user}", self.prefix);
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = RETRY_FIRST;
        loop {
            match self.try_lease(&set, limit).await {
                Ok(Some(lease)) => return Ok(Some(lease)),
                Ok(None) => {}
                Err(()) => return Ok(None),
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(LimitError::Concurrency {
                    user: user.clone(),
                    limit,
                    waited: wait,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// Extend every lease this replica holds; run at every heartbeat.
    pub async fn extend_leases(&self) {
        let held: Vec<(String, Vec<String>)> = lock(&self.held)
            .iter_mut()
            .filter_map(|(set, members)| {
                (!members.is_empty()).then(|| (set.clone(), members.iter().cloned().collect()))
            })
            .collect();
        lock(&self.held).retain(|_, members| !members.is_empty());
        for (set, members) in held {
            let mut extend = self.extend.key(&set);
            extend.arg(u64::try_from(LEASE_TTL.as_millis()).unwrap_or(5000));
            for member in &members {
                extend.arg(member);
            }
            let _ = self.redis.script::<i64>("lease_extend", &extend).await;
        }
    }
}
