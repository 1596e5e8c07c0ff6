//! Telemetry for mesh services.
//!
//! **Status: no code yet.** This crate will own W3C `traceparent`/`tracestate` and B3
//! propagation with OpenTelemetry spans, OTLP export set-up, Prometheus RED metrics with
//! Istio-compatible names and labels, and JSON access logs. It deliberately exposes no API
//! until that API exists and is tested.
//!
//! It will read, never decide: the `Outcome` and response flags that other layers record
//! through `mesh_core::classify` and `mesh_core::flags`.
