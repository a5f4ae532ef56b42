//! Stage 8, admit: global in-flight caps per backend, with priority and early shedding.
//!
//! Each backend has a [`Gate`]: at most `max_in_flight` upstream calls, of which
//! `reserved` only the critical class (curated dashboards, named users) may use; a
//! bounded queue served best class first; and past `max_wait`, or when the queue is
//! full and nobody of a lower class can be displaced, a refusal (503) instead of a
//! wait until the client times out. A caller that goes away leaves the queue at
//! once. No I/O.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::{GateConfig, PriorityConfig};
use crate::identity::{Caller, Source};

/// Priority classes, lowest first. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Explore and anything without a dashboard: shed first.
    Explore,
    /// Dashboards not on the curated list.
    Dashboard,
    /// Curated dashboards and named users: reserved capacity, served first.
    Critical,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Explore, Class::Dashboard, Class::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Explore => "explore",
            Class::Dashboard => "dashboard",
            Class::Critical => "critical",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The class of a caller. Dashboard headers are believed for the critical class
/// only from the trusted Grafana, or when no Grafana trust is configured at all
/// (`trust_headers`), since anyone can send `X-Dashboard-Uid: orders`.
pub fn classify(caller: &Caller, priority: &PriorityConfig, trust_headers: bool) -> Class {
    if priority.users.iter().any(|u| **u == *caller.user)
        || curated(caller, priority, trust_headers)
    {
        return Class::Critical;
    }
    match &caller.dashboard {
        Some(_) => Class::Dashboard,
        None => Class::Explore,
    }
}

/// The request is from a curated dashboard (`priority.dashboards`), by a header
/// that can be believed: from the trusted Grafana, or from anyone when no Grafana
/// trust is configured (`trust_headers`).
pub fn curated(caller: &Caller, priority: &PriorityConfig, trust_headers: bool) -> bool {
    let via_grafana = matches!(caller.source, Source::GrafanaUser | Source::Grafana);
    caller
        .dashboard
        .as_ref()
        .is_some_and(|uid| (via_grafana || trust_headers) && priority.dashboards.contains(uid))
}

/// Why a request was shed (HTTP 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "promguard is shedding load to keep backend {backend} responsive: {in_flight} queries running, \
     {queued} waiting; this {} query {}. Retry in {}s; curated dashboards keep priority",
    class.as_str(), why.describe(), retry_after.as_secs()
)]
pub struct Shed {
    pub backend: &'static str,
    pub class: Class,
    pub why: ShedReason,
    pub in_flight: usize,
    pub queued: usize,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The queue was full of requests of the same or higher class.
    QueueFull,
    /// Waited `max_wait` without a slot.
    Timeout,
    /// A higher-class request took its place in a full queue.
    Displaced,
}

impl ShedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::Timeout => "queue_timeout",
            ShedReason::Displaced => "displaced",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "found the queue full",
            ShedReason::Timeout => "waited its maximum time in the queue",
            ShedReason::Displaced => "gave its queue place to a higher-priority query",
        }
    }
}

struct Waiter {
    id: u64,
    class: Class,
    grant: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    in_flight: [usize; 3],
    queue: Vec<Waiter>,
    next_id: u64,
}

impl State {
    fn total(&self) -> usize {
        self.in_flight.iter().sum()
    }

    fn can_start(&self, class: Class, config: &GateConfig) -> bool {
        let total = self.total();
        match class {
            Class::Critical => total < config.max_in_flight,
            _ => total < config.max_in_flight.saturating_sub(config.reserved),
        }
    }

    /// Hand freed slots to the best waiters that may use them.
    fn grant(&mut self, config: &GateConfig) {
        loop {
            // Best class first, then first come.
            let Some(at) = (0..self.queue.len())
                .filter(|&i| self.can_start(self.queue[i].class, config))
                .max_by_key(|&i| (self.queue[i].class, std::cmp::Reverse(self.queue[i].id)))
            else {
                return;
            };
            let waiter = self.queue.remove(at);
            if waiter.grant.send(()).is_ok() {
                self.in_flight[waiter.class.index()] += 1;
            }
        }
    }
}

/// The admission gate of one backend.
pub struct Gate {
    pub backend: &'static str,
    config: GateConfig,
    state: Mutex<State>,
}

/// A slot on the backend; dropping it frees the slot for the next waiter.
pub struct Permit {
    gate: Arc<Gate>,
    class: Class,
    /// How long the request queued before it got the slot.
    pub waited: Duration,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("backend", &self.gate.backend)
            .field("class", &self.class)
            .field("waited", &self.waited)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.in_flight[self.class.index()] -= 1;
        state.grant(&self.gate.config);
    }
}

/// A place in the queue. Dropped without being admitted (timed out, displaced,
/// or its client left), it leaves the queue, and gives back a slot that was
/// granted after the waiter stopped waiting, so no slot can leak.
struct QueuePlace<'a> {
    gate: &'a Gate,
    id: u64,
    class: Class,
    granted: oneshot::Receiver<()>,
    admitted: bool,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut state = self.gate.lock();
        let queued = state.queue.len();
        state.queue.retain(|w| w.id != self.id);
        if state.queue.len() == queued && self.granted.try_recv().is_ok() {
            state.in_flight[self.class.index()] -= 1;
            state.grant(&self.gate.config);
        }
    }
}

impl Gate {
    pub fn new(backend: &'static str, config: GateConfig) -> Arc<Self> {
        Arc::new(Gate {
            backend,
            config,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent under every early exit; a poisoned lock only
        // means a panic elsewhere, so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// In flight by class, and queue length, for the gauges.
    pub fn usage(&self) -> ([usize; 3], usize) {
        let state = self.lock();
        (state.in_flight, state.queue.len())
    }

    fn shed(&self, state: &State, class: Class, why: ShedReason) -> Shed {
        Shed {
            backend: self.backend,
            class,
            why,
            in_flight: state.total(),
            queued: state.queue.len(),
            retry_after: self.config.retry_after.0,
        }
    }

    /// Take a slot now, or queue for one for at most `max_wait`.
    ///
    /// # Errors
    ///
    /// [`Shed`] when the queue is full of equal or better requests, when a better
    /// request displaces this one, or when `max_wait` passes.
    pub async fn admit(self: &Arc<Self>, class: Class) -> Result<Permit, Shed> {
        let started = Instant::now();
        let (granted, id) = {
            let mut state = self.lock();
            if state.can_start(class, &self.config) {
                state.in_flight[class.index()] += 1;
                return Ok(self.permit(class, started));
            }
            if state.queue.len() >= self.config.max_queue {
                // Make room by dropping the newest waiter of the lowest class below ours.
                let victim = (0..state.queue.len())
                    .filter(|&i| state.queue[i].class < class)
                    .min_by_key(|&i| (state.queue[i].class, std::cmp::Reverse(state.queue[i].id)));
                match victim {
                    Some(i) => drop(state.queue.remove(i)),
                    None => return Err(self.shed(&state, class, ShedReason::QueueFull)),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push(Waiter {
                id,
                class,
                grant: tx,
            });
            (rx, id)
        };
        let mut place = QueuePlace {
            gate: self,
            id,
            class,
            granted,
            admitted: false,
        };
        let why = match tokio::time::timeout(self.config.max_wait.0, &mut place.granted).await {
            Ok(Ok(())) => {
                place.admitted = true;
                return Ok(self.permit(class, started));
            }
            Ok(Err(_)) => ShedReason::Displaced,
            Err(_) => ShedReason::Timeout,
        };
        drop(place);
        Err(self.shed(&self.lock(), class, why))
    }

    fn permit(self: &Arc<Self>, class: Class, started: Instant) -> Permit {
        Permit {
            gate: self.clone(),
            class,
            waited: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn gate(max_in_flight: usize, reserved: usize, max_queue: usize, wait_ms: u64) -> Arc<Gate> {
        Gate::new(
            "recent",
            GateConfig {
                max_in_flight,
                reserved,
                max_queue,
                max_wait: HumanDuration(Duration::from_millis(wait_ms)),
                retry_after: HumanDuration(Duration::from_secs(5)),
            },
        )
    }

    #[tokio::test]
    async fn the_cap_holds_and_reserved_slots_are_for_critical_only() {
        let g = gate(3, 1, 0, 0);
        let _a = g.admit(Class::Explore).await.unwrap();
        let _b = g.admit(Class::Dashboard).await.unwrap();
        let shed = g.admit(Class::Explore).await.err().unwrap();
        assert_eq!(shed.why, ShedReason::QueueFull);
        assert_eq!(shed.in_flight, 2);
        let _c = g.admit(Class::Critical).await.unwrap();
        assert!(g.admit(Class::Critical).await.is_err());
        assert_eq!(g.usage().0, [1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_best_class_first_and_time_out() {
        let g = gate(1, 0, 4, 1000);
        let running = g.admit(Class::Explore).await.unwrap();
        let explore = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Class::Explore).await.map(|_| ()) }
        });
        let critical = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Class::Critical).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(g.usage().1, 2);
        drop(running);
        let critical = critical.await.unwrap().expect("critical goes first");
        let shed = explore.await.unwrap().unwrap_err();
        assert_eq!(shed.why, ShedReason::Timeout);
        drop(critical);
        assert_eq!(g.usage(), ([0, 0, 0], 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_displaces_lower_classes_only() {
        let g = gate(1, 0, 1, 1000);
        let _running = g.admit(Class::Dashboard).await.unwrap();
        let explore = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Class::Explore).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let critical = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Class::Critical).await.map(|_| ()) }
        });
        assert_eq!(
            explore.await.unwrap().unwrap_err().why,
            ShedReason::Displaced
        );
        let same = g.admit(Class::Critical).await.unwrap_err();
        assert_eq!(same.why, ShedReason::QueueFull);
        critical.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_at_once() {
        let g = gate(1, 0, 1, 10_000);
        let running = g.admit(Class::Explore).await.unwrap();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Class::Explore).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(g.usage().1, 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(g.usage().1, 0, "its queue place is free");
        drop(running);
        assert_eq!(g.usage(), ([0, 0, 0], 0), "and no slot leaked to it");
        assert!(g.admit(Class::Explore).await.is_ok());
    }

    #[test]
    fn classes() {
        let priority = PriorityConfig {
            dashboards: vec!["orders".into()],
            users: vec!["oncall".into()],
        };
        let caller = |user: &str, source, dashboard: Option<&str>| Caller {
            user: Arc::from(user),
            source,
            client: std::net::IpAddr::from([127, 0, 0, 1]),
            org: None,
            dashboard: dashboard.map(str::to_string),
            panel: None,
            from_grafana: true,
        };
        let c = |user, source, dash| classify(&caller(user, source, dash), &priority, false);
        assert_eq!(
            c("bob", Source::GrafanaUser, Some("orders")),
            Class::Critical
        );
        assert_eq!(
            c("bob", Source::Anonymous, Some("orders")),
            Class::Dashboard
        );
        assert_eq!(
            c("bob", Source::GrafanaUser, Some("mine")),
            Class::Dashboard
        );
        assert_eq!(c("bob", Source::GrafanaUser, None), Class::Explore);
        assert_eq!(c("oncall", Source::BasicAuth, None), Class::Critical);
        assert_eq!(
            classify(
                &caller("x", Source::Anonymous, Some("orders")),
                &priority,
                true
            ),
            Class::Critical
        );
    }
}
