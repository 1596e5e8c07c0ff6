//! [`ServiceBuilderExt`]: the mesh layers as `tower::ServiceBuilder` methods.

// Unused when no feature is on (the trait then has no method).
#[allow(unused_imports)]
use tower::{ServiceBuilder, layer::util::Stack};

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// The mesh's layers as [`ServiceBuilder`] methods, in the style of tower-http's
/// `ServiceBuilderExt`. Each adds one layer, outermost first, as `ServiceBuilder::layer`
/// does. Sealed: implemented for `ServiceBuilder` only.
///
/// ```
/// use mesh::prelude::*;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = RateLimiter::total(TokenBucket::new(100, 100, std::time::Duration::from_secs(1))?);
/// let _stack = ServiceBuilder::new()
///     .mesh_rate_limit(limiter)
///     .mesh_retry(RetryPolicy::istio_default());
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Retries by `policy` (mesh-resilience's [`RetryLayer`](mesh_resilience::retry::RetryLayer);
    /// the inner service takes the replayable body,
    /// [`ReplayBody`](mesh_resilience::retry::ReplayBody)).
    #[cfg(feature = "resilience")]
    fn mesh_retry(
        self,
        policy: mesh_resilience::retry::RetryPolicy,
    ) -> ServiceBuilder<Stack<mesh_resilience::retry::RetryLayer, L>>;

    /// Retries by `policy`, within `budget` (shared by every service the layer makes).
    #[cfg(feature = "resilience")]
    fn mesh_retry_with_budget(
        self,
        policy: mesh_resilience::retry::RetryPolicy,
        budget: std::sync::Arc<dyn mesh_resilience::retry::RetryBudget>,
    ) -> ServiceBuilder<Stack<mesh_resilience::retry::RetryLayer, L>>;

    /// A local rate limit: requests over it are answered 429 (flag `RL`).
    #[cfg(feature = "resilience")]
    fn mesh_rate_limit(
        self,
        limiter: mesh_resilience::ratelimit::RateLimiter,
    ) -> ServiceBuilder<Stack<mesh_resilience::ratelimit::RateLimitLayer, L>>;

    /// Connection-pool limits: an overflow is an `Overloaded` error at once (503 `UO`).
    #[cfg(feature = "resilience")]
    fn mesh_circuit_breaker(
        self,
        breaker: mesh_resilience::pool::CircuitBreaker,
    ) -> ServiceBuilder<Stack<mesh_resilience::pool::CircuitBreakerLayer, L>>;

    /// Fault injection: delays and aborts (Istio's `fault`).
    #[cfg(feature = "resilience")]
    fn mesh_fault(
        self,
        policy: mesh_resilience::fault::FaultPolicy,
    ) -> ServiceBuilder<Stack<mesh_resilience::fault::FaultLayer, L>>;

    /// Routing by `table` (VirtualService routes; see [`crate::yaml::route_table`]).
    #[cfg(feature = "routing")]
    fn mesh_routing(self, table: mesh_routing::RouteTable) -> ServiceBuilder<Stack<mesh_routing::RoutingLayer, L>>;

    /// Request ids and W3C / B3 trace context on every request (every new trace sampled).
    #[cfg(feature = "telemetry")]
    fn mesh_trace(self) -> ServiceBuilder<Stack<mesh_telemetry::trace::TraceLayer, L>>;

    /// Trace context as `layer` is configured (propagators, sampling, a tracer for spans).
    #[cfg(feature = "telemetry")]
    fn mesh_trace_with(
        self,
        layer: mesh_telemetry::trace::TraceLayer,
    ) -> ServiceBuilder<Stack<mesh_telemetry::trace::TraceLayer, L>>;

    /// Istio's request metrics into `metrics`, with `peers` as the fixed labels.
    #[cfg(feature = "telemetry")]
    fn mesh_metrics(
        self,
        metrics: mesh_telemetry::metrics::IstioMetrics,
        peers: mesh_telemetry::metrics::Peers,
    ) -> ServiceBuilder<Stack<mesh_telemetry::metrics::MetricsLayer, L>>;

    /// A client span per request sent (put it below a retry layer: one per attempt).
    #[cfg(feature = "telemetry")]
    fn mesh_client_spans(
        self,
        tracer: mesh_telemetry::span::Tracer,
    ) -> ServiceBuilder<Stack<mesh_telemetry::span::ClientSpanLayer, L>>;

    /// AuthorizationPolicy enforcement (403 `RBAC: access denied`).
    #[cfg(feature = "tls")]
    fn mesh_authorization(
        self,
        authorizer: mesh_tls::authz::Authorizer,
    ) -> ServiceBuilder<Stack<mesh_tls::authz::AuthorizationLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "resilience")]
    fn mesh_retry(
        self,
        policy: mesh_resilience::retry::RetryPolicy,
    ) -> ServiceBuilder<Stack<mesh_resilience::retry::RetryLayer, L>> {
        self.layer(mesh_resilience::retry::RetryLayer::new(policy))
    }

    #[cfg(feature = "resilience")]
    fn mesh_retry_with_budget(
        self,
        policy: mesh_resilience::retry::RetryPolicy,
        budget: std::sync::Arc<dyn mesh_resilience::retry::RetryBudget>,
    ) -> ServiceBuilder<Stack<mesh_resilience::retry::RetryLayer, L>> {
        self.layer(mesh_resilience::retry::RetryLayer::new(policy).with_budget(budget))
    }

    #[cfg(feature = "resilience")]
    fn mesh_rate_limit(
        self,
        limiter: mesh_resilience::ratelimit::RateLimiter,
    ) -> ServiceBuilder<Stack<mesh_resilience::ratelimit::RateLimitLayer, L>> {
        self.layer(mesh_resilience::ratelimit::RateLimitLayer::new(limiter))
    }

    #[cfg(feature = "resilience")]
    fn mesh_circuit_breaker(
        self,
        breaker: mesh_resilience::pool::CircuitBreaker,
    ) -> ServiceBuilder<Stack<mesh_resilience::pool::CircuitBreakerLayer, L>> {
        self.layer(mesh_resilience::pool::CircuitBreakerLayer::new(breaker))
    }

    #[cfg(feature = "resilience")]
    fn mesh_fault(
        self,
        policy: mesh_resilience::fault::FaultPolicy,
    ) -> ServiceBuilder<Stack<mesh_resilience::fault::FaultLayer, L>> {
        self.layer(mesh_resilience::fault::FaultLayer::new(policy))
    }

    #[cfg(feature = "routing")]
    fn mesh_routing(self, table: mesh_routing::RouteTable) -> ServiceBuilder<Stack<mesh_routing::RoutingLayer, L>> {
        self.layer(mesh_routing::RoutingLayer::new(table))
    }

    #[cfg(feature = "telemetry")]
    fn mesh_trace(self) -> ServiceBuilder<Stack<mesh_telemetry::trace::TraceLayer, L>> {
        self.layer(mesh_telemetry::trace::TraceLayer::new())
    }

    #[cfg(feature = "telemetry")]
    fn mesh_trace_with(
        self,
        layer: mesh_telemetry::trace::TraceLayer,
    ) -> ServiceBuilder<Stack<mesh_telemetry::trace::TraceLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "telemetry")]
    fn mesh_metrics(
        self,
        metrics: mesh_telemetry::metrics::IstioMetrics,
        peers: mesh_telemetry::metrics::Peers,
    ) -> ServiceBuilder<Stack<mesh_telemetry::metrics::MetricsLayer, L>> {
        self.layer(mesh_telemetry::metrics::MetricsLayer::new(metrics, peers))
    }

    #[cfg(feature = "telemetry")]
    fn mesh_client_spans(
        self,
        tracer: mesh_telemetry::span::Tracer,
    ) -> ServiceBuilder<Stack<mesh_telemetry::span::ClientSpanLayer, L>> {
        self.layer(mesh_telemetry::span::ClientSpanLayer::new(tracer))
    }

    #[cfg(feature = "tls")]
    fn mesh_authorization(
        self,
        authorizer: mesh_tls::authz::Authorizer,
    ) -> ServiceBuilder<Stack<mesh_tls::authz::AuthorizationLayer, L>> {
        self.layer(mesh_tls::authz::AuthorizationLayer::new(authorizer))
    }
}
