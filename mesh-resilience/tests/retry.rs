//! SEMANTICS.md Appendix A, vectors 8–18 (retries and budgets), on paused time, plus body
//! replay, the budget bound as a property, and a retry storm next to tower's `Retry`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::ResponseFlags;
use mesh_core::classify::ConnectError;
use mesh_core::random::Random;
use mesh_resilience::retry::{
    Attempts, ConcurrencyBudget, HttpRetry, ReplayBody, RetryBudget, RetryLayer, RetryOn, RetryPolicy, TokenBudget,
};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Answer = Result<Response<Full<Bytes>>, BoxError>;

/// An upstream that answers try `n` (0-based) with `script(n)`, counting tries and recording
/// each try's body.
#[derive(Clone)]
struct Scripted {
    tries: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Bytes>>>,
    script: Arc<dyn Fn(usize) -> Answer + Send + Sync>,
    hang: bool,
}

impl Scripted {
    fn new(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        Self { tries: Arc::default(), bodies: Arc::default(), script: Arc::new(script), hang: false }
    }

    fn hanging() -> Self {
        Self { hang: true, ..Self::new(|_| Ok(status(200))) }
    }

    fn tries(&self) -> usize {
        self.tries.load(Ordering::SeqCst)
    }
}

impl Service<Request<ReplayBody<Full<Bytes>>>> for Scripted {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<Full<Bytes>>>) -> Self::Future {
        let n = self.tries.fetch_add(1, Ordering::SeqCst);
        let (script, bodies, hang) = (self.script.clone(), self.bodies.clone(), self.hang);
        Box::pin(async move {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bodies.lock().unwrap().push(body);
            if hang {
                std::future::pending::<()>().await;
            }
            script(n)
        })
    }
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::from_u16(code).unwrap();
    res
}

fn with_header(mut res: Response<Full<Bytes>>, name: &'static str, value: &'static str) -> Response<Full<Bytes>> {
    res.headers_mut().insert(name, value.parse().unwrap());
    res
}

fn refused() -> BoxError {
    Box::new(ConnectError::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
}

fn reset() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

fn policy(retries: u32, on: &str) -> RetryPolicy {
    RetryPolicy::new(retries, on.parse().unwrap())
}

async fn send(layer: &RetryLayer, upstream: &Scripted, method: Method, body: &'static str) -> Answer {
    let svc = layer.clone().with_random(Random::seeded(1)).layer(upstream.clone());
    let req = Request::builder().method(method).uri("/").body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap();
    svc.oneshot(req).await
}

async fn get(layer: &RetryLayer, upstream: &Scripted) -> Answer {
    send(layer, upstream, Method::GET, "").await
}

#[tokio::test(start_paused = true)]
async fn v8_istio_default_does_not_retry_503_and_retries_connect_failures_twice() {
    let layer = RetryLayer::new(RetryPolicy::istio_default());
    let upstream = Scripted::new(|_| Ok(status(503)));
    assert_eq!(get(&layer, &upstream).await.unwrap().status(), 503);
    assert_eq!(upstream.tries(), 1);

    let upstream = Scripted::new(|_| Err(refused()));
    let err = get(&layer, &upstream).await.unwrap_err();
    assert!(mesh_core::Outcome::from_error(&*err).is_connect_failure());
    assert_eq!(upstream.tries(), 3, "two retries, three tries");
}

#[tokio::test(start_paused = true)]
async fn v9_5xx_with_two_retries_gets_the_third_answer() {
    let layer = RetryLayer::new(policy(2, "5xx"));
    let upstream = Scripted::new(|n| Ok(status(if n < 2 { 500 } else { 200 })));
    let res = get(&layer, &upstream).await.unwrap();
    assert_eq!((res.status(), res.extensions().get::<Attempts>()), (StatusCode::OK, Some(&Attempts(3))));
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_last_response_with_urx() {
    let layer = RetryLayer::new(policy(2, "5xx"));
    let upstream = Scripted::new(|n| Ok(status(500 + n as u16)));
    let res = get(&layer, &upstream).await.unwrap();
    assert_eq!(res.status(), 502, "the last try's answer");
    assert!(ResponseFlags::of(res.extensions()).contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
    assert_eq!(upstream.tries(), 3);
}

#[tokio::test(start_paused = true)]
async fn v10_gateway_error_retries_502_503_504_and_resets_but_not_500() {
    let layer = RetryLayer::new(policy(1, "gateway-error"));
    for (code, tries) in [(500, 1), (502, 2), (503, 2), (504, 2)] {
        let upstream = Scripted::new(move |_| Ok(status(code)));
        let _ = get(&layer, &upstream).await.unwrap();
        assert_eq!(upstream.tries(), tries, "{code}");
    }
    let upstream = Scripted::new(|_| Err(reset()));
    assert!(get(&layer, &upstream).await.is_err());
    assert_eq!(upstream.tries(), 2, "a reset counts");
}

#[tokio::test(start_paused = true)]
async fn v11_retriable_4xx_is_409_only_and_codes_are_retriable_status_codes() {
    let layer = RetryLayer::new(policy(1, "retriable-4xx"));
    for (code, tries) in [(409, 2), (429, 1)] {
        let upstream = Scripted::new(move |_| Ok(status(code)));
        let _ = get(&layer, &upstream).await.unwrap();
        assert_eq!(upstream.tries(), tries, "{code}");
    }
    let layer = RetryLayer::new(policy(1, "429,connect-failure"));
    let upstream = Scripted::new(|_| Ok(status(429)));
    let _ = get(&layer, &upstream).await.unwrap();
    assert_eq!(upstream.tries(), 2);
    assert!("999".parse::<RetryOn>().is_err(), "an integer without a reason phrase is refused");
    assert!("5xx,bogus".parse::<RetryOn>().is_err());
}

#[tokio::test(start_paused = true)]
async fn v12_a_rate_limited_response_is_retried_only_on_envoy_ratelimited() {
    let layer = RetryLayer::new(policy(1, "5xx"));
    let upstream = Scripted::new(|_| Ok(with_header(status(503), "x-envoy-ratelimited", "true")));
    let _ = get(&layer, &upstream).await.unwrap();
    assert_eq!(upstream.tries(), 1);
    let layer = RetryLayer::new(policy(1, "envoy-ratelimited"));
    let upstream = Scripted::new(|_| Ok(with_header(status(429), "x-envoy-ratelimited", "true")));
    let _ = get(&layer, &upstream).await.unwrap();
    assert_eq!(upstream.tries(), 2);
}

#[tokio::test(start_paused = true)]
async fn v13_grpc_status_counts_in_the_head_not_in_trailers() {
    let layer = RetryLayer::new(policy(1, "unavailable"));
    let upstream = Scripted::new(|_| Ok(with_header(status(200), "grpc-status", "14")));
    let _ = get(&layer, &upstream).await.unwrap();
    assert_eq!(upstream.tries(), 2, "trailers-only UNAVAILABLE is retried");
    // In trailers only: the head says nothing, so the decision (made at the head) is no.
    let on: RetryOn = "unavailable".parse().unwrap();
    assert!(!on.on_response(StatusCode::OK, &HeaderMap::new()));
}

#[test]
fn v14_backoff_is_full_jitter_below_25ms_doubling_capped_at_250ms() {
    let p = RetryPolicy::istio_default();
    let random = Random::seeded(9);
    for (k, ceiling_ms) in [(1u32, 25u64), (2, 50), (3, 100), (4, 200), (5, 250), (9, 250)] {
        let draws: Vec<Duration> = (0..2000).map(|_| p.backoff(k, &random)).collect();
        let max = draws.iter().max().unwrap();
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(*max < ceiling, "k={k}: {max:?}");
        // Uniform on [0, c): the largest of 2,000 draws falls below 0.99 c with
        // probability 0.99^2000 < 1e-8.
        assert!(*max >= ceiling.mul_f64(0.99), "k={k}: {max:?}");
        let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
        // Mean c/2, sd of the mean c/sqrt(12 * 2000) = 0.0065 c: 5 sd is 0.032 c.
        assert!((mean.as_secs_f64() / ceiling.as_secs_f64() - 0.5).abs() < 0.033, "k={k}: mean {mean:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn v15_a_per_try_timeout_is_not_retried_by_default_and_is_with_5xx() {
    let start = tokio::time::Instant::now();
    let layer = RetryLayer::new(RetryPolicy::istio_default().with_per_try_timeout(Duration::from_secs(1)));
    let upstream = Scripted::hanging();
    let err = get(&layer, &upstream).await.unwrap_err();
    assert!(mesh_core::Outcome::from_error(&*err).is_timeout());
    assert_eq!((upstream.tries(), start.elapsed()), (1, Duration::from_secs(1)));

    let start = tokio::time::Instant::now();
    let layer = RetryLayer::new(policy(3, "5xx").with_per_try_timeout(Duration::from_secs(1)));
    let upstream = Scripted::hanging();
    let err = get(&layer, &upstream).await.unwrap_err();
    assert!(mesh_core::Outcome::from_error(&*err).is_timeout());
    assert_eq!(upstream.tries(), 4);
    // Four tries of 1 s, and three back-offs of at most 25, 50 and 100 ms.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(4) && elapsed < Duration::from_millis(4175), "{elapsed:?}");
}

#[test]
fn v17_envoy_budget_of_20_percent_min_3() {
    let budget = ConcurrencyBudget::new(20.0, 3).unwrap();
    let _requests: Vec<_> = (0..25).map(|_| budget.deposit()).collect();
    let retries: Vec<_> = (0..5).map(|_| budget.withdraw().expect("within 20 % of 25")).collect();
    assert!(budget.withdraw().is_none(), "a 6th retry is refused");
    assert_eq!(budget.refused(), 1);
    drop(retries);
    // With few requests in flight, the minimum holds.
    let small = ConcurrencyBudget::new(20.0, 3).unwrap();
    let _one = small.deposit();
    let three: Vec<_> = (0..3).map(|_| small.withdraw().expect("the minimum")).collect();
    assert!(small.withdraw().is_none());
    drop(three);
    assert!(small.withdraw().is_some(), "a finished retry gives its place back");
}

#[tokio::test(start_paused = true)]
async fn v18_token_budget_10s_10_per_second_0_2() {
    let budget = TokenBudget::new(0.2, 10, Duration::from_secs(10)).unwrap();
    let granted = (0..150).filter(|_| budget.withdraw().is_some()).count();
    assert_eq!(granted, 100, "the reserve: 10 a second for 10 s");
    for _ in 0..100 {
        budget.deposit();
    }
    let granted = (0..50).filter(|_| budget.withdraw().is_some()).count();
    assert_eq!(granted, 20, "0.2 of 100 requests");
    // After the window, deposits and withdrawals have expired: the reserve is back.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(budget.available(), 100);
    // A ratio of 1/7 is 1/7 (tower's TpsBudget truncates it to 1/6).
    let seventh = TokenBudget::new(1.0 / 7.0, 0, Duration::from_secs(10)).unwrap();
    for _ in 0..70 {
        seventh.deposit();
    }
    assert_eq!(seventh.available(), 10);
    assert!(TokenBudget::new(0.2, 10, Duration::from_millis(500)).is_err());
    assert!(TokenBudget::new(f64::NAN, 10, Duration::from_secs(10)).is_err());
    assert!(ConcurrencyBudget::new(120.0, 3).is_err());
}

proptest! {
    /// Over any sequence of requests and retries within one window, the budget never grants
    /// more than `retryRatio × requests + minRetriesPerSecond × ttl` retries.
    #[test]
    fn token_budget_never_exceeds_its_bound(
        ratio in 0.0f64..2.0,
        min in 0u32..20,
        ops in proptest::collection::vec(any::<bool>(), 0..400),
    ) {
        let budget = TokenBudget::new(ratio, min, Duration::from_secs(10)).unwrap();
        let (mut requests, mut granted) = (0u64, 0u64);
        for request in ops {
            if request {
                budget.deposit();
                requests += 1;
            } else if budget.withdraw().is_some() {
                granted += 1;
            }
        }
        let bound = ((ratio * 1000.0).round() as u64 * requests) / 1000 + u64::from(min) * 10;
        prop_assert!(granted <= bound, "granted {} > bound {}", granted, bound);
    }
}

#[tokio::test(start_paused = true)]
async fn bodies_are_replayed_within_the_cap_and_non_idempotent_requests_are_not_retried() {
    let layer = RetryLayer::new(policy(2, "5xx").with_max_replay_bytes(16));
    // PUT is idempotent: its body is sent again, the same.
    let upstream = Scripted::new(|n| Ok(status(if n == 0 { 503 } else { 200 })));
    let res = send(&layer, &upstream, Method::PUT, "hello").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*upstream.bodies.lock().unwrap(), [Bytes::from("hello"), Bytes::from("hello")]);
    // Longer than the cap: not retried, passed through.
    let upstream = Scripted::new(|_| Ok(status(503)));
    let _ = send(&layer, &upstream, Method::PUT, "a body longer than sixteen bytes").await.unwrap();
    assert_eq!(upstream.tries(), 1);
    // POST is not retried once sent...
    let upstream = Scripted::new(|_| Ok(status(503)));
    let _ = send(&layer, &upstream, Method::POST, "order").await.unwrap();
    assert_eq!(upstream.tries(), 1);
    // ...but is when it never left (connect failure), and when the user opts in.
    let on_connect = RetryLayer::new(policy(2, "connect-failure,5xx"));
    let upstream = Scripted::new(|n| if n == 0 { Err(refused()) } else { Ok(status(200)) });
    assert_eq!(send(&on_connect, &upstream, Method::POST, "order").await.unwrap().status(), 200);
    let opted = RetryLayer::new(policy(2, "5xx").retrying_non_idempotent());
    let upstream = Scripted::new(|n| Ok(status(if n == 0 { 503 } else { 200 })));
    assert_eq!(send(&opted, &upstream, Method::POST, "order").await.unwrap().status(), 200);
}

#[test]
fn istio_retry_blocks_are_validated_as_istio_does() {
    let parse = |json: &str| RetryPolicy::from_istio(&serde_json::from_str::<HttpRetry>(json).unwrap());
    let p = parse(r#"{"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,reset,connect-failure,refused-stream"}"#)
        .unwrap();
    assert_eq!((p.retries(), p.per_try_timeout()), (3, Some(Duration::from_secs(2))));
    assert_eq!(parse(r#"{"attempts": 0}"#).unwrap().retries(), 0);
    assert!(parse(r#"{"attempts": 0, "retryOn": "5xx"}"#).is_err(), "attempts 0 with conditions");
    assert!(parse(r#"{"attempts": -1}"#).is_err());
    assert!(parse(r#"{"attempts": 2, "perTryTimeout": "1.5ms"}"#).is_err(), "not whole milliseconds");
    assert!(parse(r#"{"attempts": 2, "retryOn": "gateway-error,connect-failure,refused-stream", "retryRemoteLocalities": true}"#).is_ok());
    assert!(parse(r#"{"attempts": 2, "retryOn": "sometimes"}"#).is_err());
}

/// A retry storm: an upstream failing every request. With a fixed attempt count (tower's
/// `Retry`) the upstream sees 4 calls per request; with the token budget it sees at most the
/// budget's bound over the original count.
#[tokio::test(start_paused = true)]
async fn a_retry_storm_is_held_to_the_budget_where_fixed_attempts_multiply_load() {
    const REQUESTS: usize = 1000;
    let budget = Arc::new(TokenBudget::new(0.2, 10, Duration::from_secs(10)).unwrap());
    let layer = RetryLayer::new(policy(3, "5xx")).with_budget(budget);
    let upstream = Scripted::new(|_| Ok(status(503)));
    for _ in 0..REQUESTS {
        let _ = get(&layer, &upstream).await.unwrap();
    }
    let budgeted = upstream.tries();

    #[derive(Clone)]
    struct FixedAttempts(usize);
    impl<B: Clone> tower::retry::Policy<Request<B>, Response<Full<Bytes>>, Infallible> for FixedAttempts {
        type Future = std::future::Ready<()>;
        fn retry(
            &mut self,
            _: &mut Request<B>,
            result: &mut Result<Response<Full<Bytes>>, Infallible>,
        ) -> Option<Self::Future> {
            let failed = result.as_ref().is_ok_and(|r| r.status().is_server_error());
            (failed && self.0 > 0).then(|| {
                self.0 -= 1;
                std::future::ready(())
            })
        }
        fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
            let mut r = Request::new(req.body().clone());
            *r.method_mut() = req.method().clone();
            Some(r)
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let failing = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(status(503)) }
    });
    for _ in 0..REQUESTS {
        let svc = tower::retry::Retry::new(FixedAttempts(3), failing.clone());
        let _ = svc.oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
    }
    let fixed = calls.load(Ordering::SeqCst);
    let (amp_budget, amp_fixed) = (budgeted as f64 / REQUESTS as f64, fixed as f64 / REQUESTS as f64);
    println!(
        "retry storm over {REQUESTS} requests: budget {amp_budget:.2}x upstream calls, tower Retry (3 attempts) {amp_fixed:.2}x"
    );
    assert!(budgeted <= REQUESTS + REQUESTS / 5 + 100, "{budgeted}");
    assert_eq!(fixed, 4 * REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_when_asked_and_capped() {
    let upstream =
        || Scripted::new(|n| Ok(if n == 0 { with_header(status(503), "retry-after", "7") } else { status(200) }));
    let honouring = RetryLayer::new(policy(1, "5xx").honouring_retry_after(Duration::from_secs(300)));
    let start = tokio::time::Instant::now();
    assert_eq!(get(&honouring, &upstream()).await.unwrap().status(), 200);
    let waited = start.elapsed();
    // As long as asked, and up to half again (jitter).
    assert!(waited >= Duration::from_secs(7) && waited <= Duration::from_millis(10_500), "{waited:?}");
    // The jitter spreads clients told the same time: 20 seeded draws are not all alike.
    let mut waits = std::collections::BTreeSet::new();
    for seed in 0..20 {
        let svc = honouring.clone().with_random(Random::seeded(seed)).layer(upstream());
        let start = tokio::time::Instant::now();
        let _ = svc.oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
        waits.insert(start.elapsed());
    }
    assert!(waits.len() > 10, "{waits:?}");

    // Longer than the cap (a timestamp, say): ignored, the back-off applies.
    let capped = RetryLayer::new(policy(1, "5xx").honouring_retry_after(Duration::from_secs(2)));
    let start = tokio::time::Instant::now();
    assert_eq!(get(&capped, &upstream()).await.unwrap().status(), 200);
    assert!(start.elapsed() < Duration::from_millis(25), "the back-off: {:?}", start.elapsed());

    let plain = RetryLayer::new(policy(1, "5xx"));
    let start = tokio::time::Instant::now();
    assert_eq!(get(&plain, &upstream()).await.unwrap().status(), 200);
    assert!(start.elapsed() < Duration::from_millis(25), "only the back-off: {:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn grpc_posts_are_retried_and_local_failures_and_upgrades_are_not() {
    // gRPC calls are POSTs: a trailers-only UNAVAILABLE is retried under Istio's default.
    let layer = RetryLayer::new(RetryPolicy::istio_default());
    let upstream =
        Scripted::new(|n| Ok(if n == 0 { with_header(status(200), "grpc-status", "14") } else { status(200) }));
    let svc = layer.clone().with_random(Random::seeded(1)).layer(upstream.clone());
    let req = Request::post("/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let _ = svc.oneshot(req).await.unwrap();
    assert_eq!(upstream.tries(), 2);

    // A failure that is not the upstream's (no healthy host, say) is answered at once.
    let layer = RetryLayer::new(policy(3, "5xx"));
    let upstream = Scripted::new(|_| Err("no healthy upstream".into()));
    assert!(get(&layer, &upstream).await.is_err());
    assert_eq!(upstream.tries(), 1);

    // An upgrade cannot be replayed.
    let upstream = Scripted::new(|_| Err(refused()));
    let svc = RetryLayer::new(RetryPolicy::istio_default()).layer(upstream.clone());
    let req = Request::get("/chat").header("upgrade", "websocket").body(Full::new(Bytes::new())).unwrap();
    assert!(svc.oneshot(req).await.is_err());
    assert_eq!(upstream.tries(), 1);
}

/// An upstream whose first try fails to connect without reading the body (as a pooled
/// client does when the connect is refused), then echoes the body it reads.
#[derive(Clone, Default)]
struct RefusedThenEcho {
    tries: Arc<AtomicUsize>,
}

impl Service<Request<ReplayBody<Full<Bytes>>>> for RefusedThenEcho {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<Full<Bytes>>>) -> Self::Future {
        let n = self.tries.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if n == 0 {
                drop(req);
                return Err(refused());
            }
            let body = req.into_body().collect().await?.to_bytes();
            Ok(Response::new(Full::new(body)))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_a_failed_connect_never_read_is_sent_whole_by_the_retry() {
    // A 100 KB POST: longer than the replay cap, and not idempotent. The connect failed
    // before any of it was read, so the retry can send the original, all of it.
    let upstream = RefusedThenEcho::default();
    let svc = RetryLayer::new(RetryPolicy::istio_default()).with_random(Random::seeded(3)).layer(upstream.clone());
    let body = Bytes::from(vec![b'p'; 100_000]);
    let req = Request::post("/orders").body(Full::new(body.clone())).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), body);
    assert_eq!(upstream.tries.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_error_the_retries_end_on_is_flagged_urx_and_one_the_budget_stops_uo() {
    let upstream = Scripted::new(|_| Err(refused()));
    let err = get(&RetryLayer::new(policy(2, "connect-failure")), &upstream).await.unwrap_err();
    assert_eq!(upstream.tries(), 3);
    assert_eq!(mesh_core::flags::FlaggedError::flags_of(&*err), ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
    // Still a connect failure underneath (UF at a proxy's edge, with URX).
    assert!(mesh_core::Outcome::from_error(&*err).is_connect_failure());
    assert!(err.to_string().contains("3 tries"), "{err}");

    // A budget that allows no retry: the first error, flagged UO.
    let empty = Arc::new(TokenBudget::new(0.0, 0, Duration::from_secs(10)).unwrap());
    let layer = RetryLayer::new(policy(2, "connect-failure")).with_budget(empty);
    let upstream = Scripted::new(|_| Err(refused()));
    let err = get(&layer, &upstream).await.unwrap_err();
    assert_eq!(upstream.tries(), 1);
    assert_eq!(mesh_core::flags::FlaggedError::flags_of(&*err), ResponseFlags::UPSTREAM_OVERFLOW);

    // An error that is not retried is returned as it is.
    let upstream = Scripted::new(|_| Err(reset()));
    let err = get(&RetryLayer::new(policy(2, "connect-failure")), &upstream).await.unwrap_err();
    assert!(mesh_core::flags::FlaggedError::flags_of(&*err).is_empty());
}
