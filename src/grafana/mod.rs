//! Grafana's Prometheus data source, as promguard meets it: how a dashboard's panel
//! target becomes the HTTP request Grafana sends. Warming (`promguard warm`,
//! `warm.dashboards`) sends each panel's queries as Grafana would, so that they are
//! the cache keys Grafana's requests will find; the tests and the storm bench build
//! every Grafana-shaped request here too, so none of them can disagree about one.
//!
//! The behaviour is the one `pkg/promlib` has (Grafana 11 and 12), read from Grafana's
//! source; an older revision of `pkg/tsdb/prometheus`, where the code lived before,
//! interpolated `$__interval` from the browser's interval instead of the step. A panel
//! query is made in two places:
//!
//! - The browser sizes it (`PanelQueryRunner`, and scenes' `SceneQueryRunner`, calling
//!   `rangeutil.calculateInterval` in `packages/grafana-data/src/datetime/rangeutil.ts`):
//!   `intervalMs` is the time range over `maxDataPoints` (the panel's width in pixels
//!   unless the panel sets it), rounded by `rangeutil.roundInterval`, and no finer than
//!   the panel's min interval, or else the data source's scrape interval
//!   (`jsonData.timeInterval`, `15s` when unset; `packages/grafana-prometheus/src/datasource.ts`).
//!   It replaces the dashboard's own variables (`applyTemplateVariables`), keeps
//!   `$__interval`/`$__interval_ms` for the server, and sends `utcOffsetSec`, the
//!   dashboard time zone's offset (`processTargetV2`).
//! - Grafana's server builds the request (`pkg/promlib/models/query.go`: `Parse`,
//!   `calculatePrometheusInterval`, `interpolateVariables`, `AlignTimeRange`;
//!   `pkg/promlib/intervalv2/intervalv2.go`; `gtime` in grafana-plugin-sdk-go's
//!   `backend/gtime/gtime.go`): the min interval is the target's own min step, else the
//!   browser's `intervalMs`; the step is that minimum when the range over
//!   `maxDataPoints` is below it, else that quotient rounded by `gtime.RoundInterval`,
//!   and never finer than the range over 11,000 rounded the same way. Start and end
//!   are floored to the step (in the browser's time zone), and `pkg/promlib/client/client.go`
//!   writes times as Go's shortest float of Unix seconds (`formatTime`). Instant
//!   targets are sent at the range's end, unaligned.
//!
//! Both sides round with the same table of "nice" intervals but compare differently
//! (see [`interval::Rounding`]); an interval exactly on a bound rounds up in the
//! browser and down on the server, which is why both take part in the step.
//!
//! - [`interval`]: the rounding table, intervals in Grafana's syntax, [`Resolution`].
//! - [`interpolate`](mod@interpolate): dashboard and built-in variables in an expression.
//! - [`request`]: [`Call`], one HTTP call, and how Grafana writes it.
//! - [`dashboard`]: the dashboard JSON schema and the emulator that turns a dashboard
//!   into its [`Call`]s.

pub mod dashboard;
pub mod interpolate;
pub mod interval;
pub mod request;

pub use dashboard::{Dashboard, Screen};
pub use interpolate::interpolate;
pub use interval::{DataSource, Resolution, Sizing};
pub use request::{Call, HttpCall, format_time};
