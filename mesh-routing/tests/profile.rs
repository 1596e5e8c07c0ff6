//! Linkerd ServiceProfiles: conditions, response classes, retryable routes, timeouts and
//! budgets, compiled into routes and driven through the routing and retry layers in process.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use mesh_core::RouteDecision;
use mesh_resilience::retry::{ReplayBody, RetryLayer, RetryPolicy};
use mesh_routing::model::{HttpRoute, ServiceProfileSpec};
use mesh_routing::profile::{RequestCondition, ResponseClasses};
use mesh_routing::{RouteContext, RouteTable, RoutingLayer, VirtualHostConfig};
use tower::{Layer, ServiceExt, service_fn};

fn profile(yaml: &str) -> ServiceProfileSpec {
    yaml_serde::from_str(yaml).unwrap()
}

fn table(spec: &ServiceProfileSpec) -> RouteTable {
    let fallback = HttpRoute::named("fallback").to("books", None, 1);
    let mut routes = spec.routes(&fallback).unwrap();
    routes.push(fallback);
    RouteTable::new(&[VirtualHostConfig::new("books", vec!["books".into()], routes)], &RouteContext::default()).unwrap()
}

fn route_of(table: &RouteTable, method: Method, path: &str) -> String {
    let req = Request::builder().method(method).uri(format!("http://books{path}")).body(()).unwrap();
    table.find(&req).unwrap().0.name().to_string()
}

#[test]
fn conditions_are_anchored_regexes_methods_and_all_any_not() {
    let spec = profile(
        r#"
routes:
- name: book
  condition: {method: GET, pathRegex: '/books/\d+'}
- name: writes
  condition:
    all:
    - any: [{method: POST}, {method: PUT}]
    - not: {pathRegex: '/admin/.*'}
- name: root
  condition: {pathRegex: /}
"#,
    );
    let t = table(&spec);
    assert_eq!(route_of(&t, Method::GET, "/books/42"), "book");
    // Anchored at both ends: a longer path, a prefix or a query do not change that.
    assert_eq!(route_of(&t, Method::GET, "/books/42/reviews"), "fallback");
    assert_eq!(route_of(&t, Method::GET, "/v1/books/42"), "fallback");
    assert_eq!(route_of(&t, Method::GET, "/books/42?x=1"), "book");
    assert_eq!(route_of(&t, Method::HEAD, "/books/42"), "fallback");
    assert_eq!(route_of(&t, Method::POST, "/books"), "writes");
    assert_eq!(route_of(&t, Method::PUT, "/orders/1"), "writes");
    assert_eq!(route_of(&t, Method::POST, "/admin/users"), "fallback");
    assert_eq!(route_of(&t, Method::DELETE, "/books"), "fallback");
    assert_eq!(route_of(&t, Method::GET, "/"), "root");
    assert_eq!(route_of(&t, Method::GET, "/other"), "fallback");

    let cond = RequestCondition::new(&spec.routes[1].condition.clone().unwrap()).unwrap();
    assert_eq!(cond.to_string(), "all(any(method POST, method PUT), not(path ~ ^/admin/.*$))");
}

#[test]
fn response_classes_first_match_decides_and_5xx_fails_by_default() {
    let spec = profile(
        r#"
routes:
- name: r
  condition: {method: GET}
  responseClasses:
  - condition: {status: {min: 500, max: 503}}
    isFailure: false
  - condition: {any: [{status: {min: 429, max: 429}}, {status: {min: 500}}]}
    isFailure: true
"#,
    );
    let classes = ResponseClasses::new(&spec.routes[0].response_classes).unwrap();
    let failure = |code: u16| classes.is_failure(StatusCode::from_u16(code).unwrap());
    assert!(!failure(502), "the first class says not a failure");
    assert!(failure(504) && failure(429));
    assert!(!failure(200) && !failure(404));
    let none = ResponseClasses::new(&[]).unwrap();
    assert!(none.is_failure(StatusCode::INTERNAL_SERVER_ERROR) && !none.is_failure(StatusCode::CONFLICT));
}

#[test]
fn invalid_profiles_name_the_field() {
    let fallback = HttpRoute::named("f").to("books", None, 1);
    let err = |yaml: &str| profile(yaml).routes(&fallback).unwrap_err();
    let e = err("routes: [{name: a, condition: {pathRegex: '(unclosed'}}]");
    assert_eq!(e.field(), "routes[0].condition.pathRegex");
    let e = err("routes: [{name: a, condition: {all: [{method: GET}, {}]}}]");
    assert_eq!(e.field(), "routes[0].condition.all[1]");
    let e = err("routes: [{name: a}]");
    assert_eq!(e.field(), "routes[0].condition");
    let e = err("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 600}}}]}]");
    assert_eq!(e.field(), "routes[0].responseClasses[0].condition.status.min");
    let e = err(
        "routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 500, max: 400}}}]}]",
    );
    assert_eq!(e.field(), "routes[0].responseClasses[0].condition.status");
    let bad_budget = profile("retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10}").retry_budget().unwrap_err();
    assert_eq!(bad_budget.field(), "ttl");
    assert!(profile("retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 90s}").retry_budget().is_err());
    assert!(profile("{}").retry_budget().is_ok(), "Linkerd's default budget");
}

#[test]
fn routes_get_linkerds_timeout_and_retry_policy() {
    let spec = profile(
        r#"
routes:
- {name: slow, condition: {method: GET}, timeout: 30s, isRetryable: true}
- {name: quick, condition: {method: POST}}
"#,
    );
    let t = table(&spec);
    let find = |m: Method| {
        let req = Request::builder().method(m).uri("http://books/").body(()).unwrap();
        let (route, _) = t.find(&req).unwrap();
        (route.timeout(), route.retry_policy().clone())
    };
    let (timeout, retry) = find(Method::GET);
    assert_eq!(timeout, Some(Duration::from_secs(30)));
    assert!(retry.retries() > 1000 && retry.retries_non_idempotent(), "bounded by the budget: {retry:?}");
    let (timeout, retry) = find(Method::POST);
    assert_eq!(timeout, Some(Duration::from_secs(10)), "Linkerd's default");
    assert_eq!(retry.retries(), 2, "only what never reached the service");
    assert!(!retry.retry_on().on_response(StatusCode::SERVICE_UNAVAILABLE, &http::HeaderMap::new()));
}

/// The seed's profile (fixtures/seeds/001): its POST /api route is retryable by default
/// classes, under the profile's budget; its GET / route is not.
#[tokio::test(start_paused = true)]
async fn a_retryable_route_retries_failed_posts_under_the_profile_budget() {
    let spec = profile(
        r#"
routes:
- name: POST /api
  condition: {method: POST, pathRegex: /api}
  isRetryable: true
- name: GET /
  condition: {method: GET, pathRegex: /}
retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 1, ttl: 10s}
"#,
    );
    let budget = Arc::new(spec.retry_budget().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // Fails every other call.
    let upstream = service_fn(move |req: Request<ReplayBody<_>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        // The routing layer decided before the retry layer.
        assert!(RouteDecision::of(req.extensions()).is_some());
        async move {
            let mut res = Response::new(Full::new(Bytes::new()));
            if n.is_multiple_of(2) {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(res)
        }
    });
    let svc =
        RoutingLayer::new(table(&spec)).layer(RetryLayer::new(RetryPolicy::none()).with_budget(budget).layer(upstream));
    let send = |method: Method, path: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://books{path}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        svc.clone().oneshot(req)
    };
    // POSTs on the retryable route all succeed.
    for _ in 0..10 {
        assert_eq!(send(Method::POST, "/api").await.unwrap().status(), 200);
    }
    // GETs on the other route are not retried on 503: about half fail.
    let mut failed = 0;
    for _ in 0..10 {
        failed += usize::from(send(Method::GET, "/").await.unwrap().status() != 200);
    }
    assert!(failed >= 4, "{failed}");
    // With the upstream failing every call, retries stop at the budget: 0.2 of the requests
    // plus the reserve of 1 a second for 10 s.
    let failing = service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::BAD_GATEWAY;
        Ok::<_, Infallible>(res)
    });
    let tries = Arc::new(AtomicUsize::new(0));
    let counted = tries.clone();
    let failing = tower::ServiceBuilder::new()
        .map_request(move |r| {
            counted.fetch_add(1, Ordering::SeqCst);
            r
        })
        .service(failing);
    let budget = Arc::new(spec.retry_budget().unwrap());
    let svc =
        RoutingLayer::new(table(&spec)).layer(RetryLayer::new(RetryPolicy::none()).with_budget(budget).layer(failing));
    for _ in 0..100 {
        let req = Request::post("http://books/api").body(Full::new(Bytes::new())).unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 502);
    }
    let tries = tries.load(Ordering::SeqCst);
    assert!(tries <= 100 + 20 + 10, "{tries} calls for 100 requests");
    assert!(tries > 100, "some retries were allowed: {tries}");
}
