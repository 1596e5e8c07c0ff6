//! Traces across two mesh-proxy sidecars, exported as OTLP/gRPC to a receiver built from the
//! OpenTelemetry protos: caller → sidecar A (server span; a client span per try, the route
//! retrying a 503) → sidecar B's inbound listener (a server span per try, whose parent is A's
//! try) → app B, which sees B's span as its parent. One trace id throughout.

#[path = "../../mesh-telemetry/tests/support/otlp.rs"]
mod otlp;
mod support;

use std::net::SocketAddr;

use http::StatusCode;
use support::*;

fn mesh_proxy(name: &str, otlp: SocketAddr, extra: &str) -> String {
    format!(
        "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {{name: {name}}}\nspec:\n  workload: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}\n  tracing:\n    otlp: {{endpoint: \"http://{otlp}\", protocol: grpc}}\n{extra}---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_two_sidecars_with_a_span_per_try() {
    let (otlp, received) = otlp::grpc_receiver().await;
    let (app_b, app_saw) = otlp::flaky_backend().await;
    let dir = config_dir("tracing-two-sidecars");
    let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(
        b_dir.join("b.yaml"),
        format!(
            "{}{}",
            mesh_proxy("reviews", otlp, &format!("  inbound: {{listen: \"127.0.0.1:0\", app: \"{app_b}\"}}\n")),
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: tags, namespace: shop}\nspec:\n  tracing:\n  - customTags:\n      zone: {literal: {value: eu-1}}\n      user: {header: {name: x-user, defaultValue: anonymous}}\n"
        ),
    )
    .unwrap();
    let b = Proxy::start(&b_dir);
    let b_inbound = b.inbound.unwrap();
    let routes = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, retryOn: 5xx}\n";
    std::fs::write(
        a_dir.join("a.yaml"),
        format!("{}{}{routes}", mesh_proxy("productpage", otlp, ""), service_entry("reviews", b_inbound.port())),
    )
    .unwrap();
    let a = Proxy::start(&a_dir);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller}-01");
    let (status, body) = Client::connect(a.addr)
        .await
        .get("reviews", "/ratings", &[("traceparent", traceparent.as_str()), ("x-user", "jason")])
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ratings"));

    // A: the server span and two tries; B: a server span per try. Batches go out every 5 s;
    // SIGTERM drains each proxy and flushes its spans before it exits.
    for mut proxy in [a, b] {
        let pid = proxy.child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let exit = tokio::task::spawn_blocking(move || proxy.child.wait().map(|s| s.success())).await.unwrap();
        assert!(exit.unwrap(), "a clean exit");
    }
    let spans = received.spans();
    assert_eq!(spans.len(), 5, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace), "{spans:#?}");
    let of = |service: &str, kind: i32| -> Vec<&otlp::ReceivedSpan> {
        spans.iter().filter(|s| s.service == service && s.kind == kind).collect()
    };
    let a_server = of("productpage.shop", 2);
    assert_eq!(a_server.len(), 1);
    assert_eq!(a_server[0].parent_span_id, caller);
    assert_eq!(a_server[0].attribute("http.response.status_code"), Some("200"));
    let mut tries = of("productpage.shop", 3);
    tries.sort_by_key(|s| s.attribute("http.request.resend_count").map(str::to_owned));
    assert_eq!(tries.len(), 2);
    assert!(tries.iter().all(|t| t.parent_span_id == a_server[0].span_id));
    assert_eq!(tries[0].attribute("http.response.status_code"), Some("503"));
    assert_eq!(tries[1].attribute("http.request.resend_count"), Some("1"));
    assert_eq!(tries[1].attribute("http.response.status_code"), Some("200"));
    assert_eq!(tries[1].attribute("upstream.address"), Some(format!("127.0.0.1:{}", b_inbound.port()).as_str()));
    // B's server spans: each a child of the try that reached it.
    let b_server = of("reviews.shop", 2);
    assert_eq!(b_server.len(), 2);
    for t in &tries {
        let served = b_server.iter().find(|s| s.parent_span_id == t.span_id).expect("B's span of this try");
        assert_eq!(served.attribute("http.response.status_code"), t.attribute("http.response.status_code"));
        // B's Telemetry customTags: a literal and a request header.
        assert_eq!((served.attribute("zone"), served.attribute("user")), (Some("eu-1"), Some("jason")));
    }
    // App B's parent is B's server span (no client span on the inbound side).
    let mut expected: Vec<String> = b_server.iter().map(|s| format!("00-{trace}-{}-01", s.span_id)).collect();
    let mut saw = app_saw.lock().unwrap().clone();
    expected.sort();
    saw.sort();
    assert_eq!(saw, expected);
}

/// A collector address that is not a URL stops the start with the file and the field named.
#[test]
fn a_bad_collector_endpoint_is_refused_with_its_field() {
    let dir = config_dir("tracing-bad-endpoint");
    let text = "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {name: a}\nspec:\n  tracing:\n    otlp: {endpoint: \"collector:4317\"}\n";
    std::fs::write(dir.join("a.yaml"), text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--config"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.yaml: error: MeshProxy: spec.tracing.otlp.endpoint: `collector:4317` is not a URL"),
        "{err}"
    );
}

/// `propagators: [b3]` without a collector: a new trace is written in Zipkin's headers only,
/// and nothing is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_only_propagation_without_a_collector() {
    let backend =
        app(|req| format!("b3={} w3c={}", header(req, "x-b3-traceid").len(), header(req, "traceparent"))).await;
    let dir = config_dir("tracing-b3");
    let text = format!(
        "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {{name: a}}\nspec:\n  tracing: {{propagators: [b3]}}\n---\n{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: api}}\nspec:\n  hosts: [api]\n  http:\n  - route: [{{destination: {{host: api}}}}]\n",
        service_entry("api", backend.port())
    );
    std::fs::write(dir.join("a.yaml"), text).unwrap();
    let proxy = Proxy::start(&dir);
    let (status, body) = Client::connect(proxy.addr).await.get("api", "/", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "b3=32 w3c="));
    // A caller's W3C context is not read (only B3 is configured): a new trace, in B3.
    let (_, body) = Client::connect(proxy.addr)
        .await
        .get("api", "/", &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])
        .await;
    assert!(body.starts_with("b3=32 w3c=00-4bf92f"), "the caller's header passes untouched: {body}");
}

/// Issue 20's three-hop trace: frontend's sidecar → product's sidecar (inbound) → the product
/// application, which calls reviews through its sidecar's outbound listener, forwarding the
/// trace headers as Istio asks applications to → reviews' sidecar (inbound) → reviews. Six
/// spans, one trace, each hop's parent the span before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_three_services_with_every_parent_linked() {
    use std::sync::{Arc, OnceLock};
    let (otlp, received) = otlp::grpc_receiver().await;
    let reviews = backend("reviews").await;
    // The product application: answers with what reviews answered, calling it through its
    // sidecar's outbound listener (set once that sidecar has started).
    let outbound: Arc<OnceLock<std::net::SocketAddr>> = Arc::default();
    let product = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outbound = outbound.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let outbound = outbound.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let sidecar = *outbound.get().expect("the sidecar is up");
                        let forward = ["traceparent", "tracestate", "x-request-id"]
                            .map(|h| (h, req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()));
                        async move {
                            let headers: Vec<(&str, &str)> =
                                forward.iter().filter(|(_, v)| !v.is_empty()).map(|(h, v)| (*h, v.as_str())).collect();
                            let (_, body) = Client::connect(sidecar).await.get("reviews", "/reviews/1", &headers).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(format!("product <- {body}")),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    };
    let dir = config_dir("tracing-three-hops");
    let start = |name: &str, text: String| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("mesh.yaml"), text).unwrap();
        Proxy::start(&d)
    };
    let inbound = |app: std::net::SocketAddr| format!("  inbound: {{listen: \"127.0.0.1:0\", app: \"{app}\"}}\n");
    let r = start("reviews", mesh_proxy("reviews", otlp, &inbound(reviews)));
    let p = start(
        "product",
        format!(
            "{}{}",
            mesh_proxy("product", otlp, &inbound(product)),
            service_entry("reviews", r.inbound.unwrap().port())
        ),
    );
    outbound.set(p.addr).unwrap();
    let f = start(
        "frontend",
        format!("{}{}", mesh_proxy("frontend", otlp, ""), service_entry("product", p.inbound.unwrap().port())),
    );

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let traceparent = format!("00-{trace}-{caller}-01");
    let (status, body) =
        Client::connect(f.addr).await.get("product", "/products/1", &[("traceparent", traceparent.as_str())]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "product <- reviews /reviews/1"));
    for mut proxy in [f, p, r] {
        let pid = proxy.child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        tokio::task::spawn_blocking(move || proxy.child.wait()).await.unwrap().unwrap();
    }
    let spans = received.spans();
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace));
    let one = |service: &str, kind: i32, parent: &str| -> String {
        let found: Vec<_> =
            spans.iter().filter(|s| s.service == service && s.kind == kind && s.parent_span_id == parent).collect();
        assert_eq!(found.len(), 1, "{service} kind {kind} under {parent}: {spans:#?}");
        found[0].span_id.clone()
    };
    // frontend: server, then its try; product: inbound server, then (the application's call)
    // outbound server and its try; reviews: inbound server.
    let f_server = one("frontend.shop", 2, caller);
    let f_client = one("frontend.shop", 3, &f_server);
    let p_inbound = one("product.shop", 2, &f_client);
    let p_outbound = one("product.shop", 2, &p_inbound);
    let p_client = one("product.shop", 3, &p_outbound);
    one("reviews.shop", 2, &p_client);
}
