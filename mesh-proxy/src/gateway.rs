//! The ingress gateway: Istio `Gateway` resources served on listeners of their own.
//!
//! A proxy whose `MeshProxy` lists gateway listeners (`spec.gateway.listeners`: a Gateway
//! port number and the local address that stands for it) serves, on each, the servers of the
//! Gateways whose `selector` its workload's labels satisfy (an empty selector selects every
//! gateway proxy), as Istio's ingress gateway does:
//!
//! * **HTTP** (`HTTP`, `HTTP2`, `GRPC`): requests are routed by the VirtualServices bound to
//!   the Gateway (`gateways: [name]` or `[namespace/name]`; a short name is in the
//!   VirtualService's namespace). A virtual host answers for the names in both the
//!   VirtualService's `hosts` and the server's `hosts` (`*.example.com` and `*` on either
//!   side); other names get 404 `NR`. Several VirtualServices bound to the port's Gateways
//!   for one host are merged, as Istio merges them for gateways: the routes of each follow
//!   those of the ones loaded before it (files in name order, documents in file order; Istio
//!   orders by creation time), and catch-all routes go last (Istio's `SortVHostRoutes`), so
//!   one VirtualService's catch-all does not hide another's specific routes. `tls.httpsRedirect: true` answers every request for
//!   the server's hosts with a 301 to `https://` (Envoy's `require_tls`).
//! * **TLS** (`HTTPS`, `TLS`): the ClientHello's SNI picks the server (an exact host before a
//!   wildcard, the longest wildcard first; no SNI only reaches a `*` server), then its
//!   `tls.mode`:
//!   * `SIMPLE`: TLS is terminated with the server's certificate and the HTTP inside is
//!     routed as above (HTTP/1.1 or h2, by ALPN). Its requests must be for the server's own
//!     hosts: another `Host` / `:authority` on that connection gets 421 Misdirected Request,
//!     so a connection made to one server cannot reach the routes of another (a MUTUAL one's).
//!   * `MUTUAL`: the same, and the client must present a certificate that the server's CA
//!     bundle verifies and, when `subjectAltNames` is set, that names one of them (a DNS or
//!     URI SAN); both are checked in the handshake, so a refused client gets a TLS alert.
//!   * `PASSTHROUGH`: the connection is not terminated. The chosen server's own TLS routes
//!     (those of VirtualServices bound to its Gateway, their `sniHosts` narrowed to its hosts
//!     and its hosts' namespace restrictions), first match first, pick a destination by
//!     weight, and the connection's bytes, ClientHello included, are copied to one of its
//!     endpoints (skipping ejected ones) until either side closes or nothing moves for the
//!     stream idle timeout. No route: the connection is closed. A passed-through connection
//!     counts against the connection cap and the drain waits for it.
//!
//! The gateway is the mesh's edge: `x-forwarded-client-cert` from a client is dropped,
//! `x-forwarded-proto` is set to the client's scheme and the client's address is appended to
//! `x-forwarded-for` (Envoy's `use_remote_address`, as Istio configures its gateways).
//!
//! Certificates come from `serverCertificate` / `privateKey` / `caCertificates` (PEM files,
//! relative to the Gateway's file) or from `credentialName`, looked up as the files of a
//! mounted `kubernetes.io/tls` Secret under `MeshProxy.spec.gateway.credentialsDir`
//! (`NAME/tls.crt`, `NAME/tls.key`, `NAME/ca.crt`, or `NAME-cacert/ca.crt` for the CA as
//! Istio also accepts). They are read when the configuration is (re)loaded, and a change to
//! one of them (a renewed Secret) reloads it too; a file that does not load refuses the
//! configuration, naming the Gateway, and the running one keeps serving.
//!
//! Decisions where Istio has more than this proxy needs on one host: the listener set is
//! fixed at start (a Gateway port without a listener is reported, not opened); one route
//! table serves all the plaintext or terminated servers of a port, so a VirtualService bound
//! to one Gateway also answers, through another Gateway's server on the same port, for a host
//! both servers list (the 421 check keeps TLS connections to their server's hosts), which
//! for plaintext servers is what Istio does too (one route configuration per port); one
//! server whose certificate does not load refuses the whole reload and the running
//! configuration keeps serving (Istio drops that server only); servers'
//! `bind` and `defaultEndpoint`, `ISTIO_MUTUAL`, `AUTO_PASSTHROUGH` and `OPTIONAL_MUTUAL`
//! are reported and not served; `cipherSuites`, `verifyCertificateSpki` / `Hash` and
//! `caCrl` are reported as not enforced (rustls's defaults apply).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use mesh_routing::model::{HttpRedirect, HttpRoute, VirtualServiceSpec};
use mesh_routing::{DestinationKey, RouteContext, RouteTable, VirtualHostConfig};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::loader::{Resource, Resources, Severity};
use crate::snapshot::CompileError;

// === The resource ===

/// `Gateway.spec` (networking.istio.io).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The gateway proxies it applies to, by their workload's labels.
    pub selector: BTreeMap<String, String>,
    /// What the gateway serves.
    pub servers: Vec<ServerSpec>,
}

/// One `Server` of a Gateway.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServerSpec {
    /// The port and its protocol.
    pub port: PortSpec,
    /// The hosts served: `name`, `*.suffix` or `*`, optionally `namespace/` first (only
    /// VirtualServices of that namespace bind; `./` is the Gateway's own, `*/` any).
    pub hosts: Vec<String>,
    /// TLS settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsSpec>,
    /// A name for the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The address to bind (not served: the listener's address is the MeshProxy's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// Where to forward traffic that no route takes (not served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_endpoint: Option<String>,
}

/// A server's `port`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PortSpec {
    /// The port number (the gateway Service's port).
    pub number: u32,
    /// `HTTP`, `HTTPS`, `HTTP2`, `GRPC`, `TLS`, …
    pub protocol: String,
    /// The port's name.
    pub name: String,
    /// The container port (the MeshProxy's listener stands for it here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// A server's `tls`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServerTlsSpec {
    /// Answer plain HTTP with a 301 to HTTPS.
    pub https_redirect: bool,
    /// `SIMPLE` (the default), `MUTUAL`, `PASSTHROUGH`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The certificate chain (PEM file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    /// Its private key (PEM file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// The CA bundle client certificates are verified with (MUTUAL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// A Secret's name (see the module's docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Client certificate names accepted (MUTUAL).
    pub subject_alt_names: Vec<String>,
    /// `TLS_AUTO`, `TLSV1_2` or `TLSV1_3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<String>,
    /// `TLS_AUTO`, `TLSV1_2` or `TLSV1_3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<String>,
    /// Not enforced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    /// Not enforced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_spki: Vec<String>,
    /// Not enforced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_hash: Vec<String>,
    /// Not enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
}

/// What a server's protocol makes of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http,
    Tls,
}

fn protocol(name: &str) -> Option<Protocol> {
    match name.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" => Some(Protocol::Http),
        "HTTPS" | "TLS" => Some(Protocol::Tls),
        _ => None,
    }
}

/// A server's TLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Simple,
    Mutual,
    Passthrough,
}

fn mode(tls: &ServerTlsSpec) -> Result<Mode, String> {
    match tls.mode.as_deref().unwrap_or("SIMPLE") {
        "SIMPLE" => Ok(Mode::Simple),
        "MUTUAL" => Ok(Mode::Mutual),
        "PASSTHROUGH" => Ok(Mode::Passthrough),
        m @ ("ISTIO_MUTUAL" | "AUTO_PASSTHROUGH" | "OPTIONAL_MUTUAL") => {
            Err(format!("`{m}` is not served by this proxy"))
        }
        m => Err(format!("`{m}` is not a TLS mode (SIMPLE, MUTUAL, PASSTHROUGH, …)")),
    }
}

/// The loader's checks of a Gateway: (field, severity, message).
pub(crate) fn check(spec: &GatewaySpec) -> Vec<(String, Severity, String)> {
    let mut out = Vec::new();
    let mut say = |field: String, severity, message: &str| out.push((field, severity, message.to_owned()));
    if spec.servers.is_empty() {
        say("spec.servers".into(), Severity::Error, "a Gateway needs at least one server");
    }
    for (i, s) in spec.servers.iter().enumerate() {
        let at = |f: &str| format!("spec.servers[{i}].{f}");
        if !(1..=65535).contains(&s.port.number) {
            say(at("port.number"), Severity::Error, "must be a port number, 1 to 65535");
        }
        let proto = protocol(&s.port.protocol);
        if proto.is_none() {
            say(
                at("port.protocol"),
                Severity::Warning,
                "not served: a gateway proxy serves HTTP, HTTP2, GRPC, HTTPS and TLS servers",
            );
        }
        if s.hosts.is_empty() {
            say(at("hosts"), Severity::Error, "a server needs at least one host");
        }
        if s.bind.is_some() {
            say(at("bind"), Severity::Warning, "not served: the MeshProxy's gateway listener gives the address");
        }
        if s.default_endpoint.is_some() {
            say(at("defaultEndpoint"), Severity::Warning, "parsed, but not enforced yet");
        }
        match (&s.tls, proto) {
            (None, Some(Protocol::Tls)) => {
                say(at("tls"), Severity::Error, "an HTTPS or TLS server needs `tls` settings, as Istio requires");
            }
            (Some(tls), Some(Protocol::Tls)) => match mode(tls) {
                Err(e) => say(at("tls.mode"), Severity::Warning, &format!("{e}; the server is left out")),
                Ok(Mode::Passthrough) => {}
                Ok(m) => {
                    if s.port.protocol.eq_ignore_ascii_case("TLS") {
                        say(
                            at("port.protocol"),
                            Severity::Warning,
                            "TLS terminated here is served as HTTP (VirtualService `tcp` routes are not supported)",
                        );
                    }
                    if tls.credential_name.is_none() && (tls.server_certificate.is_none() || tls.private_key.is_none())
                    {
                        say(
                            at("tls"),
                            Severity::Error,
                            "needs `credentialName`, or `serverCertificate` and `privateKey`",
                        );
                    }
                    if m == Mode::Mutual && tls.credential_name.is_none() && tls.ca_certificates.is_none() {
                        say(
                            at("tls.caCertificates"),
                            Severity::Error,
                            "MUTUAL needs a CA bundle to verify clients with",
                        );
                    }
                }
            },
            (Some(tls), Some(Protocol::Http)) if tls.mode.is_some() && !tls.https_redirect => {
                say(at("tls.mode"), Severity::Warning, "ignored on a plaintext HTTP server");
            }
            _ => {}
        }
        if let Some(tls) = &s.tls {
            for (value, field) in [
                (&tls.min_protocol_version, "tls.minProtocolVersion"),
                (&tls.max_protocol_version, "tls.maxProtocolVersion"),
            ] {
                match value.as_deref() {
                    None | Some("TLS_AUTO" | "TLSV1_2" | "TLSV1_3") => {}
                    Some("TLSV1_0" | "TLSV1_1") => {
                        say(at(field), Severity::Warning, "TLS 1.0 and 1.1 are not offered; TLS 1.2 is the least")
                    }
                    Some(v) => say(at(field), Severity::Error, &format!("`{v}` is not TLS_AUTO, TLSV1_2 or TLSV1_3")),
                }
            }
            for (set, field) in [
                (!tls.cipher_suites.is_empty(), "tls.cipherSuites"),
                (!tls.verify_certificate_spki.is_empty(), "tls.verifyCertificateSpki"),
                (!tls.verify_certificate_hash.is_empty(), "tls.verifyCertificateHash"),
                (tls.ca_crl.is_some(), "tls.caCrl"),
            ] {
                if set {
                    say(at(field), Severity::Warning, "parsed, but not enforced yet (rustls's defaults apply)");
                }
            }
        }
    }
    out
}

// === The compiled plan ===

/// What the gateway listeners serve, compiled with each snapshot.
#[derive(Debug, Default)]
pub struct Plan {
    /// By Gateway port number.
    pub ports: BTreeMap<u16, PortPlan>,
}

/// One gateway port.
#[derive(Debug)]
pub struct PortPlan {
    tls: bool,
    /// Its servers (the TLS ones are chosen by SNI).
    servers: Vec<ServerPlan>,
    /// Its HTTP routes.
    pub table: Arc<RouteTable>,
}

struct ServerPlan {
    /// `namespace/name` of its Gateway.
    gateway: String,
    /// Its hosts (lowercase, no namespace part): a terminated connection's requests must be
    /// for one of them.
    hosts: Arc<[String]>,
    mode: Option<Mode>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Its TLS routes (PASSTHROUGH), in order, their SNI names narrowed to its hosts.
    passthrough: Vec<PassRoute>,
    /// The certificate files it was built from (watched for renewal).
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for ServerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerPlan")
            .field("gateway", &self.gateway)
            .field("hosts", &self.hosts)
            .field("mode", &self.mode)
            .finish()
    }
}

#[derive(Debug)]
struct PassRoute {
    sni: Vec<String>,
    /// Destinations with cumulative weights.
    targets: Vec<(DestinationKey, u64)>,
}

/// Whether `pattern` (`name`, `*.suffix` or `*`) covers `name` (which may be a wildcard too).
fn covers(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        None => pattern == name,
    }
}

/// The names both patterns cover, as one pattern.
fn intersect(a: &str, b: &str) -> Option<String> {
    if covers(a, b) {
        Some(b.to_owned())
    } else if covers(b, a) {
        Some(a.to_owned())
    } else {
        None
    }
}

/// A server host's namespace part (`None`: any) and name.
fn split_host<'a>(host: &'a str, gateway_ns: &'a str) -> (Option<&'a str>, String) {
    match host.split_once('/') {
        Some(("*", h)) => (None, h.to_ascii_lowercase()),
        Some((".", h)) => (Some(gateway_ns), h.to_ascii_lowercase()),
        Some((ns, h)) => (Some(ns), h.to_ascii_lowercase()),
        None => (None, host.to_ascii_lowercase()),
    }
}

/// Istio's routes for a gateway host that several VirtualServices route: each one's routes up
/// to its first catch-all (the rest are unreachable), in load order, then the catch-alls
/// moved behind all other routes (Istio's `SortVHostRoutes`), so a later VirtualService's
/// specific routes are not hidden by an earlier one's catch-all.
fn merge_routes(earlier: &[HttpRoute], later: &[HttpRoute]) -> Vec<HttpRoute> {
    let reachable = |routes: &[HttpRoute]| routes.iter().position(catch_all).map_or(routes.len(), |i| i + 1);
    let (mut specific, catch_alls): (Vec<HttpRoute>, Vec<HttpRoute>) =
        earlier[..reachable(earlier)].iter().chain(&later[..reachable(later)]).cloned().partition(|r| !catch_all(r));
    specific.extend(catch_alls);
    specific
}

/// Whether a route takes every request, as Envoy's route table sees it: no match blocks, or a
/// block with no condition but a `prefix: /` (or `.*`) path and no listener port. A route with
/// both kinds of blocks counts as a catch-all as a whole (Istio moves only its catch-all block).
fn catch_all(route: &HttpRoute) -> bool {
    route.condition.is_none()
        && (route.matches.is_empty()
            || route.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == 0) && mesh_core::matching::HttpMatch::new(m).is_ok_and(|h| h.is_catch_all())
            }))
}

/// A gateway name as a VirtualService in `ns` writes it, as `namespace/name`.
pub(crate) fn qualify(gateway: &str, ns: &str) -> String {
    if gateway == "mesh" || gateway.contains('/') { gateway.to_owned() } else { format!("{ns}/{gateway}") }
}

/// The inputs of [`compile`] the snapshot already has.
pub(crate) struct Inputs<'a> {
    pub(crate) resources: &'a Resources,
    pub(crate) default_ns: &'a str,
    pub(crate) labels: &'a BTreeMap<String, String>,
    /// A VirtualService's HTTP routes as the sidecar's table has them (destinations as FQDNs).
    pub(crate) http_routes: &'a dyn Fn(&Resource<VirtualServiceSpec>) -> Vec<HttpRoute>,
    pub(crate) fqdn: &'a dyn Fn(&str, &str) -> String,
}

/// Compiles the plan of the proxy's gateway listeners, or `None` when it has none.
pub(crate) fn compile(inputs: &Inputs<'_>, notes: &mut Vec<String>) -> Result<Option<Plan>, CompileError> {
    let resources = inputs.resources;
    let Some(proxy) = resources.mesh_proxy.as_ref() else { return Ok(None) };
    let Some(spec) = proxy.spec.gateway.as_ref().filter(|g| !g.listeners.is_empty()) else {
        if !resources.gateways.is_empty() {
            notes.push("Gateways are loaded, but the MeshProxy has no gateway listeners: not served".into());
        }
        return Ok(None);
    };
    let proxy_dir = proxy.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let credentials = spec.credentials_dir.as_ref().map(|d| proxy_dir.join(d));

    // The Gateways this proxy is.
    let selected: Vec<(String, &Resource<GatewaySpec>)> = resources
        .gateways
        .iter()
        .filter(|g| g.spec.selector.iter().all(|(k, v)| inputs.labels.get(k) == Some(v)))
        .map(|g| (format!("{}/{}", g.namespace(inputs.default_ns), g.metadata.name), g))
        .collect();

    let mut plan = Plan::default();
    for listener in &spec.listeners {
        let number = u16::try_from(listener.port).unwrap_or(0);
        let mut servers = Vec::new();
        let mut kinds = Vec::new();
        for (name, g) in &selected {
            let err = |message: String| CompileError {
                resource: format!("Gateway {name} ({}:{})", g.file.display(), g.line),
                message,
            };
            let ns = g.namespace(inputs.default_ns);
            for (i, s) in g.spec.servers.iter().enumerate() {
                if s.port.number != listener.port {
                    continue;
                }
                let Some(proto) = protocol(&s.port.protocol) else { continue };
                let (mode, tls, files) = match (proto, &s.tls) {
                    (Protocol::Tls, Some(t)) => match mode(t) {
                        Ok(Mode::Passthrough) => (Some(Mode::Passthrough), None, Vec::new()),
                        Ok(m) => {
                            let base = g.file.parent().map(Path::to_path_buf).unwrap_or_default();
                            let (config, files) = server_config(t, m, &base, credentials.as_deref())
                                .map_err(|e| err(format!("spec.servers[{i}].tls: {e}")))?;
                            (Some(m), Some(config), files)
                        }
                        Err(_) => continue,
                    },
                    (Protocol::Tls, None) => continue,
                    (Protocol::Http, _) => (None, None, Vec::new()),
                };
                kinds.push(proto);
                servers.push((
                    ServerPlan {
                        gateway: name.clone(),
                        hosts: s.hosts.iter().map(|h| split_host(h, ns).1).collect(),
                        mode,
                        tls,
                        passthrough: Vec::new(),
                        files,
                    },
                    s,
                    ns,
                ));
            }
        }
        if servers.is_empty() {
            notes.push(format!(
                "gateway port {}: no selected Gateway has a server on it; every request there gets 404",
                listener.port
            ));
        }
        kinds.dedup();
        if kinds.len() > 1 {
            return Err(CompileError {
                resource: format!("Gateway servers on port {}", listener.port),
                message: "plaintext HTTP and TLS servers share the port; Istio refuses this too".into(),
            });
        }
        let is_tls = kinds.first() == Some(&Protocol::Tls);

        // HTTP routes: redirects first (they win a host), then bound VirtualServices.
        let mut hosts: Vec<VirtualHostConfig> = Vec::new();
        let mut redirects = Vec::new();
        for (server, s, _) in &servers {
            if s.tls.as_ref().is_some_and(|t| t.https_redirect) && !is_tls {
                let mut route = HttpRoute::named(format!("{} https-redirect", server.gateway));
                let mut redirect = HttpRedirect::default();
                redirect.scheme = Some("https".into());
                route.redirect = Some(redirect);
                let name = format!("{} https-redirect", server.gateway);
                redirects.push(name.clone());
                hosts.push(VirtualHostConfig::new(name, server.hosts.to_vec(), vec![route]));
            }
        }
        let gateways: Vec<String> = servers.iter().map(|(s, _, _)| s.gateway.clone()).collect();
        for vs in &resources.virtual_services {
            let vs_ns = vs.namespace(inputs.default_ns);
            let bound: Vec<String> = vs.spec.gateways.iter().map(|g| qualify(g, vs_ns)).collect();
            // Servers whose Gateway the VirtualService names, and whose hosts admit it.
            if !servers.iter().any(|(s, _, _)| bound.contains(&s.gateway)) {
                continue;
            }
            let mut domains = Vec::new();
            for (server, spec, gw_ns) in servers.iter().filter(|(s, _, _)| bound.contains(&s.gateway)) {
                if server.mode == Some(Mode::Passthrough)
                    || spec.tls.as_ref().is_some_and(|t| t.https_redirect) && !is_tls
                {
                    continue;
                }
                for h in &spec.hosts {
                    let (only_ns, host) = split_host(h, gw_ns);
                    if only_ns.is_some_and(|n| n != vs_ns) {
                        continue;
                    }
                    for vh in &vs.spec.hosts {
                        if let Some(d) = intersect(&host, &vh.to_ascii_lowercase())
                            && !domains.contains(&d)
                        {
                            domains.push(d);
                        }
                    }
                }
            }
            if !domains.is_empty() && !vs.spec.http.is_empty() {
                let mut routes = (inputs.http_routes)(vs);
                for r in &mut routes {
                    for m in &mut r.matches {
                        for g in &mut m.gateways {
                            *g = qualify(g, vs_ns);
                        }
                    }
                }
                let name = format!("{vs_ns}/{}", vs.metadata.name);
                let mut fresh = Vec::new();
                // The earlier virtual hosts this one's domains are merged into, with the domains.
                let mut hits: Vec<(usize, Vec<String>)> = Vec::new();
                for d in domains {
                    match hosts.iter().position(|h| h.domains.contains(&d)) {
                        None => fresh.push(d),
                        Some(i) if redirects.contains(&hosts[i].name) => notes.push(format!(
                            "gateway port {}: {d} is redirected to https; {name}'s routes for it are not used",
                            listener.port
                        )),
                        Some(i) => match hits.iter_mut().find(|(j, _)| *j == i) {
                            Some((_, ds)) => ds.push(d),
                            None => hits.push((i, vec![d])),
                        },
                    }
                }
                for (i, ds) in hits {
                    let merged = format!("{}+{name}", hosts[i].name);
                    let both = merge_routes(&hosts[i].routes, &routes);
                    if ds.len() == hosts[i].domains.len() {
                        hosts[i].name = merged;
                        hosts[i].routes = both;
                    } else {
                        hosts[i].domains.retain(|h| !ds.contains(h));
                        hosts.push(VirtualHostConfig::new(merged, ds, both));
                    }
                }
                if !fresh.is_empty() {
                    hosts.push(VirtualHostConfig::new(name, fresh, routes));
                }
            }
            // TLS routes: each PASSTHROUGH server of a bound Gateway takes the routes whose
            // `sniHosts` its hosts admit (namespace restrictions included), narrowed to them.
            for route in &vs.spec.tls {
                let targets = pass_targets(route, vs_ns, inputs.fqdn);
                if targets.is_empty() {
                    continue;
                }
                for (server, spec, gw_ns) in servers.iter_mut() {
                    if server.mode != Some(Mode::Passthrough) || !bound.contains(&server.gateway) {
                        continue;
                    }
                    let admitted: Vec<String> = spec
                        .hosts
                        .iter()
                        .map(|h| split_host(h, gw_ns))
                        .filter(|(only_ns, _)| only_ns.is_none_or(|n| n == vs_ns))
                        .map(|(_, h)| h)
                        .collect();
                    let mut sni = Vec::new();
                    for m in &route.matches {
                        let port_ok = m.port.is_none_or(|p| p == 0 || p == listener.port);
                        let gw_ok =
                            m.gateways.is_empty() || m.gateways.iter().any(|g| qualify(g, vs_ns) == server.gateway);
                        if !(port_ok && gw_ok) {
                            continue;
                        }
                        for h in &m.sni_hosts {
                            for host in &admitted {
                                if let Some(both) = intersect(host, &h.to_ascii_lowercase())
                                    && !sni.contains(&both)
                                {
                                    sni.push(both);
                                }
                            }
                        }
                    }
                    if !sni.is_empty() {
                        server.passthrough.push(PassRoute { sni, targets: targets.clone() });
                    }
                }
            }
        }
        let mut context = RouteContext::default();
        context.listener_port = Some(number);
        context.namespace = Some(inputs.default_ns.to_owned());
        context.labels = inputs.labels.clone();
        context.gateways = gateways.clone();
        let table = RouteTable::new(&hosts, &context).map_err(|e| CompileError {
            resource: format!("VirtualServices bound to gateway port {}", listener.port),
            message: e.to_string(),
        })?;
        notes.extend(table.notes().iter().map(|n| format!("gateway port {}: {n}", listener.port)));
        plan.ports.insert(
            number,
            PortPlan { tls: is_tls, servers: servers.into_iter().map(|(s, _, _)| s).collect(), table: Arc::new(table) },
        );
    }
    // Gateway ports this proxy has no listener for.
    for (name, g) in &selected {
        for s in &g.spec.servers {
            if !spec.listeners.iter().any(|l| l.port == s.port.number) {
                notes.push(format!(
                    "Gateway {name}: port {} has no listener in the MeshProxy (spec.gateway.listeners); not served",
                    s.port.number
                ));
            }
        }
    }
    Ok(Some(plan))
}

/// A TLS route's destinations with cumulative weights (an omitted weight is 100 alone, 0
/// among several).
fn pass_targets(
    route: &mesh_routing::model::TlsRoute,
    ns: &str,
    fqdn: &dyn Fn(&str, &str) -> String,
) -> Vec<(DestinationKey, u64)> {
    let single = route.route.len() == 1;
    let mut total = 0u64;
    let mut targets = Vec::new();
    for d in &route.route {
        let weight = match d.weight {
            Some(w) => u64::try_from(w).unwrap_or(0),
            None if single => 100,
            None => 0,
        };
        if weight == 0 {
            continue;
        }
        total += weight;
        let mut key = DestinationKey::new(fqdn(&d.destination.host, ns));
        if let Some(subset) = &d.destination.subset {
            key = key.with_subset(subset.as_str());
        }
        if let Some(port) = d.destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) {
            key = key.with_port(port);
        }
        targets.push((key, total));
    }
    targets
}

impl PortPlan {
    /// Whether its servers speak TLS (HTTPS, TLS) rather than plaintext HTTP.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }
}

impl Plan {
    /// The certificate files its servers were built from: a change to one reloads.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        self.ports.values().flat_map(|p| p.servers.iter().flat_map(|s| s.files.iter().cloned())).collect()
    }

    /// Every destination its routes can send to.
    pub(crate) fn destinations(&self) -> Vec<Arc<DestinationKey>> {
        let mut all = Vec::new();
        for port in self.ports.values() {
            all.extend(port.table.destinations());
            for server in &port.servers {
                all.extend(server.passthrough.iter().flat_map(|r| r.targets.iter().map(|(k, _)| Arc::new(k.clone()))));
            }
        }
        all.sort();
        all.dedup();
        all
    }
}

/// A server's TLS configuration, from its files.
fn server_config(
    tls: &ServerTlsSpec,
    mode: Mode,
    base: &Path,
    credentials: Option<&Path>,
) -> Result<(Arc<rustls::ServerConfig>, Vec<PathBuf>), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let (cert, key, ca): (PathBuf, PathBuf, Option<PathBuf>) = match &tls.credential_name {
        Some(name) => {
            let Some(dir) = credentials else {
                return Err(format!(
                    "credentialName `{name}`: the MeshProxy has no spec.gateway.credentialsDir to find it in"
                ));
            };
            let secret = dir.join(name);
            let ca = [secret.join("ca.crt"), dir.join(format!("{name}-cacert")).join("ca.crt")]
                .into_iter()
                .find(|p| p.exists());
            (secret.join("tls.crt"), secret.join("tls.key"), ca)
        }
        None => (
            base.join(tls.server_certificate.as_deref().unwrap_or_default()),
            base.join(tls.private_key.as_deref().unwrap_or_default()),
            tls.ca_certificates.as_ref().map(|c| base.join(c)),
        ),
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_slice(&read(&key)?).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = mesh_tls::identity::provider();
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        match (tls.min_protocol_version.as_deref(), tls.max_protocol_version.as_deref()) {
            (Some("TLSV1_3"), _) => vec![&rustls::version::TLS13],
            (_, Some("TLSV1_2")) => vec![&rustls::version::TLS12],
            _ => vec![&rustls::version::TLS13, &rustls::version::TLS12],
        };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let mut files = vec![cert.clone(), key.clone()];
    let builder = if mode == Mode::Mutual {
        let Some(ca) = ca else {
            return Err("MUTUAL: no CA bundle (caCertificates, or ca.crt of the credential)".into());
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(&ca)?) {
            let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        files.push(ca.clone());
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        if tls.subject_alt_names.is_empty() {
            builder.with_client_cert_verifier(chain)
        } else {
            builder.with_client_cert_verifier(Arc::new(SanVerifier { chain, names: tls.subject_alt_names.clone() }))
        }
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), files))
}

// === Serving a TLS port ===

/// How a TLS connection on a gateway port goes on.
pub(crate) enum Opened {
    /// Terminated (SIMPLE, MUTUAL): HTTP inside.
    Terminated(Box<tokio_rustls::server::TlsStream<mesh_tls::Rewind<TcpStream>>>, Option<Arc<str>>, ServerHosts),
    /// To pass through: the bytes read so far, the connection, and where it goes.
    Passthrough(Bytes, TcpStream, Vec<(DestinationKey, u64)>),
}

/// The most a ClientHello may take.
const HELLO_LIMIT: usize = 16 * 1024;

/// Reads the ClientHello, picks the server by its SNI and terminates TLS or finds the
/// passthrough route. `Err` says why the connection is closed.
pub(crate) async fn open_tls(mut stream: TcpStream, port: &PortPlan) -> Result<Opened, String> {
    let mut buf = BytesMut::with_capacity(2048);
    let mut acceptor = rustls::server::Acceptor::default();
    let sni: Option<String> = loop {
        let before = buf.len();
        if buf.len() >= HELLO_LIMIT {
            return Err("ClientHello too large".into());
        }
        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before its ClientHello ended".into());
        }
        // rustls takes at most a few KiB per call: feed it all that was read.
        let mut fresh = &buf[before..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh).map_err(|e| e.to_string())?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => break accepted.client_hello().server_name().map(str::to_ascii_lowercase),
            Err((e, _)) => return Err(format!("not a TLS ClientHello: {e}")),
        }
    };
    let server = pick_server(&port.servers, sni.as_deref())
        .ok_or_else(|| format!("no server for SNI {}", sni.as_deref().unwrap_or("(none)")))?;
    match (server.mode, &server.tls) {
        (Some(Mode::Passthrough), _) => {
            let sni = sni.ok_or("PASSTHROUGH needs an SNI")?;
            let route = server
                .passthrough
                .iter()
                .find(|r| r.sni.iter().any(|p| covers(p, &sni)))
                .ok_or_else(|| format!("no TLS route for SNI {sni}"))?;
            Ok(Opened::Passthrough(buf.freeze(), stream, route.targets.clone()))
        }
        (_, Some(config)) => {
            let io = mesh_tls::Rewind::new(buf.freeze(), stream);
            let tls = tokio_rustls::TlsAcceptor::from(config.clone()).accept(io).await.map_err(|e| e.to_string())?;
            Ok(Opened::Terminated(Box::new(tls), sni.map(Arc::from), ServerHosts(server.hosts.clone())))
        }
        _ => Err("the server has no TLS settings".into()),
    }
}

/// The hosts of the server a terminated connection reached: its requests must name one of
/// them. Another name (reachable through the same certificate by connection reuse, or named
/// on purpose to reach another server's routes, a MUTUAL one's say) is answered 421
/// Misdirected Request, as Envoy answers a request its filter chain does not serve.
#[derive(Clone, Debug)]
pub(crate) struct ServerHosts(Arc<[String]>);

impl ServerHosts {
    /// Whether `authority` (a `host[:port]`) is one of the hosts.
    pub(crate) fn admit(&self, authority: &str) -> bool {
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        };
        let host = host.to_ascii_lowercase();
        self.0.iter().any(|pattern| covers(pattern, &host))
    }
}

/// The server whose hosts cover `sni` most specifically: an exact name, then the longest
/// wildcard. Without an SNI only a `*` server is reached.
fn pick_server<'a>(servers: &'a [ServerPlan], sni: Option<&str>) -> Option<&'a ServerPlan> {
    let score = |pattern: &str| match sni {
        None => (pattern == "*").then_some(0),
        Some(name) if pattern == name => Some(usize::MAX),
        Some(name) => covers(pattern, name).then_some(pattern.len()),
    };
    servers
        .iter()
        .filter(|s| s.mode.is_some())
        .filter_map(|s| s.hosts.iter().filter_map(|h| score(h)).max().map(|sc| (sc, s)))
        .max_by_key(|(sc, _)| *sc)
        .map(|(_, s)| s)
}

/// MUTUAL with `subjectAltNames`: the client's chain verified by webpki, then its leaf must
/// name one of them (a DNS or URI SAN), within the handshake (a refused client gets a TLS
/// alert, not a closed connection after it).
#[derive(Debug)]
struct SanVerifier {
    chain: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    names: Vec<String>,
}

impl rustls::server::danger::ClientCertVerifier for SanVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        if sans(end_entity).iter().any(|n| self.names.contains(n)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A certificate's DNS and URI subject alternative names.
fn sans(cert: &rustls::pki_types::CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else { return Vec::new() };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else { return Vec::new() };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// Copies a passed-through connection to an endpoint of a destination picked by weight.
pub(crate) async fn pass_through(
    prefix: Bytes,
    client: TcpStream,
    targets: Vec<(DestinationKey, u64)>,
    routes: Arc<crate::routes::Routes>,
    idle_limit: Option<std::time::Duration>,
) {
    use tokio::io::AsyncWriteExt;
    let total = targets.last().map_or(0, |(_, t)| *t);
    let draw = routes.random().below(total.max(1));
    let Some((key, _)) = targets.iter().find(|(_, upto)| draw < *upto) else { return };
    let Some(cluster) = routes.cluster(key) else {
        tracing::debug!(destination = %key, "passthrough: no such cluster");
        return;
    };
    let health: &dyn mesh_routing::balance::HealthView = match &cluster.outlier {
        Some(detector) => detector,
        None => &(),
    };
    let Some(picked) = cluster.balancer.pick(None, health) else {
        tracing::debug!(destination = %key, "passthrough: no healthy endpoint");
        return;
    };
    let address = picked.endpoint().address().clone();
    let connect = tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(&*address));
    let mut upstream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(endpoint = %address, error = %e, "passthrough: connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(endpoint = %address, "passthrough: connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&prefix).await.is_err() {
        return;
    }
    // Closed when either side closes, or when no byte has moved for the stream idle timeout.
    let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut client = crate::tunnel::Counted::new(client, moved.clone());
    let mut upstream = crate::tunnel::Counted::new(upstream, moved.clone());
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        () = crate::tunnel::idle(&moved, idle_limit) => tracing::debug!("passthrough idle for the stream idle timeout: closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_intersect_as_istio_binds_them() {
        assert_eq!(intersect("*", "shop.example.com").as_deref(), Some("shop.example.com"));
        assert_eq!(intersect("*.example.com", "shop.example.com").as_deref(), Some("shop.example.com"));
        assert_eq!(intersect("shop.example.com", "*").as_deref(), Some("shop.example.com"));
        assert_eq!(intersect("*.example.com", "*.a.example.com").as_deref(), Some("*.a.example.com"));
        assert_eq!(intersect("*.example.com", "example.com"), None);
        assert_eq!(intersect("a.example.com", "b.example.com"), None);
        assert_eq!(split_host("./shop.example.com", "web"), (Some("web"), "shop.example.com".into()));
        assert_eq!(split_host("*/Shop.example.com", "web"), (None, "shop.example.com".into()));
        assert_eq!(qualify("shop-gw", "web"), "web/shop-gw");
        assert_eq!(qualify("mesh", "web"), "mesh");
    }

    #[test]
    fn the_most_specific_server_takes_an_sni() {
        let server = |hosts: &[&str]| ServerPlan {
            gateway: hosts.join(","),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            mode: Some(Mode::Passthrough),
            tls: None,
            passthrough: Vec::new(),
            files: Vec::new(),
        };
        let servers = [server(&["*"]), server(&["*.example.com"]), server(&["shop.example.com"])];
        let pick = |sni| pick_server(&servers, sni).map(|s| s.gateway.as_str());
        assert_eq!(pick(Some("shop.example.com")), Some("shop.example.com"));
        assert_eq!(pick(Some("api.example.com")), Some("*.example.com"));
        assert_eq!(pick(Some("other.org")), Some("*"));
        assert_eq!(pick(None), Some("*"));
        assert_eq!(pick_server(&servers[1..], None).map(|s| s.gateway.as_str()), None);
        let hosts = ServerHosts(Arc::from(vec!["shop.example.com".to_owned(), "*.api.example.com".to_owned()]));
        assert!(
            hosts.admit("shop.example.com")
                && hosts.admit("Shop.Example.com:8443")
                && hosts.admit("v1.api.example.com")
        );
        assert!(!hosts.admit("partner.example.com") && !hosts.admit("api.example.com") && !hosts.admit("[::1]:443"));
    }
}
