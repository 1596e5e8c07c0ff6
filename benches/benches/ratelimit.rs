//! The rate limiter on an admitted request, next to `governor` used directly, in the same
//! run: governor's own check (its default clock, and the tokio clock this crate reads so that
//! paused-time tests drive the buckets), mesh's `RateLimiter::check` (global, and keyed with
//! 10,000 live keys), and the whole `RateLimitLayer` around a bare service next to the bare
//! service and to tower's `RateLimit` (which it is not: tower's holds one window per service
//! value and makes callers wait, where mesh's answers 429 and shares its buckets between
//! clones). Then the concurrency limits: mesh's `CircuitBreakerLayer` (Istio's connection
//! pool `maxRequests`, refusing with 503 `UO` when full) next to tower's `ConcurrencyLimit`
//! (which queues instead), both far from their limit.
//!
//! Run with `cargo bench -p mesh-benches --bench ratelimit`.

use std::convert::Infallible;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderName, Request, Response};
use http_body_util::Full;
use mesh_resilience::ratelimit::{RateLimitKey, RateLimitLayer, RateLimiter, TokenBucket, TokioClock};
use tower::{Layer, ServiceExt};

/// Never runs out within a run: a huge burst.
fn bucket() -> TokenBucket {
    TokenBucket::new(u32::MAX, u32::MAX, Duration::from_secs(1)).expect("valid")
}

fn quota() -> governor::Quota {
    governor::Quota::per_second(NonZeroU32::MAX)
}

fn ok(_req: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ok_or_error(_req: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, BoxError>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

fn admitted(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let _guard = rt.enter();
    let mut g = c.benchmark_group("rate limit: one admitted request");

    let direct = governor::RateLimiter::direct(quota());
    g.bench_function("governor direct, default clock", |b| b.iter(|| black_box(direct.check().is_ok())));
    let tokio_clock = governor::RateLimiter::direct_with_clock(quota(), TokioClock);
    g.bench_function("governor direct, tokio clock", |b| b.iter(|| black_box(tokio_clock.check().is_ok())));

    let head = Request::get("/").header("x-user-id", "user-42").body(()).expect("valid").into_parts().0;
    let total = RateLimiter::total(bucket());
    g.bench_function("mesh RateLimiter::check, total bucket", |b| b.iter(|| black_box(total.check(&head))));

    let keys = 10_000;
    let keyed_governor = governor::RateLimiter::dashmap_with_clock(quota(), TokioClock);
    let keyed = RateLimiter::keyed(RateLimitKey::Header(HeaderName::from_static("x-user-id")), bucket());
    for i in 0..keys {
        let mut h = head.clone();
        h.headers.insert("x-user-id", format!("user-{i}").parse().expect("valid"));
        let _ = keyed.check(&h);
        let _ = keyed_governor.check_key(&format!("user-{i}"));
    }
    let key = "user-42".to_owned();
    g.bench_function("governor keyed (dashmap, 10,000 keys), tokio clock", |b| {
        b.iter(|| black_box(keyed_governor.check_key(&key).is_ok()))
    });
    g.bench_function("mesh RateLimiter::check, keyed by header (10,000 keys)", |b| {
        b.iter(|| black_box(keyed.check(&head)))
    });

    let bare = tower::service_fn(ok);
    g.bench_function("bare service", |b| {
        b.iter(|| rt.block_on(black_box(bare).oneshot(Request::new(()))).map(|r| black_box(r.status())))
    });
    let layered = RateLimitLayer::new(RateLimiter::total(bucket())).layer(tower::service_fn(ok));
    g.bench_function("RateLimitLayer (total bucket) around the bare service", |b| {
        b.iter(|| rt.block_on(black_box(layered.clone()).oneshot(Request::new(()))).map(|r| black_box(r.status())))
    });
    // tower's RateLimit is not `Clone`: one value, driven through `ready` + `call`; mesh's
    // layer the same way, for the pair.
    let mut mesh_one = RateLimitLayer::new(RateLimiter::total(bucket())).layer(tower::service_fn(ok));
    g.bench_function("mesh RateLimitLayer, one value (ready + call)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let svc = mesh_one.ready().await.expect("ready");
                tower::Service::call(svc, Request::new(())).await.map(|r| black_box(r.status()))
            })
        })
    });
    let mut tower_limited =
        tower::limit::RateLimitLayer::new(1_000_000_000, Duration::from_secs(1)).layer(tower::service_fn(ok));
    g.bench_function("tower RateLimit around the bare service", |b| {
        b.iter(|| {
            rt.block_on(async {
                let svc = tower_limited.ready().await.expect("ready");
                tower::Service::call(svc, Request::new(())).await.map(|r| black_box(r.status()))
            })
        })
    });
    g.finish();

    // The breaker refuses with an error its service's error type is made from.
    let mut g = c.benchmark_group("concurrency limit: one request");
    let bare = tower::service_fn(ok_or_error);
    g.bench_function("bare service", |b| {
        b.iter(|| rt.block_on(black_box(bare).oneshot(Request::new(()))).map(|r| black_box(r.status())))
    });
    let breaker = mesh_resilience::pool::CircuitBreakerLayer::new(mesh_resilience::pool::CircuitBreaker::new(
        mesh_resilience::pool::PoolLimits::default().max_requests(1024).max_pending(1024),
    ))
    .layer(tower::service_fn(ok_or_error));
    g.bench_function("mesh CircuitBreakerLayer (maxRequests 1024) around the bare service", |b| {
        b.iter(|| rt.block_on(black_box(breaker.clone()).oneshot(Request::new(()))).map(|r| black_box(r.status())))
    });
    let concurrency = tower::limit::ConcurrencyLimitLayer::new(1024).layer(tower::service_fn(ok_or_error));
    g.bench_function("tower ConcurrencyLimit (1024) around the bare service", |b| {
        b.iter(|| rt.block_on(black_box(concurrency.clone()).oneshot(Request::new(()))).map(|r| black_box(r.status())))
    });
    g.finish();
}

criterion_group!(benches, admitted);
criterion_main!(benches);
