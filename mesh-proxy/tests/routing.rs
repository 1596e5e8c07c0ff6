//! End-to-end routing through the `mesh-proxy` binary: `--config` with a ServiceEntry of two
//! real backends labelled v1 / v2, a DestinationRule and a VirtualService; a header route and
//! a weighted split; weights moved in the file while a client sends continuously; a broken
//! file refused while the old routes keep serving; `validate` on the seed resources.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::*;

fn services(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
  namespace: default
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports:
  - number: 9080
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {p1}}}
    labels: {{app: reviews, version: v1}}
  - address: 127.0.0.1
    ports: {{http: {p2}}}
    labels: {{app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"#,
        p1 = v1.port(),
        p2 = v2.port()
    )
}

fn routes(w1: u32, w2: u32) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - name: canary
    match:
    - headers:
        x-canary:
          exact: "true"
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: split
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: {w1}
    - destination: {{host: reviews, subset: v2}}
      weight: {w2}
"#
    )
}

/// Counts `v2` answers among `n` requests, asserting every one is a 200 from a backend.
async fn count_v2(client: &mut Client, n: usize, headers: &[(&str, &str)]) -> usize {
    let mut v2 = 0;
    for _ in 0..n {
        let (status, body) = client.get("reviews", "/reviews/1", headers).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body == "v1 /reviews/1" || body == "v2 /reviews/1", "{body}");
        v2 += usize::from(body.starts_with("v2"));
    }
    v2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_header_and_weight_and_reloads_without_failing_a_request() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let dir = config_dir("reload");
    write_atomically(&dir, "services.yaml", &services(v1, v2));
    write_atomically(&dir, "routes.yaml", &routes(90, 10));
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;

    // The header route.
    assert_eq!(count_v2(&mut client, 50, &[("x-canary", "true")]).await, 50);

    // The 90/10 split: 2,000 independent draws in the proxy (unseeded), v2 expected 200 with
    // sd = sqrt(2000 * 0.1 * 0.9) = 13.4; 5 sd either side fails a correct split with
    // probability under 1e-6.
    let n = 2000;
    let got = count_v2(&mut client, n, &[]).await;
    assert!((133..=267).contains(&got), "v2 got {got} of {n}");

    // Names: the short name, the FQDN and with a port all reach the virtual host; another
    // host is 404 (NR).
    for host in ["reviews.default.svc.cluster.local", "reviews:9080", "REVIEWS.default"] {
        let (status, _) = client.get(host, "/", &[("x-canary", "true")]).await;
        assert_eq!(status, StatusCode::OK, "{host}");
    }
    assert_eq!(client.get("ratings", "/", &[]).await.0, StatusCode::NOT_FOUND);

    // Admin pages describe what is loaded.
    let clusters = admin(proxy.admin, "/clusters").await;
    assert!(clusters.contains("outbound||v1|reviews.default.svc.cluster.local"), "{clusters}");
    assert!(clusters.contains(&format!("127.0.0.1:{}", v2.port())), "{clusters}");
    assert!(admin(proxy.admin, "/routes").await.contains("\"canary\""));
    assert!(admin(proxy.admin, "/config_dump").await.contains("\"virtualServices\""));

    // Move the weights to 50/50, then 0/100, while two clients send continuously, one on a
    // keep-alive connection and one on a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for fresh in [false, true] {
        let (stop, sent, failed, addr) = (stop.clone(), sent.clone(), failed.clone(), proxy.addr);
        load.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    client = Client::connect(addr).await;
                }
                let (status, _) = client.get("reviews", "/", &[]).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The canary's steps: 90/10, then 50/50 (1,000 draws: v2 expected 500, sd 15.8; 5 sd
    // either side), then 0/100.
    write_atomically(&dir, "routes.yaml", &routes(50, 50));
    wait_for_stat(proxy.admin, "config_reloads", 1).await;
    let got = count_v2(&mut client, 1000, &[]).await;
    assert!((421..=579).contains(&got), "50/50: v2 got {got} of 1000");
    write_atomically(&dir, "routes.yaml", &routes(0, 100));
    wait_for_stat(proxy.admin, "config_reloads", 2).await;
    assert_eq!(count_v2(&mut client, 200, &[]).await, 200, "after the reload everything goes to v2");

    // A broken file is refused; the routes that were loaded keep serving.
    write_atomically(
        &dir,
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec:\n  hosts: [reviews\n",
    );
    wait_for_stat(proxy.admin, "config_reload_failures", 1).await;
    assert_eq!(count_v2(&mut client, 100, &[]).await, 100, "the previous routes keep serving");
    // So is one that parses but does not validate (weights summing to 0).
    write_atomically(&dir, "routes.yaml", &routes(0, 0));
    wait_for_stat(proxy.admin, "config_reload_failures", 2).await;
    assert_eq!(count_v2(&mut client, 100, &[]).await, 100);

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 50, "the clients kept sending");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across the reloads");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (bounded) until the admin counter `name` reaches `at_least`.
async fn wait_for_stat(admin_addr: SocketAddr, name: &str, at_least: u64) {
    for _ in 0..100 {
        let stats = admin(admin_addr, "/stats").await;
        let value =
            stats.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u64>().ok())).unwrap_or(0);
        if value >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never reached {at_least}");
}

#[tokio::test]
async fn a_bad_configuration_stops_the_start_with_file_line_and_field() {
    let dir = config_dir("bad");
    write_atomically(
        &dir,
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r}\n      weight: heavy\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--config"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes.yaml:10:15: error: VirtualService r: spec.http[0].route[0].weight: invalid type"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validate_the_seed_resources() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/seeds");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy")).arg("validate").arg(&seeds).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(": error: ")).collect();
    // The two malformed files, with line and column.
    for f in [
        "004_3d2bbe7e826deccf.invalid-1.yaml:19:19: error: invalid YAML",
        "004_3d2bbe7e826deccf.invalid-2.yaml:19:19: error: invalid YAML",
    ] {
        assert!(errors.iter().any(|l| l.contains(f)), "{f} in {text}");
    }
    // The VirtualService without hosts, with the fix suggested.
    assert!(
        errors.iter().any(|l| l.contains("001_20ec9f7b39974c56.yaml:6:1: error: VirtualService reviews: spec.hosts:")
            && l.contains("add `hosts: [reviews]`")),
        "{text}"
    );
    // Files 000, 002 and 003 load (their not-enforced kinds and fields are warnings); 001 has
    // only the hostless VirtualService.
    for clean in ["000_", "002_", "003_"] {
        assert!(!errors.iter().any(|l| l.contains(clean)), "{clean}: {text}");
    }
    assert_eq!(errors.iter().filter(|l| l.contains("001_")).count(), 1, "{text}");
    // The security kinds are enforced now: no "not enforced" note for them, and 004's
    // `principals` written beside `source` is refused as Istio refuses it.
    assert!(!text.contains("deny-delete: parsed, but not enforced yet"), "{text}");
    assert!(
        text.contains("004_3d2bbe7e826deccf.yaml:230:7: error: AuthorizationPolicy default/backend-access: spec.rules[0].from[0].principals: unknown field: `principals` belongs inside `source`"),
        "{text}"
    );
    // 004's `weight` written inside `destination` is refused, as Istio refuses the unknown field.
    assert!(
        text.contains("spec.http[0].route[0].destination.weight: unknown field: `weight` belongs beside `destination`")
    );
    assert!(text.lines().last().unwrap().starts_with("7 file(s): "), "{text}");
}

/// A WebSocket server that answers each text message with `NAME: message`.
async fn websocket_backend(name: &'static str) -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Ok(text) = msg.to_text() {
                        let _ = ws.send(tokio_tungstenite::tungstenite::Message::text(format!("{name}: {text}"))).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_routed_like_any_request() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (v1, v2) = (websocket_backend("ws-v1").await, websocket_backend("ws-v2").await);
    let dir = config_dir("websocket");
    write_atomically(&dir, "services.yaml", &services(v1, v2));
    write_atomically(&dir, "routes.yaml", &routes(100, 0));
    let proxy = Proxy::start(&dir);
    for (canary, expected) in [(true, "ws-v2: hello"), (false, "ws-v1: hello")] {
        let mut request = format!("ws://{}/chat", proxy.addr).into_client_request().unwrap();
        request.headers_mut().insert("host", "reviews".parse().unwrap());
        if canary {
            request.headers_mut().insert("x-canary", "true".parse().unwrap());
        }
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, res) =
            tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::client_async(request, stream))
                .await
                .expect("handshake in time")
                .expect("the WebSocket handshake succeeds through the routed proxy");
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("hello")).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(answer, Message::text(expected));
        ws.close(None).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend counting the requests it gets, answering with its name.
async fn counting_backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_sticky_splits_and_hash_cookies() {
    let ((v1, _), (v2, shadowed)) = (counting_backend("v1").await, counting_backend("v2").await);
    let dir = config_dir("extras");
    write_atomically(&dir, "services.yaml", &services(v1, v2));
    write_atomically(
        &dir,
        "routes.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  annotations: {mesh.dev/sticky-split: "header:x-user"}
spec:
  hosts: [reviews, ratings]
  http:
  - name: mirrored
    match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
  - name: split
    match: [{authority: {prefix: reviews}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 50}
  - name: hashed
    route: [{destination: {host: reviews}}]
"#,
    );
    // Read after services.yaml: this rule replaces the round-robin one there.
    write_atomically(
        &dir,
        "zz-hash.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-hash}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, ttl: 60s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    );
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;

    // Mirroring: every request answered by v1, and a copy of each reaches v2.
    for _ in 0..20 {
        assert_eq!(client.get("reviews", "/mirrored", &[]).await, (StatusCode::OK, "v1".to_owned()));
    }
    for _ in 0..100 {
        if shadowed.load(Ordering::SeqCst) >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shadowed.load(Ordering::SeqCst), 20, "each mirrored request reached the mirror once");

    // Sticky split: each of 40 users sees one version on every request, and both versions
    // get users (a 50/50 split of 40 users puts all on one side with probability 2^-39).
    let mut versions = std::collections::BTreeSet::new();
    for user in 0..40 {
        let id = format!("user-{user}");
        let (_, first) = client.get("reviews", "/", &[("x-user", id.as_str())]).await;
        for _ in 0..5 {
            assert_eq!(client.get("reviews", "/", &[("x-user", id.as_str())]).await.1, first, "{id}");
        }
        versions.insert(first);
    }
    assert_eq!(versions.len(), 2, "{versions:?}");

    // Consistent hashing by an httpCookie with a ttl: a request without the cookie is given
    // one, and requests carrying it stay on one endpoint.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let res = tx
        .send_request(Request::get("/").header("host", "ratings").body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let cookie = res.headers().get("set-cookie").expect("the balancer sets its cookie").to_str().unwrap().to_owned();
    assert!(cookie.starts_with("session=") && cookie.contains("Max-Age=60"), "{cookie}");
    let chosen = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let pair = cookie.split(';').next().unwrap().to_owned();
    // The generated cookie hashes to the endpoint that answered the request that got it.
    for _ in 0..20 {
        assert_eq!(client.get("ratings", "/", &[("cookie", pair.as_str())]).await.1, chosen);
    }
    // Another client's cookies spread over both endpoints (40 keys on 2 endpoints: all on one
    // with probability 2^-39).
    let mut spread = std::collections::BTreeSet::new();
    for user in 0..40 {
        spread.insert(client.get("ratings", "/", &[("cookie", &format!("session=user-{user}"))]).await.1);
    }
    assert_eq!(spread.len(), 2, "{spread:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend failing every other request (503), counting requests by method; `/hang` never
/// answers.
async fn flaky_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (all, posts) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (seen, seen_posts) = (all.clone(), posts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (seen, seen_posts) = (seen.clone(), seen_posts.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    if req.method() == http::Method::POST {
                        seen_posts.fetch_add(1, Ordering::SeqCst);
                    }
                    async move {
                        if req.uri().path() == "/hang" {
                            std::future::pending::<()>().await;
                        }
                        let _ = req.into_body().collect().await;
                        let mut res = Response::new(Full::new(Bytes::from(format!("answer {n}"))));
                        if n % 2 == 0 {
                            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, all, posts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_from_the_virtual_service() {
    let (backend, all, posts) = flaky_backend().await;
    let dir = config_dir("retries");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: orders}}
spec:
  hosts: [orders]
  http:
  - name: hang
    match: [{{uri: {{prefix: /hang}}}}]
    timeout: 5s
    retries: {{attempts: 3, perTryTimeout: 300ms, retryOn: 5xx}}
    route: [{{destination: {{host: orders}}}}]
  - name: default
    retries: {{attempts: 3, retryOn: 5xx}}
    route: [{{destination: {{host: orders}}}}]
"#,
            se = service_entry("orders", backend.port())
        ),
    );
    let log_path = dir.with_extension("log");
    let proxy = Proxy::start_logging(&dir, std::fs::File::create(&log_path).unwrap().into());
    let mut client = Client::connect(proxy.addr).await;

    // Every other answer is 503: with retries on 5xx every request succeeds.
    for _ in 0..50 {
        let (status, body) = client.get("orders", "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(all.load(Ordering::SeqCst) >= 50);
    // Each 503 was retried, and /metrics counts the retries.
    let retried = all.load(Ordering::SeqCst) - 50;
    assert!(retried >= 25, "{retried}");
    assert_eq!(metric(proxy.admin, "mesh_retries_total").await, retried as f64);

    // A POST is not replayed once sent (its 503 comes back), and a 1 MB body would not be
    // either (it exceeds the 64 KiB replay buffer).
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for _ in 0..4 {
        let before = posts.load(Ordering::SeqCst);
        let body = Full::new(Bytes::from(vec![b'x'; 1 << 20]));
        let req = Request::post("/").header("host", "orders").body(body).unwrap();
        tx.ready().await.unwrap();
        let res = tx.send_request(req).await.unwrap();
        answers.push(res.status());
        let _ = res.into_body().collect().await;
        assert_eq!(posts.load(Ordering::SeqCst) - before, 1, "one POST upstream per POST");
    }
    assert!(answers.contains(&StatusCode::SERVICE_UNAVAILABLE), "{answers:?}");

    // A backend that hangs: each of 4 tries ends at the per-try timeout (300 ms), so the
    // answer is 504 after at least 1.2 s, and before the route timeout (5 s) would give it.
    let start = std::time::Instant::now();
    let (status, body) = client.get("orders", "/hang", &[]).await;
    let took = start.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(took >= Duration::from_millis(1200), "four tries of 300 ms: {took:?}");
    assert!(took < Duration::from_secs(5), "the per-try timeouts, not the route timeout: {took:?}");
    // The log says why: a timeout (UT), and the retries ran out (URX).
    drop(proxy);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let line = log.lines().find(|l| l.contains("upstream request failed")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("flags=UT,URX "), "{line}");
    assert!(line.contains("gave up after 4 tries"), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend answering each request with the length of its body.
async fn length_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body.len().to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// Istio's default retries (connect failures, twice) with a dead endpoint beside a live one:
/// every request reaches the live one, POSTs with bodies over the replay cap included, since
/// a retry never goes back to the endpoint that just failed and a body the failed connect
/// never read is sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_elsewhere_and_resend_bodies_a_failed_connect_never_read() {
    let live = length_backend().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = config_dir("elsewhere");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments}}
spec:
  hosts: [payments]
  ports: [{{number: 80, name: http}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {dead}}}}}
  - {{address: 127.0.0.1, ports: {{http: {live}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments}}
spec:
  host: payments
  trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}
"#,
            dead = dead.port(),
            live = live.port()
        ),
    );
    let proxy = Proxy::start(&dir);
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..60 {
        // Half of them over the 64 KiB replay cap.
        let len = if i % 2 == 0 { 100_000 } else { 1_000 };
        let req = Request::post("/charge").header("host", "payments").body(Full::new(Bytes::from(vec![b'c'; len])));
        tx.ready().await.unwrap();
        let res = tx.send_request(req.unwrap()).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((status, &body[..]), (StatusCode::OK, len.to_string().as_bytes()), "request {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Linkerd ServiceProfile drives the proxy: its retryable route retries failed POSTs under
/// its budget, its other routes do not retry 503s, and its timeout answers 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_profile_routes_retries_and_timeouts() {
    let (backend, _all, posts) = flaky_backend().await;
    let dir = config_dir("profile");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"{se}apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {{name: webapp.default.svc.cluster.local, namespace: default}}
spec:
  routes:
  - name: POST /api
    condition: {{method: POST, pathRegex: /api}}
    isRetryable: true
  - name: GET /hang
    condition: {{method: GET, pathRegex: /hang}}
    timeout: 400ms
  retryBudget: {{retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}}
"#,
            se = service_entry("webapp", backend.port())
        ),
    );
    let proxy = Proxy::start(&dir);
    let routes = admin(proxy.admin, "/routes").await;
    assert!(routes.contains("POST /api"), "{routes}");
    assert!(routes.contains("all(method POST, path ~ ^/api$)"), "{routes}");
    assert!(routes.contains("until the budget refuses"), "{routes}");
    let clusters = admin(proxy.admin, "/clusters").await;
    assert!(clusters.contains("TokenBudget"), "the profile's budget: {clusters}");

    // Every other answer is 503; POSTs on the retryable route all succeed, by retrying.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..30 {
        let req = Request::post("/api").header("host", "webapp").body(Full::new(Bytes::from_static(b"{}"))).unwrap();
        tx.ready().await.unwrap();
        let res = tx.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let _ = res.into_body().collect().await;
    }
    assert!(posts.load(Ordering::SeqCst) > 30, "retried: {}", posts.load(Ordering::SeqCst));

    // Other requests take the service's default route, which does not retry a 503.
    let mut client = Client::connect(proxy.addr).await;
    let mut failed = 0;
    for _ in 0..10 {
        failed += usize::from(client.get("webapp.default.svc.cluster.local", "/", &[]).await.0 != StatusCode::OK);
    }
    assert!(failed >= 3, "{failed} of 10");

    // The profile's timeout: 504 at 400 ms.
    let start = std::time::Instant::now();
    let (status, _) = client.get("webapp", "/hang", &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() >= Duration::from_millis(400) && start.elapsed() < Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend that answers 200, or 503 while `failing` is set, counting its requests.
async fn switchable_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let (fail, seen) = (failing.clone(), count.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (fail, seen) = (fail.clone(), seen.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                    if fail.load(Ordering::SeqCst) {
                        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    async move { Ok::<_, Infallible>(res) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, failing, count)
}

/// `/clusters`' view of the endpoint at `addr`: (ejected, times ejected).
async fn ejection_state(admin_addr: SocketAddr, addr: SocketAddr) -> (bool, u64) {
    let dump: serde_json::Value = serde_json::from_str(&admin(admin_addr, "/clusters").await).unwrap();
    let endpoint = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().unwrap())
        .find(|e| e["address"] == addr.to_string())
        .unwrap()
        .clone();
    (endpoint["health"] == "ejected", endpoint["timesEjected"].as_u64().unwrap())
}

/// Outlier detection from a DestinationRule, through the real binary: of three backends, the
/// one that starts failing is ejected after three 503s, gets nothing while ejected, comes
/// back after the base ejection time, and is ejected for twice as long the next time; the
/// client, retrying 5xx, sees every request succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_and_returns_with_back_off() {
    let backends = [switchable_backend().await, switchable_backend().await, switchable_backend().await];
    let dir = config_dir("outlier");
    let endpoints: String =
        backends.iter().map(|(a, ..)| format!("  - {{address: 127.0.0.1, ports: {{http: {}}}}}\n", a.port())).collect();
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments}}
spec:
  hosts: [payments]
  ports: [{{number: 80, name: http}}]
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments}}
spec:
  host: payments
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 3, interval: 250ms, baseEjectionTime: 2s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payments}}
spec:
  hosts: [payments]
  http:
  - route: [{{destination: {{host: payments}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
"#
        ),
    );
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    let (bad, failing, bad_count) = &backends[2];
    failing.store(true, Ordering::SeqCst);
    let (mut sent, mut failed) = (0usize, 0usize);
    let mut send = async |client: &mut Client, n: usize| {
        for _ in 0..n {
            sent += 1;
            failed += usize::from(client.get("payments", "/", &[]).await.0 != StatusCode::OK);
        }
        (sent, failed)
    };

    let mut durations = Vec::new();
    for round in 1..=2u64 {
        // Traffic until the failing backend is ejected (three 503s in a row).
        let mut ejected = false;
        for _ in 0..50 {
            send(&mut client, 10).await;
            if ejection_state(proxy.admin, *bad).await == (true, round) {
                ejected = true;
                break;
            }
        }
        assert!(ejected, "round {round}: never ejected");
        let since = std::time::Instant::now();
        // While it is out it gets nothing.
        let before = bad_count.load(Ordering::SeqCst);
        send(&mut client, 60).await;
        assert!(ejection_state(proxy.admin, *bad).await.0, "still out");
        assert_eq!(bad_count.load(Ordering::SeqCst), before, "round {round}: traffic reached an ejected backend");
        // It comes back on its own.
        while ejection_state(proxy.admin, *bad).await.0 {
            assert!(since.elapsed() < Duration::from_secs(10), "round {round}: never returned");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        durations.push(since.elapsed());
    }
    // 2 s, then 4 s (each up to a 250 ms tick later; observed from just after the ejection).
    assert!(durations[0] >= Duration::from_millis(1500) && durations[0] < Duration::from_millis(3000), "{durations:?}");
    assert!(durations[1] >= Duration::from_millis(3500) && durations[1] < Duration::from_millis(5000), "{durations:?}");
    let (sent, failed) = send(&mut client, 0).await;
    assert!(failed * 1000 <= sent, "{failed} of {sent} failed");
    assert_eq!(metric(proxy.admin, "mesh_outlier_ejections_total").await, 2.0);
    assert_eq!(metric(proxy.admin, "mesh_outlier_ejections_active").await, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Circuit breaking from a DestinationRule's `connectionPool`, through the real binary: with
/// one connection and one pending request allowed, a slow backend's third concurrent
/// request is answered 503 at once, with `x-envoy-overloaded: true`, and not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_excess_over_the_connection_pool_gets_503_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"slow"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    let dir = config_dir("pool");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments}}
spec:
  host: payments
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1}}
      http: {{http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payments}}
spec:
  hosts: [payments]
  http:
  - route: [{{destination: {{host: payments}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
"#,
            se = service_entry("payments", backend.port())
        ),
    );
    let proxy = Proxy::start(&dir);
    let one = |delay: u64| async move {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let start = std::time::Instant::now();
        let res = tx.send_request(Request::get("/").header("host", "payments").body(Empty::<Bytes>::new()).unwrap());
        let res = res.await.unwrap();
        let overloaded = res.headers().get("x-envoy-overloaded").map(|v| v.to_str().unwrap().to_owned());
        (res.status(), overloaded, start.elapsed())
    };
    // The first takes the connection, the second waits for it, the third overflows.
    let (first, second, third) = tokio::join!(one(0), one(100), one(200));
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(second.0, StatusCode::OK);
    assert!(second.2 >= Duration::from_millis(1000), "waited for the first: {:?}", second.2);
    assert_eq!((third.0, third.1.as_deref()), (StatusCode::SERVICE_UNAVAILABLE, Some("true")));
    assert!(third.2 < Duration::from_millis(300), "at once: {:?}", third.2);
    assert_eq!(seen.load(Ordering::SeqCst), 2, "the overflow never reached the backend, nor was retried");
    let clusters = admin(proxy.admin, "/clusters").await;
    assert!(clusters.contains(r#""overflows": 1"#), "{clusters}");
    assert_eq!(metric(proxy.admin, "mesh_pool_overflow_total").await, 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `maxRequestsPerConnection: 1` turns keep-alive off towards the destination: each request
/// gets a connection of its own; without it one connection carries them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_closes_connections_after_their_share() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    let config = |per_connection: u32| {
        format!(
            r#"{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ledger}}
spec:
  host: ledger
  trafficPolicy:
    connectionPool:
      http: {{maxRequestsPerConnection: {per_connection}}}
"#,
            se = service_entry("ledger", backend.port())
        )
    };
    for (per_connection, connections) in [(1, 5), (0, 1)] {
        let dir = config_dir(&format!("per-connection-{per_connection}"));
        write_atomically(&dir, "mesh.yaml", &config(per_connection));
        let proxy = Proxy::start(&dir);
        let before = accepted.load(Ordering::SeqCst);
        let mut client = Client::connect(proxy.addr).await;
        for _ in 0..5 {
            assert_eq!(client.get("ledger", "/", &[]).await.0, StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst) - before, connections, "maxRequestsPerConnection {per_connection}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// VirtualService `fault` through the real binary: a 100 % abort answers its status without
/// reaching the backend, a 100 % delay holds the request, a fault without a percentage
/// never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_from_the_virtual_service() {
    let (backend, all, _) = flaky_backend().await;
    let dir = config_dir("faults");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - match: [{{uri: {{prefix: /abort}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ratings}}}}]
  - match: [{{uri: {{prefix: /delay}}}}]
    fault: {{delay: {{fixedDelay: 400ms, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ratings}}}}]
  - match: [{{uri: {{prefix: /never}}}}]
    fault: {{abort: {{httpStatus: 500}}}}
    route: [{{destination: {{host: ratings}}}}]
"#,
            se = service_entry("ratings", backend.port())
        ),
    );
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..5 {
        assert_eq!(client.get("ratings", "/abort", &[]).await, (StatusCode::IM_A_TEAPOT, "fault filter abort".into()));
    }
    assert_eq!(all.load(Ordering::SeqCst), 0, "aborted requests never reach the backend");
    let start = std::time::Instant::now();
    let _ = client.get("ratings", "/delay", &[]).await;
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    assert_eq!(all.load(Ordering::SeqCst), 1);
    for _ in 0..5 {
        assert_ne!(client.get("ratings", "/never", &[]).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The document of `kind` in a seed file, as written there.
fn seed_document(file: &str, kind: &str) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/seeds").join(file)).unwrap();
    text.split("\n---")
        .find(|doc| doc.lines().any(|l| l.trim() == format!("kind: {kind}")))
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
        .trim_start_matches('\n')
        .to_owned()
}

/// Local rate limits from EnvoyFilters through the real binary: the seed's gateway bucket
/// (100 a minute) admits its burst then answers 429 with `Retry-After`; a limit of 50 a
/// minute per `x-user-id` limits two users independently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_filter_rate_limits_total_and_per_user() {
    let backend = backend("app").await;
    let service = |port: u16| service_entry("api", port);
    // The seed's EnvoyFilter, for a proxy running as the ingress gateway it selects.
    let dir = config_dir("ratelimit-seed");
    let gateway = "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {name: gateway}\nspec:\n  workload: {name: gateway, labels: {app: istio-ingressgateway}}\n";
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            "{}---\n{gateway}---\n{}",
            service(backend.port()),
            seed_document("000_72edd42856911899.yaml", "EnvoyFilter")
        ),
    );
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    for i in 0..100 {
        assert_eq!(client.get("api", "/", &[]).await.0, StatusCode::OK, "request {i} of the burst");
    }
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let res =
        tx.send_request(Request::get("/").header("host", "api").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(res.headers().contains_key("ratelimit-policy"));
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "local_rate_limited");
    // The connection stays open.
    tx.ready().await.unwrap();
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);

    // Per user: 50 a minute each.
    let dir = config_dir("ratelimit-user");
    let per_user = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: per-user}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match: {context: SIDECAR_INBOUND}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          stat_prefix: per_user
          token_bucket: {max_tokens: 10000, tokens_per_fill: 10000, fill_interval: 60s}
          filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
          filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
          rate_limits:
          - actions: [{request_headers: {header_name: x-user-id, descriptor_key: user}}]
          descriptors:
          - entries: [{key: user}]
            token_bucket: {max_tokens: 50, tokens_per_fill: 50, fill_interval: 60s}
"#;
    write_atomically(&dir, "mesh.yaml", &format!("{}{per_user}", service(backend.port())));
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    for user in ["alice", "bob"] {
        let mut ok = 0;
        for _ in 0..60 {
            ok += usize::from(client.get("api", "/", &[("x-user-id", user)]).await.0 == StatusCode::OK);
        }
        assert_eq!(ok, 50, "{user}");
    }
    // Requests without the header only take from the total.
    assert_eq!(client.get("api", "/", &[]).await.0, StatusCode::OK);
    let stats = admin(proxy.admin, "/stats").await;
    assert!(stats.contains("http_local_rate_limit.enforced 20\n"), "{stats}");
    assert_eq!(metric(proxy.admin, "mesh_rate_limited_total").await, 20.0);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);

    // Linkerd's policy: a total of 2 a second (a burst of 2, then a token every 500 ms).
    let dir = config_dir("ratelimit-linkerd");
    let linkerd = "apiVersion: policy.linkerd.io/v1alpha1\nkind: HTTPLocalRateLimitPolicy\nmetadata: {name: api}\nspec:\n  targetRef: {group: policy.linkerd.io, kind: Server, name: api}\n  total: {requestsPerSecond: 2}\n";
    write_atomically(&dir, "mesh.yaml", &format!("{}{linkerd}", service(backend.port())));
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(client.get("api", "/", &[]).await.0.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An h2c backend that takes one stream at a time per connection (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS` is 1), counting connections. It answers its first
/// request at once, and holds every later one until three are in flight together (10 s at
/// most), so that concurrent requests overlap however slowly they arrive.
async fn one_stream_h2_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    let together = Arc::new(tokio::sync::Barrier::new(3));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (requests, together) = (requests.clone(), together.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (requests, together) = (requests.clone(), together.clone());
                    async move {
                        if requests.fetch_add(1, Ordering::SeqCst) > 0 {
                            let _ = tokio::time::timeout(Duration::from_secs(10), together.wait()).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"h2"))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(1)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, connections)
}

/// HTTP/2 to a destination (`h2UpgradePolicy: UPGRADE`) whose peer allows one stream per
/// connection: concurrent requests get connections of their own instead of queueing on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_h2_connection_opens_when_the_first_is_at_the_peers_stream_limit() {
    let (backend, connections) = one_stream_h2_backend().await;
    let dir = config_dir("h2-streams");
    write_atomically(
        &dir,
        "mesh.yaml",
        &format!(
            r#"{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: grpc}}
spec:
  host: grpc
  trafficPolicy:
    connectionPool:
      http: {{h2UpgradePolicy: UPGRADE}}
"#,
            se = service_entry("grpc", backend.port())
        ),
    );
    let proxy = Proxy::start(&dir);
    // One request first, so the connection and the peer's SETTINGS are there.
    assert_eq!(Client::connect(proxy.addr).await.get("grpc", "/", &[]).await.0, StatusCode::OK);
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    let one = || async {
        let mut client = Client::connect(proxy.addr).await;
        client.get("grpc", "/", &[]).await.0
    };
    let (a, b, c) = tokio::join!(one(), one(), one());
    assert_eq!([a, b, c], [StatusCode::OK; 3]);
    assert_eq!(connections.load(Ordering::SeqCst), 3, "two more connections for the streams that did not fit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// h2c streams cancelled while the TLS connection to their endpoint is still opening: the
/// connects are not thrown away and restarted per request. An endpoint that accepts TCP and
/// never answers the TLS handshake gets at most the proxy's bound of dials in flight (4),
/// however many requests were cancelled meanwhile; before, each request that came to the
/// front of the queue started a connect of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cancelled_while_their_tls_connection_opens_share_a_bounded_number_of_connects() {
    let dir = config_dir("h2-cold-connect");
    let certs = dir.join("certs");
    openssl_certs(&certs);
    // Accepts, counts, and holds each connection without a word for 5 s.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(stream);
            });
        }
    });
    let rule = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: slow}}\nspec:\n  host: slow\n  trafficPolicy:\n    tls: {{mode: SIMPLE, caCertificates: {}, sni: localhost}}\n    connectionPool:\n      tcp: {{connectTimeout: 3s}}\n      http: {{h2UpgradePolicy: UPGRADE}}\n",
        certs.join("ca.pem").display()
    );
    write_atomically(&dir, "mesh.yaml", &format!("{}{rule}", service_entry("slow", port)));
    let proxy = Proxy::start(&dir);

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut cancelled = 0;
    // 8 batches of 10 (below the premature-reset budget), each cancelled after 30 ms.
    for _ in 0..8 {
        let mut batch = Vec::new();
        for _ in 0..10 {
            let mut ready = client.clone().ready().await.unwrap();
            let (response, _) = ready.send_request(Request::get("http://slow/").body(()).unwrap(), true).unwrap();
            batch.push(response);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        cancelled += batch.len();
        drop(batch);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connects = accepted.load(Ordering::SeqCst);
    eprintln!("{cancelled} cancelled requests made {connects} connects");
    assert!((1..=4).contains(&connects), "{connects} connects for {cancelled} cancelled requests");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One HTTP/1.1 exchange on a new connection, raw: the status line and the body.
async fn raw(addr: SocketAddr, method: &str, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("{method} {target} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await.unwrap().unwrap();
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim_end().to_owned()).unwrap_or_default();
    format!("{status} | {body}")
}

/// Operations: `/logging` shows and switches the log filter at run time (a bad filter is
/// refused, the old one kept), and `--check` prints the effective settings and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_switches_at_run_time_and_check_prints_the_settings() {
    use tokio::io::AsyncWriteExt;
    let backend = backend("reviews").await;
    let dir = config_dir("operations");
    write_atomically(&dir, "mesh.yaml", &service_entry("reviews", backend.port()));
    let log_path = dir.with_extension("log");
    let proxy = Proxy::start_logging(&dir, std::fs::File::create(&log_path).unwrap().into());

    assert_eq!(raw(proxy.admin, "GET", "/logging").await, "HTTP/1.1 200 OK | log filter: warn");
    // A debug event before the switch is not logged; after it, it is.
    let half_preface = |addr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nS").await.unwrap();
        s.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    half_preface(proxy.addr).await;
    assert!(!std::fs::read_to_string(&log_path).unwrap().contains("h2c handshake failed"));
    assert_eq!(
        raw(proxy.admin, "POST", "/logging?level=mesh_proxy%3Ddebug").await,
        "HTTP/1.1 200 OK | log filter: mesh_proxy=debug"
    );
    half_preface(proxy.addr).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("h2c handshake failed"), "{log}");
    let refused = raw(proxy.admin, "POST", "/logging?level=mesh_proxy%3D%5B").await;
    assert!(refused.starts_with("HTTP/1.1 400 Bad Request | log filter refused:"), "{refused}");
    assert_eq!(raw(proxy.admin, "GET", "/logging").await, "HTTP/1.1 200 OK | log filter: mesh_proxy=debug");
    assert!(raw(proxy.admin, "POST", "/stats").await.starts_with("HTTP/1.1 405"));
    drop(proxy);

    // --check: the settings, exit 0; a configuration that does not compile, exit 1.
    let check = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["--check", "--admin", "off", "--config"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = check(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("configuration check: ok")
            && text.contains("destinations     1")
            && text.contains("admin            off"),
        "{text}"
    );
    write_atomically(
        &dir,
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {hosts: 5}\n",
    );
    let out = check(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.yaml"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log_path);
}

/// Debugging a 503 from the access log and `/clusters` (issue 20's scenario): `payments` has
/// one endpoint, and it is down. The first request fails to connect three times (Istio's
/// default retries): 503, and its log line says `UF,URX` (connect failure, retries
/// exhausted). Those three failures eject the endpoint; the next request finds no healthy
/// one: 503 `UH`, and `/clusters` shows it ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_explained_by_the_access_log_and_the_clusters_page() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = config_dir("debug-503");
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payments}\nspec:\n  host: payments\n  trafficPolicy:\n    outlierDetection: {consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}\n";
    write_atomically(&dir, "mesh.yaml", &format!("{}{rule}", service_entry("payments", dead)));
    let log_path = dir.with_extension("access.log");
    let proxy = Proxy::start_with(&dir, std::process::Stdio::inherit(), &["--access-log", log_path.to_str().unwrap()]);
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.get("payments", "/charge", &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(client.get("payments", "/charge", &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);

    // The log lines (the writer gathers them every few milliseconds).
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log_path).unwrap_or_default().lines().map(str::to_owned).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parsed: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed.len(), 2, "{lines:?}");
    assert_eq!(parsed[0]["response_code"], 503);
    assert_eq!(parsed[0]["response_flags"], "UF,URX", "{}", lines[0]);
    // The endpoint that refused the connection, though it never answered.
    assert_eq!(parsed[0]["upstream_host"], format!("127.0.0.1:{dead}"), "{}", lines[0]);
    assert_eq!(parsed[0]["path"], "/charge");
    assert_eq!(parsed[1]["response_flags"], "UH", "{}", lines[1]);
    // The clusters page says the endpoint is out.
    assert!(ejection_state(proxy.admin, SocketAddr::from(([127, 0, 0, 1], dead))).await.0);
    let clusters = admin(proxy.admin, "/clusters").await;
    assert!(clusters.contains("\"health\": \"ejected\""), "{clusters}");
    // A line still queued at SIGTERM is written before the process exits.
    assert_eq!(client.get("payments", "/refund", &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let mut proxy = proxy;
    let pid = proxy.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    drop(client);
    assert!(tokio::task::spawn_blocking(move || proxy.child.wait()).await.unwrap().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().nth(2).is_some_and(|l| l.contains("\"path\":\"/refund\"")), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log_path);
}

/// Issue 20's flaky payment service: `payments` has a healthy endpoint and a broken one
/// (every answer 503); the route injects 503 aborts into 10 % of requests and retries 5xx;
/// outlier detection ejects after two consecutive 5xx. Clients see only the injected faults
/// (not retried: they never reach an endpoint); the broken endpoint is tried twice, each
/// retried elsewhere, then ejected and sent nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_payment_service_with_faults_retries_and_ejection() {
    let good = backend("payments").await;
    // Broken for good: every answer 503.
    let (broken, failing, broken_seen) = switchable_backend().await;
    failing.store(true, Ordering::SeqCst);
    let dir = config_dir("flaky-payments");
    let config = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments}}
spec:
  hosts: [payments]
  ports: [{{number: 80, name: http}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {good}}}}}
  - {{address: 127.0.0.1, ports: {{http: {broken}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments}}
spec:
  host: payments
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payments}}
spec:
  hosts: [payments]
  http:
  - fault: {{abort: {{httpStatus: 503, percentage: {{value: 10}}}}}}
    retries: {{attempts: 3, retryOn: 5xx}}
    route: [{{destination: {{host: payments}}}}]
"#,
        good = good.port(),
        broken = broken.port()
    );
    write_atomically(&dir, "mesh.yaml", &config);
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    let (mut ok, mut injected) = (0, 0);
    for _ in 0..1000 {
        match client.get("payments", "/charge", &[]).await {
            (StatusCode::OK, body) if body == "payments /charge" => ok += 1,
            (StatusCode::SERVICE_UNAVAILABLE, body) if body == "fault filter abort" => injected += 1,
            other => panic!("{other:?}"),
        }
    }
    // 10 % of 1,000: expected 100, sd 9.5; 5 sd either side.
    assert!((53..=147).contains(&injected), "{injected} injected");
    assert_eq!(ok + injected, 1000);
    assert_eq!(broken_seen.load(Ordering::SeqCst), 2, "tried twice, then ejected");
    assert!(ejection_state(proxy.admin, broken).await.0);
    assert_eq!(metric(proxy.admin, "mesh_outlier_ejections_total").await, 1.0);
    assert_eq!(metric(proxy.admin, "mesh_retries_total").await, 2.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 20's A/B and blue-green scenarios: the user `jason` (by cookie, as Istio's docs
/// match it: a regex on the `cookie` header) and testers (by header) get v2, everyone else
/// v1; then a blue-green flip sends everyone to v2 at once, and back, each taking effect on
/// the next request after the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_routing_by_cookie_and_header_and_a_blue_green_flip() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let dir = config_dir("ab-blue-green");
    write_atomically(&dir, "services.yaml", &services(v1, v2));
    let ab = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {cookie: {regex: "^(.*?;\\s*)?(user=jason)(;.*)?$"}}
    - headers: {x-tester: {exact: "yes"}}
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    let all_to = |subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews, subset: {subset}}}}}]\n"
        )
    };
    write_atomically(&dir, "routes.yaml", ab);
    let proxy = Proxy::start(&dir);
    let mut client = Client::connect(proxy.addr).await;
    let who = |body: String| body.split(' ').next().unwrap_or_default().to_owned();
    for (headers, expected) in [
        (vec![("cookie", "theme=dark; user=jason")], "v2"),
        (vec![("cookie", "user=jason")], "v2"),
        (vec![("cookie", "user=jasonx; theme=dark")], "v1"),
        (vec![("cookie", "theme=dark; user=alice")], "v1"),
        (vec![("x-tester", "yes")], "v2"),
        (vec![], "v1"),
    ] {
        let (status, body) = client.get("reviews", "/reviews/1", &headers).await;
        assert_eq!((status, who(body).as_str()), (StatusCode::OK, expected), "{headers:?}");
    }
    // Blue-green: everyone to green (v2), then back to blue (v1).
    for (round, subset) in [(1, "v2"), (2, "v1")] {
        write_atomically(&dir, "routes.yaml", &all_to(subset));
        wait_for_stat(proxy.admin, "config_reloads", round).await;
        for headers in [vec![], vec![("cookie", "user=jason")]] {
            let (status, body) = client.get("reviews", "/reviews/1", &headers).await;
            assert_eq!((status, who(body).as_str()), (StatusCode::OK, subset), "round {round}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests their clients cancel before an answer leave `mesh_requests_in_flight` as they
/// found it (the gauge counts them down when they are abandoned, not only when answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_leave_the_in_flight_gauge() {
    let slow = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("late"))))
                    });
                    // HTTP/1.1 and h2c: the proxy speaks to it as the client spoke.
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    };
    let dir = config_dir("in-flight");
    write_atomically(&dir, "mesh.yaml", &service_entry("slow", slow.port()));
    let proxy = Proxy::start(&dir);
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut pending = Vec::new();
    for _ in 0..5 {
        let mut ready = client.clone().ready().await.unwrap();
        pending.push(ready.send_request(Request::get("http://slow/").body(()).unwrap(), true).unwrap().0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = admin(proxy.admin, "/metrics").await;
    assert_eq!(metric(proxy.admin, "mesh_requests_in_flight").await, 5.0, "{page}");
    drop(pending);
    let mut now = f64::NAN;
    for _ in 0..50 {
        now = metric(proxy.admin, "mesh_requests_in_flight").await;
        if now == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(now, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mesh-proxy demo` runs its small mesh and reports what each feature did: every canary
/// request answered (the broken endpoint's 503s retried, then ejected), the testers' route,
/// injected faults and rate-limited requests.
#[test]
fn the_demo_runs_its_mesh_and_reports() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy")).args(["demo", "--requests", "300"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let section =
        |n: &str| text.split(&format!("\n{n}. ")).nth(1).and_then(|s| s.split("\n\n").next()).unwrap_or("").to_owned();
    let canary = section("1");
    assert!(canary.contains("200 reviews-v1") && !canary.contains(" 503 ") && !canary.contains("(broken)"), "{canary}");
    assert!(section("2").contains("20  100.0 %  200 reviews-v2"), "{text}");
    assert!(section("3").contains("503 fault filter abort"), "{text}");
    assert!(section("4").contains("429 local_rate_limited"), "{text}");
    assert!(text.contains("mesh_outlier_ejections_total     1"), "{text}");
    assert!(text.contains("mesh_retries_total               2"), "{text}");
}
