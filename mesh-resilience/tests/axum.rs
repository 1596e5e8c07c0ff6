//! The retry layer drops into `axum::Router::layer` (no `HandleErrorLayer`: an axum route
//! never fails, `Infallible` is a `RetryableError`), with one map giving the route the
//! replayable body as an axum `Body`.

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
