//! The vocabulary every mesh layer speaks.
//!
//! `mesh-core` holds the small, I/O-free pieces that the routing, resilience, identity and
//! telemetry layers share, so that a request is classified once and every layer reads the
//! same answer:
//!
//! | module | what it gives you |
//! |---|---|
//! | [`matching`] | Istio `StringMatch` and the header, query-parameter, cookie and URI matchers built from it, compiled once from config, plus [`HttpMatch`](matching::HttpMatch), one `HTTPMatchRequest` block |
//! | [`classify`] | [`Outcome`]: what became of a request (success, 5xx, gateway error, connect failure, reset, refused stream, timeout, gRPC status) |
//! | [`flags`] | [`ResponseFlags`]: Envoy's short response flags (`UF`, `UT`, `NR`, …) carried as a response extension |
//! | [`identity`] | [`SpiffeId`] and [`TrustDomain`], validated as the SPIFFE standard says, Istio principals, the X.509-SVID leaf rules and the [`PeerIdentity`] request extension |
//! | [`route`] | [`RouteDecision`], the request extension that records which route and destination were chosen, and [`ClientConnection`], the one that says which client connection a request came on |
//! | [`random`] | [`Random`](random::Random), a lock-free, seedable random source for weighted choices, jitter and sampling |
//! | [`config`] | serde types for Istio durations (`"2s"`, `"250ms"`, `"1.5s"`) and percentages |
//!
//! The crate does no I/O and depends on no networking runtime.
//!
//! # Example
//!
//! Compile a match block from Istio YAML-shaped config once, then evaluate it per request:
//!
//! ```
//! use mesh_core::matching::{HttpMatch, HttpMatchRequest, StringMatch};
//!
//! let mut config = HttpMatchRequest::default();
//! config.uri = Some(StringMatch::Prefix("/api".into()));
//! config.headers.insert("x-canary".into(), StringMatch::Exact("true".into()));
//! let block = HttpMatch::new(&config).expect("valid match");
//!
//! let request = http::Request::get("/api/orders").header("x-canary", "true").body(()).unwrap();
//! assert!(block.matches_request(&request));
//!
//! let request = http::Request::get("/api/orders").body(()).unwrap();
//! assert!(!block.matches_request(&request));
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod classify;
pub mod config;
pub mod flags;
pub mod identity;
pub mod matching;
pub mod random;
pub mod route;

pub use body::LocalOr;
pub use classify::{Failure, GrpcCode, GrpcStatus, Outcome};
pub use flags::ResponseFlags;
pub use identity::{PeerIdentity, SpiffeId, TrustDomain};
pub use route::{ClientConnection, ResendCount, RouteDecision, TriedEndpoints, TryDeadline, UpstreamHost};
