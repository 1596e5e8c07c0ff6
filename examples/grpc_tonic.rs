//! A tonic gRPC service and client with the mesh layers. The service is an OTLP trace
//! collector (its gRPC code ships with `opentelemetry-proto`, so there is no codegen here)
//! that answers every other call `UNAVAILABLE`, with Istio's metrics reported by the server
//! side; the client retries on `unavailable` (an Istio `retryOn` condition for gRPC) and
//! reports its own metrics, gRPC statuses included.
//!
//! It serves on a free port on 127.0.0.1, makes 6 calls, prints what happened and checks it:
//!
//! ```text
//! cargo run -p mesh-examples --example grpc_tonic
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh::prelude::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fails every other call with `UNAVAILABLE`.
#[derive(Default)]
struct Collector {
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        _: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.calls.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            return Err(tonic::Status::unavailable("warming up"));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The server: the collector behind Istio's server-side metrics.
    let mut server_registry = Registry::default();
    let server_metrics = IstioMetrics::register(&mut server_registry);
    let collector = Collector::default();
    let calls = collector.calls.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(MetricsLayer::new(server_metrics, Peers::destination("collector", "observability")))
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // The client: retries on `unavailable`, metrics as the caller (reporter source).
    let mut client_registry = Registry::default();
    let client_metrics = IstioMetrics::register(&mut client_registry);
    let mut caller = Peers::unknown(Reporter::Source);
    caller.destination_service = "collector.observability.svc.cluster.local".into();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let stack = ServiceBuilder::new()
        .mesh_metrics(client_metrics, caller)
        .mesh_retry(mesh::yaml::retry_policy("{attempts: 2, retryOn: unavailable}")?)
        .map_request(|req: http::Request<ReplayBody<tonic::body::Body>>| req.map(tonic::body::Body::new))
        .map_err(BoxError::from)
        .service(channel);
    let mut client = TraceServiceClient::new(stack);

    let mut ok = 0;
    for i in 0..6 {
        let answer = client.export(ExportTraceServiceRequest { resource_spans: Vec::new() }).await;
        println!("call {i}: {}", if answer.is_ok() { "OK".to_owned() } else { format!("{answer:?}") });
        ok += usize::from(answer.is_ok());
    }
    let served = calls.load(Ordering::SeqCst);
    println!("{ok} of 6 calls succeeded; the server saw {served} (each UNAVAILABLE retried)");

    let line = |registry: &Registry, status: &str| -> Option<String> {
        let text = mesh::telemetry::metrics::encode(registry);
        text.lines()
            .find(|l| {
                l.starts_with("istio_requests_total{") && l.contains(&format!("grpc_response_status=\"{status}\""))
            })
            .map(|l| {
                let reporter = l.split("reporter=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
                format!("reporter={reporter} grpc_response_status={status} {}", l.rsplit(' ').next().unwrap_or("?"))
            })
    };
    let client_ok = line(&client_registry, "0");
    let (server_ok, server_unavailable) = (line(&server_registry, "0"), line(&server_registry, "14"));
    for l in [&client_ok, &server_ok, &server_unavailable].into_iter().flatten() {
        println!("istio_requests_total {l}");
    }
    assert_eq!((ok, served), (6, 12));
    assert_eq!(client_ok.as_deref(), Some("reporter=source grpc_response_status=0 6"));
    assert_eq!(server_ok.as_deref(), Some("reporter=destination grpc_response_status=0 6"));
    assert_eq!(server_unavailable.as_deref(), Some("reporter=destination grpc_response_status=14 6"));
    println!("grpc example checks passed");
    Ok(())
}
