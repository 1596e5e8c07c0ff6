//! Resilience for mesh services: retries with budgets, replayable bodies, back-off and
//! per-try timeouts, as tower layers.
//!
//! | module | what it gives you |
//! |---|---|
//! | [`retry`] | [`RetryLayer`](retry::RetryLayer): Istio's `retries` (`attempts`, `perTryTimeout`, every `retryOn` condition with Envoy's meaning), jittered exponential back-off, bodies replayed from a capped buffer, and retry budgets shared by every clone (Linkerd's token budget, Envoy's concurrency budget) |
//! | [`outlier`] | [`OutlierDetector`](outlier::OutlierDetector): Envoy's outlier detection (consecutive 5xx, gateway and local-origin errors, success rate, failure percentage; ejection back-off and decay; `maxEjectionPercent`; panic mode), fed per endpoint by [`MonitorLayer`](outlier::MonitorLayer) and read by mesh-routing's balancers as their health view |
//! | [`fault`] | [`FaultLayer`](fault::FaultLayer): VirtualService `fault` (delays and aborts for a share of requests, HTTP or gRPC statuses, flags `DI` / `FI`, seedable) |
//! | [`ratelimit`] | [`RateLimitLayer`](ratelimit::RateLimitLayer): Envoy's local rate limit on `governor` (total, keyed and per-key override buckets shared by clones; 429 with `Retry-After` and the IETF `RateLimit` fields; gRPC `RESOURCE_EXHAUSTED`; sampling and shadow mode) |
//! | [`pool`] | [`CircuitBreaker`](pool::CircuitBreaker): DestinationRule `connectionPool` limits as Envoy's circuit breakers (requests in flight, busy connections, pending requests), failing fast with [`Overloaded`](pool::Overloaded) |
//!
//! Every decision reads the shared classification of `mesh_core::classify`, and what the
//! layer did is left on the response for metrics and logs: the [`Attempts`](retry::Attempts)
//! it took and the flags `URX` (retries exhausted) and `UO` (budget exhausted).
//!
//! Still to come here: route timeouts as a layer of their own.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod fault;

pub mod outlier;
pub mod pool;
pub mod ratelimit;
pub mod retry;

pub use mesh_core::LocalOr;

/// A configuration a layer refuses (a retry policy, an outlier detector, a rate limit): the
/// field, as the configuration names it, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidConfig {
    field: &'static str,
    reason: String,
}

impl InvalidConfig {
    /// An error about `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }

    /// The field, like `retryOn`.
    pub fn field(&self) -> &str {
        self.field
    }

    /// Why it is invalid.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
