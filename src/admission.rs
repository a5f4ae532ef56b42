//! Stage 8, admit: global in-flight caps per backend, with priority and early shedding.
//!
//! Each backend has a [`Gate`]: at most `max_in_flight` upstream calls, of which
//! `reserved` only the critical class (curated dashboards, named users) may use; a
//! bounded queue served best class first; and past `max_wait`, or when the queue is
//! full and nobody of a lower class can be displaced, a refusal (503) instead of a
//! wait until the client times out. A caller that goes away leaves the queue at
//! once. Each gate also remembers when a request last found no slot it could
//! use: the pressure the busy refresh floor reads (`cache.busy_refresh`). No I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

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
    /// Every class, lowest first, for the per-class admission gauges.
    pub const ALL: [Class; 3] = [Class::Explore, Class::Dashboard, Class::Critical];

    /// The `class` label value.
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
    /// Which backend's gate shed it (`recent`, `long_term`).
    pub backend: &'static str,
    /// The class the request was shed at; its highest, if it rose while queued.
    pub class: Class,
    /// Which of the three ways to be shed happened; the `reason` label.
    pub why: ShedReason,
    /// Upstream calls running on the backend when it was shed, all classes.
    pub in_flight: usize,
    /// Requests still waiting in the backend's queue at that moment.
    pub queued: usize,
    /// Sent as `Retry-After`: `admission.<backend>.retry_after`.
    pub retry_after: Duration,
}

/// How a request came to be shed; the `reason` label of
/// `promguard_limit_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The queue was full of requests of the same or higher class.
    QueueFull,
    /// Waited `max_wait` without a slot.
    Timeout,
    /// A higher-class request took its place in a full queue.
    Displaced,
    /// The fleet's cap on the backend (shared through Redis) stayed full, taken by
    /// other replicas' calls, until `max_wait`.
    FleetFull,
}

impl ShedReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::Timeout => "queue_timeout",
            ShedReason::Displaced => "displaced",
            ShedReason::FleetFull => "fleet_full",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "found the queue full",
            ShedReason::Timeout => "waited its maximum time in the queue",
            ShedReason::Displaced => "gave its queue place to a higher-priority query",
            ShedReason::FleetFull => {
                "waited its maximum time for a slot under the fleet's cap, held by other replicas"
            }
        }
    }
}

/// How urgent a fetch is: its class, then how many requests wait on it (a fetch
/// that serves fifty panels goes before one that serves one). A shared fetch's
/// priority grows as requests join it: the best class among them, and all of
/// them counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority {
    /// Best class among the requests waiting on the fetch.
    pub class: Class,
    /// How many requests wait on the fetch; breaks ties within a class.
    pub callers: usize,
}

impl Priority {
    /// One request of `class`.
    pub fn of(class: Class) -> Self {
        Priority { class, callers: 1 }
    }
}

/// The priority a call asks to be admitted at: fixed (a call that shares its fetch
/// with nobody), or following a shared fetch's best waiter as requests join it.
#[derive(Debug, Clone)]
pub enum Wanted {
    /// It never changes.
    Fixed(Priority),
    /// A shared fetch's, which may rise while the call queues.
    Rising(watch::Receiver<Priority>),
}

impl Wanted {
    /// The priority now.
    pub fn now(&self) -> Priority {
        match self {
            Wanted::Fixed(p) => *p,
            Wanted::Rising(rx) => *rx.borrow(),
        }
    }

    /// The priority now, marking it seen, so [`Wanted::rise`] waits for the next.
    fn seen(&mut self) -> Priority {
        match self {
            Wanted::Fixed(p) => *p,
            Wanted::Rising(rx) => *rx.borrow_and_update(),
        }
    }

    /// The next priority, once it changes; `None` when it never will (fixed, or
    /// the shared fetch is gone).
    async fn rise(&mut self) -> Option<Priority> {
        match self {
            Wanted::Fixed(_) => None,
            Wanted::Rising(rx) => match rx.changed().await {
                Ok(()) => Some(*rx.borrow_and_update()),
                Err(_) => None,
            },
        }
    }
}

impl crate::cache::coalesce::Joinable for Priority {
    fn join(&mut self, other: Self) {
        self.class = self.class.max(other.class);
        self.callers = self.callers.saturating_add(other.callers);
    }
}

struct Waiter {
    id: u64,
    priority: Priority,
    /// Sends the class the slot was granted (and counted) under.
    grant: oneshot::Sender<Class>,
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
            // Best priority first, then first come.
            let Some(at) = (0..self.queue.len())
                .filter(|&i| self.can_start(self.queue[i].priority.class, config))
                .max_by_key(|&i| (self.queue[i].priority, std::cmp::Reverse(self.queue[i].id)))
            else {
                return;
            };
            let waiter = self.queue.remove(at);
            let class = waiter.priority.class;
            if waiter.grant.send(class).is_ok() {
                self.in_flight[class.index()] += 1;
            }
        }
    }
}

/// The admission gate of one backend.
pub struct Gate {
    /// The backend's name (`recent`, `long_term`), for sheds and logs.
    pub backend: &'static str,
    config: GateConfig,
    state: Mutex<State>,
    /// When a request last had to queue or was refused for want of a slot, as
    /// milliseconds after `born` plus one (zero: never).
    pressed: AtomicU64,
    born: Instant,
}

/// A slot on the backend; dropping it frees the slot for the next waiter.
pub struct Permit {
    gate: Arc<Gate>,
    class: Class,
    /// How long the request queued before it got the slot.
    pub waited: Duration,
    /// Its `max_wait` from when it asked: how long it may still wait for the fleet's
    /// cap, when replicas share one.
    pub deadline: tokio::time::Instant,
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
    granted: oneshot::Receiver<Class>,
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
        if state.queue.len() == queued
            && let Ok(class) = self.granted.try_recv()
        {
            state.in_flight[class.index()] -= 1;
            state.grant(&self.gate.config);
        }
    }
}

impl Gate {
    /// A gate for `backend` (its [`crate::routing::BackendId::as_str`]); `config`
    /// comes through [`GateConfig::for_priority`], which frees the reserved slots
    /// when nobody can be critical.
    pub fn new(backend: &'static str, config: GateConfig) -> Arc<Self> {
        Arc::new(Gate {
            backend,
            config,
            state: Mutex::new(State::default()),
            pressed: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// Whether a request found no slot it could use within the last `span`: the
    /// backend is saturated, or was a moment ago.
    pub fn pressed_within(&self, span: Duration) -> bool {
        match self.pressed.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let since = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                since.saturating_sub(at - 1) < u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
            }
        }
    }

    /// Mark the backend saturated now: a request found no slot it may use, here or
    /// under the fleet's cap.
    pub fn press(&self) {
        let at = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.pressed.store(at + 1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent under every early exit; a poisoned lock only
        // means a panic elsewhere, so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings it enforces; [`crate::state::AppState::wait_limit`] adds its
    /// `max_wait` to bound how long a request waits for a shared fetch.
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// In flight by class, and queue length, for the gauges.
    pub fn usage(&self) -> ([usize; 3], usize) {
        let state = self.lock();
        (state.in_flight, state.queue.len())
    }

    /// The refusal when the fleet's cap stayed full for a request of `class` that
    /// held a slot here.
    pub fn fleet_full(&self, class: Class) -> Shed {
        self.shed(&self.lock(), class, ShedReason::FleetFull)
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

    /// Take a slot now, or queue for one for at most `max_wait`, at the priority
    /// `priority` says; it may rise while queued (requests joining a shared
    /// fetch), which moves the place up and may open the reserved slots to it.
    ///
    /// # Errors
    ///
    /// [`Shed`] when the queue is full of equal or better requests, when a better
    /// request displaces this one, or when `max_wait` passes.
    pub async fn admit(self: &Arc<Self>, mut priority: Wanted) -> Result<Permit, Shed> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.max_wait.0;
        let first = priority.seen();
        let (granted, id) = {
            let mut state = self.lock();
            if state.can_start(first.class, &self.config) {
                state.in_flight[first.class.index()] += 1;
                return Ok(self.permit(first.class, started, deadline));
            }
            self.press();
            if state.queue.len() >= self.config.max_queue {
                // Make room by dropping the newest waiter of the lowest priority
                // below ours.
                let victim = (0..state.queue.len())
                    .filter(|&i| state.queue[i].priority < first)
                    .min_by_key(|&i| {
                        (
                            state.queue[i].priority,
                            std::cmp::Reverse(state.queue[i].id),
                        )
                    });
                match victim {
                    Some(i) => drop(state.queue.remove(i)),
                    None => return Err(self.shed(&state, first.class, ShedReason::QueueFull)),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push(Waiter {
                id,
                priority: first,
                grant: tx,
            });
            (rx, id)
        };
        let mut place = QueuePlace {
            gate: self,
            id,
            granted,
            admitted: false,
        };
        let mut watching = true;
        let why = loop {
            tokio::select! {
                granted = &mut place.granted => match granted {
                    Ok(class) => {
                        place.admitted = true;
                        return Ok(self.permit(class, started, deadline));
                    }
                    Err(_) => break ShedReason::Displaced,
                },
                risen = priority.rise(), if watching => {
                    let Some(now) = risen else {
                        watching = false;
                        continue;
                    };
                    let mut state = self.lock();
                    if let Some(w) = state.queue.iter_mut().find(|w| w.id == id) {
                        w.priority = w.priority.max(now);
                    }
                    state.grant(&self.config);
                }
                () = tokio::time::sleep_until(deadline) => break ShedReason::Timeout,
            }
        };
        let class = priority.now().class;
        drop(place);
        Err(self.shed(&self.lock(), class, why))
    }

    fn permit(
        self: &Arc<Self>,
        class: Class,
        started: Instant,
        deadline: tokio::time::Instant,
    ) -> Permit {
        Permit {
            gate: self.clone(),
            class,
            waited: started.elapsed(),
            deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    /// A priority that never changes.
    fn fixed(class: Class) -> Wanted {
        Wanted::Fixed(Priority::of(class))
    }

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
    async fn a_request_without_a_slot_marks_the_gate_pressed() {
        let g = gate(2, 1, 0, 0);
        let hour = Duration::from_secs(3600);
        let _a = g.admit(fixed(Class::Dashboard)).await.unwrap();
        let _c = g.admit(fixed(Class::Critical)).await.unwrap();
        assert!(!g.pressed_within(hour), "every request found a slot");
        assert!(g.admit(fixed(Class::Dashboard)).await.is_err());
        assert!(g.pressed_within(hour));
        assert!(!g.pressed_within(Duration::ZERO), "the mark has an age");
    }

    #[tokio::test]
    async fn the_cap_holds_and_reserved_slots_are_for_critical_only() {
        let g = gate(3, 1, 0, 0);
        let _a = g.admit(fixed(Class::Explore)).await.unwrap();
        let _b = g.admit(fixed(Class::Dashboard)).await.unwrap();
        let shed = g.admit(fixed(Class::Explore)).await.err().unwrap();
        assert_eq!(shed.why, ShedReason::QueueFull);
        assert_eq!(shed.in_flight, 2);
        let _c = g.admit(fixed(Class::Critical)).await.unwrap();
        assert!(g.admit(fixed(Class::Critical)).await.is_err());
        assert_eq!(g.usage().0, [1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_best_class_first_and_time_out() {
        let g = gate(1, 0, 4, 1000);
        let running = g.admit(fixed(Class::Explore)).await.unwrap();
        let explore = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Explore)).await.map(|_| ()) }
        });
        let critical = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Critical)).await }
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
        let _running = g.admit(fixed(Class::Dashboard)).await.unwrap();
        let explore = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Explore)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let critical = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Critical)).await.map(|_| ()) }
        });
        assert_eq!(
            explore.await.unwrap().unwrap_err().why,
            ShedReason::Displaced
        );
        let same = g.admit(fixed(Class::Critical)).await.unwrap_err();
        assert_eq!(same.why, ShedReason::QueueFull);
        critical.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_at_once() {
        let g = gate(1, 0, 1, 10_000);
        let running = g.admit(fixed(Class::Explore)).await.unwrap();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Explore)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(g.usage().1, 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(g.usage().1, 0, "its queue place is free");
        drop(running);
        assert_eq!(g.usage(), ([0, 0, 0], 0), "and no slot leaked to it");
        assert!(g.admit(fixed(Class::Explore)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_rises_in_the_queue_as_better_requests_join_it() {
        let g = gate(2, 1, 8, 10_000);
        let running = g.admit(fixed(Class::Dashboard)).await.unwrap();
        // An Explore fetch waits; the reserved slot is not for it.
        let (rise, shared) = watch::channel(Priority::of(Class::Explore));
        let explore_fetch = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Wanted::Rising(shared)).await }
        });
        let busy = tokio::spawn({
            let g = g.clone();
            async move { g.admit(fixed(Class::Dashboard)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(g.usage().1, 2);
        // A curated panel joins the Explore fetch: it is critical now, takes the
        // reserved slot at once and leaves the dashboard waiter behind.
        rise.send_modify(|p| {
            crate::cache::coalesce::Joinable::join(p, Priority::of(Class::Critical))
        });
        let permit = explore_fetch
            .await
            .unwrap()
            .expect("admitted at the joined class");
        assert_eq!(permit.class, Class::Critical);
        assert_eq!(g.usage(), ([0, 1, 1], 1));
        // The dashboard waiter may use only the unreserved slot, still taken.
        drop(permit);
        assert_eq!(g.usage().1, 1, "still waiting");
        drop(running);
        busy.await
            .unwrap()
            .expect("the dashboard gets the freed slot");
    }

    #[tokio::test(start_paused = true)]
    async fn among_equals_the_fetch_more_requests_wait_on_goes_first() {
        let g = gate(1, 0, 8, 10_000);
        let running = g.admit(fixed(Class::Dashboard)).await.unwrap();
        let lonely = tokio::spawn({
            let g = g.clone();
            async move {
                g.admit(fixed(Class::Dashboard))
                    .await
                    .map(|_| Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (_keep, popular) = watch::channel(Priority {
            class: Class::Dashboard,
            callers: 40,
        });
        let popular = tokio::spawn({
            let g = g.clone();
            async move {
                g.admit(Wanted::Rising(popular))
                    .await
                    .map(|p| (Instant::now(), p))
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(running);
        let (at, permit) = popular.await.unwrap().expect("served first");
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(permit);
        let lonely_at = lonely.await.unwrap().expect("then the other");
        assert!(at < lonely_at);
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
