//! Micro benchmarks of the hot paths: request parsing, PromQL lookback analysis,
//! the policy decision, cache keys, extent merging, the limit and admission stages,
//! shedding, and a whole cache hit through the HTTP app.
//!
//! Run: `cargo bench --bench micro`. After criterion's report it prints per-call
//! p50/p99 (hdrhistogram) for the stages whose targets are stated as percentiles
//! and writes them to `benches/results/micro-percentiles.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request};
use criterion::{Criterion, criterion_group};
use hdrhistogram::Histogram;
use tower::ServiceExt;

use promguard::admission::{Class, Gate, Priority, Wanted};
use promguard::analysis::{DEFAULT_LOOKBACK_DELTA, analyse_query};
use promguard::app::app;
use promguard::cache::extent::{Span, assemble};
use promguard::cache::key::series_key;
use promguard::cache::matrix::Matrix;
use promguard::config::{Config, GateConfig, HumanDuration, LimitsConfig, RateConfig};
use promguard::limits::{Limiter, Quotas};
use promguard::metrics::Metrics;
use promguard::policy::file::load_dir;
use promguard::policy::rules::{Facts, Judge};
use promguard::request::{ApiRequest, QueryParser, RequestKind, parse};
use promguard::routing::BackendId;
use promguard::scan::ScanLimits;
use promguard::state::AppState;

const QUERY: &str = r#"sum by (region) (rate(shop_orders_total{status="created",channel=~"web|app"}[5m])) / on (region) group_left shop_orders_forecast_per_minute"#;
const NOW: i64 = 1_795_770_000_000;

fn form() -> Vec<(String, String)> {
    [
        ("query", QUERY),
        ("start", "1795766400"),
        ("end", "1795770000"),
        ("step", "15"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn request() -> ApiRequest {
    parse(
        &Method::POST,
        "/api/v1/query_range",
        form(),
        NOW,
        &QueryParser::default(),
    )
    .expect("a valid request")
}

/// A 7-day, 10-minute-step answer for 40 series, as Prometheus prints it.
fn matrix_json(series: usize, points: usize, from: i64, step: i64) -> String {
    let result: Vec<String> = (0..series)
        .map(|s| {
            let values: Vec<String> = (0..points)
                .map(|p| format!("[{},\"{}.{}\"]", from + p as i64 * step, s * 7 + p, p % 97))
                .collect();
            format!(
                r#"{{"metric":{{"region":"r{s}","status":"created"}},"values":[{}]}}"#,
                values.join(",")
            )
        })
        .collect();
    format!(
        r#"{{"status":"success","data":{{"resultType":"matrix","result":[{}]}}}}"#,
        result.join(",")
    )
}

fn stages(c: &mut Criterion) {
    c.bench_function(
        "parse a Grafana query_range form (first sight of the query)",
        |b| {
            b.iter(|| {
                let fresh = QueryParser::new(0, ScanLimits::default());
                parse(
                    &Method::POST,
                    "/api/v1/query_range",
                    black_box(form()),
                    NOW,
                    &fresh,
                )
            })
        },
    );
    let memo = QueryParser::default();
    c.bench_function(
        "parse a Grafana query_range form (query seen before)",
        |b| {
            b.iter(|| {
                parse(
                    &Method::POST,
                    "/api/v1/query_range",
                    black_box(form()),
                    NOW,
                    &memo,
                )
            })
        },
    );

    let req = request();
    let RequestKind::Range {
        query,
        start,
        end,
        step_ms,
    } = &req.kind
    else {
        unreachable!("a range request")
    };
    c.bench_function("analyse lookback of a dashboard query", |b| {
        b.iter(|| {
            analyse_query(
                black_box(query),
                *start,
                *end,
                *step_ms,
                DEFAULT_LOOKBACK_DELTA,
            )
        })
    });

    let policy = load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .expect("the shipped policies");
    c.bench_function("policy decision (sale rules, incl. analysis)", |b| {
        b.iter(|| decide(&policy, &req))
    });

    c.bench_function("cache key", |b| {
        b.iter(|| {
            series_key(
                black_box(&req),
                Some(BackendId::Recent),
                &query.canonical,
                15_000,
                *start,
            )
        })
    });

    let body = matrix_json(40, 1008, 1_795_165_200, 600);
    c.bench_function("parse a 40-series 7-day matrix", |b| {
        b.iter(|| Matrix::parse(black_box(body.as_bytes())))
    });
    let whole = Matrix::parse(body.as_bytes()).expect("valid matrix");
    let cut = 1_795_165_200_000 + 1000 * 600_000;
    let head = assemble(&[(
        Span {
            from: 1_795_165_200_000,
            to: cut - 600_000,
        },
        &whole,
    )]);
    let tail = assemble(&[(
        Span {
            from: cut,
            to: cut + 7 * 600_000,
        },
        &whole,
    )]);
    c.bench_function(
        "stitch 7 days of extents with a new tail and print JSON",
        |b| {
            b.iter(|| {
                assemble(&[
                    (
                        Span {
                            from: 1_795_165_200_000,
                            to: cut - 600_000,
                        },
                        &head,
                    ),
                    (
                        Span {
                            from: cut,
                            to: cut + 7 * 600_000,
                        },
                        &tail,
                    ),
                ])
                .to_json()
            })
        },
    );
}

fn decide(policy: &promguard::policy::file::Policy, req: &ApiRequest) -> bool {
    let RequestKind::Range {
        query,
        start,
        end,
        step_ms,
    } = &req.kind
    else {
        return false;
    };
    let shape = analyse_query(query, *start, *end, *step_ms, DEFAULT_LOOKBACK_DELTA);
    let facts = Facts {
        now: NOW,
        user: "bob",
        dashboard: Some("personal"),
        range: Some(Duration::from_millis((end - start) as u64)),
        oldest: shape.oldest,
        furthest: shape.furthest.as_ref(),
        backend: BackendId::Recent,
        query: Some(&query.text),
    };
    // A request is judged as asked, then its upstream call; on a miss both run.
    [Judge::Request, Judge::Fetch].into_iter().all(|stage| {
        matches!(
            policy.sale.rules.decide(&facts, stage),
            promguard::policy::rules::Decision::Allow { .. }
        )
    })
}

fn limits_config() -> LimitsConfig {
    LimitsConfig {
        // Out of the way: criterion runs millions of iterations.
        requests: RateConfig {
            per_second: u32::MAX,
            burst: u32::MAX,
        },
        upstream: RateConfig {
            per_second: u32::MAX,
            burst: u32::MAX,
        },
        ..LimitsConfig::default()
    }
}

fn gate(max_in_flight: usize, max_queue: usize) -> Arc<Gate> {
    Gate::new(
        "recent",
        GateConfig {
            max_in_flight,
            reserved: 0,
            max_queue,
            max_wait: HumanDuration(Duration::from_millis(1)),
            retry_after: HumanDuration(Duration::from_secs(5)),
        },
    )
}

fn limits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter = Limiter::default();
    let quotas = Quotas::new(&limits_config());
    let g = gate(64, 64);
    let user: Arc<str> = Arc::from("bob");
    c.bench_function(
        "limit + admit stages (budgets, user slot, backend slot)",
        |b| {
            b.to_async(&rt).iter(|| async {
                limiter.check_request(&quotas, &user).expect("budget");
                limiter.check_upstream(&quotas, &user).expect("budget");
                let slot = limiter.acquire(&quotas, &user).await.expect("slot");
                let permit = g.admit(fixed(Class::Dashboard)).await.expect("permit");
                drop(permit);
                drop(slot);
            })
        },
    );
    let full = gate(1, 0);
    let _held = rt
        .block_on(full.admit(fixed(Class::Dashboard)))
        .expect("the only slot");
    c.bench_function("shed when the backend is full", |b| {
        b.to_async(&rt)
            .iter(|| async { full.admit(fixed(Class::Explore)).await.expect_err("shed") })
    });
}

/// A whole cache hit through the axum app, as Grafana's refresh would get it.
fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (router, uri) = rt.block_on(async {
        let body = matrix_json(40, 360, 1_795_766_400, 10);
        let backend = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, backend).await });
        let mut config = Config::with_recent(format!("http://{addr}").parse().expect("url"));
        config.limits = limits_config();
        let state = Arc::new(AppState::new(&config, Metrics::new()).expect("state"));
        let router = app(state);
        // An old, immutable hour, the one the backend answers with: cached for the
        // extent TTL after the first request.
        let uri = "/api/v1/query_range?query=sum(rate(x%5B5m%5D))&start=1795766400&end=1795769990&step=10";
        let first = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(first.status(), 200);
        (router, uri)
    });
    c.bench_function("cache hit end to end (40 series x 360 points)", |b| {
        b.to_async(&rt).iter(|| async {
            let response = router
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
                .await
                .expect("response");
            assert_eq!(response.headers()["x-cache"], "HIT");
            response
        })
    });
}

// No plots: the medians are what the README reports, and criterion's plotting
// backend needs fonts a minimal machine may not resolve.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = stages, limits, cache_hit
}

/// Per-call percentiles for the stages whose targets are stated as p99.
fn percentiles() {
    let req = request();
    let policy = load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .expect("the shipped policies");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter = Limiter::default();
    let quotas = Quotas::new(&limits_config());
    let g = gate(64, 64);
    let full = gate(1, 0);
    let _held = rt
        .block_on(full.admit(fixed(Class::Dashboard)))
        .expect("slot");
    let user: Arc<str> = Arc::from("bob");
    let mut rows = Vec::new();
    let mut measure = |name: &str, f: &mut dyn FnMut()| {
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("bounds");
        for _ in 0..1000 {
            f();
        }
        for _ in 0..100_000 {
            let t = Instant::now();
            f();
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
        rows.push(format!(
            "| {name} | {:.2} µs | {:.2} µs | {:.2} µs |",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0
        ));
    };
    measure("policy decision incl. PromQL analysis", &mut || {
        black_box(decide(&policy, &req));
    });
    measure("limit + admit stages", &mut || {
        rt.block_on(async {
            limiter.check_request(&quotas, &user).expect("budget");
            limiter.check_upstream(&quotas, &user).expect("budget");
            let _slot = limiter.acquire(&quotas, &user).await.expect("slot");
            let _permit = g.admit(fixed(Class::Dashboard)).await.expect("permit");
        })
    });
    measure("shed decision (backend full)", &mut || {
        black_box(
            rt.block_on(full.admit(fixed(Class::Explore)))
                .expect_err("shed"),
        );
    });
    let table = format!(
        "Per-call latency, 100,000 calls each after warm-up, release build, {} cores.\n\n\
         | stage | p50 | p99 | p99.9 |\n|---|---|---|---|\n{}\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        rows.join("\n")
    );
    print!("\n{table}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/results/micro-percentiles.md");
    std::fs::write(path, table).expect("write the results");
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    percentiles();
}

/// A priority that never changes, as a request that shares its fetch with nobody has.
fn fixed(class: Class) -> Wanted {
    Wanted::Fixed(Priority::of(class))
}
