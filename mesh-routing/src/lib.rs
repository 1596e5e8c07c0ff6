//! Routing for mesh services: route tables compiled from Istio VirtualServices, weighted
//! destinations, subsets and load balancers, as tower layers.
//!
//! | module | what it gives you |
//! |---|---|
//! | [`model`] | the policy types in Istio's shape (VirtualService `http`, DestinationRule `subsets` / `loadBalancer`, SMI TrafficSplit), deserializable with the `serde` feature |
//! | [`table`] | [`RouteTable`]: virtual hosts and routes compiled once, first match wins, weighted and sticky destination choice, rewrites, header operations, redirects, direct responses |
//! | [`layer`] | [`RoutingLayer`] (decides, records [`RouteDecision`](mesh_core::RouteDecision)) and [`DispatchLayer`] (per-destination services, made lazily, cached, retired) |
//! | [`profile`] | Linkerd ServiceProfiles: request conditions, response classes, retryable routes, timeouts and retry budgets, as routes of a virtual host |
//! | [`balance`] | load balancers over an endpoint set that changes while requests flow, skipping endpoints a [`HealthView`](balance::HealthView) marks unavailable |
//! | [`random`] | the lock-free, seedable random source they draw from |
//!
//! The semantics are Istio's, as `SEMANTICS.md` section 1 states them: match blocks OR-ed,
//! conditions AND-ed, first match wins, no match is 404 `NR`; weights need not sum to 100 and
//! zero weights drop out; one fresh draw per request unless the split is made sticky
//! ([`SplitKey`]), which Istio cannot do.
//!
//! # Example: a canary gateway on axum
//!
//! ```
//! use mesh_core::matching::{HttpMatchRequest, StringMatch};
//! use mesh_routing::model::{HttpMatchRequestExt, HttpRoute};
//! use mesh_routing::{RouteTable, RoutingLayer};
//!
//! let table = RouteTable::from_routes(&[
//!     HttpRoute::named("beta")
//!         .matching(HttpMatchRequest::default().header("x-canary", StringMatch::Exact("true".into())))
//!         .to("reviews", Some("v2"), 1),
//!     HttpRoute::named("split").to("reviews", Some("v1"), 90).to("reviews", Some("v2"), 10),
//! ])
//! .expect("valid routes");
//! let app: axum::Router = axum::Router::new()
//!     .route("/", axum::routing::get(|req: axum::extract::Request| async move {
//!         let decision = mesh_core::RouteDecision::of(req.extensions()).unwrap();
//!         format!("{:?}\n", decision.subset)
//!     }))
//!     .layer(RoutingLayer::new(table));
//! # let _ = app;
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod action;
pub mod balance;
mod index;
pub mod layer;
pub mod model;
pub mod profile;
/// The lock-free, seedable random source (it lives in mesh-core, shared with retries and faults).
pub use mesh_core::random;
pub mod table;

pub use action::{DirectResponse, HeaderOps, ORIGINAL_PATH, Redirect};
pub use layer::{
    Dispatch, DispatchLayer, MakeDestination, MirrorTo, ResponseFuture, RouteTimeout, Routing, RoutingBody,
    RoutingLayer, SharedRouteTable,
};
pub use table::{
    Action, DestinationKey, InvalidRoute, Route, RouteContext, RouteTable, Split, SplitKey, Target, VirtualHostConfig,
};
