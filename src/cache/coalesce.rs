//! Coalescing: concurrent identical requests share one upstream call.
//!
//! The first caller for a key starts the work in its own task; later callers for
//! the same key wait on its result, and raise the work's priority with their own
//! (the work sees it through a watch channel, so a queued fetch moves up when a
//! curated panel joins it). A caller that goes away does not cancel the work others
//! still wait on; when the last one leaves, the work is aborted (which drops, and so
//! closes, its upstream connection). Waiting is bounded by the caller's own limit,
//! and every way it can end is an explicit [`Outcome`], modelled on pingora's cache
//! lock. Does no I/O itself.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

/// How a shared fetch's priority grows as callers join it.
pub trait Joinable: Copy + Send + Sync + 'static {
    /// Add a joining caller's priority to the fetch's.
    fn join(&mut self, other: Self);
}

/// How one caller's wait on a key ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<V> {
    /// This caller started the work and got its result.
    Led(V),
    /// This caller joined work under way and got its result.
    Joined(V),
    /// The work ended without a result: its task panicked or was aborted.
    Lost,
    /// The caller's limit passed before the work finished; the work goes on for
    /// any other callers.
    TimedOut(Duration),
}

type FlightMap<K, V, P> = Mutex<HashMap<K, Weak<Flight<K, V, P>>>>;
type Flights<K, V, P> = Arc<FlightMap<K, V, P>>;

/// In-flight work by key.
pub struct Coalescer<K: Hash + Eq, V, P> {
    flights: Flights<K, V, P>,
}

/// One piece of work and the callers holding it alive.
struct Flight<K: Hash + Eq, V, P> {
    key: K,
    result: watch::Receiver<Option<V>>,
    priority: watch::Sender<P>,
    task: AbortHandle,
    flights: Weak<FlightMap<K, V, P>>,
}

impl<K: Hash + Eq, V, P> Drop for Flight<K, V, P> {
    /// The last caller left: stop the work and forget the key, unless a newer
    /// flight already took its place.
    fn drop(&mut self) {
        self.task.abort();
        if let Some(flights) = self.flights.upgrade()
            && let Ok(mut map) = flights.lock()
            && map.get(&self.key).is_some_and(|w| w.strong_count() == 0)
        {
            map.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq, V, P> Default for Coalescer<K, V, P> {
    fn default() -> Self {
        Coalescer {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V, P> Coalescer<K, V, P>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    P: Joinable,
{
    /// Run `work` for `key` at `priority`, or join the run already under way and
    /// raise its priority by ours; wait at most `limit` for the result.
    pub async fn run<F>(
        &self,
        key: K,
        priority: P,
        limit: Duration,
        work: impl FnOnce(watch::Receiver<P>) -> F,
    ) -> Outcome<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (flight, led) = self.join_or_start(key, priority, work);
        let mut result = flight.result.clone();
        match tokio::time::timeout(limit, result.wait_for(Option::is_some)).await {
            Err(_) => Outcome::TimedOut(limit),
            Ok(Err(_)) => Outcome::Lost,
            Ok(Ok(value)) => match value.clone() {
                Some(v) if led => Outcome::Led(v),
                Some(v) => Outcome::Joined(v),
                None => Outcome::Lost,
            },
        }
    }

    fn join_or_start<F>(
        &self,
        key: K,
        priority: P,
        work: impl FnOnce(watch::Receiver<P>) -> F,
    ) -> (Arc<Flight<K, V, P>>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        // A poisoned lock only means another caller panicked mid-insert; the map
        // itself is still a valid map.
        let mut map = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        // A finished flight whose last callers have not let go yet is not joined:
        // its result was for them (a success is in the cache by now; a failure,
        // such as its leader's budget, must not reach newcomers).
        if let Some(flight) = map
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|f| f.result.borrow().is_none())
        {
            flight.priority.send_modify(|p| p.join(priority));
            return (flight, false);
        }
        let (tx, rx) = watch::channel(None);
        let (priority, watched) = watch::channel(priority);
        let fut = work(watched);
        let task = tokio::spawn(async move {
            let value = fut.await;
            let _ = tx.send(Some(value));
        });
        let flight = Arc::new(Flight {
            key: key.clone(),
            result: rx,
            priority,
            task: task.abort_handle(),
            flights: Arc::downgrade(&self.flights),
        });
        map.insert(key, Arc::downgrade(&flight));
        (flight, true)
    }

    /// Keys with work under way (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.flights
            .lock()
            .map(|m| m.values().filter(|w| w.strong_count() > 0).count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The largest priority joined, for tests.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Max(u32);

    impl Joinable for Max {
        fn join(&mut self, other: Self) {
            self.0 = self.0.max(other.0);
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    /// Work that panics, as a bug would.
    fn fails() -> u32 {
        panic!("the work failed")
    }

    #[tokio::test]
    async fn first_caller_runs_the_second_waits_then_the_key_is_free_again() {
        let c: Arc<Coalescer<&str, u32, Max>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let work = |calls: Arc<AtomicUsize>, gate: Option<tokio::sync::oneshot::Receiver<()>>| {
            move |_: watch::Receiver<Max>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                7
            }
        };
        let first = tokio::spawn({
            let c = c.clone();
            let w = work(calls.clone(), Some(gate));
            async move { c.run("k", Max(0), LONG, w).await }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let c = c.clone();
            let w = work(calls.clone(), None);
            async move { c.run("k", Max(0), LONG, w).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Outcome::Led(7));
        assert_eq!(second.await.unwrap(), Outcome::Joined(7));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 0);

        // After release the key can be run again.
        let again = c.run("k", Max(0), LONG, work(calls.clone(), None)).await;
        assert_eq!(again, Outcome::Led(7));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_work_sees_the_priority_of_callers_who_join_it() {
        let c: Arc<Coalescer<&str, u32, Max>> = Arc::default();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<u32>();
        let leader = tokio::spawn({
            let c = c.clone();
            async move {
                c.run(
                    "k",
                    Max(1),
                    LONG,
                    move |mut priority: watch::Receiver<Max>| async move {
                        let _ = priority.wait_for(|p| p.0 >= 3).await;
                        let _ = seen_tx.send(priority.borrow().0);
                        1
                    },
                )
                .await
            }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let joiner = c
            .run("k", Max(3), LONG, |_| async {
                unreachable!("joins the running work")
            })
            .await;
        assert_eq!(joiner, Outcome::Joined(1));
        assert_eq!(seen_rx.await.unwrap(), 3);
        assert_eq!(leader.await.unwrap(), Outcome::Led(1));
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_joined_by_latecomers() {
        let c: Arc<Coalescer<&str, u32, Max>> = Arc::default();
        let held = c.join_or_start("k", Max(0), |_| async { 1 });
        let mut result = held.0.result.clone();
        let _ = result.wait_for(Option::is_some).await;
        // The first flight is done but still held: a newcomer runs its own.
        let again = c.run("k", Max(0), LONG, |_| async { 2 }).await;
        assert_eq!(again, Outcome::Led(2));
        drop(held);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_and_a_lost_flight_is_reported_as_lost() {
        let c: Arc<Coalescer<&str, u32, Max>> = Arc::default();
        let slow = |_: watch::Receiver<Max>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            1
        };
        let waited = c.run("slow", Max(0), Duration::from_secs(5), slow).await;
        assert_eq!(waited, Outcome::TimedOut(Duration::from_secs(5)));

        let lost = c.run("panics", Max(0), LONG, |_| async { fails() }).await;
        assert_eq!(lost, Outcome::Lost);
        assert_eq!(c.in_flight(), 0);
    }

    /// Sets a flag when dropped before completing: the work was cancelled.
    struct Cancelled(Arc<AtomicUsize>);
    impl Drop for Cancelled {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_leaving_waiter_does_not_cancel_but_the_last_one_does() {
        let c: Arc<Coalescer<&str, u32, Max>> = Arc::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let slow = |dropped: Arc<AtomicUsize>| {
            move |_: watch::Receiver<Max>| async move {
                let _guard = Cancelled(dropped);
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::mem::forget(_guard);
                1
            }
        };
        let leaver = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("k", Max(0), LONG, w).await }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let stayer = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("k", Max(0), LONG, w).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leaver.abort();
        assert_eq!(stayer.await.unwrap(), Outcome::Joined(1));
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "work ran to completion");

        let lonely = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("other", Max(0), LONG, w).await }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        lonely.abort();
        let _ = lonely.await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the last caller leaving cancels the work"
        );
        assert_eq!(c.in_flight(), 0);
    }
}
