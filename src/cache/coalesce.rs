//! Coalescing: concurrent identical requests share one upstream call.
//!
//! The first caller for a key starts the work in its own task; later callers for
//! the same key wait on its result. A caller that goes away does not cancel the
//! work others still wait on; when the last one leaves, the work is aborted (which
//! drops, and so closes, its upstream connection). Does no I/O itself.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Whether a caller started the work or joined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Waiter,
}

type FlightMap<K, V> = Mutex<HashMap<K, Weak<Flight<K, V>>>>;
type Flights<K, V> = Arc<FlightMap<K, V>>;

/// In-flight work by key.
pub struct Coalescer<K: Hash + Eq, V> {
    flights: Flights<K, V>,
}

/// One piece of work and the callers holding it alive.
struct Flight<K: Hash + Eq, V> {
    key: K,
    result: watch::Receiver<Option<V>>,
    task: AbortHandle,
    flights: Weak<FlightMap<K, V>>,
}

impl<K: Hash + Eq, V> Drop for Flight<K, V> {
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

impl<K: Hash + Eq, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Run `work` for `key`, or wait for the run already under way.
    ///
    /// Returns `None` only if the work panicked or was aborted, which cannot
    /// happen while this caller still waits on it.
    pub async fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> (Option<V>, Role)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (flight, role) = self.join_or_start(key, work);
        let mut result = flight.result.clone();
        let value = result
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone());
        (value, role)
    }

    fn join_or_start<F>(&self, key: K, work: impl FnOnce() -> F) -> (Arc<Flight<K, V>>, Role)
    where
        F: Future<Output = V> + Send + 'static,
    {
        // A poisoned lock only means another caller panicked mid-insert; the map
        // itself is still a valid map.
        let mut map = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = map.get(&key).and_then(Weak::upgrade) {
            return (flight, Role::Waiter);
        }
        let (tx, rx) = watch::channel(None);
        let fut = work();
        let task = tokio::spawn(async move {
            let value = fut.await;
            let _ = tx.send(Some(value));
        });
        let flight = Arc::new(Flight {
            key: key.clone(),
            result: rx,
            task: task.abort_handle(),
            flights: Arc::downgrade(&self.flights),
        });
        map.insert(key, Arc::downgrade(&flight));
        (flight, Role::Leader)
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
    use std::time::Duration;

    #[tokio::test]
    async fn first_caller_runs_the_second_waits_then_the_key_is_free_again() {
        let c: Arc<Coalescer<&str, u32>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let work = |calls: Arc<AtomicUsize>, gate: Option<tokio::sync::oneshot::Receiver<()>>| {
            move || async move {
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
            async move { c.run("k", w).await }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let c = c.clone();
            let w = work(calls.clone(), None);
            async move { c.run("k", w).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), (Some(7), Role::Leader));
        assert_eq!(second.await.unwrap(), (Some(7), Role::Waiter));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 0);

        // After release the key can be run again.
        let again = c.run("k", work(calls.clone(), None)).await;
        assert_eq!(again, (Some(7), Role::Leader));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
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
        let c: Arc<Coalescer<&str, u32>> = Arc::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let slow = |dropped: Arc<AtomicUsize>| {
            move || async move {
                let _guard = Cancelled(dropped);
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::mem::forget(_guard);
                1
            }
        };
        let leaver = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("k", w).await }
        });
        while c.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let stayer = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("k", w).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leaver.abort();
        assert_eq!(stayer.await.unwrap(), (Some(1), Role::Waiter));
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "work ran to completion");

        let lonely = tokio::spawn({
            let c = c.clone();
            let w = slow(dropped.clone());
            async move { c.run("other", w).await }
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
