//! Policy types in Istio's shape: what a VirtualService's `http` rules, a DestinationRule's
//! `subsets` and `loadBalancer`, and an SMI TrafficSplit's `backends` say.
//!
//! With the `serde` feature (on by default) they deserialize from the field names Istio uses
//! (camelCase, durations like `"2s"`), so a service author and mesh-proxy read the same YAML
//! into the same model. Fields this crate does not act on (`fault`, `corsPolicy`,
//! `connectionPool`, …) are accepted as [`NotEnforced`] so that a loader can say which are
//! present; the layers that enforce them arrive with mesh-resilience and mesh-tls.
//!
//! Nothing here is checked until it is compiled: [`RouteTable::new`](crate::RouteTable::new)
//! validates and reports the field path of the first error.
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! use mesh_routing::model::VirtualServiceSpec;
//!
//! let spec: VirtualServiceSpec = serde_json::from_str(r#"{
//!   "hosts": ["reviews"],
//!   "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
//!                       {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]}]
//! }"#).unwrap();
//! assert_eq!(spec.http[0].route[1].weight, Some(10));
//! # }
//! ```

use std::collections::BTreeMap;

use mesh_core::config::{Duration, Percent};
use mesh_core::matching::{HttpMatchRequest, StringMatch};

/// A field that is accepted, and recorded as present, but not acted on yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotEnforced;

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for NotEnforced {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| NotEnforced)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for NotEnforced {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("(not enforced)")
    }
}

macro_rules! model {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Default, PartialEq)]
        #[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
        #[cfg_attr(feature = "serde", serde(default, rename_all = "camelCase"))]
        #[non_exhaustive]
        pub struct $name { $($body)* }
    };
}

// === VirtualService ===

model! {
    /// A VirtualService's `spec`.
    pub struct VirtualServiceSpec {
        /// The hosts whose traffic these routes apply to (short names resolve in the
        /// resource's namespace; `*.example.com` wildcards; `*` for all).
        pub hosts: Vec<String>,
        /// Gateways and sidecars the routes apply to; empty means `["mesh"]`.
        pub gateways: Vec<String>,
        /// HTTP routes, in order: the first that matches wins.
        pub http: Vec<HttpRoute>,
        /// TLS routes: connections a gateway passes through unterminated, chosen by SNI.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
        pub tls: Vec<TlsRoute>,
        /// TCP routes (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub tcp: Option<NotEnforced>,
        /// Visibility (accepted; one proxy sees every namespace it loads).
        pub export_to: Vec<String>,
    }
}

model! {
    /// One `TLSRoute`: match blocks (OR-ed) on the connection's SNI and port, and where the
    /// connection's bytes go.
    pub struct TlsRoute {
        /// Match blocks, OR-ed; at least one is required.
        #[cfg_attr(feature = "serde", serde(rename = "match"))]
        pub matches: Vec<TlsMatchAttributes>,
        /// Weighted destinations.
        pub route: Vec<RouteDestination>,
    }
}

model! {
    /// One TLS match block: its conditions are AND-ed.
    pub struct TlsMatchAttributes {
        /// SNI names (`*.example.com` wildcards allowed); at least one is required.
        pub sni_hosts: Vec<String>,
        /// The gateway port the connection arrived on.
        pub port: Option<u32>,
        /// Gateways the block applies to (overrides the VirtualService's).
        pub gateways: Vec<String>,
        /// Client subnets (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
        pub destination_subnets: Vec<String>,
        /// The calling workload's labels (sidecars only).
        pub source_labels: BTreeMap<String, String>,
        /// The calling workload's namespace.
        pub source_namespace: Option<String>,
    }
}

model! {
    /// One weighted destination of a TLS or TCP route.
    pub struct RouteDestination {
        /// Where the connection goes.
        pub destination: Destination,
        /// Relative weight; with several destinations an omitted weight is 0 (dropped).
        pub weight: Option<i64>,
    }
}

model! {
    /// One `HTTPRoute`: match blocks (OR-ed) and what to do with a matching request.
    pub struct HttpRoute {
        /// The route's name, used in logs, stats and [`RouteDecision`](mesh_core::RouteDecision).
        pub name: Option<String>,
        /// Match blocks, OR-ed; empty matches every request.
        #[cfg_attr(feature = "serde", serde(rename = "match"))]
        pub matches: Vec<HttpMatchRequest>,
        /// Weighted destinations.
        pub route: Vec<HttpRouteDestination>,
        /// Answer with a redirect instead of forwarding.
        pub redirect: Option<HttpRedirect>,
        /// Answer with a fixed response instead of forwarding.
        pub direct_response: Option<HttpDirectResponse>,
        /// Rewrite the path or authority before forwarding.
        pub rewrite: Option<HttpRewrite>,
        /// Route timeout; unset means none (Istio's default).
        pub timeout: Option<Duration>,
        /// Header operations on the request and the response.
        pub headers: Option<Headers>,
        /// Send a copy of each request here too (fire and forget).
        pub mirror: Option<Destination>,
        /// Share of requests mirrored to `mirror`; unset is 100 %.
        pub mirror_percentage: Option<Percent>,
        /// Several mirrors, each with its own percentage.
        pub mirrors: Vec<HttpMirrorPolicy>,
        /// Retries; unset is Istio's default policy (see
        /// [`RetryPolicy::istio_default`](mesh_resilience::retry::RetryPolicy::istio_default)).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub retries: Option<mesh_resilience::retry::HttpRetry>,
        /// Fault injection (mesh-resilience's `FaultLayer` applies it).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub fault: Option<HttpFaultInjection>,
        /// CORS (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub cors_policy: Option<NotEnforced>,
        /// Delegation to another VirtualService (not supported).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub delegate: Option<NotEnforced>,
        /// A condition beyond the match blocks, AND-ed with them: a Linkerd ServiceProfile
        /// route's `condition` (`all`, `any`, `not`), which Istio's blocks cannot say. Set in
        /// code ([`ServiceProfileSpec::routes`]), never read from YAML.
        #[cfg_attr(feature = "serde", serde(skip))]
        pub condition: Option<crate::profile::RequestCondition>,
        /// A compiled retry policy that replaces `retries` (a ServiceProfile route's, say).
        /// Set in code, never read from YAML.
        #[cfg_attr(feature = "serde", serde(skip))]
        pub retry_policy: Option<std::sync::Arc<mesh_resilience::retry::RetryPolicy>>,
    }
}

model! {
    /// One weighted destination of a route.
    pub struct HttpRouteDestination {
        /// Where to send the request.
        pub destination: Destination,
        /// Relative weight; with several destinations an omitted weight is 0 (dropped).
        pub weight: Option<i64>,
        /// Header operations applied when this destination is chosen.
        pub headers: Option<Headers>,
    }
}

model! {
    /// A service host, optionally narrowed to a subset and a port.
    pub struct Destination {
        /// The service host (short names resolve in the resource's namespace).
        pub host: String,
        /// A subset named in the host's DestinationRule.
        pub subset: Option<String>,
        /// The service port, when the service has several.
        pub port: Option<PortSelector>,
    }
}

model! {
    /// A port, by number.
    pub struct PortSelector {
        /// The port number.
        pub number: u32,
    }
}

model! {
    /// Header operations for requests and responses.
    pub struct Headers {
        /// Applied to the request before it is forwarded.
        pub request: Option<HeaderOperations>,
        /// Applied to the response before it is returned.
        pub response: Option<HeaderOperations>,
    }
}

model! {
    /// `set` overwrites, `add` appends, `remove` deletes (applied in the order remove, set, add).
    pub struct HeaderOperations {
        /// Headers to overwrite.
        pub set: BTreeMap<String, String>,
        /// Headers to append.
        pub add: BTreeMap<String, String>,
        /// Headers to remove.
        pub remove: Vec<String>,
    }
}

model! {
    /// Rewrites applied before forwarding.
    pub struct HttpRewrite {
        /// Replaces the matched prefix (or, for exact and regex matches, the whole path).
        pub uri: Option<String>,
        /// Replaces the authority (`Host`).
        pub authority: Option<String>,
        /// Replaces every match of a regex in the path.
        pub uri_regex_rewrite: Option<RegexRewrite>,
    }
}

model! {
    /// `uriRegexRewrite`: RE2 `match` and a `rewrite` with `\1`-style references.
    pub struct RegexRewrite {
        /// The pattern.
        #[cfg_attr(feature = "serde", serde(rename = "match"))]
        pub pattern: String,
        /// The replacement.
        pub rewrite: String,
    }
}

model! {
    /// A redirect answered by the router itself.
    pub struct HttpRedirect {
        /// Replaces the whole path.
        pub uri: Option<String>,
        /// Replaces the authority.
        pub authority: Option<String>,
        /// Replaces the port.
        pub port: Option<u32>,
        /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
        pub derive_port: Option<String>,
        /// `http` or `https`.
        pub scheme: Option<String>,
        /// 301 (default), 302, 303, 307 or 308.
        pub redirect_code: Option<u32>,
    }
}

model! {
    /// A fixed response answered by the router itself.
    pub struct HttpDirectResponse {
        /// The status (200–600).
        pub status: u32,
        /// The body.
        pub body: Option<HttpBody>,
    }
}

model! {
    /// A direct response's body, as text or base64 bytes.
    pub struct HttpBody {
        /// Text.
        pub string: Option<String>,
        /// Bytes, base64 in YAML.
        pub bytes: Option<String>,
    }
}

model! {
    /// One mirror with its percentage.
    pub struct HttpMirrorPolicy {
        /// Where copies go.
        pub destination: Destination,
        /// Share of requests mirrored; unset is 100 %.
        pub percentage: Option<Percent>,
    }
}

// === DestinationRule ===

model! {
    /// A DestinationRule's `spec`: a host's subsets and traffic policy.
    pub struct DestinationRuleSpec {
        /// The service host.
        pub host: String,
        /// Policy for the whole host.
        pub traffic_policy: Option<TrafficPolicy>,
        /// Named label sets.
        pub subsets: Vec<Subset>,
        /// Visibility (accepted).
        pub export_to: Vec<String>,
        /// Which workloads the rule applies to (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub workload_selector: Option<NotEnforced>,
    }
}

model! {
    /// A subset: endpoints whose labels include all of `labels`.
    pub struct Subset {
        /// The subset's name, referred to by routes.
        pub name: String,
        /// Labels an endpoint must carry.
        pub labels: BTreeMap<String, String>,
        /// Overrides the host's policy for this subset, block by block.
        pub traffic_policy: Option<TrafficPolicy>,
    }
}

model! {
    /// A traffic policy. This crate enforces `loadBalancer`; `retryBudget` and
    /// `outlierDetection` compile into mesh-resilience's layers.
    pub struct TrafficPolicy {
        /// How endpoints are chosen.
        pub load_balancer: Option<LoadBalancerSettings>,
        /// Connection-pool limits and settings.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub connection_pool: Option<ConnectionPoolSettings>,
        /// Outlier detection ([`OutlierDetectionSpec::to_config`]).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub outlier_detection: Option<OutlierDetectionSpec>,
        /// Upstream TLS: how connections to the endpoints are secured.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub tls: Option<ClientTlsSettings>,
        /// Per-port policies: for a destination on one of these ports, the entry's blocks
        /// replace this policy's (see [`TrafficPolicy::merged`]).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
        pub port_level_settings: Vec<PortTrafficPolicy>,
        /// Envoy's retry budget: retries in flight capped as a share of requests in flight.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub retry_budget: Option<RetryBudgetSpec>,
        /// Tunnel settings (not supported).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub tunnel: Option<NotEnforced>,
        /// PROXY protocol (not supported).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub proxy_protocol: Option<NotEnforced>,
    }
}

model! {
    /// One entry of `portLevelSettings`.
    pub struct PortTrafficPolicy {
        /// The port it applies to.
        pub port: Option<PortSelector>,
        /// How endpoints are chosen.
        pub load_balancer: Option<LoadBalancerSettings>,
        /// Connection-pool limits and settings.
        pub connection_pool: Option<ConnectionPoolSettings>,
        /// Outlier detection.
        pub outlier_detection: Option<OutlierDetectionSpec>,
        /// Upstream TLS.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub tls: Option<ClientTlsSettings>,
    }
}

model! {
    /// `trafficPolicy.tls`: how a client secures connections to a destination. The data
    /// only; mesh-tls and the proxy act on it.
    pub struct ClientTlsSettings {
        /// `DISABLE`, `SIMPLE`, `MUTUAL` or `ISTIO_MUTUAL`.
        pub mode: Option<String>,
        /// Identities (SPIFFE IDs) the server may present; empty: any of the trust domain
        /// (`ISTIO_MUTUAL`) or the destination's service accounts.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
        pub subject_alt_names: Vec<String>,
        /// The server name to send.
        pub sni: Option<String>,
        /// `MUTUAL`: the client certificate file.
        pub client_certificate: Option<String>,
        /// `MUTUAL`: the client key file.
        pub private_key: Option<String>,
        /// `SIMPLE` / `MUTUAL`: the CA file that verifies the server.
        pub ca_certificates: Option<String>,
        /// A Kubernetes Secret name (not supported: no API server).
        pub credential_name: Option<String>,
        /// Skip server verification (accepted, refused by the proxy).
        pub insecure_skip_verify: Option<bool>,
    }
}

/// The blocks of a traffic policy that apply to one destination, after merging.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct MergedPolicy {
    /// How endpoints are chosen.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection-pool limits and settings.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// The retry budget.
    pub retry_budget: Option<RetryBudgetSpec>,
    /// Upstream TLS.
    pub tls: Option<ClientTlsSettings>,
}

impl TrafficPolicy {
    /// This policy's blocks for a destination on `port`: a `portLevelSettings` entry for
    /// the port replaces `loadBalancer`, `connectionPool` and `outlierDetection` wholesale
    /// (a block it omits is unset, not inherited).
    fn for_port(&self, port: Option<u16>) -> (MergedPolicy, bool) {
        let entry = port.and_then(|p| {
            self.port_level_settings.iter().find(|e| e.port.as_ref().is_some_and(|s| s.number == u32::from(p)))
        });
        let merged = match entry {
            Some(e) => MergedPolicy {
                load_balancer: e.load_balancer.clone(),
                connection_pool: e.connection_pool.clone(),
                outlier_detection: e.outlier_detection.clone(),
                retry_budget: self.retry_budget.clone(),
                tls: e.tls.clone(),
            },
            None => MergedPolicy {
                load_balancer: self.load_balancer.clone(),
                connection_pool: self.connection_pool.clone(),
                outlier_detection: self.outlier_detection.clone(),
                retry_budget: self.retry_budget.clone(),
                tls: self.tls.clone(),
            },
        };
        (merged, entry.is_some())
    }

    /// What applies to a destination on `port`, from a DestinationRule's policy and its
    /// subset's, as Istio merges them (SEMANTICS.md 2.1): the rule's policy after its port
    /// level; then each block the subset sets replaces the rule's (all of them when the
    /// subset has an entry for the port); the subset's `retryBudget` replaces the rule's when
    /// set.
    pub fn merged(rule: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>, port: Option<u16>) -> MergedPolicy {
        let mut merged = rule.map(|r| r.for_port(port).0).unwrap_or_default();
        if let Some(subset) = subset {
            let (own, port_level) = subset.for_port(port);
            if port_level {
                merged.load_balancer = own.load_balancer;
                merged.connection_pool = own.connection_pool;
                merged.outlier_detection = own.outlier_detection;
                merged.tls = own.tls;
            } else {
                merged.load_balancer = own.load_balancer.or(merged.load_balancer);
                merged.connection_pool = own.connection_pool.or(merged.connection_pool);
                merged.outlier_detection = own.outlier_detection.or(merged.outlier_detection);
                merged.tls = own.tls.or(merged.tls);
            }
            merged.retry_budget = own.retry_budget.or(merged.retry_budget);
        }
        merged
    }
}

model! {
    /// `trafficPolicy.connectionPool` (SEMANTICS.md 2.3). A 0 means "not set", as in Istio.
    pub struct ConnectionPoolSettings {
        /// TCP settings.
        pub tcp: Option<TcpSettings>,
        /// HTTP settings.
        pub http: Option<HttpSettings>,
    }
}

model! {
    /// `connectionPool.tcp`.
    pub struct TcpSettings {
        /// Connections at once to the destination's endpoints.
        pub max_connections: Option<i32>,
        /// TCP connect timeout (10 s).
        pub connect_timeout: Option<Duration>,
        /// TCP keepalive probes on upstream connections.
        pub tcp_keepalive: Option<TcpKeepalive>,
        /// The longest a connection lives (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub max_connection_duration: Option<NotEnforced>,
        /// How long an unused connection stays open.
        pub idle_timeout: Option<Duration>,
    }
}

model! {
    /// `connectionPool.tcp.tcpKeepalive`.
    pub struct TcpKeepalive {
        /// Unanswered probes before the connection is dropped.
        pub probes: Option<u32>,
        /// Idle time before the first probe.
        pub time: Option<Duration>,
        /// Time between probes.
        pub interval: Option<Duration>,
    }
}

model! {
    /// `connectionPool.http`.
    pub struct HttpSettings {
        /// Requests waiting for a connection at once.
        pub http1_max_pending_requests: Option<i32>,
        /// Requests in flight at once.
        pub http2_max_requests: Option<i32>,
        /// Requests per connection before it is closed (1 disables keep-alive).
        pub max_requests_per_connection: Option<i32>,
        /// Retries in flight at once (when no retry budget is set).
        pub max_retries: Option<i32>,
        /// How long an unused connection stays open.
        pub idle_timeout: Option<Duration>,
        /// `DEFAULT`, `DO_NOT_UPGRADE` or `UPGRADE` (HTTP/2 to the upstream).
        pub h2_upgrade_policy: Option<String>,
        /// Use the client's protocol upstream (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub use_client_protocol: Option<NotEnforced>,
        /// Streams at once on one HTTP/2 connection to the upstream.
        pub max_concurrent_streams: Option<i32>,
    }
}

impl ConnectionPoolSettings {
    /// The circuit breaker's limits (a field at 0 or unset is unlimited, as Istio leaves it),
    /// with Istio's validation. The error names the field under `connectionPool`.
    pub fn limits(&self) -> Result<mesh_resilience::pool::PoolLimits, crate::InvalidRoute> {
        if self.tcp.is_none() && self.http.is_none() {
            return Err(crate::InvalidRoute::new("", "needs `tcp` or `http`"));
        }
        let positive = |field: &str, v: Option<i32>| -> Result<Option<usize>, crate::InvalidRoute> {
            match v {
                Some(n) if n < 0 => Err(crate::InvalidRoute::new(field, "must not be negative")),
                Some(0) | None => Ok(None),
                Some(n) => Ok(Some(n as usize)),
            }
        };
        let tcp = self.tcp.clone().unwrap_or_default();
        let http = self.http.clone().unwrap_or_default();
        let mut limits = mesh_resilience::pool::PoolLimits::default();
        limits.max_connections = positive("tcp.maxConnections", tcp.max_connections)?;
        limits.max_pending = positive("http.http1MaxPendingRequests", http.http1_max_pending_requests)?;
        limits.max_requests = positive("http.http2MaxRequests", http.http2_max_requests)?;
        positive("http.maxRequestsPerConnection", http.max_requests_per_connection)?;
        positive("http.maxRetries", http.max_retries)?;
        positive("http.maxConcurrentStreams", http.max_concurrent_streams)?;
        match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") => {}
            Some(other) => {
                return Err(crate::InvalidRoute::new(
                    "http.h2UpgradePolicy",
                    &format!("`{other}` is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE"),
                ));
            }
        }
        Ok(limits)
    }
}

model! {
    /// `trafficPolicy.outlierDetection` (SEMANTICS.md 2.4.1): when endpoints are ejected
    /// from the balancer and for how long.
    pub struct OutlierDetectionSpec {
        /// Consecutive 5xx (and local-origin failures, unless split) that eject; 5 by
        /// default, 0 disables.
        pub consecutive_5xx_errors: Option<u32>,
        /// Consecutive 502/503/504 that eject; off by default.
        pub consecutive_gateway_errors: Option<u32>,
        /// Deprecated and ignored by Istio (a loader warns).
        pub consecutive_errors: Option<i32>,
        /// Counts connect failures, resets and timeouts apart from responses.
        pub split_external_local_origin_errors: Option<bool>,
        /// With the split, consecutive local-origin failures that eject (5 by default).
        pub consecutive_local_origin_failures: Option<u32>,
        /// The analysis sweep's period (10 s).
        pub interval: Option<Duration>,
        /// The first ejection's length (30 s).
        pub base_ejection_time: Option<Duration>,
        /// The most endpoints ejected at once, in percent (10).
        pub max_ejection_percent: Option<i32>,
        /// Below this percentage of endpoints in, ejections are ignored (0: never).
        pub min_health_percent: Option<i32>,
    }
}

impl OutlierDetectionSpec {
    /// The detector's configuration, with Istio's defaults and validation.
    pub fn to_config(
        &self,
    ) -> Result<mesh_resilience::outlier::OutlierConfig, mesh_resilience::outlier::InvalidOutlier> {
        use mesh_resilience::outlier::{InvalidOutlier, OutlierConfig};
        let mut config = OutlierConfig::default();
        if let Some(n) = self.consecutive_5xx_errors {
            config.consecutive_5xx = n;
        }
        if let Some(n) = self.consecutive_gateway_errors {
            config.consecutive_gateway = n;
        }
        config.split_local_origin = self.split_external_local_origin_errors.unwrap_or(false);
        if let Some(n) = self.consecutive_local_origin_failures {
            if !config.split_local_origin {
                return Err(InvalidOutlier::new(
                    "consecutiveLocalOriginFailures",
                    "needs splitExternalLocalOriginErrors: true",
                ));
            }
            config.consecutive_local_origin = n;
        }
        if let Some(d) = self.interval {
            config.interval = d.get();
        }
        if let Some(d) = self.base_ejection_time {
            config.base_ejection_time = d.get();
        }
        let percent = |field: &'static str, v: i32| {
            u32::try_from(v)
                .ok()
                .filter(|v| *v <= 100)
                .ok_or_else(|| InvalidOutlier::new(field, "must be from 0 to 100"))
        };
        if let Some(p) = self.max_ejection_percent {
            // Istio sets Envoy's only when above 0.
            if p != 0 {
                config.max_ejection_percent = percent("maxEjectionPercent", p)?;
            }
        }
        if let Some(p) = self.min_health_percent {
            config.min_health_percent = percent("minHealthPercent", p)?;
        }
        mesh_resilience::outlier::OutlierDetector::new(config.clone())?;
        Ok(config)
    }
}

model! {
    /// `trafficPolicy.retryBudget`: retries in flight at most `percent` of the requests in
    /// flight (20 % by default), or `minRetryConcurrency` (3 by default), whichever is more.
    pub struct RetryBudgetSpec {
        /// The share of requests in flight that may be retries.
        pub percent: Option<Percent>,
        /// Retries always allowed in flight.
        pub min_retry_concurrency: Option<u32>,
    }
}

model! {
    /// `loadBalancer`: a simple policy or consistent hashing.
    pub struct LoadBalancerSettings {
        /// `ROUND_ROBIN`, `LEAST_REQUEST` (`LEAST_CONN`), `RANDOM`, `PASSTHROUGH`, `UNSPECIFIED`.
        pub simple: Option<String>,
        /// Consistent hashing.
        pub consistent_hash: Option<ConsistentHash>,
        /// Locality weighting (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub locality_lb_setting: Option<NotEnforced>,
        /// Slow start (not enforced).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub warmup: Option<NotEnforced>,
    }
}

model! {
    /// `consistentHash`: the key (one of four) and the ring.
    pub struct ConsistentHash {
        /// Hash this header.
        pub http_header_name: Option<String>,
        /// Hash this cookie (set it when absent and a `ttl` is given).
        pub http_cookie: Option<HttpCookie>,
        /// Hash the client's IP.
        pub use_source_ip: Option<bool>,
        /// Hash this query parameter.
        pub http_query_parameter_name: Option<String>,
        /// Ring hash settings.
        pub ring_hash: Option<RingHashSettings>,
        /// Maglev settings.
        pub maglev: Option<MaglevSettings>,
        /// Deprecated form of `ringHash.minimumRingSize`.
        pub minimum_ring_size: Option<u64>,
    }
}

model! {
    /// Istio's `httpCookie`.
    pub struct HttpCookie {
        /// The cookie's name.
        pub name: String,
        /// The cookie's path, when the proxy sets it.
        pub path: Option<String>,
        /// Lifetime of a cookie the proxy sets; unset means the proxy never sets one.
        pub ttl: Option<Duration>,
    }
}

model! {
    /// Ring hash settings.
    pub struct RingHashSettings {
        /// Smallest ring (default 1024).
        pub minimum_ring_size: Option<u64>,
    }
}

model! {
    /// Maglev settings.
    pub struct MaglevSettings {
        /// Lookup table size, a prime (default 65537).
        pub table_size: Option<u64>,
    }
}

// === SMI TrafficSplit ===

model! {
    /// An SMI TrafficSplit's `spec`: the apex service and its weighted backends.
    pub struct TrafficSplitSpec {
        /// The apex service clients call.
        pub service: String,
        /// Backends and their weights.
        pub backends: Vec<TrafficSplitBackend>,
    }
}

model! {
    /// One backend of a TrafficSplit.
    pub struct TrafficSplitBackend {
        /// The backend service.
        pub service: String,
        /// Its relative weight.
        pub weight: i64,
    }
}

impl TrafficSplitSpec {
    /// The split as the one route Istio would need for it: every request to `service` is
    /// shared among the backends by weight.
    pub fn to_route(&self) -> HttpRoute {
        HttpRoute {
            name: Some(format!("split-{}", self.service)),
            route: self
                .backends
                .iter()
                .map(|b| HttpRouteDestination {
                    destination: Destination { host: b.service.clone(), ..Destination::default() },
                    weight: Some(b.weight),
                    headers: None,
                })
                .collect(),
            ..HttpRoute::default()
        }
    }
}

// === fault injection ===

model! {
    /// `fault` (SEMANTICS.md 1.14): a delay and/or an abort for a share of requests.
    pub struct HttpFaultInjection {
        /// Delay requests.
        pub delay: Option<FaultDelay>,
        /// Abort requests.
        pub abort: Option<FaultAbort>,
    }
}

model! {
    /// `fault.delay`.
    pub struct FaultDelay {
        /// How long (at least 1 ms).
        pub fixed_delay: Option<Duration>,
        /// Rejected, as Istio rejects it.
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub exponential_delay: Option<Duration>,
        /// The share of requests delayed; absent: none.
        pub percentage: Option<Percent>,
        /// Deprecated integer percentage, used only without `percentage`.
        pub percent: Option<i32>,
    }
}

model! {
    /// `fault.abort`.
    pub struct FaultAbort {
        /// Answer this HTTP status (200–600).
        pub http_status: Option<i32>,
        /// Answer this gRPC status, by name (`UNAVAILABLE`).
        pub grpc_status: Option<String>,
        /// Rejected, as Istio rejects it ("not supported yet").
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub http2_error: Option<NotEnforced>,
        /// The share of requests aborted; absent: none.
        pub percentage: Option<Percent>,
    }
}

impl HttpFaultInjection {
    /// The fault policy, with Istio's validation; the error names the field under `fault`.
    pub fn to_policy(&self) -> Result<mesh_resilience::fault::FaultPolicy, crate::InvalidRoute> {
        use mesh_resilience::fault::{Abort, FaultPolicy};
        let err = |field: &str, why: &str| crate::InvalidRoute::new(field, why);
        if self.delay.is_none() && self.abort.is_none() {
            return Err(err("", "a fault needs `delay` or `abort`"));
        }
        let mut policy = FaultPolicy::default();
        if let Some(d) = &self.delay {
            if d.exponential_delay.is_some() {
                return Err(err("delay.exponentialDelay", "is not supported (as in Istio)"));
            }
            let fixed = d.fixed_delay.ok_or_else(|| err("delay.fixedDelay", "is required"))?.get();
            if fixed < std::time::Duration::from_millis(1) {
                return Err(err("delay.fixedDelay", "must be at least 1ms"));
            }
            let percent = match (d.percentage, d.percent) {
                (Some(p), _) => p.value(),
                (None, Some(p)) if (0..=100).contains(&p) => f64::from(p),
                (None, Some(_)) => return Err(err("delay.percent", "must be from 0 to 100")),
                // No percentage: Istio never delays.
                (None, None) => 0.0,
            };
            policy = policy.with_delay(fixed, percent);
        }
        if let Some(a) = &self.abort {
            if a.http2_error.is_some() {
                return Err(err("abort.http2Error", "is not supported yet (as in Istio)"));
            }
            let abort = match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => return Err(err("abort", "`httpStatus` and `grpcStatus` are mutually exclusive")),
                (Some(code), None) => Abort::Http(
                    u16::try_from(code)
                        .ok()
                        .filter(|c| (200..=600).contains(c))
                        .and_then(|c| http::StatusCode::from_u16(c).ok())
                        .ok_or_else(|| err("abort.httpStatus", "must be a status from 200 to 600"))?,
                ),
                (None, Some(name)) => Abort::Grpc(grpc_code(name).ok_or_else(|| {
                    err("abort.grpcStatus", &format!("`{name}` is not an upper-case gRPC code name"))
                })?),
                (None, None) => return Err(err("abort", "needs `httpStatus` or `grpcStatus`")),
            };
            policy = policy.with_abort(abort, a.percentage.map_or(0.0, |p| p.value()));
        }
        Ok(policy)
    }
}

/// A gRPC code by its upper-case name, as Istio accepts it (numbers are not).
fn grpc_code(name: &str) -> Option<mesh_core::classify::GrpcCode> {
    (0..=16).map(mesh_core::classify::GrpcCode::new).find(|c| c.name() == Some(name))
}

// === Linkerd ServiceProfile ===

model! {
    /// A Linkerd ServiceProfile's `spec` (`linkerd.io/v1alpha2`): named routes of one service,
    /// how their responses are classified, which are retryable, their timeouts, and the
    /// service's retry budget. The profile's `metadata.name` is the service's FQDN.
    pub struct ServiceProfileSpec {
        /// Routes, in order: the first whose condition holds wins.
        pub routes: Vec<ProfileRoute>,
        /// The service's retry budget; Linkerd's default (ratio 0.2, 10 a second, ttl 10 s)
        /// when absent.
        pub retry_budget: Option<LinkerdRetryBudget>,
        /// Traffic shifting by authority (not enforced: use a TrafficSplit).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub dst_overrides: Option<NotEnforced>,
        /// Opaque ports (not enforced: the proxy speaks HTTP only).
        #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
        pub opaque_ports: Option<NotEnforced>,
    }
}

model! {
    /// One route of a ServiceProfile.
    pub struct ProfileRoute {
        /// The route's name (in logs and decisions).
        pub name: String,
        /// Which requests are on this route.
        pub condition: Option<ProfileRequestMatch>,
        /// How responses are classified; the first class whose condition holds decides, and
        /// an unclassified response is a failure when its status is 5xx.
        pub response_classes: Vec<ProfileResponseClass>,
        /// Whether failed requests on this route may be retried (any method).
        pub is_retryable: bool,
        /// The time allowed for the request, retries included; Linkerd's default is 10 s.
        pub timeout: Option<Duration>,
    }
}

model! {
    /// A request condition: `all`, `any`, `not`, `pathRegex` (matched against the whole
    /// path) and `method`; several fields set are AND-ed.
    pub struct ProfileRequestMatch {
        /// Every one of these holds.
        pub all: Option<Vec<ProfileRequestMatch>>,
        /// At least one of these holds.
        pub any: Option<Vec<ProfileRequestMatch>>,
        /// This does not hold.
        pub not: Option<Box<ProfileRequestMatch>>,
        /// The path matches this regex, anchored at both ends.
        pub path_regex: Option<String>,
        /// The method is this one.
        pub method: Option<String>,
    }
}

model! {
    /// A response class: responses its condition holds for are failures or not.
    pub struct ProfileResponseClass {
        /// Which responses are in the class.
        pub condition: Option<ProfileResponseMatch>,
        /// Whether they are failures.
        pub is_failure: bool,
    }
}

model! {
    /// A response condition over the status: `all`, `any`, `not`, `status {min, max}`.
    pub struct ProfileResponseMatch {
        /// Every one of these holds.
        pub all: Option<Vec<ProfileResponseMatch>>,
        /// At least one of these holds.
        pub any: Option<Vec<ProfileResponseMatch>>,
        /// This does not hold.
        pub not: Option<Box<ProfileResponseMatch>>,
        /// The status is in this range.
        pub status: Option<StatusRange>,
    }
}

model! {
    /// An inclusive range of statuses; an unset bound is open (100 and 599).
    pub struct StatusRange {
        /// The lowest status in the range.
        pub min: Option<u32>,
        /// The highest status in the range.
        pub max: Option<u32>,
    }
}

model! {
    /// Linkerd's retry budget: retries may add `retryRatio` of the requests of the last `ttl`,
    /// plus `minRetriesPerSecond` (SEMANTICS.md 3.3).
    pub struct LinkerdRetryBudget {
        /// Retries allowed per request, as a ratio.
        pub retry_ratio: f64,
        /// Retries allowed per second whatever the traffic.
        pub min_retries_per_second: u32,
        /// The window requests are counted over.
        pub ttl: Option<Duration>,
    }
}

// === builders for code ===

impl HttpRoute {
    /// A route named `name` with no match blocks (a catch-all) and no action yet.
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: Some(name.into()), ..Self::default() }
    }

    /// Adds a match block (blocks are OR-ed).
    pub fn matching(mut self, block: HttpMatchRequest) -> Self {
        self.matches.push(block);
        self
    }

    /// Adds a weighted destination `host` / `subset`.
    pub fn to(mut self, host: impl Into<String>, subset: Option<&str>, weight: i64) -> Self {
        self.route.push(HttpRouteDestination {
            destination: Destination { host: host.into(), subset: subset.map(Into::into), port: None },
            weight: Some(weight),
            headers: None,
        });
        self
    }
}

impl HttpMatchRequestExt for HttpMatchRequest {
    fn header(mut self, name: &str, m: StringMatch) -> Self {
        self.headers.insert(name.into(), m);
        self
    }

    fn uri(mut self, m: StringMatch) -> Self {
        self.uri = Some(m);
        self
    }

    fn cookie(mut self, name: &str, m: StringMatch) -> Self {
        self.cookies.insert(name.into(), m);
        self
    }
}

/// Builder methods for match blocks written in code.
///
/// ```
/// use mesh_core::matching::{HttpMatchRequest, StringMatch};
/// use mesh_routing::model::HttpMatchRequestExt;
///
/// let block = HttpMatchRequest::default().header("x-canary", StringMatch::Exact("true".into()));
/// assert_eq!(block.headers.len(), 1);
/// ```
pub trait HttpMatchRequestExt: Sized {
    /// Requires header `name` to match.
    fn header(self, name: &str, m: StringMatch) -> Self;
    /// Requires the path to match.
    fn uri(self, m: StringMatch) -> Self;
    /// Requires cookie `name` to match (by name, not by regex over the header).
    fn cookie(self, name: &str, m: StringMatch) -> Self;
}
