//! Fault injection: shares within binomial tolerance (seeded), delays on paused time, aborts
//! for HTTP and gRPC, flags, and an aborted request never reaching the service.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::ResponseFlags;
use mesh_core::classify::GrpcCode;
use mesh_core::random::Random;
use mesh_resilience::fault::{Abort, FaultLayer, FaultPolicy, RouteFault};
use tower::{Layer, ServiceExt, service_fn};

fn counting(
    seen: Arc<AtomicUsize>,
) -> impl tower::Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Request<()>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    })
}

#[tokio::test(start_paused = true)]
async fn a_ten_percent_abort_lands_within_binomial_tolerance() {
    let seen = Arc::new(AtomicUsize::new(0));
    let policy = FaultPolicy::default().with_abort(Abort::Http(StatusCode::SERVICE_UNAVAILABLE), 10.0);
    let svc = FaultLayer::new(policy).with_random(Random::seeded(2026)).layer(counting(seen.clone()));
    const N: usize = 10_000;
    let mut aborted = 0;
    for _ in 0..N {
        let res = svc.clone().oneshot(Request::new(())).await.unwrap();
        if res.status() == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
            assert_eq!(ResponseFlags::of(res.extensions()), ResponseFlags::FAULT_INJECTED);
            assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "fault filter abort");
        }
    }
    // n p = 1000, sd = sqrt(n p (1 - p)) = 30: within 5 sd.
    assert!((aborted as f64 - 1000.0).abs() <= 150.0, "{aborted} of {N}");
    assert_eq!(seen.load(Ordering::SeqCst), N - aborted, "an aborted request never reaches the service");
}

#[tokio::test(start_paused = true)]
async fn a_five_second_delay_then_the_service_or_an_abort() {
    let seen = Arc::new(AtomicUsize::new(0));
    let delayed =
        FaultLayer::new(FaultPolicy::default().with_delay(Duration::from_secs(5), 100.0)).layer(counting(seen.clone()));
    let start = tokio::time::Instant::now();
    let res = delayed.oneshot(Request::new(())).await.unwrap();
    assert_eq!((res.status(), start.elapsed()), (StatusCode::OK, Duration::from_secs(5)));
    assert_eq!(ResponseFlags::of(res.extensions()), ResponseFlags::DELAY_INJECTED);
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // Both: delayed, then aborted (independent draws, both at 100 %).
    let both = FaultLayer::new(
        FaultPolicy::default()
            .with_delay(Duration::from_millis(300), 100.0)
            .with_abort(Abort::Http(StatusCode::BAD_REQUEST), 100.0),
    )
    .layer(counting(seen.clone()));
    let start = tokio::time::Instant::now();
    let res = both.oneshot(Request::new(())).await.unwrap();
    assert_eq!((res.status(), start.elapsed()), (StatusCode::BAD_REQUEST, Duration::from_millis(300)));
    assert_eq!(ResponseFlags::of(res.extensions()), ResponseFlags::DELAY_INJECTED | ResponseFlags::FAULT_INJECTED);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn grpc_aborts_are_trailers_only_and_http_aborts_of_grpc_calls_are_mapped() {
    let grpc_call = || Request::post("/pkg.Svc/M").header("content-type", "application/grpc").body(()).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let svc = FaultLayer::new(FaultPolicy::default().with_abort(Abort::Grpc(GrpcCode::UNAVAILABLE), 100.0))
        .layer(counting(seen.clone()));
    let res = svc.oneshot(grpc_call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-message"], "fault filter abort");
    assert!(res.into_body().collect().await.unwrap().to_bytes().is_empty());

    let svc = FaultLayer::new(FaultPolicy::default().with_abort(Abort::Http(StatusCode::FORBIDDEN), 100.0))
        .layer(counting(seen.clone()));
    let res = svc.oneshot(grpc_call()).await.unwrap();
    assert_eq!(
        (res.status(), &res.headers()["grpc-status"]),
        (StatusCode::OK, &"7".parse::<http::HeaderValue>().unwrap())
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_route_fault_on_the_request_replaces_the_layers_and_zero_never_fires() {
    let seen = Arc::new(AtomicUsize::new(0));
    let svc = FaultLayer::from_routes().layer(counting(seen.clone()));
    // No route fault: passes.
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    let mut req = Request::new(());
    let route = FaultPolicy::default().with_abort(Abort::Http(StatusCode::IM_A_TEAPOT), 100.0);
    req.extensions_mut().insert(RouteFault(Arc::new(route)));
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), StatusCode::IM_A_TEAPOT);
    // 0 % never fires.
    let never = FaultLayer::new(FaultPolicy::default().with_abort(Abort::Http(StatusCode::IM_A_TEAPOT), 0.0))
        .layer(counting(seen.clone()));
    for _ in 0..1000 {
        assert_eq!(never.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    }
}
