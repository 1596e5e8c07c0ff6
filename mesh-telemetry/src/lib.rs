//! Telemetry for mesh services: trace context and request ids, and Prometheus metrics with
//! Istio's names, as tower layers.
//!
//! | module | what |
//! |---|---|
//! | [`propagation`] | W3C `traceparent` / `tracestate`, B3 (multi and single header), `x-request-id` |
//! | [`trace`] | [`trace::TraceLayer`]: request ids, continuing or starting traces, sampling |
//! | [`metrics`] | [`metrics::IstioMetrics`] and [`metrics::MetricsLayer`]: `istio_requests_total` and friends |
//!
//! It reads, never decides: the response flags and gRPC statuses other layers record.
//! OTLP export and access logs are not written yet.

pub mod metrics;
pub mod propagation;
pub mod trace;

pub use prometheus_client::registry::Registry;
