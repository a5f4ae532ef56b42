//! promguard: a Prometheus query proxy that keeps metrics backends usable during
//! peak sale events.
//!
//! A request passes these stages, in this order (see [`pipeline::handle`]):
//!
//! 1. [`identity`]: who is asking (trusted Grafana user, basic auth, bearer, anonymous)
//! 2. [`request`]: parse into a typed [`request::ApiRequest`], refuse bad input locally
//! 3. [`analysis`]: which samples the PromQL touches (oldest, newest)
//! 4. [`routing`]: recent Prometheus or the long-term store, by the oldest sample
//! 5. [`cache`]: answer from cached answers and extents; fetch, coalesced, only what is missing
//! 6. [`upstream`]: one bounded, cancellable call to the chosen backend
//!
//! Around them: [`app`] (HTTP surface and own endpoints), [`error`] (the one table
//! from failures to Prometheus-style responses), [`metrics`] (self-metrics),
//! [`config`] and [`shutdown`].

pub mod analysis;
pub mod app;
pub mod cache;
pub mod config;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod request;
pub mod routing;
pub mod shutdown;
pub mod upstream;
