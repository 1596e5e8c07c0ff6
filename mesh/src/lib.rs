//! Service-mesh primitives for any Rust service, as `tower` layers: what an Istio or Linkerd
//! sidecar gives a cluster, a `cargo add` away. This crate gathers the `mesh-*` crates behind
//! features and adds [`ServiceBuilderExt`], so that a stack reads like tower-http's:
//!
//! | feature | crate | what |
//! |---|---|---|
//! | `routing` | [`routing`] (mesh-routing) | VirtualService routes: matches, weighted destinations, rewrites, dispatch |
//! | `resilience` | [`resilience`] (mesh-resilience) | retries with budgets, outlier detection, connection-pool limits, faults, rate limits |
//! | `tls` | [`tls`] (mesh-tls) | SPIFFE identities, mTLS, PeerAuthentication, AuthorizationPolicy, JWT |
//! | `telemetry` | [`telemetry`] (mesh-telemetry) | W3C / B3 trace context, spans over OTLP, Istio's metrics, access logs |
//! | `full` (default) | all of them | |
//!
//! [`yaml`] turns the YAML operators already write (a VirtualService, a `retries` block) into
//! the values these layers take.
//!
//! # An axum service with trace context, Istio's metrics and retries
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use axum::{Router, body::Body, routing::get};
//! use mesh::prelude::*;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::default();
//! let metrics = IstioMetrics::register(&mut registry);
//! let app = Router::new()
//!     .route("/orders", get(|| async { "orders\n" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .mesh_trace()
//!             .mesh_metrics(metrics, Peers::destination("orders", "shop"))
//!             .mesh_retry(mesh::yaml::retry_policy("{attempts: 2, retryOn: 5xx}")?)
//!             .map_request(|req: http::Request<ReplayBody<Body>>| req.map(Body::new)),
//!     )
//!     .route_service("/metrics", MetricsService::new(Arc::new(Mutex::new(registry))));
//! // Serve it with `axum::serve`; here, one request in process.
//! let res = app.oneshot(http::Request::get("/orders").body(Body::empty())?).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use mesh_core as core;
#[cfg(feature = "resilience")]
pub use mesh_resilience as resilience;
#[cfg(feature = "routing")]
pub use mesh_routing as routing;
#[cfg(feature = "telemetry")]
pub use mesh_telemetry as telemetry;
#[cfg(feature = "tls")]
pub use mesh_tls as tls;

mod builder;
#[cfg(any(feature = "routing", feature = "resilience"))]
pub mod yaml;

pub use builder::ServiceBuilderExt;

/// The names a service using the layers needs most.
pub mod prelude {
    pub use crate::ServiceBuilderExt;
    pub use mesh_core::{Outcome, ResponseFlags, SpiffeId};
    #[cfg(feature = "resilience")]
    pub use mesh_resilience::{
        fault::{FaultLayer, FaultPolicy},
        pool::{CircuitBreaker, CircuitBreakerLayer, PoolLimits},
        ratelimit::{RateLimitLayer, RateLimiter, TokenBucket},
        retry::{ReplayBody, RetryBudget, RetryLayer, RetryPolicy, TokenBudget},
    };
    #[cfg(feature = "routing")]
    pub use mesh_routing::{DestinationKey, DispatchLayer, RouteTable, RoutingLayer};
    #[cfg(feature = "telemetry")]
    pub use mesh_telemetry::{
        Registry,
        metrics::{IstioMetrics, MetricsLayer, MetricsService, Peers, Reporter},
        propagation::{Propagator, TraceContext},
        span::{ClientSpanLayer, OtlpExport, Tracer},
        trace::TraceLayer,
    };
    #[cfg(feature = "tls")]
    pub use mesh_tls::authz::{AuthorizationLayer, Authorizer};
}
