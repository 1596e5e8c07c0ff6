//! AuthorizationPolicy as a tower layer: Istio's semantics (SEMANTICS.md 5), compiled once.
//!
//! An [`Authorizer`] is compiled from the policies that apply to a workload
//! ([`Policy::applies_to`] does Istio's namespace and selector scoping) and decides each
//! request from its [`RequestAttrs`]: any matching DENY rule denies; otherwise, when there are
//! ALLOW policies, some ALLOW rule must match; AUDIT rules only log; `CUSTOM` is refused when
//! the policies are compiled (there is no external authorizer to call). Policies annotated
//! `istio.io/dry-run: "true"` are evaluated and logged, never enforced.
//!
//! A rule matches when some `from` source matches, some `to` operation matches and every
//! `when` condition holds; an absent list matches anything. Inside a source, operation or
//! condition the fields are ANDed and each field's values ORed; a `notX` field matches when
//! none of its values does. Values are exact, `prefix*`, `*suffix` or `*` (present); hosts
//! compare without case; paths may use the `{*}` (one segment) and `{**}` (the rest)
//! templates; `namespaces` wildcards and `serviceAccounts` follow Istio's regexes on the peer's
//! SPIFFE ID. A plaintext peer has no principal: `principals` never match it and
//! `notPrincipals` always do.
//!
//! Paths are matched as the request carries them, without the query string: the proxy's own
//! request checks refuse the malformed targets that Istio's path normalization exists for.
//!
//! [`AuthorizationLayer`] answers a denial with 403 `RBAC: access denied` (gRPC:
//! `PERMISSION_DENIED`), records the `RBAC` response flag, and never returns an error of its
//! own.
//!
//! # Example: the seeds' "only frontend may GET the products API", and no DELETE anywhere
//!
//! ```
//! use mesh_tls::authz::{Authorizer, Decision, Policy, RequestAttrs};
//!
//! let spec = serde_json::from_value(serde_json::json!({
//!     "action": "ALLOW",
//!     "rules": [{
//!         "from": [{"source": {"principals": ["cluster.local/ns/ecommerce/sa/frontend"]}}],
//!         "to": [{"operation": {"methods": ["GET"], "paths": ["/api/products*"]}}],
//!     }],
//! }))?;
//! let allow = Policy::new("ecommerce", "product-service-authz", spec);
//! let authorizer = Authorizer::new([allow])?;
//! let frontend: mesh_core::SpiffeId = "spiffe://cluster.local/ns/ecommerce/sa/frontend".parse()?;
//! let headers = http::HeaderMap::new();
//! let mut attrs = RequestAttrs::new("GET", "/api/products/7", "product", &headers);
//! attrs.peer = Some(&frontend);
//! assert_eq!(authorizer.decide(&attrs), Decision::Allow);
//! attrs.method = "DELETE";
//! assert!(matches!(authorizer.decide(&attrs), Decision::Deny { .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Consul intentions and Cilium L7 rules
//!
//! A Consul intention "`web` → `api`: deny" is a DENY policy on `api` with
//! `from: [{source: {principals: ["<td>/ns/<ns>/sa/web"]}}]`; "allow" is the same with ALLOW
//! (and, as Consul's default-deny, an ALLOW policy's presence denies everyone else). A Cilium
//! L7 rule `{method: "GET", path: "/public/.*"}` is an ALLOW rule with
//! `to: [{operation: {methods: ["GET"], paths: ["/public/*"]}}]`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use mesh_core::{ClientConnection, LocalOr, PeerIdentity, ResponseFlags, SpiffeId};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::jwt::RequestAuth;

// === the resource ===

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to (none: every workload of its namespace, or of the mesh in
    /// the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Gateway API targets (parsed; a policy with them applies to no sidecar here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<serde_json::Value>>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The CUSTOM provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// The rules; absent means none (an ALLOW policy without rules allows nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

/// A workload selector.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels the workload must carry.
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A policy's action.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow matching requests (and, once any ALLOW policy exists, only them).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Log matching requests.
    Audit,
    /// Delegate to an external authorizer (refused here).
    Custom,
}

/// One rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Rule {
    /// Sources (ORed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    /// Operations (ORed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    /// Conditions (ANDed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// A `from` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct From {
    /// The source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// A `to` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct To {
    /// The operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

macro_rules! string_lists {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
        #[serde(default, rename_all = "camelCase")]
        pub struct $name {
            $($(#[$fmeta])* #[serde(skip_serializing_if = "Option::is_none")] pub $field: Option<Vec<String>>,)*
        }
    };
}

string_lists! {
    /// Who sent the request.
    pub struct Source {
        /// Peer principals (`<td>/ns/<ns>/sa/<sa>`).
        principals,
        /// Not these principals.
        not_principals,
        /// JWT principals (`<iss>/<sub>`).
        request_principals,
        /// Not these JWT principals.
        not_request_principals,
        /// Peer namespaces.
        namespaces,
        /// Not these namespaces.
        not_namespaces,
        /// Peer service accounts (`ns/sa`, or `sa` in the policy's namespace).
        service_accounts,
        /// Not these service accounts.
        not_service_accounts,
        /// Direct peer addresses (IP or CIDR).
        ip_blocks,
        /// Not these.
        not_ip_blocks,
        /// Original client addresses (IP or CIDR).
        remote_ip_blocks,
        /// Not these.
        not_remote_ip_blocks,
        /// Peer trust domains.
        trust_domains,
        /// Not these.
        not_trust_domains,
    }
}

string_lists! {
    /// What the request asks for.
    pub struct Operation {
        /// `:authority` values (case-insensitive).
        hosts,
        /// Not these.
        not_hosts,
        /// Destination ports.
        ports,
        /// Not these.
        not_ports,
        /// Methods.
        methods,
        /// Not these.
        not_methods,
        /// Paths (without the query).
        paths,
        /// Not these.
        not_paths,
    }
}

/// A `when` condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    /// The attribute (`request.headers[x-api-key]`, `source.ip`, `request.auth.claims[role]`, …).
    pub key: String,
    /// It must match one of these.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// It must match none of these.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

/// A policy with its name and namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its spec.
    pub spec: AuthorizationPolicySpec,
    /// `istio.io/dry-run: "true"`: evaluated and logged, not enforced.
    pub dry_run: bool,
}

impl Policy {
    /// A policy.
    pub fn new(namespace: &str, name: &str, spec: AuthorizationPolicySpec) -> Self {
        Self { namespace: namespace.into(), name: name.into(), spec, dry_run: false }
    }

    /// Istio's scoping: a policy applies to a workload of `namespace` with `labels` when it is
    /// in that namespace or in the root namespace, and its selector (if any) selects the
    /// workload. `targetRefs` policies bind to gateways and services, not sidecars.
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>, root_namespace: &str) -> bool {
        (self.namespace == namespace || self.namespace == root_namespace)
            && self.spec.target_refs.is_none()
            && self.spec.selector.as_ref().is_none_or(|s| s.selects(labels))
    }

    fn label(&self) -> String {
        format!("ns[{}]-policy[{}]", self.namespace, self.name)
    }
}

/// A policy that cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {policy}: {field}: {reason}")]
pub struct InvalidPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// The field path, as `spec.rules[0].from[1].source`.
    pub field: String,
    /// Why.
    pub reason: String,
}

// === the request ===

/// What a decision reads from a request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RequestAttrs<'a> {
    /// `:method`.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// `:authority` (or `Host`).
    pub host: &'a str,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The peer's verified SPIFFE ID (mTLS), if any.
    pub peer: Option<&'a SpiffeId>,
    /// The direct peer's address.
    pub source_ip: Option<IpAddr>,
    /// The original client's address (the direct peer's unless the caller trusts proxies).
    pub remote_ip: Option<IpAddr>,
    /// The local address the request arrived on.
    pub destination: Option<SocketAddr>,
    /// The TLS server name.
    pub sni: Option<&'a str>,
    /// The validated JWT, if any.
    pub auth: Option<&'a RequestAuth>,
}

impl<'a> RequestAttrs<'a> {
    /// Attributes with only the request line and headers; set the rest as known.
    pub fn new(method: &'a str, path: &'a str, host: &'a str, headers: &'a HeaderMap) -> Self {
        Self {
            method,
            path,
            host,
            headers,
            peer: None,
            source_ip: None,
            remote_ip: None,
            destination: None,
            sni: None,
            auth: None,
        }
    }

    /// Everything a request carries: its line and headers, and the extensions the server and
    /// layers record: [`PeerIdentity`], [`ClientConnection`] and [`RequestAuth`].
    pub fn of<B>(req: &'a Request<B>) -> Self {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let ext = req.extensions();
        let conn = ext.get::<ClientConnection>();
        let source_ip = conn.map(|c| canonical(c.peer.ip()));
        Self {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: req.headers(),
            peer: PeerIdentity::of(ext),
            source_ip,
            remote_ip: source_ip,
            destination: conn.map(|c| c.local),
            sni: conn.and_then(|c| c.sni.as_deref()),
            auth: ext.get::<RequestAuth>(),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

// === compiled matchers ===

type Pred = Box<dyn Fn(&RequestAttrs<'_>) -> bool + Send + Sync>;

/// Istio's string value forms.
#[derive(Debug)]
enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Present,
    Regex(Regex),
}

impl StrMatch {
    fn new(value: &str) -> Self {
        if value == "*" {
            StrMatch::Present
        } else if let Some(suffix) = value.strip_prefix('*') {
            StrMatch::Suffix(suffix.into())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StrMatch::Prefix(prefix.into())
        } else {
            StrMatch::Exact(value.into())
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == &**e,
            StrMatch::Prefix(p) => s.starts_with(&**p),
            StrMatch::Suffix(x) => s.ends_with(&**x),
            StrMatch::Present => !s.is_empty(),
            StrMatch::Regex(r) => r.is_match(s),
        }
    }
}

/// `*` becomes `.*`, everything else literal; anchored.
fn glob_regex(prefix: &str, value: &str, suffix: &str) -> Regex {
    let body = value.split('*').map(regex::escape).collect::<Vec<_>>().join(".*");
    Regex::new(&format!("^(?:{prefix}{body}{suffix})$")).expect("escaped pieces form a valid regex")
}

/// A path value: `{*}` is one segment, `{**}` the rest; otherwise Istio's string forms.
fn path_match(value: &str) -> StrMatch {
    if !value.contains("{*}") && !value.contains("{**}") {
        return StrMatch::new(value);
    }
    let mut pattern = String::from("^");
    for (i, segment) in value.split('/').enumerate() {
        if i > 0 {
            pattern.push('/');
        }
        match segment {
            "{*}" => pattern.push_str("[^/]+"),
            "{**}" => pattern.push_str(".*"),
            other => pattern.push_str(&regex::escape(other)),
        }
    }
    pattern.push('$');
    StrMatch::Regex(Regex::new(&pattern).expect("escaped pieces form a valid regex"))
}

#[derive(Debug, Clone, Copy)]
struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Self> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net = canonical(addr.parse::<IpAddr>().ok()?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { net, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
            IpAddr::V6(v6) => u128::from(v6),
        };
        let ip = canonical(ip);
        if ip.is_ipv4() != self.net.is_ipv4() {
            return false;
        }
        // IPv4 addresses sit in the top 32 bits, so one mask serves both families.
        let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
        (bits(ip) & mask) == (bits(self.net) & mask)
    }
}

/// What kind of value a field's strings are.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Principal,
    RequestPrincipal,
    Namespace,
    ServiceAccount,
    TrustDomain,
    SourceIp,
    RemoteIp,
    DestinationIp,
    Host,
    Port,
    Method,
    Path,
    Header,
    Sni,
    Audiences,
    Presenter,
    Claim,
}

struct Ctx<'p> {
    policy: &'p Policy,
    field: String,
}

impl Ctx<'_> {
    fn invalid(&self, reason: impl Into<String>) -> InvalidPolicy {
        InvalidPolicy {
            policy: format!("{}/{}", self.policy.namespace, self.policy.name),
            field: self.field.clone(),
            reason: reason.into(),
        }
    }
}

/// Compiles one field's values into a predicate: some value matches (or, negated, none).
fn field(ctx: &Ctx<'_>, kind: Kind, values: &[String], negated: bool, arg: &[String]) -> Result<Pred, InvalidPolicy> {
    if values.iter().any(String::is_empty) {
        return Err(ctx.invalid("empty string values are not allowed"));
    }
    let any: Pred = match kind {
        Kind::Principal => {
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            Box::new(move |a| a.peer.is_some_and(|p| ms.iter().any(|m| m.matches(p.principal()))))
        }
        Kind::Namespace => {
            let rs: Vec<Regex> = values.iter().map(|v| glob_regex(r"spiffe://.*/ns/", v, r"/.*")).collect();
            Box::new(move |a| a.peer.is_some_and(|p| rs.iter().any(|r| r.is_match(p.as_str()))))
        }
        Kind::ServiceAccount => {
            let ns = &ctx.policy.namespace;
            let mut rs = Vec::new();
            for v in values {
                if v.contains('*') {
                    return Err(ctx.invalid(format!("`{v}`: service accounts take no wildcards")));
                }
                let (n, sa) = v.split_once('/').unwrap_or((ns, v));
                rs.push(
                    Regex::new(&format!("^spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?$", regex::escape(n), regex::escape(sa)))
                        .expect("escaped pieces form a valid regex"),
                );
            }
            Box::new(move |a| a.peer.is_some_and(|p| rs.iter().any(|r| r.is_match(p.as_str()))))
        }
        Kind::TrustDomain => {
            let ms: Vec<StrMatch> = values
                .iter()
                .map(|v| match v.as_str() {
                    "*" => StrMatch::Prefix("spiffe://".into()),
                    v if v.contains('*') => StrMatch::Regex(glob_regex("spiffe://", v, "/.*")),
                    v => StrMatch::Prefix(format!("spiffe://{v}/").into()),
                })
                .collect();
            Box::new(move |a| a.peer.is_some_and(|p| ms.iter().any(|m| m.matches(p.as_str()))))
        }
        Kind::RequestPrincipal => {
            // `iss/sub`: `*` means any validated token.
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            Box::new(move |a| a.auth.is_some_and(|t| ms.iter().any(|m| m.matches(t.principal()))))
        }
        Kind::SourceIp | Kind::RemoteIp | Kind::DestinationIp => {
            let cidrs = values
                .iter()
                .map(|v| Cidr::parse(v).ok_or_else(|| ctx.invalid(format!("`{v}` is not an IP address or CIDR range"))))
                .collect::<Result<Vec<_>, _>>()?;
            Box::new(move |a| {
                let ip = match kind {
                    Kind::SourceIp => a.source_ip,
                    Kind::RemoteIp => a.remote_ip,
                    _ => a.destination.map(|d| d.ip()),
                };
                ip.is_some_and(|ip| cidrs.iter().any(|c| c.contains(ip)))
            })
        }
        Kind::Host => {
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(&v.to_ascii_lowercase())).collect();
            Box::new(move |a| {
                let host = a.host.to_ascii_lowercase();
                ms.iter().any(|m| m.matches(&host))
            })
        }
        Kind::Port => {
            let ports = values
                .iter()
                .map(|v| v.parse::<u16>().map_err(|_| ctx.invalid(format!("`{v}` is not a port number"))))
                .collect::<Result<Vec<_>, _>>()?;
            Box::new(move |a| a.destination.is_some_and(|d| ports.contains(&d.port())))
        }
        Kind::Method => {
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            Box::new(move |a| ms.iter().any(|m| m.matches(a.method)))
        }
        Kind::Path => {
            let ms: Vec<StrMatch> = values.iter().map(|v| path_match(v)).collect();
            Box::new(move |a| ms.iter().any(|m| m.matches(a.path)))
        }
        Kind::Header => {
            let name = http::HeaderName::try_from(arg[0].as_str())
                .map_err(|_| ctx.invalid(format!("`{}` is not a header name", arg[0])))?;
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            Box::new(move |a| {
                let mut seen = a.headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).peekable();
                if seen.peek().is_none() {
                    return false;
                }
                let joined = seen.collect::<Vec<_>>().join(",");
                ms.iter().any(|m| m.matches(&joined))
            })
        }
        Kind::Sni => {
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            Box::new(move |a| a.sni.is_some_and(|s| ms.iter().any(|m| m.matches(s))))
        }
        Kind::Audiences | Kind::Presenter | Kind::Claim => {
            let ms: Vec<StrMatch> = values.iter().map(|v| StrMatch::new(v)).collect();
            let path: Vec<String> = match kind {
                Kind::Audiences => vec!["aud".into()],
                Kind::Presenter => vec!["azp".into()],
                _ => arg.to_vec(),
            };
            Box::new(move |a| {
                a.auth.is_some_and(|t| t.claim_strings(&path).iter().any(|s| ms.iter().any(|m| m.matches(s))))
            })
        }
    };
    Ok(if negated { Box::new(move |a| !any(a)) } else { any })
}

/// Parses a `when` key into its kind and arguments (`request.headers[x]` → Header, `["x"]`).
fn condition_kind(key: &str) -> Option<(Kind, Vec<String>)> {
    let bracketed = |prefix: &str| -> Option<Vec<String>> {
        let rest = key.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
        let parts: Vec<String> = rest.split("][").map(str::to_owned).collect();
        parts.iter().all(|p| !p.is_empty() && !p.contains(['[', ']'])).then_some(parts)
    };
    let simple = match key {
        "source.ip" => Some(Kind::SourceIp),
        "remote.ip" => Some(Kind::RemoteIp),
        "source.namespace" => Some(Kind::Namespace),
        "source.principal" => Some(Kind::Principal),
        "source.serviceAccount" => Some(Kind::ServiceAccount),
        "source.trustDomain" => Some(Kind::TrustDomain),
        "request.auth.principal" => Some(Kind::RequestPrincipal),
        "request.auth.audiences" => Some(Kind::Audiences),
        "request.auth.presenter" => Some(Kind::Presenter),
        "destination.ip" => Some(Kind::DestinationIp),
        "destination.port" => Some(Kind::Port),
        "connection.sni" => Some(Kind::Sni),
        _ => None,
    };
    if let Some(kind) = simple {
        return Some((kind, Vec::new()));
    }
    if let Some(args) = bracketed("request.headers").filter(|a| a.len() == 1) {
        return Some((Kind::Header, args));
    }
    bracketed("request.auth.claims").map(|args| (Kind::Claim, args))
}

// === the authorizer ===

struct CompiledRule {
    from: Option<Vec<Vec<Pred>>>,
    to: Option<Vec<Vec<Pred>>>,
    when: Vec<Pred>,
}

impl CompiledRule {
    fn matches(&self, a: &RequestAttrs<'_>) -> bool {
        let all = |preds: &Vec<Pred>| preds.iter().all(|p| p(a));
        self.from.as_ref().is_none_or(|f| f.iter().any(all))
            && self.to.as_ref().is_none_or(|t| t.iter().any(all))
            && self.when.iter().all(|p| p(a))
    }
}

struct CompiledPolicy {
    label: Arc<str>,
    action: Action,
    dry_run: bool,
    rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    fn matches(&self, a: &RequestAttrs<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(a))
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it; `policy` names the DENY policy that matched, or `allow-policies` when no
    /// ALLOW rule did.
    Deny {
        /// Which policy decided (`ns[<ns>]-policy[<name>]`).
        policy: Arc<str>,
    },
}

/// The compiled policies of one workload. See the module docs.
#[derive(Default)]
pub struct Authorizer {
    deny: Vec<CompiledPolicy>,
    allow: Vec<CompiledPolicy>,
    audit: Vec<CompiledPolicy>,
    /// Rules skipped (unknown `when` keys), as warnings.
    warnings: Vec<String>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels = |ps: &Vec<CompiledPolicy>| ps.iter().map(|p| p.label.to_string()).collect::<Vec<_>>();
        f.debug_struct("Authorizer")
            .field("deny", &labels(&self.deny))
            .field("allow", &labels(&self.allow))
            .field("audit", &labels(&self.audit))
            .finish()
    }
}

static ALLOW_POLICIES: &str = "allow-policies";

impl Authorizer {
    /// Compiles `policies` (already scoped to the workload: see [`Policy::applies_to`]).
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Result<Self, InvalidPolicy> {
        let mut authorizer = Authorizer::default();
        for policy in policies {
            let compiled = compile(&policy, &mut authorizer.warnings)?;
            match compiled.action {
                Action::Allow => authorizer.allow.push(compiled),
                Action::Deny => authorizer.deny.push(compiled),
                Action::Audit => authorizer.audit.push(compiled),
                Action::Custom => unreachable!("compile refuses CUSTOM"),
            }
        }
        Ok(authorizer)
    }

    /// Whether no policy applies (every request is allowed).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Rules skipped for an unsupported `when` key, as Istio skips them.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Decides: DENY, then ALLOW; AUDIT and dry-run policies are logged.
    pub fn decide(&self, a: &RequestAttrs<'_>) -> Decision {
        for p in &self.audit {
            if p.matches(a) {
                tracing::info!(policy = %p.label, method = a.method, path = a.path, "authorization audit");
            }
        }
        for p in &self.deny {
            if p.matches(a) {
                if p.dry_run {
                    tracing::info!(policy = %p.label, "dry-run: would deny");
                    continue;
                }
                return Decision::Deny { policy: p.label.clone() };
            }
        }
        let enforced = self.allow.iter().filter(|p| !p.dry_run);
        let mut any_enforced = false;
        for p in enforced {
            any_enforced = true;
            if p.matches(a) {
                return Decision::Allow;
            }
        }
        for p in self.allow.iter().filter(|p| p.dry_run) {
            if !p.matches(a) {
                tracing::info!(policy = %p.label, "dry-run: would not allow");
            }
        }
        if any_enforced { Decision::Deny { policy: ALLOW_POLICIES.into() } } else { Decision::Allow }
    }
}

fn compile(policy: &Policy, warnings: &mut Vec<String>) -> Result<CompiledPolicy, InvalidPolicy> {
    let spec = &policy.spec;
    let action = spec.action.unwrap_or_default();
    let mut ctx = Ctx { policy, field: "spec.action".into() };
    if action == Action::Custom {
        return Err(
            ctx.invalid("CUSTOM needs an external authorizer, which this proxy does not call; use ALLOW or DENY")
        );
    }
    if spec.provider.is_some() {
        ctx.field = "spec.provider".into();
        return Err(ctx.invalid("`provider` is only for CUSTOM"));
    }
    if matches!(action, Action::Deny | Action::Audit) && spec.rules.is_none() {
        ctx.field = "spec.rules".into();
        return Err(ctx.invalid(format!("a {action:?} policy needs rules")));
    }
    let mut rules = Vec::new();
    'rules: for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let from =
            entries(&mut ctx, &at, rule.from.as_ref(), ("from", "source"), |e: &From| e.source.as_ref(), source_preds)?;
        let to = entries(
            &mut ctx,
            &at,
            rule.to.as_ref(),
            ("to", "operation"),
            |e: &To| e.operation.as_ref(),
            operation_preds,
        )?;
        let mut when = Vec::new();
        for (j, cond) in rule.when.iter().flatten().enumerate() {
            ctx.field = format!("{at}.when[{j}]");
            if cond.values.is_none() && cond.not_values.is_none() {
                return Err(ctx.invalid("a condition needs `values` or `notValues`"));
            }
            let Some((kind, args)) = condition_kind(&cond.key) else {
                warnings.push(format!(
                    "{}: {}: unsupported key `{}`; the rule is skipped",
                    ctx.invalid("").policy,
                    ctx.field,
                    cond.key
                ));
                continue 'rules;
            };
            if let Some(values) = &cond.values {
                when.push(field(&ctx, kind, values, false, &args)?);
            }
            if let Some(values) = &cond.not_values {
                when.push(field(&ctx, kind, values, true, &args)?);
            }
        }
        rules.push(CompiledRule { from, to, when });
    }
    Ok(CompiledPolicy { label: policy.label().into(), action, dry_run: policy.dry_run, rules })
}

fn source_preds(ctx: &mut Ctx<'_>, s: &Source) -> Result<Vec<Pred>, InvalidPolicy> {
    let base = ctx.field.clone();
    if s.service_accounts.is_some() && (s.principals.is_some() || s.namespaces.is_some()) {
        return Err(ctx.invalid("`serviceAccounts` cannot be combined with `principals` or `namespaces`"));
    }
    let fields: [(&Option<Vec<String>>, &str, Kind, bool); 14] = [
        (&s.principals, "principals", Kind::Principal, false),
        (&s.not_principals, "notPrincipals", Kind::Principal, true),
        (&s.request_principals, "requestPrincipals", Kind::RequestPrincipal, false),
        (&s.not_request_principals, "notRequestPrincipals", Kind::RequestPrincipal, true),
        (&s.namespaces, "namespaces", Kind::Namespace, false),
        (&s.not_namespaces, "notNamespaces", Kind::Namespace, true),
        (&s.service_accounts, "serviceAccounts", Kind::ServiceAccount, false),
        (&s.not_service_accounts, "notServiceAccounts", Kind::ServiceAccount, true),
        (&s.ip_blocks, "ipBlocks", Kind::SourceIp, false),
        (&s.not_ip_blocks, "notIpBlocks", Kind::SourceIp, true),
        (&s.remote_ip_blocks, "remoteIpBlocks", Kind::RemoteIp, false),
        (&s.not_remote_ip_blocks, "notRemoteIpBlocks", Kind::RemoteIp, true),
        (&s.trust_domains, "trustDomains", Kind::TrustDomain, false),
        (&s.not_trust_domains, "notTrustDomains", Kind::TrustDomain, true),
    ];
    compile_fields(ctx, &base, &fields)
}

fn operation_preds(ctx: &mut Ctx<'_>, o: &Operation) -> Result<Vec<Pred>, InvalidPolicy> {
    let base = ctx.field.clone();
    let fields: [(&Option<Vec<String>>, &str, Kind, bool); 8] = [
        (&o.hosts, "hosts", Kind::Host, false),
        (&o.not_hosts, "notHosts", Kind::Host, true),
        (&o.ports, "ports", Kind::Port, false),
        (&o.not_ports, "notPorts", Kind::Port, true),
        (&o.methods, "methods", Kind::Method, false),
        (&o.not_methods, "notMethods", Kind::Method, true),
        (&o.paths, "paths", Kind::Path, false),
        (&o.not_paths, "notPaths", Kind::Path, true),
    ];
    compile_fields(ctx, &base, &fields)
}

/// A source's or operation's fields, each present one a predicate (ANDed by the caller).
fn compile_fields(
    ctx: &mut Ctx<'_>,
    base: &str,
    fields: &[(&Option<Vec<String>>, &str, Kind, bool)],
) -> Result<Vec<Pred>, InvalidPolicy> {
    let mut preds = Vec::new();
    for (values, name, kind, negated) in fields {
        if let Some(values) = values {
            ctx.field = format!("{base}.{name}");
            preds.push(field(ctx, *kind, values, *negated, &[])?);
        }
    }
    Ok(preds)
}

/// A rule's `from` or `to` list: absent matches anything; present, each entry needs its
/// non-empty block (`source` / `operation`), compiled by `compile`.
fn entries<E, B: PartialEq + Default>(
    ctx: &mut Ctx<'_>,
    at: &str,
    list: Option<&Vec<E>>,
    (list_name, block_name): (&str, &str),
    block: impl Fn(&E) -> Option<&B>,
    compile: impl Fn(&mut Ctx<'_>, &B) -> Result<Vec<Pred>, InvalidPolicy>,
) -> Result<Option<Vec<Vec<Pred>>>, InvalidPolicy> {
    let Some(list) = list else { return Ok(None) };
    ctx.field = format!("{at}.{list_name}");
    if list.is_empty() {
        return Err(ctx.invalid(format!("an empty list; leave `{list_name}` out to match anything")));
    }
    let mut compiled = Vec::new();
    for (j, entry) in list.iter().enumerate() {
        ctx.field = format!("{at}.{list_name}[{j}].{block_name}");
        let Some(b) = block(entry).filter(|b| **b != B::default()) else {
            return Err(ctx.invalid(format!("a `{list_name}` entry needs a non-empty `{block_name}`")));
        };
        compiled.push(compile(ctx, b)?);
    }
    Ok(Some(compiled))
}

// === the layer ===

/// Where a layer finds its authorizer: fixed, or swapped by a config reload.
#[derive(Clone)]
enum Source_ {
    Fixed(Arc<Authorizer>),
    Swapped(Arc<ArcSwap<Authorizer>>),
}

/// Applies an [`Authorizer`] to every request (see the module docs).
#[derive(Clone)]
pub struct AuthorizationLayer {
    source: Source_,
}

impl fmt::Debug for AuthorizationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationLayer").finish_non_exhaustive()
    }
}

impl AuthorizationLayer {
    /// A layer with fixed policies.
    pub fn new(authorizer: Authorizer) -> Self {
        Self { source: Source_::Fixed(Arc::new(authorizer)) }
    }

    /// A layer reading the authorizer `current` holds at each request (store a new one on
    /// reload).
    pub fn swapped(current: Arc<ArcSwap<Authorizer>>) -> Self {
        Self { source: Source_::Swapped(current) }
    }
}

impl<S> tower::Layer<S> for AuthorizationLayer {
    type Service = Authorization<S>;
    fn layer(&self, inner: S) -> Authorization<S> {
        Authorization { inner, source: self.source.clone() }
    }
}

/// The service of [`AuthorizationLayer`].
#[derive(Clone)]
pub struct Authorization<S> {
    inner: S,
    source: Source_,
}

impl<S: fmt::Debug> fmt::Debug for Authorization<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorization").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, B, RB> tower::Service<Request<B>> for Authorization<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<LocalOr<RB>>;
    type Error = S::Error;
    type Future = Authorized<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let decision = match &self.source {
            Source_::Fixed(a) => a.decide(&RequestAttrs::of(&req)),
            Source_::Swapped(a) => a.load().decide(&RequestAttrs::of(&req)),
        };
        match decision {
            Decision::Allow => Authorized::Inner { future: self.inner.call(req) },
            Decision::Deny { policy } => {
                tracing::debug!(%policy, method = %req.method(), path = req.uri().path(), "request denied by authorization policy");
                Authorized::Denied { response: Some(denied(req.headers())) }
            }
        }
    }
}

/// 403 `RBAC: access denied`, or gRPC `PERMISSION_DENIED`; flag `RBAC`.
pub fn denied<RB>(request_headers: &HeaderMap) -> Response<LocalOr<RB>> {
    const BODY: &str = "RBAC: access denied";
    let grpc =
        request_headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut res = if grpc {
        let mut res = Response::new(LocalOr::local(Bytes::new()));
        let h = res.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(mesh_core::GrpcCode::PERMISSION_DENIED.as_u32()));
        h.insert("grpc-message", HeaderValue::from_static("RBAC: access denied"));
        res
    } else {
        let mut res = Response::new(LocalOr::local(Bytes::from_static(BODY.as_bytes())));
        *res.status_mut() = StatusCode::FORBIDDEN;
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        res
    };
    ResponseFlags::record(res.extensions_mut(), ResponseFlags::RBAC_ACCESS_DENIED);
    res
}

pin_project_lite::pin_project! {
    /// The future of [`Authorization`] (and of the JWT layer): the inner service's
    /// (`future`), or a refusal (`response`).
    #[project = AuthorizedProj]
    #[allow(missing_docs)]
    pub enum Authorized<F, RB> {
        /// Allowed: the inner service's.
        Inner { #[pin] future: F },
        /// Denied.
        Denied { response: Option<Response<LocalOr<RB>>> },
    }
}

impl<F, RB, E> Future for Authorized<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<LocalOr<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthorizedProj::Inner { future } => future.poll(cx).map_ok(|res| res.map(LocalOr::inner)),
            AuthorizedProj::Denied { response } => Poll::Ready(Ok(response.take().expect("polled after completion"))),
        }
    }
}
