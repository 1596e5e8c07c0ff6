//! Telemetry for mesh services: trace context and request ids, and Prometheus metrics with
//! Istio's names, as tower layers.
//!
//! | module | what |
//! |---|---|
//! | [`propagation`] | W3C `traceparent` / `tracestate`, B3 (multi and single header), `x-request-id` |
//! | [`trace`] | [`trace::TraceLayer`]: request ids, continuing or starting traces, sampling |
//! | [`access_log`] | one JSON line per request, written by a thread of its own; drops (and counts) rather than stalls |
//! | [`span`] | server and client (per attempt) spans, exported as OTLP over gRPC or HTTP, or kept in memory |
//! | [`metrics`] | [`metrics::IstioMetrics`] and [`metrics::MetricsLayer`]: `istio_requests_total` and friends |
//!
//! It reads, never decides: the response flags and gRPC statuses other layers record.

pub mod access_log;
pub mod metrics;
pub mod propagation;
pub mod span;
pub mod trace;

/// The metrics crate, for collectors of one's own beside these metrics.
pub use prometheus_client;
pub use prometheus_client::registry::Registry;
