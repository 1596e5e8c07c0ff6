//! Spans end to end on 127.0.0.1: an axum service with `TraceLayer` (a server span per
//! request) calls a backend through mesh-resilience's retries and `ClientSpanLayer` (a
//! client span per attempt), exporting OTLP over gRPC and HTTP to receivers built from the
//! OpenTelemetry protos; the backend's `traceparent` names the attempt that reached it.

mod support {
    pub mod otlp;
}

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Extension, State};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_resilience::retry::{ReplayBody, RetryLayer, RetryPolicy};
use mesh_telemetry::propagation::TraceContext;
use mesh_telemetry::span::{ClientSpanLayer, OtlpExport, Tracer};
use mesh_telemetry::trace::TraceLayer;
use support::otlp::{ReceivedSpan, flaky_backend};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceBuilder, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Client = tower::util::BoxCloneSyncService<
    Request<Empty<Bytes>>,
    Response<mesh_telemetry::span::SpanBody<hyper::body::Incoming>>,
    BoxError,
>;

/// One HTTP/1.1 connection per request (enough for a test client).
async fn send(
    addr: SocketAddr,
    req: Request<ReplayBody<Empty<Bytes>>>,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// The service under test: axum with a server span per request, whose handler calls the
/// backend with up to two retries, a client span per attempt.
async fn service(tracer: Tracer, backend: SocketAddr) -> SocketAddr {
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(
            RetryPolicy::new(2, "5xx".parse().unwrap())
                .with_backoff(Duration::from_millis(1), Duration::from_millis(2)),
        ))
        .layer(ClientSpanLayer::new(tracer.clone()))
        .service(tower::service_fn(move |req| send(backend, req)));
    let app = axum::Router::new()
        .route(
            "/checkout",
            axum::routing::get(
                move |State(client): State<Client>, Extension(parent): Extension<TraceContext>| async move {
                    let mut req = Request::get(format!("http://{backend}/pay")).body(Empty::<Bytes>::new()).unwrap();
                    // The embedding service passes its request's context on to the calls it makes.
                    req.extensions_mut().insert(parent);
                    let res = client.oneshot(req).await.unwrap();
                    let status = res.status();
                    res.into_body().collect().await.unwrap();
                    status
                },
            ),
        )
        .with_state(Client::new(client))
        .layer(TraceLayer::new().tracer(tracer));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A caller's request with a sampled W3C context; the response status.
async fn call(addr: SocketAddr) -> StatusCode {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/checkout")
        .header("host", "shop")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    res.into_body().collect().await.unwrap();
    status
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// The server span and the two attempts, linked: the caller → server → each attempt, the
/// retry marked, and the backend told each attempt's span id.
fn assert_linked(spans: &[ReceivedSpan], backend_saw: &[String]) {
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == TRACE && s.service == "checkout"));
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    assert_eq!(server.parent_span_id, CALLER);
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(server.attribute("url.path"), Some("/checkout"));
    let mut clients: Vec<_> = spans.iter().filter(|s| s.kind == 3).collect();
    clients.sort_by_key(|s| s.attribute("http.request.resend_count").map(str::to_owned));
    assert_eq!(clients.len(), 2);
    for client in &clients {
        assert_eq!(client.parent_span_id, server.span_id, "each attempt is a child of the server span");
        assert_eq!(client.name, "GET");
    }
    assert_eq!(clients[0].attribute("http.request.resend_count"), None);
    assert_eq!(clients[0].attribute("http.response.status_code"), Some("503"));
    assert_eq!(clients[0].status, 2, "a 503 fails a client span");
    assert_eq!(clients[1].attribute("http.request.resend_count"), Some("1"));
    assert_eq!(clients[1].attribute("http.response.status_code"), Some("200"));
    let sent: Vec<String> = clients.iter().map(|c| format!("00-{TRACE}-{}-01", c.span_id)).collect();
    assert_eq!(backend_saw, sent, "the backend's parent is the attempt's client span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_retry_spans_reach_an_otlp_grpc_receiver() {
    let (otlp, received) = support::otlp::grpc_receiver().await;
    let tracer = OtlpExport::grpc(format!("http://{otlp}")).delay(Duration::from_millis(20)).build("checkout").unwrap();
    let (backend, seen) = flaky_backend().await;
    let addr = service(tracer.clone(), backend).await;
    assert_eq!(call(addr).await, StatusCode::OK);
    let spans = received.wait_for(3).await;
    assert_linked(&spans, &seen.lock().unwrap());
    tokio::task::spawn_blocking(move || tracer.shutdown(Duration::from_secs(5))).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_receiver_and_flush_on_shutdown() {
    let (otlp, received) = support::otlp::http_receiver().await;
    // A delay longer than the test: only the shutdown's flush sends them.
    let tracer = OtlpExport::http(format!("http://{otlp}")).delay(Duration::from_secs(60)).build("checkout").unwrap();
    let (backend, seen) = flaky_backend().await;
    let addr = service(tracer.clone(), backend).await;
    assert_eq!(call(addr).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(received.spans().is_empty());
    tokio::task::spawn_blocking(move || tracer.shutdown(Duration::from_secs(5))).await.unwrap().unwrap();
    let spans = received.wait_for(3).await;
    assert_eq!(received.exports(), 1, "one batch");
    assert_linked(&spans, &seen.lock().unwrap());
}

/// An unsampled request records nothing, and its context still reaches the backend.
#[tokio::test]
async fn unsampled_requests_make_no_spans() {
    let (tracer, spans) = Tracer::in_memory("checkout");
    let (backend, seen) = flaky_backend().await;
    let addr = service(tracer, backend).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/checkout")
        .header("traceparent", format!("00-{TRACE}-{CALLER}-00"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(spans.spans().is_empty());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|tp| tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-00")), "{seen:?}");
}

/// A client span takes the application's current OpenTelemetry span as its parent when the
/// request carries no context of its own.
#[tokio::test]
async fn the_applications_opentelemetry_context_is_the_parent() {
    let (tracer, spans) = Tracer::in_memory("app");
    let (backend, seen) = flaky_backend().await;
    let client = ClientSpanLayer::new(tracer).layer(tower::service_fn(move |req| send(backend, req)));
    let app_span = TraceContext::root(0xabc, 0x123, true);
    let _attached = app_span.otel_context().attach();
    let req = Request::get(format!("http://{backend}/")).body(ReplayBody::new(Empty::<Bytes>::new(), 0).0).unwrap();
    let res = client.oneshot(req).await.unwrap();
    drop(res);
    let spans = spans.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, opentelemetry::trace::SpanId::from_bytes(0x123u64.to_be_bytes()));
    assert_eq!(spans[0].span_context.trace_id(), opentelemetry::trace::TraceId::from_bytes(0xabcu128.to_be_bytes()));
    let expected = format!("00-{:032x}-{}-01", 0xabc, spans[0].span_context.span_id());
    assert_eq!(seen.lock().unwrap().as_slice(), [expected]);
}
