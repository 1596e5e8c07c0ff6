//! The layers drop into `axum::Router::layer`: retries (no `HandleErrorLayer`: an axum route
//! never fails, `Infallible` is a `RetryableError`, with one map giving the route the
//! replayable body as an axum `Body`), faults, and connection-pool limits (whose overflow is an
//! error, answered by axum's `HandleErrorLayer`). Rate limits are in `tests/ratelimit.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use mesh_resilience::retry::{ReplayBody, RetryLayer, RetryPolicy};
use tower::ServiceExt;

#[tokio::test(start_paused = true)]
async fn retries_inside_an_axum_router() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new()
        .route(
            "/flaky",
            get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move { if n == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK } }
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(RetryLayer::new(RetryPolicy::new(2, "5xx".parse().unwrap())))
                .map_request(|req: Request<ReplayBody<Body>>| req.map(Body::new)),
        );
    let res = app.oneshot(Request::get("/flaky").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Fault injection inside an axum router: a 100 % abort answers its status before the route.
#[tokio::test(start_paused = true)]
async fn faults_inside_an_axum_router() {
    use mesh_resilience::fault::{Abort, FaultLayer, FaultPolicy};
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new()
        .route(
            "/",
            get(move || async move {
                counted.fetch_add(1, Ordering::SeqCst);
                "ok"
            }),
        )
        .layer(FaultLayer::new(FaultPolicy::default().with_abort(Abort::Http(StatusCode::IM_A_TEAPOT), 100.0)));
    let res = app.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Connection-pool limits inside an axum router, with axum's `HandleErrorLayer` turning an
/// overflow into 503: one request in flight, none waiting, the second refused at once.
#[tokio::test(start_paused = true)]
async fn circuit_breaking_inside_an_axum_router() {
    use axum::error_handling::HandleErrorLayer;
    use mesh_resilience::pool::{CircuitBreaker, CircuitBreakerLayer, PoolLimits};
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let app = axum::Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                "slow"
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: BoxError| async { StatusCode::SERVICE_UNAVAILABLE }))
                .layer(CircuitBreakerLayer::new(CircuitBreaker::new(PoolLimits::default().max_requests(1))))
                .map_err(|never: std::convert::Infallible| -> BoxError { match never {} }),
        );
    let first = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
    tokio::task::yield_now().await;
    let second = app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
}
