//! Stage 5, limit: per-user budgets, keyed by the budget key of the caller.
//!
//! Two token buckets per key: a generous one that every request needing the
//! backend spends, and a small one that only upstream calls spend, so a cached
//! dashboard stays viewable while a flood of distinct heavy queries does not. Plus
//! at most N upstream calls in flight per key, with a short bounded wait. The
//! [`Quotas`] come from the mode in force and are swapped on reload; the
//! [`Limiter`]'s state outlives them. The clock is injected so tests control time.
//! No I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::clock::{Clock, MonotonicClock};

use crate::config::{LimitsConfig, RateConfig, Unverified};
use crate::identity::Caller;

/// Which budget a request spent. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// Every request that needs the backend, coalesced waiters included (cache hits
    /// too with `limits.count_hits`): generous, so cached dashboards stay viewable.
    Requests,
    /// Each upstream call: what a flood of distinct heavy queries runs out of.
    Upstream,
}

impl Budget {
    /// The budget's name in refusal messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Requests => "requests",
            Budget::Upstream => "upstream",
        }
    }
}

/// A refusal by a per-user limit (HTTP 429).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    /// The budget is spent: more requests than its rate and burst allow.
    #[error(
        "user {user} is over the {} budget of {per_second}/s (burst {burst}); retry in {}s{}",
        budget.as_str(), retry_after.as_secs().max(1), advice(*budget)
    )]
    Rate {
        /// The budget key: a person, or an address and dashboard under
        /// `limits.unverified: per_dashboard`.
        user: Arc<str>,
        /// Which budget ran out.
        budget: Budget,
        /// That budget's sustained rate, quoted in the message.
        per_second: u32,
        /// That budget's burst, quoted in the message.
        burst: u32,
        /// When the next token is due.
        retry_after: Duration,
    },
    /// The key already had `max_in_flight` upstream calls running, and none finished
    /// within `limits.in_flight_wait`.
    #[error(
        "user {user} already has {limit} queries running on the backends and none finished within {} ms; \
         wait for your open panels to load, or close some",
        waited.as_millis()
    )]
    Concurrency {
        /// The budget key, as for [`LimitError::Rate`].
        user: Arc<str>,
        /// Its `max_in_flight` in the mode in force.
        limit: usize,
        /// How long it waited for a slot.
        waited: Duration,
    },
}

fn advice(budget: Budget) -> &'static str {
    match budget {
        Budget::Requests => "",
        Budget::Upstream => {
            "; cached dashboards still load: reuse the curated dashboards or widen refresh intervals"
        }
    }
}

impl LimitError {
    /// The budget key the refusal is for.
    pub fn user(&self) -> &str {
        match self {
            LimitError::Rate { user, .. } | LimitError::Concurrency { user, .. } => user,
        }
    }

    /// For `Retry-After`: when the next token is due, at least 1 s; 1 s for a
    /// concurrency refusal, since slots free up as panels load.
    pub fn retry_after(&self) -> Duration {
        match self {
            LimitError::Rate { retry_after, .. } => (*retry_after).max(Duration::from_secs(1)),
            LimitError::Concurrency { .. } => Duration::from_secs(1),
        }
    }

    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::Rate {
                budget: Budget::Requests,
                ..
            } => "rate_requests",
            LimitError::Rate {
                budget: Budget::Upstream,
                ..
            } => "rate_upstream",
            LimitError::Concurrency { .. } => "user_concurrency",
        }
    }
}

/// The quotas of one mode, from the configuration and the mode's policy: plain
/// values, swapped whole when a policy reloads or the mode changes. The state they
/// are checked against lives in the [`Limiter`], which outlives both.
#[derive(Debug, Clone)]
pub struct Quotas {
    default: UserQuota,
    /// Users with their own quotas (on-call, alerting).
    overrides: HashMap<Arc<str>, UserQuota>,
    in_flight_wait: Duration,
    unverified: Unverified,
    count_hits: bool,
}

/// One user's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserQuota {
    requests: RateConfig,
    upstream: RateConfig,
    max_in_flight: usize,
}

/// Dashboard uids in budget keys are cut to this: the header is the caller's.
const MAX_KEY_UID: usize = 128;

impl Quotas {
    /// The quotas `config` gives: its budgets for everyone, and each of
    /// `limits.users` with its own over them.
    pub fn new(config: &LimitsConfig) -> Self {
        let default = UserQuota {
            requests: config.requests,
            upstream: config.upstream,
            max_in_flight: config.max_in_flight,
        };
        Quotas {
            default,
            overrides: config
                .users
                .iter()
                .map(|(user, o)| {
                    (
                        Arc::from(user.as_str()),
                        UserQuota {
                            requests: o.requests.unwrap_or(default.requests),
                            upstream: o.upstream.unwrap_or(default.upstream),
                            max_in_flight: o.max_in_flight.unwrap_or(default.max_in_flight),
                        },
                    )
                })
                .collect(),
            in_flight_wait: config.in_flight_wait.0,
            unverified: config.unverified,
            count_hits: config.count_hits,
        }
    }

    fn of(&self, key: &str) -> UserQuota {
        self.overrides.get(key).copied().unwrap_or(self.default)
    }

    /// Whose budgets a request spends, or `None` when per-user budgets do not apply
    /// to it: curated dashboards never spend them (they are what on-call watches;
    /// backend admission still bounds them), and requests that stand for many
    /// people (a Grafana whose users cannot be told apart) follow
    /// `limits.unverified`. Everyone else spends their own.
    pub fn budget_key(&self, caller: &Caller, curated: bool) -> Option<Arc<str>> {
        if curated {
            return None;
        }
        if caller.is_one_person() {
            return Some(caller.user.clone());
        }
        match self.unverified {
            Unverified::Off => None,
            Unverified::PerDashboard => Some(match &caller.dashboard {
                Some(uid) => {
                    let uid: String = uid.chars().take(MAX_KEY_UID).collect();
                    format!("{}/dashboard:{uid}", caller.user).into()
                }
                None => format!("{}/explore", caller.user).into(),
            }),
        }
    }

    /// `key`'s upstream budget.
    pub fn upstream_rate(&self, key: &str) -> RateConfig {
        self.of(key).upstream
    }

    /// How many upstream calls `key` may have in flight.
    pub fn max_in_flight(&self, key: &str) -> usize {
        self.of(key).max_in_flight
    }

    /// How long a call may wait for one of its user's slots.
    pub fn in_flight_wait(&self) -> Duration {
        self.in_flight_wait
    }

    /// What per-user budgets do for requests that stand for many people.
    pub fn unverified(&self) -> Unverified {
        self.unverified
    }

    /// Whether cache hits spend the request budget (`limits.count_hits`).
    pub fn counts_hits(&self) -> bool {
        self.count_hits
    }
}

/// Every user's budget state, kept across policy reloads and mode changes: a
/// reload swaps the [`Quotas`] it is checked against, never the state.
///
/// Each budget is a GCRA bucket (the algorithm behind governor): per key, the
/// theoretical arrival time of the next request. A call passes when that lies no
/// more than `(burst − 1)` emission intervals ahead of now, and moves it one
/// interval on. Unlike governor's limiter, whose state is tied to the one quota it
/// was built with, this state means the same under any quota, so consumption
/// carries over when the quota changes (a sale window opening, an edited policy).
/// Per key also: the upstream calls in flight, with their waiters.
pub struct Limiter<C: Clock = MonotonicClock> {
    buckets: Mutex<HashMap<(Budget, Arc<str>), Instant>>,
    slots: Arc<Mutex<HashMap<Arc<str>, SlotState>>>,
    clock: C,
}

#[derive(Default)]
struct SlotState {
    in_flight: usize,
    /// Woken once per freed slot; waiters hold clones.
    freed: Arc<Notify>,
}

/// One of a user's in-flight slots; dropping it (including when the client goes
/// away) frees the slot for the user's next waiter.
pub struct UserSlot {
    slots: Arc<Mutex<HashMap<Arc<str>, SlotState>>>,
    key: Arc<str>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        if let Some(state) = slots.get_mut(&self.key) {
            state.in_flight = state.in_flight.saturating_sub(1);
            state.freed.notify_one();
            if state.in_flight == 0 && Arc::strong_count(&state.freed) == 1 {
                slots.remove(&self.key);
            }
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the maps stay valid maps.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Limiter<MonotonicClock> {
    fn default() -> Self {
        Self::with_clock(MonotonicClock)
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter with no state yet, reading time from `clock` (tests pass one they
    /// move by hand).
    pub fn with_clock(clock: C) -> Self {
        Limiter {
            buckets: Mutex::new(HashMap::new()),
            slots: Arc::new(Mutex::new(HashMap::new())),
            clock,
        }
    }

    /// Spend one token of `key`'s request budget under `quotas`.
    ///
    /// # Errors
    ///
    /// [`LimitError::Rate`] when the budget is empty.
    pub fn check_request(&self, quotas: &Quotas, key: &Arc<str>) -> Result<(), LimitError> {
        self.spend(Budget::Requests, quotas.of(key).requests, key)
    }

    /// Spend one token of `key`'s upstream budget under `quotas`.
    ///
    /// # Errors
    ///
    /// [`LimitError::Rate`] when the budget is empty.
    pub fn check_upstream(&self, quotas: &Quotas, key: &Arc<str>) -> Result<(), LimitError> {
        self.spend(Budget::Upstream, quotas.of(key).upstream, key)
    }

    fn spend(&self, budget: Budget, rate: RateConfig, key: &Arc<str>) -> Result<(), LimitError> {
        let now = self.clock.now();
        let emission = Duration::from_secs(1) / rate.per_second.max(1);
        let tolerance = emission * (rate.burst.max(1) - 1);
        let mut buckets = lock(&self.buckets);
        let next = buckets
            .get(&(budget, key.clone()))
            .map_or(now, |t| (*t).max(now));
        let ahead = next - now;
        if ahead > tolerance {
            return Err(LimitError::Rate {
                user: key.clone(),
                budget,
                per_second: rate.per_second,
                burst: rate.burst,
                retry_after: ahead - tolerance,
            });
        }
        buckets.insert((budget, key.clone()), next + emission);
        Ok(())
    }

    /// Take one of `key`'s in-flight slots, waiting at most `limits.in_flight_wait`.
    ///
    /// # Errors
    ///
    /// [`LimitError::Concurrency`] when no slot frees up in time.
    pub async fn acquire(&self, quotas: &Quotas, key: &Arc<str>) -> Result<UserSlot, LimitError> {
        let limit = quotas.of(key).max_in_flight;
        let deadline = tokio::time::Instant::now() + quotas.in_flight_wait;
        loop {
            let freed = {
                let mut slots = lock(&self.slots);
                let state = slots.entry(key.clone()).or_default();
                if state.in_flight < limit {
                    state.in_flight += 1;
                    return Ok(UserSlot {
                        slots: self.slots.clone(),
                        key: key.clone(),
                    });
                }
                state.freed.clone()
            };
            // notify_one keeps a permit when nobody waits yet, so a slot freed
            // between the check above and this wait is not missed.
            if tokio::time::timeout_at(deadline, freed.notified())
                .await
                .is_err()
            {
                return Err(LimitError::Concurrency {
                    user: key.clone(),
                    limit,
                    waited: quotas.in_flight_wait,
                });
            }
        }
    }

    /// Forget keys whose buckets are full again under any quota and who have no
    /// calls in flight, so the maps hold only active users.
    pub fn forget_idle(&self) {
        let now = self.clock.now();
        lock(&self.buckets).retain(|_, next| *next > now);
        lock(&self.slots).retain(|_, s| s.in_flight > 0 || Arc::strong_count(&s.freed) > 1);
    }

    /// Keys with state, for tests and the janitor's metrics.
    pub fn tracked(&self) -> usize {
        lock(&self.buckets).len() + lock(&self.slots).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::{HumanDuration, UserOverride};
    use crate::identity::Source;

    fn config() -> LimitsConfig {
        LimitsConfig {
            requests: RateConfig {
                per_second: 10,
                burst: 3,
            },
            upstream: RateConfig {
                per_second: 1,
                burst: 2,
            },
            max_in_flight: 2,
            in_flight_wait: HumanDuration(Duration::from_millis(50)),
            users: [(
                "oncall".to_string(),
                UserOverride {
                    requests: None,
                    upstream: Some(RateConfig {
                        per_second: 100,
                        burst: 100,
                    }),
                    max_in_flight: Some(8),
                },
            )]
            .into(),
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn budgets_are_per_user_and_refill_with_time() {
        let clock = ManualClock::new();
        let limiter = Limiter::with_clock(clock.clone());
        let quotas = Quotas::new(&config());
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        assert!(limiter.check_upstream(&quotas, &alice).is_ok());
        assert!(limiter.check_upstream(&quotas, &alice).is_ok());
        let err = limiter.check_upstream(&quotas, &alice).unwrap_err();
        assert_eq!(err.reason(), "rate_upstream");
        assert!(
            err.to_string().contains("alice") && err.to_string().contains("1/s"),
            "{err}"
        );
        assert_eq!(err.retry_after(), Duration::from_secs(1));
        // Another user is unaffected.
        assert!(limiter.check_upstream(&quotas, &bob).is_ok());
        // The request budget is separate.
        for _ in 0..3 {
            assert!(limiter.check_request(&quotas, &alice).is_ok());
        }
        assert_eq!(
            limiter.check_request(&quotas, &alice).unwrap_err().reason(),
            "rate_requests"
        );
        clock.advance(Duration::from_secs(1));
        assert!(limiter.check_upstream(&quotas, &alice).is_ok());
        assert!(
            limiter.check_upstream(&quotas, &alice).is_err(),
            "one token a second"
        );
    }

    #[test]
    fn a_user_at_their_limit_stays_limited_when_the_quotas_change() {
        let clock = ManualClock::new();
        let limiter = Limiter::with_clock(clock.clone());
        let normal = Quotas::new(&config());
        let alice: Arc<str> = Arc::from("alice");
        while limiter.check_upstream(&normal, &alice).is_ok() {}
        // A reload with the same quotas, and a sale window with smaller ones: the
        // spent budget is still spent.
        let reloaded = Quotas::new(&config());
        assert!(limiter.check_upstream(&reloaded, &alice).is_err());
        let sale = Quotas::new(&LimitsConfig {
            upstream: RateConfig {
                per_second: 1,
                burst: 1,
            },
            ..config()
        });
        assert!(limiter.check_upstream(&sale, &alice).is_err());
        // A larger quota lets more through: the state is time owed, not tokens.
        let generous = Quotas::new(&LimitsConfig {
            upstream: RateConfig {
                per_second: 1,
                burst: 10,
            },
            ..config()
        });
        assert!(limiter.check_upstream(&generous, &alice).is_ok());
        // Once idle long enough, a key is forgotten.
        assert!(limiter.tracked() > 0);
        clock.advance(Duration::from_secs(60));
        limiter.forget_idle();
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn overrides_get_their_own_quota() {
        let limiter = Limiter::with_clock(ManualClock::new());
        let quotas = Quotas::new(&config());
        let oncall: Arc<str> = Arc::from("oncall");
        for _ in 0..50 {
            assert!(limiter.check_upstream(&quotas, &oncall).is_ok());
        }
    }

    #[test]
    fn budgets_belong_to_people_and_never_to_a_whole_grafana() {
        let caller = |user: &str, source, from_grafana, dashboard: Option<&str>| Caller {
            user: Arc::from(user),
            source,
            client: std::net::IpAddr::from([10, 0, 0, 7]),
            org: None,
            dashboard: dashboard.map(str::to_string),
            panel: None,
            from_grafana,
        };
        let off = Quotas::new(&config());
        let per_dashboard = Quotas::new(&LimitsConfig {
            unverified: Unverified::PerDashboard,
            ..config()
        });
        let bob = caller("bob", Source::GrafanaUser, true, Some("mine"));
        assert_eq!(off.budget_key(&bob, false).as_deref(), Some("bob"));
        assert_eq!(
            off.budget_key(&bob, true),
            None,
            "curated dashboards spend nothing"
        );
        let script = caller("anonymous@10.0.0.7", Source::Anonymous, false, None);
        assert_eq!(
            off.budget_key(&script, false).as_deref(),
            Some("anonymous@10.0.0.7"),
            "a plain client at one address is one client"
        );
        let grafana = caller("anonymous@10.0.0.7", Source::Anonymous, true, Some("mine"));
        assert_eq!(off.budget_key(&grafana, false), None);
        assert_eq!(
            per_dashboard.budget_key(&grafana, false).as_deref(),
            Some("anonymous@10.0.0.7/dashboard:mine")
        );
        let explore = caller("grafana", Source::Grafana, true, None);
        assert_eq!(off.budget_key(&explore, false), None);
        assert_eq!(
            per_dashboard.budget_key(&explore, false).as_deref(),
            Some("grafana/explore")
        );
        let long = caller("grafana", Source::Grafana, true, Some(&"u".repeat(10_000)));
        let key = per_dashboard.budget_key(&long, false).unwrap();
        assert!(
            key.len() < 200,
            "a caller's header cannot make keys grow without bound"
        );
        assert!(!off.counts_hits());
    }

    #[tokio::test]
    async fn in_flight_slots_wait_briefly_then_refuse_and_free_on_drop() {
        let limiter = Limiter::with_clock(ManualClock::new());
        let quotas = Quotas::new(&config());
        let alice: Arc<str> = Arc::from("alice");
        let a = limiter.acquire(&quotas, &alice).await.unwrap();
        let _b = limiter.acquire(&quotas, &alice).await.unwrap();
        let err = limiter.acquire(&quotas, &alice).await.err().unwrap();
        assert_eq!(err.reason(), "user_concurrency");
        // Bob has his own slots.
        assert!(limiter.acquire(&quotas, &Arc::from("bob")).await.is_ok());
        drop(a);
        assert!(limiter.acquire(&quotas, &alice).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_a_waiter() {
        let limiter = Arc::new(Limiter::with_clock(ManualClock::new()));
        let quotas = Arc::new(Quotas::new(&LimitsConfig {
            in_flight_wait: HumanDuration(Duration::from_secs(10)),
            ..config()
        }));
        let alice: Arc<str> = Arc::from("alice");
        let a = limiter.acquire(&quotas, &alice).await.unwrap();
        let _b = limiter.acquire(&quotas, &alice).await.unwrap();
        let waiter = tokio::spawn({
            let (limiter, quotas, alice) = (limiter.clone(), quotas.clone(), alice.clone());
            async move { limiter.acquire(&quotas, &alice).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(a);
        assert!(waiter.await.unwrap().is_ok());
    }
}
