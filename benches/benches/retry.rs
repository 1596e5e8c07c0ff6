//! The retry layer on the success path (no retry), next to a bare service and tower's `Retry`
//! with a `TpsBudget`, in the same run: what wrapping a service in retries costs per request.
//!
//! ```text
//! cargo bench -p mesh-benches --bench retry
//! ```

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use mesh_resilience::retry::{RetryLayer, RetryPolicy, TokenBudget};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, ServiceExt};

fn request() -> Request<Full<Bytes>> {
    Request::get("/api/orders/42").header("x-request-id", "bench").body(Full::new(Bytes::new())).expect("valid")
}

fn ok<B>(_req: Request<B>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

/// tower's retry with a TPS budget (Linkerd's defaults), retrying 5xx.
#[derive(Clone)]
struct TowerPolicy(Arc<TpsBudget>);

impl tower::retry::Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible> for TowerPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Full<Bytes>>, Infallible>,
    ) -> Option<Self::Future> {
        match result {
            Ok(res) if res.status().is_server_error() => self.0.withdraw().then(|| std::future::ready(())),
            _ => {
                self.0.deposit();
                None
            }
        }
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let mut g = c.benchmark_group("one request, no retry needed");

    let bare = tower::service_fn(ok::<Full<Bytes>>);
    g.bench_function("bare service", |b| {
        b.iter(|| rt.block_on(black_box(bare).oneshot(request())).map(|r| black_box(r.status())))
    });

    let mesh = RetryLayer::new(RetryPolicy::new(2, "5xx".parse().expect("valid")))
        .with_budget(Arc::new(TokenBudget::linkerd_default()))
        .layer(tower::service_fn(ok));
    g.bench_function("mesh Retry (2 retries on 5xx, token budget)", |b| {
        b.iter(|| rt.block_on(black_box(mesh.clone()).oneshot(request())).map(|r| black_box(r.status())))
    });

    let mesh_same_host = RetryLayer::new(RetryPolicy::new(2, "5xx".parse().expect("valid")).allowing_previous_hosts())
        .with_budget(Arc::new(TokenBudget::linkerd_default()))
        .layer(tower::service_fn(ok));
    g.bench_function("mesh Retry, no previous-hosts record", |b| {
        b.iter(|| rt.block_on(black_box(mesh_same_host.clone()).oneshot(request())).map(|r| black_box(r.status())))
    });

    let tower_retry = tower::retry::Retry::new(
        TowerPolicy(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))),
        tower::service_fn(ok::<Full<Bytes>>),
    );
    g.bench_function("tower Retry + TpsBudget", |b| {
        b.iter(|| rt.block_on(black_box(tower_retry.clone()).oneshot(request())).map(|r| black_box(r.status())))
    });
    g.finish();
}

criterion_group!(benches, success_path);
criterion_main!(benches);
