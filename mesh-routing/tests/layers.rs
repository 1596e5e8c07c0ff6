//! The tower layers: [`RoutingLayer`] and [`DispatchLayer`] in-process with
//! `tower::ServiceExt::oneshot`, and [`RoutingLayer`] under an `axum::Router` reached over a
//! real TCP connection.

#![cfg(feature = "serde")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::{ResponseFlags, RouteDecision};
use mesh_routing::model::HttpRoute;
use mesh_routing::random::Random;
use mesh_routing::{
    DestinationKey, Dispatch, DispatchLayer, MirrorTo, RouteTable, RouteTimeout, RoutingLayer, SharedRouteTable,
};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

type Body = Full<Bytes>;

// === helpers ===

fn compile(yaml: &str) -> RouteTable {
    let routes: Vec<HttpRoute> = yaml_serde::from_str(yaml).unwrap_or_else(|e| panic!("routes YAML: {e}\n{yaml}"));
    RouteTable::from_routes(&routes).unwrap_or_else(|e| panic!("routes compile: {e}")).with_random(Random::seeded(7))
}

fn request(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(path);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Body::default()).unwrap()
}

async fn body_string<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.expect("a readable body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("a UTF-8 body")
}

/// The value of `key=` on its own line of an [`echo`] body.
fn field<'b>(body: &'b str, key: &str) -> Option<&'b str> {
    body.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

/// What the inner service saw, one `key=value` per line: the routing decision, the URI, the
/// route timeout and mirrors, and every request header.
fn echo(req: &Request<Body>) -> String {
    let decision = RouteDecision::of(req.extensions()).expect("the router records a decision");
    let mut lines = vec![
        format!("route={}", decision.route_name),
        format!("host={}", decision.destination_host),
        format!("subset={}", decision.subset.as_deref().unwrap_or("-")),
        format!("uri={}", req.uri()),
    ];
    if let Some(RouteTimeout(t)) = req.extensions().get::<RouteTimeout>() {
        lines.push(format!("timeout={}", t.as_millis()));
    }
    if let Some(MirrorTo(mirrors)) = req.extensions().get::<MirrorTo>() {
        lines.push(format!("mirrors={}", mirrors.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(",")));
    }
    for (name, value) in req.headers() {
        lines.push(format!("header:{name}={}", value.to_str().unwrap()));
    }
    lines.join("\n")
}

/// An inner service answering with [`echo`], counting its calls.
fn echo_service(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    service_fn(move |req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(Body::from(echo(&req)))))
    })
}

/// An inner service that must not be called: the router answers on its own.
fn must_not_be_called(_req: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    panic!("the inner service was called for a request the router answers itself")
}

const ROUTES: &str = r#"
- name: canary
  match:
  - name: header
    headers: {x-canary: {exact: "true"}}
  rewrite: {uri: /v2/}
  timeout: 3s
  headers:
    request:
      set: {x-routed: canary}
      remove: [x-internal]
    response:
      set: {x-served-by: canary}
  route:
  - destination: {host: reviews, subset: v2}
    headers:
      response: {add: {x-destination: v2}}
- name: old
  match: [{uri: {prefix: /old}}]
  redirect: {uri: /new, redirectCode: 308}
- name: down
  match: [{uri: {prefix: /down}}]
  directResponse: {status: 503, body: {string: "down for maintenance"}}
- name: default
  match: [{uri: {prefix: /}, headers: {host: {exact: reviews}}}]
  mirror: {host: reviews-shadow}
  route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v3}, weight: 10}
"#;

// === RoutingLayer ===

#[tokio::test]
async fn routing_records_the_decision_and_rewrites_the_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = RoutingLayer::new(compile(ROUTES)).layer(echo_service(calls.clone()));

    let req = request("/api/items?x=1", &[("x-canary", "true"), ("x-internal", "secret")]);
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Response header operations: the destination's, then the route's.
    assert_eq!(res.headers()["x-served-by"], "canary");
    assert_eq!(res.headers()["x-destination"], "v2");
    assert!(ResponseFlags::of(res.extensions()).is_empty());
    let body = body_string(res).await;
    assert_eq!(field(&body, "route"), Some("canary.header"));
    assert_eq!(field(&body, "host"), Some("reviews"));
    assert_eq!(field(&body, "subset"), Some("v2"));
    // The inner service sees the rewritten request.
    assert_eq!(field(&body, "uri"), Some("/v2/api/items?x=1"));
    assert_eq!(field(&body, "header:x-envoy-original-path"), Some("/api/items?x=1"));
    assert_eq!(field(&body, "header:x-routed"), Some("canary"));
    assert_eq!(field(&body, "header:x-internal"), None);
    assert_eq!(field(&body, "timeout"), Some("3000"), "RouteTimeout is recorded");
    assert_eq!(field(&body, "mirrors"), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The weighted route: no timeout, no response operations, a mirror chosen at 100 %.
    let res = svc.oneshot(request("/api/items", &[("host", "reviews")])).await.unwrap();
    assert!(res.headers().get("x-served-by").is_none());
    let body = body_string(res).await;
    assert_eq!(field(&body, "route"), Some("default"));
    assert!(matches!(field(&body, "subset"), Some("v1" | "v3")), "{body}");
    assert_eq!(field(&body, "uri"), Some("/api/items"));
    assert_eq!(field(&body, "header:x-envoy-original-path"), None);
    assert_eq!(field(&body, "timeout"), None);
    assert_eq!(field(&body, "mirrors"), Some("outbound|||reviews-shadow"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unmatched_requests_are_404_with_flag_nr() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = RoutingLayer::new(compile(ROUTES)).layer(echo_service(calls.clone()));
    // The default route needs `host: reviews`.
    let res = svc.oneshot(request("/api", &[("host", "ratings")])).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let flags = ResponseFlags::of(res.extensions());
    assert!(flags.contains(ResponseFlags::NO_ROUTE_FOUND));
    assert_eq!(flags.names().collect::<Vec<_>>(), ["NR"]);
    assert_eq!(body_string(res).await, "", "Envoy's NR reply has an empty body");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn redirects_and_direct_responses_are_answered_without_the_inner_service() {
    let svc = RoutingLayer::new(compile(ROUTES)).layer(service_fn(must_not_be_called));

    let res = svc.clone().oneshot(request("/old/page?x=1", &[("host", "reviews:8080")])).await.unwrap();
    assert_eq!(res.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(res.headers()[LOCATION], "http://reviews:8080/new?x=1");
    assert_eq!(body_string(res).await, "");

    let res = svc.oneshot(request("/down", &[])).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[CONTENT_TYPE], "text/plain");
    assert!(ResponseFlags::of(res.extensions()).is_empty());
    assert_eq!(body_string(res).await, "down for maintenance");
}

#[tokio::test]
async fn shared_table_swaps_routes_for_later_requests() {
    let shared = SharedRouteTable::new(compile("- name: before\n  route: [{destination: {host: a}}]\n"));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = RoutingLayer::shared(shared.clone()).layer(echo_service(calls));
    let clone = svc.clone();

    let before = body_string(svc.clone().oneshot(request("/", &[])).await.unwrap()).await;
    assert_eq!(field(&before, "route"), Some("before"));

    // A request already called finishes on the table it started with.
    let in_flight = svc.ready().await.unwrap().call(request("/", &[]));
    shared.store(compile("- name: after\n  route: [{destination: {host: b, subset: s}}]\n"));
    let finished = body_string(in_flight.await.unwrap()).await;
    assert_eq!(field(&finished, "route"), Some("before"));

    // Later requests, through the service and through a clone made before the swap.
    for svc in [svc, clone] {
        let after = body_string(svc.oneshot(request("/", &[])).await.unwrap()).await;
        assert_eq!(field(&after, "route"), Some("after"));
        assert_eq!(field(&after, "host"), Some("b"));
        assert_eq!(field(&after, "subset"), Some("s"));
    }
    assert_eq!(&*shared.load().destinations()[0].host, "b");
}

// === DispatchLayer ===

/// A per-destination service.
type DestinationService = tower::util::BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// A `MakeDestination` closure whose services answer with their destination's key, counting
/// how many services were made per destination.
fn counting_make(made: Arc<Mutex<HashMap<String, usize>>>) -> impl Fn(&DestinationKey) -> DestinationService + Clone {
    move |key: &DestinationKey| {
        *made.lock().unwrap().entry(key.to_string()).or_default() += 1;
        let name = key.to_string();
        DestinationService::new(service_fn(move |req: Request<Body>| {
            let decision = RouteDecision::of(req.extensions()).expect("a decision reaches the destination");
            assert_eq!(DestinationKey::of(decision).to_string(), name, "sent to its own destination");
            std::future::ready(Ok(Response::new(Body::from(name.clone()))))
        }))
    }
}

const SPLIT: &str = r#"
- name: ratings
  match: [{headers: {x-ratings: {}}}]
  route: [{destination: {host: ratings}}]
- name: split
  route:
  - {destination: {host: reviews, subset: v1}, weight: 50}
  - {destination: {host: reviews, subset: v2}, weight: 50}
"#;

#[tokio::test]
async fn dispatch_makes_one_service_per_destination_across_requests_and_clones() {
    let made = Arc::new(Mutex::new(HashMap::new()));
    let svc = ServiceBuilder::new()
        .layer(RoutingLayer::new(compile(SPLIT)))
        .layer(DispatchLayer::new(counting_make(made.clone())))
        .service(service_fn(must_not_be_called));

    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..200 {
        // A fresh clone every time, as axum and hyper clone per request.
        let headers: &[(&str, &str)] = if i % 4 == 0 { &[("x-ratings", "1")] } else { &[] };
        let res = svc.clone().oneshot(request("/", headers)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        *seen.entry(body_string(res).await).or_default() += 1;
    }
    assert_eq!(seen["outbound|||ratings"], 50);
    assert_eq!(seen.len(), 3, "{seen:?}");
    let made = made.lock().unwrap().clone();
    assert_eq!(made.len(), 3, "{made:?}");
    assert!(made.values().all(|&n| n == 1), "each destination's service is made once: {made:?}");
}

#[tokio::test]
async fn dispatch_retain_retires_services() {
    let made = Arc::new(Mutex::new(HashMap::new()));
    let dispatch = Dispatch::new(counting_make(made.clone()));
    let svc = RoutingLayer::new(compile(SPLIT)).layer(dispatch.clone());
    let send = |headers: &'static [(&'static str, &'static str)]| {
        let svc = svc.clone();
        async move { body_string(svc.oneshot(request("/", headers)).await.unwrap()).await }
    };
    assert_eq!(send(&[("x-ratings", "1")]).await, "outbound|||ratings");
    for _ in 0..50 {
        send(&[]).await;
    }
    let mut destinations: Vec<String> = dispatch.destinations().iter().map(ToString::to_string).collect();
    destinations.sort();
    assert_eq!(destinations, ["outbound||v1|reviews", "outbound||v2|reviews", "outbound|||ratings"]);

    // `ratings` left the configuration.
    dispatch.retain(|key| &*key.host != "ratings");
    let destinations: Vec<String> = dispatch.destinations().iter().map(ToString::to_string).collect();
    assert_eq!(destinations.len(), 2);
    assert!(!destinations.contains(&"outbound|||ratings".to_owned()));
    assert_eq!(made.lock().unwrap()["outbound|||ratings"], 1);
    // Routed there again, it gets a new service.
    assert_eq!(send(&[("x-ratings", "1")]).await, "outbound|||ratings");
    assert_eq!(made.lock().unwrap()["outbound|||ratings"], 2);
    assert_eq!(made.lock().unwrap()["outbound||v1|reviews"], 1);
}

#[tokio::test]
async fn dispatch_without_a_decision_is_503_with_flag_nc() {
    let made = Arc::new(Mutex::new(HashMap::new()));
    let dispatch = Dispatch::new(counting_make(made.clone()));
    let res = dispatch.oneshot(request("/", &[])).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let flags = ResponseFlags::of(res.extensions());
    assert!(flags.contains(ResponseFlags::NO_CLUSTER_FOUND));
    assert_eq!(flags.names().collect::<Vec<_>>(), ["NC"]);
    assert!(!body_string(res).await.is_empty());
    assert!(made.lock().unwrap().is_empty(), "no service is made");
}

#[tokio::test]
async fn dispatch_copies_mirrored_requests_to_the_mirror_service() {
    let mirrored = Arc::new(Mutex::new(Vec::<String>::new()));
    let make = {
        let mirrored = mirrored.clone();
        move |key: &DestinationKey| {
            let (key, mirrored) = (key.to_string(), mirrored.clone());
            service_fn(move |req: Request<Body>| {
                if key.contains("shadow") {
                    let decision = RouteDecision::of(req.extensions()).unwrap();
                    mirrored.lock().unwrap().push(format!("{} {} {}", decision.route_name, key, req.uri()));
                }
                std::future::ready(Ok::<_, Infallible>(Response::new(Body::from(key.clone()))))
            })
        }
    };
    let svc = RoutingLayer::new(compile(ROUTES)).layer(Dispatch::new(make));
    let res = svc.oneshot(request("/r?x=1", &[("host", "reviews")])).await.unwrap();
    assert!(body_string(res).await.starts_with("outbound||v"));
    // The copy is spawned, fire and forget; let it run (no clock involved).
    for _ in 0..100 {
        if !mirrored.lock().unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(*mirrored.lock().unwrap(), ["default outbound|||reviews-shadow /r?x=1"]);
}

// === axum ===

/// The handler: what the router decided, as text.
async fn decision(req: axum::extract::Request) -> String {
    let d = RouteDecision::of(req.extensions()).expect("the routing layer ran first");
    format!("route={} host={} subset={}\n", d.route_name, d.destination_host, d.subset.as_deref().unwrap_or("-"))
}

/// Serves `app` on `listener`, one HTTP/1.1 request per connection (`Connection: close`).
///
/// `axum::serve` would do this, but it needs axum's `http1` feature, which mesh-routing's
/// dev-dependency does not enable; this minimal server reads the request head from the socket
/// and hands the request to the router as axum would.
async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let app = app.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.expect("read the request");
                assert!(n > 0, "the client closed before the end of the head");
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8(head).expect("an ASCII head");
            let mut lines = head.split("\r\n");
            let mut request_line = lines.next().unwrap().split(' ');
            let (method, target) = (request_line.next().unwrap(), request_line.next().unwrap());
            let mut builder = Request::builder().method(method).uri(target);
            for line in lines.take_while(|l| !l.is_empty()) {
                let (name, value) = line.split_once(':').expect("a header line");
                builder = builder.header(name.trim(), value.trim());
            }
            let req = builder.body(axum::body::Body::empty()).unwrap();
            let res = app.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
            let status = res.status();
            let body = res.into_body().collect().await.expect("the response body").to_bytes();
            let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len())
                .into_bytes();
            out.extend_from_slice(&body);
            stream.write_all(&out).await.expect("write the response");
            stream.shutdown().await.expect("close");
        });
    }
}

/// Sends `raw` on a fresh connection and reads the whole response.
async fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("write the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read the response");
    String::from_utf8(response).expect("a UTF-8 response")
}

#[tokio::test(flavor = "current_thread")]
async fn axum_router_with_routing_layer_over_http1() {
    let table = compile(
        r#"
- name: canary
  match: [{headers: {x-canary: {exact: "true"}}}]
  route: [{destination: {host: reviews, subset: v2}}]
- name: by-host
  match: [{authority: {exact: x}}]
  route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    let app: axum::Router =
        axum::Router::new().route("/", axum::routing::get(decision)).layer(RoutingLayer::new(table));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, app));

    let bound = Duration::from_secs(10);
    let canary = tokio::time::timeout(
        bound,
        exchange(addr, "GET / HTTP/1.1\r\nHost: x\r\nx-canary: true\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("the canary exchange finishes");
    assert!(canary.starts_with("HTTP/1.1 200 OK\r\n"), "{canary}");
    assert!(canary.ends_with("\r\n\r\nroute=canary host=reviews subset=v2\n"), "{canary}");

    let plain = tokio::time::timeout(bound, exchange(addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        .await
        .expect("the plain exchange finishes");
    assert!(plain.ends_with("route=by-host host=reviews subset=v1\n"), "{plain}");

    let unrouted =
        tokio::time::timeout(bound, exchange(addr, "GET / HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n"))
            .await
            .expect("the unrouted exchange finishes");
    assert!(unrouted.starts_with("HTTP/1.1 404 Not Found\r\n"), "{unrouted}");
    server.abort();
}
