//! The source of "now" for the stages that keep time (budgets, cache freshness),
//! injected so that their tests move time by hand instead of sleeping. No I/O.

use std::time::Instant;

/// A monotonic clock.
pub trait Clock: Send + Sync + 'static {
    /// The current instant; never goes backwards.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Time moved by hand, for tests.
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct ManualClock {
    base: Instant,
    offset: std::sync::Arc<std::sync::Mutex<std::time::Duration>>,
}

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            base: Instant::now(),
            offset: Default::default(),
        }
    }
}

#[cfg(test)]
impl ManualClock {
    /// A clock standing at the real now, until moved.
    pub fn new() -> Self {
        Self::default()
    }

    /// Move time forward by `by`, for every clone of this clock.
    pub fn advance(&self, by: std::time::Duration) {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }
}
