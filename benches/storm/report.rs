//! What one arm measured, the side-by-side markdown table of all arms, and the
//! promguard arms' figures against their targets (the fleet's against the tuned
//! single replica's, the warmed sale window's against today's sale arm and
//! fetch-level routing's against the unsplit arm, and the tuned arm's against the
//! release before), judged from those figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::arms::Arm;
use crate::backends::{Counters, Gauges, Logged};
use crate::load::{Outcome, Record};
use crate::population::Kind;

/// The gauges sampled every [`crate::SAMPLE_EVERY`] during an arm.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_ms: u64,
    pub backends: Gauges,
    /// promguard's `promguard_upstream_in_flight_requests` per backend (a fleet's
    /// replicas added up).
    pub promguard_in_flight: Option<[f64; 2]>,
}

/// The windows curated p99 is reported over.
const WINDOW_MS: u64 = 10_000;
/// The windows the upstream rate is plotted over.
const RATE_WINDOW_MS: u64 = 2_000;
/// How often Prometheus' in-flight queries are counted from its query log.
const IN_FLIGHT_EVERY_MS: u64 = 250;

/// The targets the quick-start, identity and tuned arms are judged against.
const CURATED_ANSWERED: f64 = 0.995;
const CURATED_P99_MS: f64 = 300.0;
const PERSONAL_ANSWERED: f64 = 0.95;
/// Upstream queries/s at full load, at least this many times fewer than direct.
const UPSTREAM_FEWER: f64 = 20.0;
/// The arms the targets table is for, in its column order.
const JUDGED: [Arm; 3] = [Arm::Quickstart, Arm::Identity, Arm::Tuned];
/// The fleet's steady-state upstream queries and samples read, per backend, at most
/// this share above the tuned single replica's: the fleet must not cost the
/// backends more than one promguard does (less is no failure).
const FLEET_UPSTREAM_WITHIN: f64 = 0.10;
/// Personal panels answered in a sale window that opens on a warm cache.
const WARMED_PERSONAL_ANSWERED: f64 = 0.90;
/// Normal-mode long-term store queries/s with fetch-level routing, at least this
/// many times fewer than without.
const SPLIT_FEWER: f64 = 3.0;
/// "Unchanged or better" for the warmed window's curated p99 against the sale
/// arm's: within this share above it, the run-to-run spread of that figure.
const P99_NOISE: f64 = 0.25;

/// What reached the backends at full load, after the ramp.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    /// Query API calls (query, query_range) by Prometheus' query log.
    pub prometheus: Rate,
    /// Query and metadata calls; `None` when it did not answer /metrics then.
    pub victoria: Option<Rate>,
}

/// Requests and samples over `seconds`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub seconds: f64,
    pub queries: f64,
    pub samples: f64,
}

impl Steady {
    /// Per second: Prometheus' queries and samples read, then VictoriaMetrics'.
    fn by_backend(&self) -> [Option<f64>; 4] {
        let p = &self.prometheus;
        let v = self.victoria.as_ref();
        [
            Some(p.queries / p.seconds),
            Some(p.samples / p.seconds),
            v.map(|v| v.queries / v.seconds),
            v.map(|v| v.samples / v.seconds),
        ]
    }

    /// Per second, Prometheus and VictoriaMetrics added up.
    fn per_second(&self, f: impl Fn(&Rate) -> f64) -> Option<f64> {
        let v = self.victoria?;
        Some(f(&self.prometheus) / self.prometheus.seconds + f(&v) / v.seconds)
    }
}

/// promguard's own account of an arm, from its /metrics at the end (a fleet's
/// replicas added up).
#[derive(Debug, Default)]
pub struct PromguardStats {
    /// (reason, class) → count, from `promguard_limit_rejections_total`.
    pub rejections: BTreeMap<(String, String), f64>,
    /// rule → count, from `promguard_policy_rejections_total`.
    pub policy: BTreeMap<String, f64>,
    /// outcome → count, from `promguard_cache_lookups_total`.
    pub lookups: BTreeMap<String, f64>,
    pub points_fetched: f64,
    pub points_served: f64,
    /// `promguard_cache_bytes` at the arm's end: what the cache held, by its own
    /// account, against its `max_bytes`.
    pub cache_bytes: f64,
}

pub struct ArmResult {
    pub arm: Arm,
    pub seconds: f64,
    pub records: Vec<Record>,
    pub timeline: Vec<Sample>,
    pub before: Counters,
    pub after: Counters,
    /// Prometheus' query log for the arm: its API queries, relative to the start.
    pub prometheus_log: Vec<Logged>,
    /// The steady state at full load, after the ramp.
    pub steady: Steady,
    /// The proxy's CPU seconds and peak RSS: a fleet's replicas added up.
    pub proxy_cpu: Option<f64>,
    pub proxy_peak_rss: Option<u64>,
    /// A fleet's balancer (nginx) and redis-server CPU seconds during the arm.
    pub fleet_cpu: Option<[f64; 2]>,
    pub generator_cpu: f64,
    pub promguard: Option<PromguardStats>,
    /// Requests the load client had open per backend (through the proxy, if any).
    pub peak_open: [i64; 2],
    /// The machine's 1-minute load average before the arm: other work shares it.
    pub load_average: Option<f64>,
}

impl ArmResult {
    fn queries(&self) -> [f64; 2] {
        [
            self.after.prometheus_queries - self.before.prometheus_queries,
            self.after.victoria_queries - self.before.victoria_queries,
        ]
    }

    fn samples(&self) -> [f64; 2] {
        [
            self.prometheus_log.iter().map(|q| q.samples).sum(),
            self.after.victoria_rows_scanned - self.before.victoria_rows_scanned,
        ]
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(move |r| r.kind == kind)
    }

    /// The share of `kind`'s requests answered 2xx; `None` without requests.
    fn answered(&self, kind: Kind) -> Option<f64> {
        let (ok, total) = self.of(kind).fold((0, 0), |(ok, n), r| {
            (ok + usize::from(r.outcome.ok()), n + 1)
        });
        (total > 0).then(|| ok as f64 / total as f64)
    }

    fn with_status(&self, kind: Kind, status: u16) -> usize {
        self.of(kind)
            .filter(|r| r.outcome == Outcome::Status(status))
            .count()
    }

    /// The worst curated p99 of the 10-s windows: of all, or of those from the one the
    /// ramp starts in.
    fn worst_curated_p99(&self, from_ramp: bool) -> Option<f64> {
        let from_ms = if from_ramp {
            let ramp_ms = (self.seconds * 1000.0 * crate::population::RAMP.0) as u64;
            ramp_ms / WINDOW_MS * WINDOW_MS
        } else {
            0
        };
        self.curated_p99_by_window(WINDOW_MS)
            .iter()
            .filter(|(at, _)| *at >= from_ms)
            .map(|(_, p)| *p)
            .reduce(f64::max)
    }

    /// The most calls in flight to each backend (recent, long-term): promguard's own
    /// count, and the backend's (Prometheus' engine by its query log, VictoriaMetrics'
    /// running selects).
    fn peak_in_flight(&self) -> [(f64, f64); 2] {
        let engine = self
            .prometheus_in_flight()
            .iter()
            .map(|(_, n)| *n)
            .fold(0.0, f64::max);
        [
            (self.peak(|s| s.promguard_in_flight.map(|g| g[0])), engine),
            (
                self.peak(|s| s.promguard_in_flight.map(|g| g[1])),
                self.peak(|s| s.backends.victoria.map(|g| g.in_flight)),
            ),
        ]
    }

    fn latency(&self, kind: Kind) -> Histogram<u64> {
        let mut h = histogram();
        for r in self.of(kind) {
            h.saturating_record(r.latency_us.max(1));
        }
        h
    }

    /// p99 of curated requests sent in each `window_ms`, as (window start, ms).
    pub fn curated_p99_by_window(&self, window_ms: u64) -> Vec<(u64, f64)> {
        let mut windows: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
        for r in self.of(Kind::Curated) {
            windows
                .entry(r.at_ms / window_ms * window_ms)
                .or_insert_with(histogram)
                .saturating_record(r.latency_us.max(1));
        }
        windows
            .into_iter()
            .map(|(at, h)| (at, h.value_at_quantile(0.99) as f64 / 1000.0))
            .collect()
    }

    /// Queries per second reaching both backends per [`RATE_WINDOW_MS`]:
    /// Prometheus' API queries by when they finished (its query log), plus
    /// VictoriaMetrics' request counter over the window.
    pub fn upstream_rate(&self) -> Vec<(u64, f64)> {
        let victoria_at = |t: u64| {
            self.timeline
                .iter()
                .take_while(|s| s.at_ms <= t)
                .filter_map(|s| Some(s.backends.victoria?.queries))
                .last()
        };
        let end = self.timeline.last().map_or(0, |s| s.at_ms);
        (0..end / RATE_WINDOW_MS)
            .map(|w| {
                let (from, to) = (w * RATE_WINDOW_MS, (w + 1) * RATE_WINDOW_MS);
                let prometheus = self
                    .prometheus_log
                    .iter()
                    .filter(|q| (from as i64..to as i64).contains(&q.finished_ms))
                    .count() as f64;
                let victoria = victoria_at(to)
                    .zip(victoria_at(from))
                    .map_or(0.0, |(b, a)| b - a);
                (to, (prometheus + victoria) * 1000.0 / RATE_WINDOW_MS as f64)
            })
            .collect()
    }

    /// API queries in Prometheus' engine (running or queued), from its query log,
    /// every [`IN_FLIGHT_EVERY_MS`] of the arm: complete even while Prometheus is
    /// too busy to answer its /metrics.
    pub fn prometheus_in_flight(&self) -> Vec<(u64, f64)> {
        let end = self
            .prometheus_log
            .iter()
            .map(|q| q.finished_ms)
            .max()
            .map_or(0, |e| u64::try_from(e).unwrap_or(0));
        (0..=end / IN_FLIGHT_EVERY_MS)
            .map(|i| {
                let at = i * IN_FLIGHT_EVERY_MS;
                let n = self
                    .prometheus_log
                    .iter()
                    .filter(|q| q.in_flight_at(at as i64))
                    .count();
                (at, n as f64)
            })
            .collect()
    }

    fn peak(&self, f: impl Fn(&Sample) -> Option<f64>) -> f64 {
        self.timeline.iter().filter_map(f).fold(0.0, f64::max)
    }

    /// Samples in which a backend did not answer its /metrics in time.
    fn unanswered(&self, f: impl Fn(&Sample) -> bool) -> usize {
        self.timeline.iter().filter(|s| f(s)).count()
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Everything the header of the report states about the run.
pub struct RunInfo {
    pub engineers: usize,
    pub seed: u64,
    pub seconds: u64,
    pub timeout_s: u64,
    pub long_term: String,
    pub instances: usize,
    pub nginx_ttl: String,
    pub total_minutes: f64,
}

/// The side-by-side table, one column per arm.
pub fn markdown(results: &[ArmResult], info: &RunInfo) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "Sale-night storm, {} engineers ramping from 1× to 5× load, {} s per arm, seed {}, \
         client timeout {} s, {cores} cores, release build; backends: Prometheus (2 days at 30 s) \
         and VictoriaMetrics ({} at 1 h, the last 2 days at 30 s), {} instances per service. Arms ran one after another \
         against the same backends (VictoriaMetrics' result cache reset before each), each with a \
         freshly started proxy. Whole run: {:.1} min.\n",
        info.engineers,
        info.seconds,
        info.seed,
        info.timeout_s,
        info.long_term,
        info.instances,
        info.total_minutes,
    );
    let direct = results.iter().find(|r| r.arm == Arm::Direct);
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&ArmResult) -> String| {
        rows.push((name.to_string(), results.iter().map(f).collect()));
    };
    row("requests sent (curated / personal / Explore)", &|r| {
        let n = |k| r.of(k).count();
        format!(
            "{} / {} / {}",
            n(Kind::Curated),
            n(Kind::Personal),
            n(Kind::Explore)
        )
    });
    row(
        "**upstream queries/s** (Prometheus + VictoriaMetrics)",
        &|r| {
            let [p, v] = r.queries().map(|q| q / r.seconds);
            let ratio = direct.map_or(String::new(), |d| {
                fewer(d.queries().iter().sum(), r.queries().iter().sum())
            });
            format!("**{:.1}** ({p:.1} + {v:.1}){ratio}", p + v)
        },
    );
    row("**samples read** (Prometheus + VictoriaMetrics)", &|r| {
        let [p, v] = r.samples();
        let ratio = direct.map_or(String::new(), |d| {
            fewer(d.samples().iter().sum(), r.samples().iter().sum())
        });
        format!("**{}** ({} + {}){ratio}", si(p + v), si(p), si(v))
    });
    row("samples read per answered (2xx) request", &|r| {
        let answered = r.records.iter().filter(|x| x.outcome.ok()).count();
        let per = r.samples().iter().sum::<f64>() / answered.max(1) as f64;
        let ratio = direct.map_or(String::new(), |d| {
            let answered = d.records.iter().filter(|x| x.outcome.ok()).count();
            fewer(
                d.samples().iter().sum::<f64>() / answered.max(1) as f64,
                per,
            )
        });
        format!("{}{ratio}", si(per))
    });
    row(
        &format!(
            "**steady state at 5×** (last {:.0}% of the run): upstream queries/s",
            100.0 * (1.0 - crate::STEADY_FROM)
        ),
        &|r| steady(r, direct, |rate| rate.queries, |q| format!("{q:.1}")),
    );
    row("**steady state at 5×**: samples read/s", &|r| {
        steady(r, direct, |rate| rate.samples, si)
    });
    row("VictoriaMetrics rows read from storage", &|r| {
        si(r.after.victoria_rows_read - r.before.victoria_rows_read)
    });
    row("backend CPU s (Prometheus + VictoriaMetrics)", &|r| {
        let p = r.after.prometheus_cpu - r.before.prometheus_cpu;
        let v = r.after.victoria_cpu - r.before.victoria_cpu;
        format!("{:.1} ({p:.1} + {v:.1})", p + v)
    });
    row(
        "proxy CPU s / peak RSS",
        &|r| match (r.proxy_cpu, r.proxy_peak_rss) {
            (Some(cpu), Some(rss)) => format!("{cpu:.1} / {:.0} MiB", rss as f64 / 1048576.0),
            _ => "–".into(),
        },
    );
    row("fleet's balancer (nginx) / redis-server CPU s", &|r| {
        r.fleet_cpu.map_or("–".into(), |[nginx, redis]| {
            format!("{nginx:.1} / {redis:.1}")
        })
    });
    row(
        &format!(
            "promguard cache held at the end (of its {} MiB bound)",
            crate::arms::cache_mib()
        ),
        &|r| {
            r.promguard.as_ref().map_or("–".into(), |p| {
                format!("{:.0} MiB", p.cache_bytes / 1048576.0)
            })
        },
    );
    row("load generator CPU s", &|r| {
        format!("{:.1}", r.generator_cpu)
    });
    row("machine load average before the arm", &|r| {
        r.load_average.map_or("–".into(), |l| format!("{l:.2}"))
    });
    for kind in Kind::ALL {
        row(
            &format!("**{} p50 / p99 / p99.9** (ms)", kind.as_str()),
            &|r| {
                let h = r.latency(kind);
                if h.is_empty() {
                    return "–".into();
                }
                let q = |q| h.value_at_quantile(q) as f64 / 1000.0;
                format!("{} / **{}** / {}", ms(q(0.5)), ms(q(0.99)), ms(q(0.999)))
            },
        );
        row(&format!("{} outcomes", kind.as_str()), &|r| {
            outcomes(r, kind)
        });
        row(&format!("{} answers by X-Cache", kind.as_str()), &|r| {
            caches(r.of(kind))
        });
    }
    row(
        "personal answers from the cache past calls the sale rules held back (with a warning)",
        &|r| personal_share(r, |x| x.held),
    );
    row(
        "personal answers moved back by the busy refresh floor (with a warning)",
        &|r| personal_share(r, |x| x.busy),
    );
    row(
        "curated instant queries (stat and bar-gauge panels): sent, answers by X-Cache",
        &|r| {
            let sent = r.of(Kind::Curated).filter(|x| x.instant).count();
            let by = caches(r.of(Kind::Curated).filter(|x| x.instant));
            format!("{sent}: {by}")
        },
    );
    let worst = |r: &ArmResult, from_ramp| r.worst_curated_p99(from_ramp).map_or("–".into(), ms);
    row("curated p99, worst 10 s window (ms)", &|r| worst(r, false));
    row(
        "curated p99, worst 10 s window from the ramp on (ms)",
        &|r| worst(r, true),
    );
    row("promguard refusals (reason, class)", &|r| {
        r.promguard.as_ref().map_or("–".into(), |p| {
            let mut parts: Vec<String> = p
                .rejections
                .iter()
                .filter(|(_, n)| **n > 0.0)
                .map(|((reason, class), n)| format!("{reason} {class}: {n:.0}"))
                .collect();
            parts.extend(
                p.policy
                    .iter()
                    .filter(|(_, n)| **n > 0.0)
                    .map(|(rule, n)| format!("policy {rule}: {n:.0}")),
            );
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join("<br>")
            }
        })
    });
    row("promguard cache lookups", &|r| {
        r.promguard.as_ref().map_or("–".into(), |p| {
            let parts: Vec<String> = p
                .lookups
                .iter()
                .filter(|(_, n)| **n > 0.0)
                .map(|(outcome, n)| format!("{outcome} {n:.0}"))
                .collect();
            format!(
                "{}<br>points fetched {} of {} served",
                parts.join(", "),
                si(p.points_fetched),
                si(p.points_served)
            )
        })
    });
    row("**peak in flight, promguard → backends** (cap)", &|r| {
        let Some([recent_cap, long_term_cap]) = r.arm.caps() else {
            return "–".into();
        };
        let [(p, _), (v, _)] = r.peak_in_flight();
        format!(
            "Prometheus **{p:.0}** ({recent_cap}), VictoriaMetrics **{v:.0}** ({long_term_cap})"
        )
    });
    row(
        "peak Prometheus API queries in its engine, running + queued (query log)",
        &|r| format!("{:.0}", r.peak_in_flight()[0].1),
    );
    row(
        "peak VictoriaMetrics selects running (its limit: 4)",
        &|r| format!("{:.0}", r.peak_in_flight()[1].1),
    );
    row(
        "samples without a /metrics answer in 2 s (Prometheus / VictoriaMetrics)",
        &|r| {
            format!(
                "{} / {} of {}",
                r.unanswered(|s| s.backends.prometheus.is_none()),
                r.unanswered(|s| s.backends.victoria.is_none()),
                r.timeline.len()
            )
        },
    );
    row(
        "VictoriaMetrics selects queued / timed out in its queue",
        &|r| {
            format!(
                "{:.0} / {:.0}",
                r.after.victoria_select_queued - r.before.victoria_select_queued,
                r.after.victoria_select_timeouts - r.before.victoria_select_timeouts
            )
        },
    );
    row(
        "peak requests open from the client (recent / long-term)",
        &|r| format!("{} / {}", r.peak_open[0], r.peak_open[1]),
    );

    let _ = writeln!(
        out,
        "| | {} |\n|---|{}",
        results
            .iter()
            .map(|r| r.arm.name())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(results.len())
    );
    for (name, cells) in rows {
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    out.push_str(&targets(results, direct));
    out.push_str(&fleet_targets(results));
    out.push_str(&sale_targets(results));
    let _ = writeln!(
        out,
        "\nHow to read it:\n\
         - Latency is from sending a request until it ended: answered (any status), or \
         abandoned. Abandoned requests count at the moment they were abandoned: \
         `timeout` after {} s (Grafana's data proxy default), `superseded` when the \
         panel's next refresh fired first (Grafana cancels the running query). Fast refusals \
         (429, 503, 422 with a reason) count at their own, short, latency; the outcome rows \
         show how many there were.\n\
         - Upstream queries are the backends' own request counters for the query and \
         metadata endpoints (`prometheus_http_requests_total`, `vm_http_requests_total`). \
         Samples read: Prometheus' `totalQueryableSamples` from its query log (2.42 exports \
         no counter), plus VictoriaMetrics' `vm_rows_scanned_per_query`; both count a sample \
         once per evaluation step that reads it. The whole-run totals include every \
         panel's first load, which no cache avoids; the steady state (the last 30% of the \
         run, everyone on, the ramp's first loads over) is what each further minute of the \
         storm costs. There Prometheus is counted from its query log (query and query_range \
         calls by when they finished), because under overload it stops answering /metrics. \
         When an arm leaves requests unanswered (direct), its totals are bounded by what the \
         backends managed to do, not by what was asked; samples per answered request \
         corrects for that.\n\
         - In flight: promguard's `promguard_upstream_in_flight_requests` and \
         VictoriaMetrics' `vm_concurrent_select_current`, sampled every {} ms (a shorter \
         peak can be missed); Prometheus' API queries in its engine, running or queued, \
         from its query log (each from its finish less its `execTotalTime`), every 250 ms; \
         its recording-rule evaluations are not counted.\n\
         - nginx caches every 200 for {} with the cache lock, stale-while-updating and \
         background refresh on, its key the method, URI, form body and Accept-Encoding; the \
         direct and nginx \
         arms send each query to the backend promguard would pick (its own PromQL analysis). \
         `X-Cache` shares are of answered requests, as the proxy labelled them.\n\
         - The promguard arms: *quick start* is the README's `promguard serve --listen … \
         --recent-url … --recent-window 2d --long-term-url …` with no file (default limits, \
         default caps {quick_caps}, no identity, no priority, no policies) behind a Grafana \
         with default settings, which sends no `X-Grafana-User` and no shared secret: every \
         engineer is the same caller at the same address. *Identity only* configures \
         `identity.grafana` (the secret header) and `priority.dashboards: [orders, sla, \
         promguard]`, everything else at its default. *Tuned* spells out every limit for \
         this machine (caps {tuned_caps}) and loads `policies/` in normal mode; \
         *split_fetches off* is the same with `routing.split_fetches: false`, and \
         *split_fetches and busy_refresh off* with `cache.busy_refresh: 0s` too (the tuned \
         configuration as the release before both ran it); *sale mode* is the tuned \
         configuration switched to sale mode, *after a warm afternoon* the same after a \
         warm-up in normal mode. Every promguard arm but the last of those has the busy \
         refresh floor at its default (2 min). *Fleet of 3* is {replicas} replicas of the tuned \
         configuration in normal mode, each with `shared.redis` on one redis-server and \
         `expected_replicas: {replicas}`, so caps {tuned_caps}, budgets, cache and the \
         switch are the whole fleet's; one nginx balances round-robin over them without \
         caching. Its proxy CPU and peak RSS, cache held, refusals, cache lookups and \
         promguard's in-flight count are the three replicas added up (the cache bound is \
         each replica's); its balancer's and Redis' CPU are a row of their own. Every \
         other arm's Grafana sends \
         `X-Grafana-User` and the secret; all send `User-Agent`, `X-Grafana-Org-Id`, \
         `X-Datasource-Uid` and, on dashboard panels, `X-Dashboard-Uid` and `X-Panel-Id`. \
         Caps are (Prometheus, VictoriaMetrics).\n\
         - Curated dashboards are `dashboards/orders.json` and `dashboards/sla.json`: range \
         panels on the recording rules of `dashboards/rules/` (backfilled by \
         scripts/backends.sh), and stat and bar-gauge panels as instant queries at the \
         refresh's now in milliseconds, some on the raw series.",
        info.timeout_s,
        crate::SAMPLE_EVERY.as_millis(),
        info.nginx_ttl,
        quick_caps = caps(Arm::Quickstart),
        tuned_caps = caps(Arm::Tuned),
        replicas = crate::arms::FLEET_REPLICAS,
    );
    out
}

/// A figure and whether it meets its target; `None` when it cannot be judged.
type Judged = (String, Option<bool>);
/// How an arm's figures are judged against one target.
type Judge<'a> = &'a dyn Fn(&ArmResult) -> Judged;
/// How a figure is written.
type Show = fn(f64) -> String;

/// An arm's caps as `(recent, long-term)`.
fn caps(arm: Arm) -> String {
    arm.caps().map_or("none".into(), |[recent, long_term]| {
        format!("({recent}, {long_term})")
    })
}

/// The quick-start, identity and tuned arms against their targets, each judged from
/// the figure it shows; empty when none of them ran.
fn targets(results: &[ArmResult], direct: Option<&ArmResult>) -> String {
    let judged: Vec<&ArmResult> = JUDGED
        .iter()
        .filter_map(|arm| results.iter().find(|r| r.arm == *arm))
        .collect();
    if judged.is_empty() {
        return String::new();
    }
    let percent = |share: Option<f64>, at_least: f64| -> Judged {
        share.map_or(("no requests".into(), None), |s| {
            (format!("{:.2}%", 100.0 * s), Some(s >= at_least))
        })
    };
    let rows: [(String, Judge<'_>); 6] = [
        (
            format!("curated answered (≥ {}%)", 100.0 * CURATED_ANSWERED),
            &|r| percent(r.answered(Kind::Curated), CURATED_ANSWERED),
        ),
        ("curated 429 / 503 (0)".into(), &|r| {
            let (throttled, shed) = (
                r.with_status(Kind::Curated, 429),
                r.with_status(Kind::Curated, 503),
            );
            (format!("{throttled} / {shed}"), Some(throttled + shed == 0))
        }),
        (
            format!("curated p99, worst 10 s window from the ramp on (< {CURATED_P99_MS} ms)"),
            &|r| {
                r.worst_curated_p99(true)
                    .map_or(("no requests".into(), None), |p| {
                        (format!("{} ms", ms(p)), Some(p < CURATED_P99_MS))
                    })
            },
        ),
        (
            format!("personal answered (≥ {}%)", 100.0 * PERSONAL_ANSWERED),
            &|r| percent(r.answered(Kind::Personal), PERSONAL_ANSWERED),
        ),
        (
            format!("upstream queries/s at full load (≥ {UPSTREAM_FEWER}× fewer than direct)"),
            &|r| {
                let Some(arm) = r.steady.per_second(|rate| rate.queries) else {
                    return ("VictoriaMetrics did not answer /metrics".into(), None);
                };
                match direct.and_then(|d| d.steady.per_second(|rate| rate.queries)) {
                    Some(d) if arm > 0.0 => (
                        format!("{arm:.1} ({:.1}× fewer)", d / arm),
                        Some(d / arm >= UPSTREAM_FEWER),
                    ),
                    Some(_) => ("0 (none reached the backends)".into(), Some(true)),
                    None => (format!("{arm:.1} (no direct arm to compare)"), None),
                }
            },
        ),
        (
            "backend peak in flight, promguard's count and the backend's (≤ the arm's caps)".into(),
            &|r| {
                let caps = r.arm.caps().expect("a promguard arm has caps");
                let peaks = r.peak_in_flight();
                let figure = ["Prometheus", "VictoriaMetrics"]
                    .iter()
                    .zip(peaks.iter().zip(caps))
                    .map(|(name, ((own, backend), cap))| {
                        format!("{name} {own:.0} / {backend:.0} of {cap}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let within = peaks
                    .iter()
                    .zip(caps)
                    .all(|((own, backend), cap)| own.max(*backend) <= cap as f64);
                (figure, Some(within))
            },
        ),
    ];
    let mut out = format!(
        "\nTargets for a first deployment (the tuned arm for comparison), judged from the \
         figures:\n\n| target | {} |\n|---|{}\n",
        judged
            .iter()
            .map(|r| r.arm.name())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(judged.len())
    );
    for (name, judge) in rows {
        let cells: Vec<String> = judged
            .iter()
            .map(|r| match judge(r) {
                (figure, Some(true)) => format!("{figure}: met"),
                (figure, Some(false)) => format!("{figure}: **missed**"),
                (figure, None) => format!("{figure}: not judged"),
            })
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    out
}

/// The fleet against the tuned single replica: the same upstream work in the steady
/// state, the caps held fleet-wide, and curated latency; empty unless both ran.
fn fleet_targets(results: &[ArmResult]) -> String {
    let find = |arm| results.iter().find(|r| r.arm == arm);
    let (Some(fleet), Some(tuned)) = (find(Arm::Fleet), find(Arm::Tuned)) else {
        return String::new();
    };
    let within = 100.0 * FLEET_UPSTREAM_WITHIN;
    let mut out = format!(
        "\nThe fleet of {} against the tuned single replica, judged from the figures:\n\n\
         | target | fleet | tuned | fleet / tuned | |\n|---|---|---|---|---|\n",
        crate::arms::FLEET_REPLICAS
    );
    let mut line = |target: &str, f: &str, t: &str, ratio: &str, verdict: Option<bool>| {
        let verdict = verdict.map_or("not judged", self::verdict);
        let _ = writeln!(out, "| {target} | {f} | {t} | {ratio} | {verdict} |");
    };
    let figures: [(&str, Show); 4] = [
        ("Prometheus queries/s", |q| format!("{q:.1}")),
        ("Prometheus samples read/s", si),
        ("VictoriaMetrics queries/s", |q| format!("{q:.1}")),
        ("VictoriaMetrics samples read/s", si),
    ];
    let (fleet_rates, tuned_rates) = (fleet.steady.by_backend(), tuned.steady.by_backend());
    for (i, (label, figure)) in figures.into_iter().enumerate() {
        let show = |v: Option<f64>| v.map_or("did not answer /metrics".into(), figure);
        let (f, t) = (fleet_rates[i], tuned_rates[i]);
        let (ratio, verdict) = match (f, t) {
            (Some(f), Some(t)) if t > 0.0 => (
                format!("{:.2}", f / t),
                Some(f / t <= 1.0 + FLEET_UPSTREAM_WITHIN),
            ),
            (Some(f), Some(_)) => ("–".into(), Some(f == 0.0)),
            _ => ("–".into(), None),
        };
        line(
            &format!("steady state: {label} (at most {within:.0}% above tuned)"),
            &show(f),
            &show(t),
            &ratio,
            verdict,
        );
    }
    let [recent_cap, long_term_cap] = Arm::Fleet.caps().expect("the fleet has caps");
    let (fleet_peaks, tuned_peaks) = (fleet.peak_in_flight(), tuned.peak_in_flight());
    for (i, (backend, cap)) in [
        ("Prometheus", recent_cap),
        ("VictoriaMetrics", long_term_cap),
    ]
    .into_iter()
    .enumerate()
    {
        let show = |(own, backend): (f64, f64)| format!("{own:.0} / {backend:.0}");
        let (own, at_backend) = fleet_peaks[i];
        line(
            &format!(
                "peak in flight at {backend}, promguard's count (replicas added up) / the \
                 backend's (≤ the fleet-wide cap {cap})"
            ),
            &show(fleet_peaks[i]),
            &show(tuned_peaks[i]),
            "–",
            Some(own.max(at_backend) <= cap as f64),
        );
    }
    let p99 = |r: &ArmResult| {
        let h = r.latency(Kind::Curated);
        (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0)
    };
    let show = |r: &ArmResult| match (p99(r), r.worst_curated_p99(true)) {
        (Some(all), Some(worst)) => format!("{} / {} ms", ms(all), ms(worst)),
        _ => "no requests".into(),
    };
    let ratio = match (fleet.worst_curated_p99(true), tuned.worst_curated_p99(true)) {
        (Some(f), Some(t)) if t > 0.0 => format!("{:.2}", f / t),
        _ => "–".into(),
    };
    line(
        &format!(
            "curated p99, whole arm / worst 10 s window from the ramp on (the worst < \
             {CURATED_P99_MS} ms, as for tuned)"
        ),
        &show(fleet),
        &show(tuned),
        &ratio,
        fleet.worst_curated_p99(true).map(|p| p < CURATED_P99_MS),
    );
    out
}

/// The sale window that opens on a warm cache against today's sale arm, and
/// fetch-level routing against the unsplit arm in normal mode (and the tuned arm
/// against the release before, when that arm ran too); each part only when
/// both of its arms ran.
fn sale_targets(results: &[ArmResult]) -> String {
    let find = |arm| results.iter().find(|r| r.arm == arm);
    let mut out = String::new();
    if let (Some(warmed), Some(sale)) = (find(Arm::Warmed), find(Arm::Sale)) {
        let _ = writeln!(
            out,
            "\nA sale window opening on a warm cache (the warmed arm) against today's sale \
             arm, judged from the figures:\n\n\
             | target | warmed | sale | |\n|---|---|---|---|"
        );
        let answered = |r: &ArmResult| r.answered(Kind::Personal).unwrap_or(0.0);
        let held = |r: &ArmResult| {
            let all = r.of(Kind::Personal).count().max(1) as f64;
            r.of(Kind::Personal).filter(|x| x.held).count() as f64 / all
        };
        let _ = writeln!(
            out,
            "| personal answered ≥ {:.0}% (of them from the cache with a warning) | {:.1}% ({:.1}%) | {:.1}% ({:.1}%) | {} |",
            100.0 * WARMED_PERSONAL_ANSWERED,
            100.0 * answered(warmed),
            100.0 * held(warmed),
            100.0 * answered(sale),
            100.0 * held(sale),
            verdict(answered(warmed) >= WARMED_PERSONAL_ANSWERED)
        );
        let (wq, sq) = (warmed.queries()[1], sale.queries()[1]);
        let (ws, ss) = (warmed.samples()[1], sale.samples()[1]);
        let _ = writeln!(
            out,
            "| long-term store queries in the window, at most the sale arm's | {wq:.0} | {sq:.0} | {} |",
            verdict(wq <= sq)
        );
        let _ = writeln!(
            out,
            "| long-term store rows scanned in the window, at most the sale arm's | {} | {} | {} |",
            si(ws),
            si(ss),
            verdict(ws <= ss)
        );
        match (warmed.worst_curated_p99(true), sale.worst_curated_p99(true)) {
            (Some(w), Some(s)) => {
                let _ = writeln!(
                    out,
                    "| curated p99, worst 10 s window from the ramp on, unchanged or better \
                     (at most {:.0}% above the sale arm's) | {} ms | {} ms | {} |",
                    100.0 * P99_NOISE,
                    ms(w),
                    ms(s),
                    verdict(w <= s * (1.0 + P99_NOISE))
                );
            }
            _ => {
                let _ = writeln!(out, "| curated p99 | no requests | | not judged |");
            }
        }
    }
    let against = [
        (
            Arm::Unsplit,
            "Fetch-level routing in normal mode (tuned, `routing.split_fetches` on) against \
             the same with it off (unsplit)",
        ),
        (
            Arm::Before,
            "The tuned arm against the same configuration as the release before fetch-level \
             routing and the busy refresh floor ran it (before: `routing.split_fetches: false`, \
             `cache.busy_refresh: 0s`)",
        ),
    ];
    for (arm, heading) in against {
        if let (Some(tuned), Some(other)) = (find(Arm::Tuned), find(arm)) {
            out.push_str(&fewer_long_term_queries(tuned, other, heading));
        }
    }
    out
}

/// How a target fares in the tables.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// The tuned arm's long-term store queries against `other`'s (at least
/// [`SPLIT_FEWER`] times fewer at full load), and both backends' upstream queries,
/// as a table under `heading`.
fn fewer_long_term_queries(tuned: &ArmResult, other: &ArmResult, heading: &str) -> String {
    let name = other.arm.key();
    let mut out = format!(
        "\n{heading}:\n\n| target | tuned | {name} | {name} / tuned | |\n|---|---|---|---|---|\n"
    );
    let rate = |r: &ArmResult| r.steady.victoria.map(|v| v.queries / v.seconds);
    match (rate(tuned), rate(other)) {
        (Some(t), Some(o)) => {
            let _ = writeln!(
                out,
                "| steady state: long-term store queries/s, at least {SPLIT_FEWER:.0}× fewer \
                 | {t:.2} | {o:.2} | {:.1} | {} |",
                o / t.max(f64::MIN_POSITIVE),
                verdict(o >= SPLIT_FEWER * t)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "| steady state: long-term store queries/s | did not answer /metrics | | – | not judged |"
            );
        }
    }
    let whole = |r: &ArmResult| r.queries()[1] / r.seconds;
    let _ = writeln!(
        out,
        "| whole arm: long-term store queries/s | {:.2} | {:.2} | {:.1} | |",
        whole(tuned),
        whole(other),
        whole(other) / whole(tuned).max(f64::MIN_POSITIVE)
    );
    let steady = |r: &ArmResult| r.steady.per_second(|rate| rate.queries);
    if let (Some(t), Some(o)) = (steady(tuned), steady(other)) {
        let _ = writeln!(
            out,
            "| steady state: upstream queries/s, both backends | {t:.1} | {o:.1} | {:.1} | |",
            o / t.max(f64::MIN_POSITIVE)
        );
    }
    out
}

/// Client-side outcomes of `kind`'s requests: share answered 2xx, then the rest by
/// status or way of failing.
fn outcomes(r: &ArmResult, kind: Kind) -> String {
    let mut by: BTreeMap<Outcome, usize> = BTreeMap::new();
    let mut total = 0;
    for rec in r.of(kind) {
        *by.entry(rec.outcome).or_default() += 1;
        total += 1;
    }
    if total == 0 {
        return "–".into();
    }
    let ok: usize = by.iter().filter(|(o, _)| o.ok()).map(|(_, n)| n).sum();
    let mut parts = vec![format!("{:.1}% ok", 100.0 * ok as f64 / total as f64)];
    parts.extend(
        by.iter()
            .filter(|(o, _)| !o.ok())
            .map(|(o, n)| format!("{} {n}", o.label())),
    );
    parts.join(", ")
}

/// A steady-state rate of both backends, with its parts and the factor against the
/// direct arm.
fn steady(
    r: &ArmResult,
    direct: Option<&ArmResult>,
    f: impl Fn(&Rate) -> f64 + Copy,
    show: impl Fn(f64) -> String,
) -> String {
    let Some(total) = r.steady.per_second(f) else {
        return "VictoriaMetrics did not answer /metrics".into();
    };
    let p = f(&r.steady.prometheus) / r.steady.prometheus.seconds;
    let ratio = direct
        .and_then(|d| d.steady.per_second(f))
        .map_or(String::new(), |d| fewer(d, total));
    format!(
        "**{}** ({} + {}){ratio}",
        show(total),
        show(p),
        show(total - p)
    )
}

/// How many of an arm's personal requests `counts`, and their share.
fn personal_share(r: &ArmResult, counts: impl Fn(&Record) -> bool) -> String {
    let these = r.of(Kind::Personal).filter(|x| counts(x)).count();
    let all = r.of(Kind::Personal).count().max(1);
    format!("{these} ({:.1}%)", 100.0 * these as f64 / all as f64)
}

/// How `records` were answered, by the proxy's `X-Cache` header, as shares.
fn caches<'a>(records: impl Iterator<Item = &'a Record>) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for rec in records {
        if let Some(tag) = rec.cache {
            *by.entry(tag).or_default() += 1;
        }
    }
    let total: usize = by.values().sum();
    if total == 0 {
        return "–".into();
    }
    let mut parts: Vec<(&str, usize)> = by.into_iter().collect();
    parts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    parts
        .iter()
        .map(|(tag, n)| format!("{tag} {:.1}%", 100.0 * *n as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// " (N× fewer)" against the direct arm.
fn fewer(direct: f64, arm: f64) -> String {
    if arm >= direct || direct == 0.0 {
        return String::new();
    }
    if arm == 0.0 {
        " (none)".into()
    } else {
        format!(" (**{:.0}× fewer**)", direct / arm)
    }
}

/// A count with an SI suffix: 12.3k, 4.56M, 7.89G.
fn si(v: f64) -> String {
    match v.abs() {
        x if x >= 1e9 => format!("{:.2}G", v / 1e9),
        x if x >= 1e6 => format!("{:.2}M", v / 1e6),
        x if x >= 1e3 => format!("{:.1}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

/// Milliseconds with precision that suits their size.
fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
