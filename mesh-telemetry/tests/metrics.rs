//! The metrics and trace layers in an axum service over a real socket; the exposition checked
//! by `promtool check metrics` when it is installed (CI installs Debian's prometheus).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_core::random::Random;
use mesh_telemetry::Registry;
use mesh_telemetry::metrics::{IstioMetrics, MetricsLayer, MetricsService, Peers, Reporter};
use mesh_telemetry::trace::TraceLayer;

async fn get_once(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "reviews");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tx.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let status = res.status();
    (status, String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap())
}

#[tokio::test]
async fn istio_metrics_and_trace_context_in_an_axum_service() {
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let mut peers = Peers::unknown(Reporter::Destination);
    peers.destination_workload = "reviews-v1".into();
    peers.destination_service = "reviews.default.svc.cluster.local".into();
    peers.connection_security_policy = "none".into();
    let scrape = registry.clone();
    let app = Router::new()
        .route(
            "/echo",
            get(|req: Request<axum::body::Body>| async move {
                let h = req.headers();
                let show = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                format!("{} {}", show("x-request-id"), show("traceparent"))
            }),
        )
        .route("/missing", get(|| async { (StatusCode::NOT_FOUND, "no\n") }))
        .layer(MetricsLayer::new(metrics, peers))
        .layer(TraceLayer::new().random(Random::seeded(7)))
        .route_service("/metrics", MetricsService::new(scrape));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // A caller's trace is continued with a new span; a request id is made when absent.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, body) = get_once(addr, "/echo", &[("traceparent", tp)]).await;
    let (id, traceparent) = body.split_once(' ').unwrap();
    assert_eq!(id.len(), 36);
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && traceparent.ends_with("-01"),
        "{traceparent}"
    );
    assert!(!traceparent.contains("00f067aa0ba902b7"));
    let (_, body) = get_once(addr, "/echo", &[("x-request-id", "given")]).await;
    assert!(body.starts_with("given 00-"), "{body}");
    assert_eq!(get_once(addr, "/missing", &[]).await.0, StatusCode::NOT_FOUND);

    let (_, text) = get_once(addr, "/metrics", &[]).await;
    let ok = "istio_requests_total{reporter=\"destination\",source_workload=\"unknown\"";
    assert!(text.contains(ok), "{text}");
    assert!(text.contains("destination_workload=\"reviews-v1\""), "{text}");
    assert!(text.contains("response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"none\"} 2"), "{text}");
    assert!(text.contains("response_code=\"404\""), "{text}");
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"), "{text}");
    assert!(text.contains("le=\"3.6e+06\""), "{text}");
    assert!(text.contains("istio_response_bytes_sum{"), "{text}");

    // promtool, when installed, accepts the exposition.
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(std::env::var_os("MESH_REQUIRE_PROMTOOL").is_none(), "promtool is required but missing");
        eprintln!("SKIPPED: promtool not installed");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The exposition parses; the only lint is about Istio's own metric name (its unit is
    // milliseconds, which Prometheus' conventions frown on and Istio's dashboards need).
    let lints: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        out.status.success()
            || (out.status.code() == Some(3)
                && lints.iter().all(|l| l.contains("istio_request_duration_milliseconds use base unit"))),
        "promtool ({:?}): {report}",
        out.status.code()
    );
}
