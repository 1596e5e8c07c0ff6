//! The README's quick start: an axum service with request ids and trace context, Istio's
//! request metrics on `/metrics`, and Istio-style retries around its handler, from the
//! `mesh` facade.
//!
//! ```text
//! cargo run -p mesh-examples --example quickstart
//! curl -i http://127.0.0.1:3000/orders        # x-request-id and traceparent in the logs
//! curl http://127.0.0.1:3000/metrics          # istio_requests_total{...}
//! ```
//!
//! With `QUICKSTART_SELFTEST=1` it serves on a free port, sends itself requests over TCP,
//! prints what it saw, checks it and exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::{Router, body::Body, http::Request, routing::get};
use mesh::prelude::*;
use tower::ServiceBuilder;

/// The service: `/orders` (which fails every third call, and is retried), and `/metrics`.
fn app() -> Result<Router, Box<dyn std::error::Error>> {
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let calls = Arc::new(AtomicUsize::new(0));
    let orders = move || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n % 3 == 2 {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy\n")
            } else {
                (axum::http::StatusCode::OK, "orders\n")
            }
        }
    };
    Ok(Router::new()
        .route("/orders", get(orders))
        .layer(
            ServiceBuilder::new()
                .mesh_trace()
                .mesh_metrics(metrics, Peers::destination("orders", "shop"))
                .mesh_retry(mesh::yaml::retry_policy("{attempts: 2, retryOn: 5xx}")?)
                .map_request(|req: Request<ReplayBody<Body>>| req.map(Body::new)),
        )
        .route_service("/metrics", MetricsService::new(Arc::new(Mutex::new(registry)))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var("QUICKSTART_SELFTEST").is_ok_and(|v| v == "1") {
        return self_test(app()?).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("quickstart on http://127.0.0.1:3000/orders (metrics on /metrics)");
    axum::serve(listener, app()?).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
    Ok(())
}

/// Serves `app` on a free port, sends it 9 requests and a scrape over TCP, and checks that
/// every request succeeded (the failures were retried) and the metrics counted them.
async fn self_test(app: Router) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let mut ok = 0;
    for _ in 0..9 {
        let answer = get("/orders").await?;
        ok += usize::from(answer.starts_with("HTTP/1.1 200"));
    }
    let metrics = get("/metrics").await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_default();
    println!("{ok} of 9 requests answered 200 (the handler's 503s were retried)");
    println!("{line}");
    assert_eq!(ok, 9);
    assert!(line.contains("destination_workload=\"orders\"") && line.ends_with(" 9"), "{metrics}");
    println!("quickstart self-test passed");
    Ok(())
}
