//! SEMANTICS.md Appendix A, vectors 24–25, the burst test, keys, overrides, headers, gRPC,
//! shadow mode, a bounded key store, and exact admission under two threads.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::ResponseFlags;
use mesh_resilience::ratelimit::{Decision, RateLimitKey, RateLimitLayer, RateLimitResponse, RateLimiter, TokenBucket};
use tower::{Layer, ServiceExt, service_fn};

fn ok() -> impl tower::Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send> + Clone
{
    service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) })
}

fn bucket(max: u32, per_fill: u32, interval_ms: u64) -> TokenBucket {
    TokenBucket::new(max, per_fill, Duration::from_millis(interval_ms)).unwrap()
}

fn head(user: Option<&str>) -> http::request::Parts {
    let mut req = Request::get("/");
    if let Some(u) = user {
        req = req.header("x-user-id", u);
    }
    req.body(()).unwrap().into_parts().0
}

#[tokio::test(start_paused = true)]
async fn v24_a_burst_of_ten_then_one_every_200_ms() {
    let svc = RateLimitLayer::new(RateLimiter::total(bucket(10, 5, 1000))).layer(ok());
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    }
    let refused = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(ResponseFlags::of(refused.extensions()), ResponseFlags::RATE_LIMITED);
    assert_eq!(refused.headers()["retry-after"], "1", "a token in 200 ms, rounded up");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"default\";q=10;w=2");
    assert_eq!(refused.headers()["ratelimit"], "\"default\";r=0;t=1");
    assert_eq!(refused.into_body().collect().await.unwrap().to_bytes(), "local_rate_limited");
    // The atomic bucket: one token 200 ms later, not five at the next second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // Sustained: 5 a second.
    let mut admitted = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        admitted += usize::from(svc.clone().oneshot(Request::new(())).await.unwrap().status() == StatusCode::OK);
    }
    assert_eq!(admitted, 25, "5 a second over 5 s");
}

#[tokio::test(start_paused = true)]
async fn v25_unsampled_requests_are_never_limited_and_shadow_mode_only_counts() {
    let limiter = RateLimiter::total(bucket(1, 1, 60_000));
    let mut off = RateLimitResponse::default();
    off.enabled_per_million = 0;
    let svc = RateLimitLayer::with_response(limiter.clone(), off).layer(ok());
    for _ in 0..20 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(limiter.stats().enabled.load(Ordering::Relaxed), 0);

    let limiter = RateLimiter::total(bucket(1, 1, 60_000));
    let mut shadow = RateLimitResponse::default();
    shadow.enforced_per_million = 0;
    let svc = RateLimitLayer::with_response(limiter.clone(), shadow).layer(ok());
    for _ in 0..20 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    }
    let stats = limiter.stats();
    assert_eq!(
        (
            stats.enabled.load(Ordering::Relaxed),
            stats.ok.load(Ordering::Relaxed),
            stats.rate_limited.load(Ordering::Relaxed),
            stats.enforced.load(Ordering::Relaxed)
        ),
        (20, 1, 19, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_per_user_with_an_override_and_a_total() {
    let key = RateLimitKey::Header(HeaderName::from_static("x-user-id"));
    let limiter = RateLimiter::keyed_with_total(key, bucket(2, 2, 60_000), bucket(100, 100, 60_000))
        .with_override("vip", bucket(5, 5, 60_000));
    let admitted =
        |user: &str| (0..10).filter(|_| matches!(limiter.check(&head(Some(user))), Decision::Allowed { .. })).count();
    assert_eq!(admitted("alice"), 2);
    assert_eq!(admitted("bob"), 2, "users are limited independently");
    assert_eq!(admitted("vip"), 5, "the override's bucket");
    // Without the key only the total applies: 100 - 9 taken so far.
    assert_eq!((0..200).filter(|_| matches!(limiter.check(&head(None)), Decision::Allowed { .. })).count(), 91);
    assert!(matches!(limiter.check(&head(Some("carol"))), Decision::Limited { .. }), "the total is spent");
}

#[tokio::test(start_paused = true)]
async fn grpc_refusals_are_resource_exhausted_and_legacy_headers_on_request() {
    let mut response = RateLimitResponse::default();
    response.legacy_headers = true;
    let svc = RateLimitLayer::with_response(RateLimiter::total(bucket(1, 1, 10_000)), response).layer(ok());
    let call = || Request::post("/pkg.Svc/M").header("content-type", "application/grpc").body(()).unwrap();
    let first = svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(
        (
            first.headers()["x-ratelimit-limit"].to_str().unwrap(),
            first.headers()["x-ratelimit-remaining"].to_str().unwrap()
        ),
        ("1", "0")
    );
    let res = svc.clone().oneshot(call()).await.unwrap();
    assert_eq!((res.status(), &res.headers()["grpc-status"]), (StatusCode::OK, &http::HeaderValue::from_static("8")));
    assert_eq!(res.headers()["x-ratelimit-reset"], "10");
}

#[tokio::test(start_paused = true)]
async fn a_million_keys_keep_the_store_bounded() {
    let key = RateLimitKey::Header(HeaderName::from_static("x-user-id"));
    // A bucket refilled in 100 ms; at most 10 000 keys held.
    let limiter = RateLimiter::keyed(key, bucket(1, 1, 100)).with_max_keys(10_000);
    let mut most = 0;
    for i in 0..1_000_000u32 {
        let mut parts = head(None);
        parts.headers.insert("x-user-id", i.to_string().parse().unwrap());
        let _ = limiter.check(&parts);
        if i % 1000 == 0 {
            tokio::time::advance(Duration::from_millis(10)).await;
            most = most.max(limiter.keys());
        }
    }
    // The cap, plus the 1,024 checks between looks.
    assert!(most <= 10_000 + 1024, "the store held {most} keys");
}

#[test]
fn two_threads_against_one_bucket_admit_exactly_its_budget() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let _guard = rt.enter();
    // A bucket that does not refill within the test: exactly 1,000 tokens.
    let limiter = RateLimiter::total(TokenBucket::new(1000, 1, Duration::from_secs(3600)).unwrap());
    let admitted = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (limiter, admitted) = (limiter.clone(), admitted.clone());
            s.spawn(move || {
                for _ in 0..5_000 {
                    if matches!(limiter.check(&head(None)), Decision::Allowed { .. }) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 1000);
}

#[test]
fn invalid_buckets_name_the_field() {
    assert_eq!(TokenBucket::new(0, 1, Duration::from_secs(1)).unwrap_err().field(), "max_tokens");
    assert_eq!(TokenBucket::new(1, 0, Duration::from_secs(1)).unwrap_err().field(), "tokens_per_fill");
    assert_eq!(TokenBucket::new(1, 1, Duration::from_millis(10)).unwrap_err().field(), "fill_interval");
}

#[tokio::test(start_paused = true)]
async fn inside_axum_a_service_cloned_per_request_is_limited_once_overall() {
    let limiter = RateLimiter::total(bucket(3, 3, 60_000));
    let app: axum::Router =
        axum::Router::new().route("/", axum::routing::get(|| async { "ok" })).layer(RateLimitLayer::new(limiter));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let res = app.clone().oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap()).await.unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

/// Envoy's filter configuration, as an EnvoyFilter carries it.
fn envoy(json: serde_json::Value) -> Result<Option<RateLimitLayer>, mesh_resilience::ratelimit::InvalidRateLimit> {
    serde_json::from_value::<mesh_resilience::ratelimit::LocalRateLimitConfig>(json).unwrap().to_layer()
}

#[tokio::test(start_paused = true)]
async fn envoy_filter_shapes_compile_as_envoy_reads_them() {
    use serde_json::json;
    let on = json!({"default_value": {"numerator": 100, "denominator": "HUNDRED"}});
    // No default bucket: the filter limits nothing.
    assert!(envoy(json!({"stat_prefix": "x"})).unwrap().is_none());
    // A value-only descriptor has no per-value bucket to override: refused, not ignored.
    let valued = json!({
        "token_bucket": {"max_tokens": 10, "fill_interval": "1s"},
        "rate_limits": [{"actions": [{"request_headers": {"header_name": "x-user-id", "descriptor_key": "user"}}]}],
        "descriptors": [{"entries": [{"key": "user", "value": "admin"}], "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}]
    });
    assert_eq!(envoy(valued).unwrap_err().field(), "descriptors");
    // Without always_consume_default_token_bucket the default is for requests with no key.
    let config = json!({
        "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "60s"},
        "filter_enabled": on, "filter_enforced": on,
        "always_consume_default_token_bucket": false,
        "rate_limits": [{"actions": [{"request_headers": {"header_name": "x-user-id", "descriptor_key": "user"}}]}],
        "descriptors": [{"entries": [{"key": "user"}], "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "60s"}}]
    });
    let svc = envoy(config).unwrap().unwrap().layer(ok());
    let with_user = || Request::get("/").header("x-user-id", "u").body(()).unwrap();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(svc.clone().oneshot(with_user()).await.unwrap().status().as_u16());
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429], "the descriptor's bucket alone");
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // gRPC refusals: UNAVAILABLE, as Envoy's default; RESOURCE_EXHAUSTED when asked.
    for (flag, code) in [(false, "14"), (true, "8")] {
        let svc = envoy(json!({
            "token_bucket": {"max_tokens": 1, "fill_interval": "60s"},
            "filter_enabled": on, "filter_enforced": on,
            "rate_limited_as_resource_exhausted": flag
        }))
        .unwrap()
        .unwrap()
        .layer(ok());
        let call = || Request::post("/p.S/M").header("content-type", "application/grpc").body(()).unwrap();
        let _ = svc.clone().oneshot(call()).await.unwrap();
        assert_eq!(svc.clone().oneshot(call()).await.unwrap().headers()["grpc-status"], code);
    }
    // Unset filter_enabled: the filter does nothing (vector 25).
    let svc = envoy(json!({"token_bucket": {"max_tokens": 1, "fill_interval": "60s"}})).unwrap().unwrap().layer(ok());
    for _ in 0..5 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    }
}
