//! The telemetry layers on one request, next to tower-http's `TraceLayer` in the same run:
//! a bare service (its response body read to the end, as a server would), tower-http's
//! `TraceLayer::new_for_http()` around it (no subscriber: its spans are disabled, the usual
//! cost of having it in a stack), mesh's `TraceLayer` (request id and trace context, the
//! caller's context unsampled, or a new unsampled trace with a generated id), mesh's
//! `MetricsLayer` (Istio's series, handles cached), both together (the bar: under
//! 500 ns over the bare service), and a sampled request whose server span goes to a
//! processor that drops it (the span's own cost, without an exporter).
//!
//! Run with `cargo bench -p mesh-benches --bench telemetry`.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_telemetry::metrics::{IstioMetrics, MetricsLayer, Peers, Reporter};
use mesh_telemetry::span::Tracer;
use mesh_telemetry::trace::TraceLayer;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};
use tower::{Layer, Service, ServiceExt};

fn ok(_req: Request<Full<Bytes>>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

/// A request from another sidecar: its id and an unsampled W3C context.
fn from_caller() -> Request<Full<Bytes>> {
    Request::get("/api/ratings")
        .header("host", "reviews")
        .header("x-request-id", "2f8a9c4e-0b1d-4e6f-9a3b-5c7d8e9f0a1b")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
        .body(Full::new(Bytes::new()))
        .expect("valid")
}

/// A request with no id and no context (a new trace).
fn fresh() -> Request<Full<Bytes>> {
    Request::get("/api/ratings").header("host", "reviews").body(Full::new(Bytes::new())).expect("valid")
}

/// Ended spans, dropped.
#[derive(Debug)]
struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        black_box(span);
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// One request through `svc`, its response body read to the end.
fn run<S, B>(rt: &tokio::runtime::Runtime, svc: &S, req: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let res = svc.clone().oneshot(req).await.expect("infallible");
        res.into_body().collect().await.expect("a body").to_bytes().len()
    })
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let mut g = c.benchmark_group("telemetry: one request");
    let bare = tower::service_fn(ok);
    g.bench_function("bare service", |b| b.iter(|| black_box(run(&rt, &bare, from_caller()))));

    let tower_http = tower_http::trace::TraceLayer::new_for_http().layer(tower::service_fn(ok));
    g.bench_function("tower-http TraceLayer::new_for_http", |b| {
        b.iter(|| black_box(run(&rt, &tower_http, from_caller())))
    });

    let trace = TraceLayer::new().sampling_percentage(0.0);
    let traced = trace.clone().layer(tower::service_fn(ok));
    g.bench_function("mesh TraceLayer, caller's unsampled context", |b| {
        b.iter(|| black_box(run(&rt, &traced, from_caller())))
    });
    g.bench_function("mesh TraceLayer, new unsampled trace and request id", |b| {
        b.iter(|| black_box(run(&rt, &traced, fresh())))
    });

    let mut registry = mesh_telemetry::Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let mut peers = Peers::unknown(Reporter::Destination);
    peers.destination_workload = "reviews-v1".into();
    let metrics_layer = MetricsLayer::new(metrics, peers);
    let metered = metrics_layer.clone().layer(tower::service_fn(ok));
    g.bench_function("mesh MetricsLayer", |b| b.iter(|| black_box(run(&rt, &metered, from_caller()))));

    let both = tower::ServiceBuilder::new().layer(trace).layer(metrics_layer.clone()).service(tower::service_fn(ok));
    g.bench_function("mesh TraceLayer + MetricsLayer, caller's unsampled context", |b| {
        b.iter(|| black_box(run(&rt, &both, from_caller())))
    });

    let sampled = TraceLayer::new().tracer(Tracer::new(Discard, "reviews"));
    let spans = tower::ServiceBuilder::new().layer(sampled).layer(metrics_layer).service(tower::service_fn(ok));
    g.bench_function("mesh TraceLayer + MetricsLayer, sampled: a server span (dropped)", |b| {
        b.iter(|| black_box(run(&rt, &spans, fresh())))
    });
    g.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
