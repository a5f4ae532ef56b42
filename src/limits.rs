//! Stage 5, limit: per-user budgets, keyed by the identity from stage 1.
//!
//! Two token buckets per user (governor): a generous one that every request
//! spends, cache hits included, and a small one that only upstream calls spend, so
//! a cached dashboard stays viewable while a flood of distinct heavy queries does
//! not. Plus at most N upstream calls in flight per user, with a short bounded wait.
//! The clock is injected so tests control time. No I/O.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, RateConfig, Unverified};
use crate::identity::Caller;

/// Which budget a request spent. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Requests,
    Upstream,
}

impl Budget {
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
    #[error(
        "user {user} is over the {} budget of {per_second}/s (burst {burst}); retry in {}s{}",
        budget.as_str(), retry_after.as_secs().max(1), advice(*budget)
    )]
    Rate {
        user: Arc<str>,
        budget: Budget,
        per_second: u32,
        burst: u32,
        retry_after: Duration,
    },
    #[error(
        "user {user} already has {limit} queries running on the backends and none finished within {} ms; \
         wait for your open panels to load, or close some",
        waited.as_millis()
    )]
    Concurrency {
        user: Arc<str>,
        limit: usize,
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

type Keyed<C> =
    RateLimiter<Arc<str>, HashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One token bucket per user, with the quota it enforces (for messages).
struct Bucket<C: Clock> {
    limiter: Keyed<C>,
    rate: RateConfig,
}

impl<C: Clock> Bucket<C> {
    fn new(rate: RateConfig, clock: C) -> Self {
        Bucket {
            limiter: RateLimiter::hashmap_with_clock(quota(rate), clock),
            rate,
        }
    }

    fn check(&self, user: &Arc<str>, budget: Budget, clock: &C) -> Result<(), LimitError> {
        self.limiter
            .check_key(user)
            .map_err(|not_until| LimitError::Rate {
                user: user.clone(),
                budget,
                per_second: self.rate.per_second,
                burst: self.rate.burst,
                retry_after: not_until.wait_time_from(clock.now()),
            })
    }
}

fn quota(rate: RateConfig) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// Per-user budgets and in-flight caps, with per-user overrides.
pub struct UserLimits<C: Clock = DefaultClock> {
    requests: Bucket<C>,
    upstream: Bucket<C>,
    /// Users with their own quotas (on-call, alerting): their own buckets.
    overrides: HashMap<Arc<str>, (Bucket<C>, Bucket<C>, usize)>,
    max_in_flight: usize,
    in_flight_wait: Duration,
    /// One semaphore per user with calls in flight; entries whose permits are all
    /// back are dropped on the next acquire, so the map holds only active users.
    slots: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    clock: C,
    unverified: Unverified,
    count_hits: bool,
}

/// Dashboard uids in budget keys are cut to this: the header is the caller's.
const MAX_KEY_UID: usize = 128;

impl UserLimits<DefaultClock> {
    pub fn new(config: &LimitsConfig) -> Self {
        Self::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> UserLimits<C> {
    pub fn with_clock(config: &LimitsConfig, clock: C) -> Self {
        UserLimits {
            requests: Bucket::new(config.requests, clock.clone()),
            upstream: Bucket::new(config.upstream, clock.clone()),
            overrides: config
                .users
                .iter()
                .map(|(user, o)| {
                    (
                        Arc::from(user.as_str()),
                        (
                            Bucket::new(o.requests.unwrap_or(config.requests), clock.clone()),
                            Bucket::new(o.upstream.unwrap_or(config.upstream), clock.clone()),
                            o.max_in_flight.unwrap_or(config.max_in_flight),
                        ),
                    )
                })
                .collect(),
            max_in_flight: config.max_in_flight,
            in_flight_wait: config.in_flight_wait.0,
            slots: Mutex::new(HashMap::new()),
            clock,
            unverified: config.unverified,
            count_hits: config.count_hits,
        }
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

    /// What per-user budgets do for requests that stand for many people.
    pub fn unverified(&self) -> Unverified {
        self.unverified
    }

    /// Whether cache hits spend the request budget (`limits.count_hits`).
    pub fn counts_hits(&self) -> bool {
        self.count_hits
    }

    /// Spend one token of the request budget (every request, cache hits included).
    ///
    /// # Errors
    ///
    /// [`LimitError::Rate`] when the budget is empty.
    pub fn check_request(&self, user: &Arc<str>) -> Result<(), LimitError> {
        let bucket = self.overrides.get(user).map_or(&self.requests, |o| &o.0);
        bucket.check(user, Budget::Requests, &self.clock)
    }

    /// Spend one token of the upstream budget (each call to a backend).
    ///
    /// # Errors
    ///
    /// [`LimitError::Rate`] when the budget is empty.
    pub fn check_upstream(&self, user: &Arc<str>) -> Result<(), LimitError> {
        let bucket = self.overrides.get(user).map_or(&self.upstream, |o| &o.1);
        bucket.check(user, Budget::Upstream, &self.clock)
    }

    /// Take one of the user's in-flight slots, waiting at most `in_flight_wait`.
    /// Dropping the permit (including when the client goes away) frees the slot.
    ///
    /// # Errors
    ///
    /// [`LimitError::Concurrency`] when no slot frees up in time.
    pub async fn acquire(&self, user: &Arc<str>) -> Result<OwnedSemaphorePermit, LimitError> {
        let limit = self.overrides.get(user).map_or(self.max_in_flight, |o| o.2);
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.retain(|_, s| Arc::strong_count(s) > 1);
            slots
                .entry(user.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(limit)))
                .clone()
        };
        let refused = || LimitError::Concurrency {
            user: user.clone(),
            limit,
            waited: self.in_flight_wait,
        };
        match tokio::time::timeout(self.in_flight_wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(refused()),
        }
    }

    /// Forget buckets of users idle long enough to be full again.
    pub fn retain_recent(&self) {
        self.requests.limiter.retain_recent();
        self.upstream.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HumanDuration, UserOverride};
    use crate::identity::Source;
    use governor::clock::FakeRelativeClock;

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
        let clock = FakeRelativeClock::default();
        let limits = UserLimits::with_clock(&config(), clock.clone());
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        assert!(limits.check_upstream(&alice).is_ok());
        assert!(limits.check_upstream(&alice).is_ok());
        let err = limits.check_upstream(&alice).unwrap_err();
        assert_eq!(err.reason(), "rate_upstream");
        assert!(
            err.to_string().contains("alice") && err.to_string().contains("1/s"),
            "{err}"
        );
        assert_eq!(err.retry_after(), Duration::from_secs(1));
        // Another user is unaffected.
        assert!(limits.check_upstream(&bob).is_ok());
        // The request budget is separate: cache hits keep working.
        for _ in 0..3 {
            assert!(limits.check_request(&alice).is_ok());
        }
        assert_eq!(
            limits.check_request(&alice).unwrap_err().reason(),
            "rate_requests"
        );
        clock.advance(Duration::from_secs(1));
        assert!(limits.check_upstream(&alice).is_ok());
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
        let off = UserLimits::with_clock(&config(), FakeRelativeClock::default());
        let per_dashboard = UserLimits::with_clock(
            &LimitsConfig {
                unverified: Unverified::PerDashboard,
                ..config()
            },
            FakeRelativeClock::default(),
        );
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

    #[test]
    fn overrides_get_their_own_quota() {
        let limits = UserLimits::with_clock(&config(), FakeRelativeClock::default());
        let oncall: Arc<str> = Arc::from("oncall");
        for _ in 0..50 {
            assert!(limits.check_upstream(&oncall).is_ok());
        }
    }

    #[tokio::test]
    async fn in_flight_slots_wait_briefly_then_refuse_and_free_on_drop() {
        let limits = UserLimits::with_clock(&config(), FakeRelativeClock::default());
        let alice: Arc<str> = Arc::from("alice");
        let a = limits.acquire(&alice).await.unwrap();
        let _b = limits.acquire(&alice).await.unwrap();
        let err = limits.acquire(&alice).await.unwrap_err();
        assert_eq!(err.reason(), "user_concurrency");
        // Bob has his own slots.
        assert!(limits.acquire(&Arc::from("bob")).await.is_ok());
        drop(a);
        assert!(limits.acquire(&alice).await.is_ok());
    }
}
