//! The routing decision, recorded on the request for later layers and telemetry.
//!
//! The router inserts a [`RouteDecision`] into the request's extensions once it has chosen a
//! route and destination; retries, load balancing, metrics and access logs read it instead of
//! routing again. Its strings are `Arc<str>` shared with the route table, so recording a
//! decision costs reference-count increments, not allocations.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use mesh_core::RouteDecision;
//!
//! let decision = RouteDecision::new(Arc::from("reviews-v2"), Arc::from("reviews.default.svc.cluster.local"))
//!     .with_subset(Arc::from("v2"))
//!     .with_port(9080);
//! let mut request = http::Request::new(());
//! request.extensions_mut().insert(decision);
//!
//! let seen = RouteDecision::of(request.extensions()).unwrap();
//! assert_eq!(seen.subset.as_deref(), Some("v2"));
//! ```

use std::sync::Arc;

/// Request extension: which route matched and where it sends the request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteDecision {
    /// The route's name (Istio: `<route.name>.<match.name>` when the match block is named).
    pub route_name: Arc<str>,
    /// The destination host (a service FQDN, or the configured upstream).
    pub destination_host: Arc<str>,
    /// The destination subset, if the route names one.
    pub subset: Option<Arc<str>>,
    /// The destination port, if the route names one.
    pub port: Option<u16>,
}

impl RouteDecision {
    /// A decision for `route_name` sending to `destination_host`, with no subset or port.
    pub fn new(route_name: Arc<str>, destination_host: Arc<str>) -> Self {
        Self { route_name, destination_host, subset: None, port: None }
    }

    /// Sets the subset.
    pub fn with_subset(mut self, subset: Arc<str>) -> Self {
        self.subset = Some(subset);
        self
    }

    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The decision recorded in a request's extensions, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&RouteDecision> {
        extensions.get::<RouteDecision>()
    }
}

/// Request extension: the client connection a request arrived on, for rate-limit keys,
/// `ipBlocks`, source-IP hashing and access logs.
///
/// ```
/// use mesh_core::route::ClientConnection;
///
/// let conn = ClientConnection::new("10.0.0.7:51000".parse().unwrap(), "10.0.0.1:15001".parse().unwrap());
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(conn);
/// assert_eq!(ClientConnection::of(request.extensions()).unwrap().peer.port(), 51000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConnection {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// The local address the connection was accepted on (its port is the listener's).
    pub local: std::net::SocketAddr,
    /// The TLS server name the client asked for, when the connection is TLS.
    pub sni: Option<Arc<str>>,
}

impl ClientConnection {
    /// A plaintext connection from `peer` to `local`.
    pub fn new(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Self {
        Self { peer, local, sni: None }
    }

    /// Sets the TLS server name.
    pub fn with_sni(mut self, sni: Arc<str>) -> Self {
        self.sni = Some(sni);
        self
    }

    /// The connection recorded in a request's extensions, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&ClientConnection> {
        extensions.get::<ClientConnection>()
    }
}

/// Request extension: the endpoints earlier tries of one request went to, shared by the
/// request's retries, so that a load balancer can send a retry elsewhere (Envoy's
/// `previous_hosts` retry predicate, which Istio turns on by default).
///
/// A retry layer inserts one (the same for every try); a balancer that finds it avoids the
/// endpoints it names when another is available, and records the endpoint it picked. It
/// remembers the last four endpoints, by address.
///
/// ```
/// use mesh_core::route::TriedEndpoints;
///
/// let tried = TriedEndpoints::default();
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(tried.clone());
/// // A balancer, on the first try:
/// TriedEndpoints::of(request.extensions()).unwrap().record("10.0.0.1:80".into());
/// // On the retry, the same record says where not to go.
/// assert!(tried.contains("10.0.0.1:80"));
/// assert!(!tried.contains("10.0.0.2:80"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(Arc<std::sync::Mutex<TriedRing>>);

#[derive(Debug, Default)]
struct TriedRing {
    addresses: [Option<Arc<str>>; 4],
    next: usize,
}

impl TriedEndpoints {
    /// The record in a request's extensions, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&TriedEndpoints> {
        extensions.get::<TriedEndpoints>()
    }

    /// Records that a try went to `address`.
    pub fn record(&self, address: Arc<str>) {
        let mut ring = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = ring.next % 4;
        ring.addresses[at] = Some(address);
        ring.next += 1;
    }

    /// Whether a try went to `address`.
    pub fn contains(&self, address: &str) -> bool {
        let ring = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.addresses.iter().flatten().any(|a| &**a == address)
    }

    /// Whether no try was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next == 0
    }
}

/// Request extension: the time by which this try must have its response head (the sooner of
/// its route timeout and its per-try timeout), set by the layers that enforce them. A layer
/// below that watches outcomes (outlier detection) counts a try dropped unanswered at or
/// after it as a timeout, and one dropped before it (the client went away) as nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TryDeadline(pub std::time::Instant);

impl TryDeadline {
    /// The deadline recorded in `extensions`, if any.
    pub fn of(extensions: &http::Extensions) -> Option<TryDeadline> {
        extensions.get::<TryDeadline>().copied()
    }

    /// Records `deadline` in `extensions`, unless an earlier one is there.
    pub fn tighten(extensions: &mut http::Extensions, deadline: std::time::Instant) {
        match extensions.get_mut::<TryDeadline>() {
            Some(existing) if existing.0 <= deadline => {}
            Some(existing) => existing.0 = deadline,
            None => {
                extensions.insert(TryDeadline(deadline));
            }
        }
    }
}

/// Request extension on a retry: how many tries were made before it (OpenTelemetry's
/// `http.request.resend_count`; a first try has none). A retry layer sets it for the span
/// and log layers below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResendCount(pub u32);

impl ResendCount {
    /// The count `extensions` carry, if this is a retry.
    pub fn of(extensions: &http::Extensions) -> Option<u32> {
        extensions.get::<Self>().map(|r| r.0)
    }
}

/// Response extension: the endpoint (`host:port`) that answered, for access logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHost(pub Arc<str>);
