//! promguard: a Prometheus query proxy that keeps metrics backends usable during
//! peak sale events.
//!
//! A request passes these stages, in this order (see [`pipeline::handle`]):
//!
//! 1. [`identity`]: who is asking (trusted Grafana user, basic auth, bearer, anonymous)
//! 2. [`limits`]: the caller's request budget in the mode in force (every request
//!    that needs a backend; hits too with `limits.count_hits`)
//! 3. [`request`]: parse into a typed [`request::ApiRequest`], refuse bad input locally
//! 4. [`analysis`]: which samples the PromQL touches (oldest, newest)
//! 5. [`routing`]: recent Prometheus or the long-term store, by the oldest sample
//! 6. [`policy`]: the rules of the mode in force (sale or normal) allow or refuse it;
//!    [`refresh`] then moves live queries of callers who are not exempt onto the
//!    mode's `min_refresh` clock
//! 7. [`cache`]: answer from cached answers and extents (the replica's own, then the
//!    fleet's); fetch, coalesced, only what is missing
//! 8. per upstream call: [`limits`] (upstream budget, in-flight slot), [`admission`]
//!    (backend slot by priority class, or shed), [`upstream`] (one bounded,
//!    cancellable call)
//!
//! In a fleet, [`shared`] makes the cache, the backend caps, the per-user upstream
//! limits and the sale-mode switch the fleet's, on Redis.
//!
//! Before a sale window, [`warm`] fills the cache with what engineers will open,
//! Grafana's requests for them built by [`grafana`].
//!
//! Around them: [`server`] (the accept loop: connection bound and timeouts),
//! [`app`] (HTTP surface and own endpoints), [`error`] (the one table from failures
//! to Prometheus-style responses), [`metrics`] (self-metrics), [`config`] and
//! [`shutdown`].

#![warn(missing_docs)]

pub mod admission;
pub mod analysis;
pub mod app;
pub mod cache;
pub mod clock;
pub mod config;
pub mod error;
pub mod grafana;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod refresh;
pub mod request;
pub mod routing;
pub mod scan;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod state;
pub mod units;
pub mod upstream;
pub mod warm;
