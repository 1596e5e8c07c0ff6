//! Route tables compiled from VirtualService `http` rules.
//!
//! A [`RouteTable`] holds virtual hosts (a VirtualService's `hosts`, with every name they are
//! reached by), each with its routes in order. Choosing a route is Envoy's algorithm as Istio
//! configures it (SEMANTICS.md 1.5): the virtual host by the request's authority (exact
//! names, then the longest `*.suffix` wildcard, then `*`), then the first route with a match
//! block that holds; the blocks of one route are OR-ed and the conditions of one block
//! AND-ed. No match is a 404 with flag `NR`. Routes after a catch-all are dropped at compile
//! time and reported in [`RouteTable::notes`].
//!
//! Everything is compiled once: matchers, regexes, header values, cumulative weights.
//! Choosing a route and a destination allocates nothing.
//!
//! ```
//! use mesh_core::matching::{HttpMatchRequest, StringMatch};
//! use mesh_routing::model::{HttpMatchRequestExt, HttpRoute};
//! use mesh_routing::{RouteTable, random::Random};
//!
//! let table = RouteTable::from_routes(&[
//!     HttpRoute::named("canary")
//!         .matching(HttpMatchRequest::default().header("x-canary", StringMatch::Exact("true".into())))
//!         .to("reviews", Some("v2"), 100),
//!     HttpRoute::named("split").to("reviews", Some("v1"), 90).to("reviews", Some("v2"), 10),
//! ])?
//! .with_random(Random::seeded(1));
//!
//! let req = http::Request::get("/").header("x-canary", "true").body(())?;
//! let (route, target) = table.decide(&req).expect("a route matches");
//! assert_eq!(&**route.name(), "canary");
//! assert_eq!(target.key().subset.as_deref(), Some("v2"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{COOKIE, HOST};
use http::{HeaderName, Request};
use mesh_core::RouteDecision;
use mesh_core::matching::{HttpMatch, HttpMatchRequest, RequestView};
use mesh_resilience::retry::RetryPolicy;

use crate::action::{self, DirectResponse, HeaderRules, Redirect, Rewrite};
use crate::index::Index;
use crate::model::{Destination, HttpRoute};
use crate::profile::RequestCondition;
use crate::random::Random;

// === errors ===

/// A route that cannot be compiled: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidRoute {
    field: String,
    reason: String,
}

impl InvalidRoute {
    pub(crate) fn new(field: &str, reason: &str) -> Self {
        Self { field: field.to_owned(), reason: reason.to_owned() }
    }

    /// The field path, like `http[1].route[0].weight`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why it is invalid.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The same error with `prefix.` in front of its field path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{}", self.field) };
        self
    }
}

// === DestinationKey ===

/// Where a route sends a request: a host, a subset and a port. Envoy's cluster
/// `outbound|port|subset|host` is its [`Display`](fmt::Display).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub struct DestinationKey {
    /// The service host.
    pub host: Arc<str>,
    /// The subset, if any.
    pub subset: Option<Arc<str>>,
    /// The port, if the route names one.
    pub port: Option<u16>,
}

impl DestinationKey {
    /// A key for `host` with no subset or port.
    pub fn new(host: impl Into<Arc<str>>) -> Self {
        Self { host: host.into(), subset: None, port: None }
    }

    /// Sets the subset.
    pub fn with_subset(mut self, subset: impl Into<Arc<str>>) -> Self {
        self.subset = Some(subset.into());
        self
    }

    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The key of a routing decision.
    pub fn of(decision: &RouteDecision) -> Self {
        Self { host: decision.destination_host.clone(), subset: decision.subset.clone(), port: decision.port }
    }

    fn from_model(d: &Destination, path: &str) -> Result<Self, InvalidRoute> {
        if d.host.trim().is_empty() {
            return Err(InvalidRoute::new(&format!("{path}.host"), "a destination needs a host"));
        }
        let port = d
            .port
            .as_ref()
            .map(|p| {
                u16::try_from(p.number)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| InvalidRoute::new(&format!("{path}.port.number"), "must be from 1 to 65535"))
            })
            .transpose()?;
        Ok(Self {
            host: d.host.as_str().into(),
            subset: d.subset.as_deref().filter(|s| !s.is_empty()).map(Into::into),
            port,
        })
    }
}

impl fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = self.port.map(|p| p.to_string()).unwrap_or_default();
        write!(f, "outbound|{port}|{}|{}", self.subset.as_deref().unwrap_or(""), self.host)
    }
}

// === configuration ===

/// One virtual host: the names it answers to and its routes, as a loader assembles it from
/// a VirtualService.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VirtualHostConfig {
    /// A name for logs and `/routes` (e.g. `namespace/virtual-service`).
    pub name: String,
    /// Host names, lowercase, without ports; `*.suffix` wildcards and `*` allowed.
    pub domains: Vec<String>,
    /// The `http` routes, in order.
    pub routes: Vec<HttpRoute>,
    /// How this host's weighted choices are made; `None` follows the table's
    /// ([`RouteTable::with_split_key`]).
    pub split_key: Option<SplitKey>,
}

impl VirtualHostConfig {
    /// A virtual host answering to `domains`.
    pub fn new(name: impl Into<String>, domains: Vec<String>, routes: Vec<HttpRoute>) -> Self {
        Self { name: name.into(), domains, routes, split_key: None }
    }

    /// Makes this host's weighted choices sticky by `key` (or per request).
    pub fn with_split_key(mut self, key: SplitKey) -> Self {
        self.split_key = Some(key);
        self
    }
}

/// Config-time filters of match blocks (SEMANTICS.md 1.3): which listener port and which
/// workload the table is compiled for. The default keeps every block that names none.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RouteContext {
    /// The listener's port: blocks naming another `port` are left out.
    pub listener_port: Option<u16>,
    /// The workload's namespace: blocks naming another `sourceNamespace` are left out.
    pub namespace: Option<String>,
    /// The workload's labels: blocks whose `sourceLabels` are not all among them are left out.
    pub labels: BTreeMap<String, String>,
    /// The gateways the table serves, as `namespace/name`: empty for a sidecar (`mesh`).
    /// Blocks whose `gateways` name none of them are left out; a gateway's name in a block
    /// must be written `namespace/name` by then (a loader resolves short names in the
    /// VirtualService's namespace).
    pub gateways: Vec<String>,
}

impl RouteContext {
    /// Whether the table serves `gateway` (`mesh`, or `namespace/name`).
    fn serves(&self, gateway: &str) -> bool {
        if self.gateways.is_empty() { gateway == "mesh" } else { self.gateways.iter().any(|g| g == gateway) }
    }
}

/// How the weighted choice is made: independently per request (Envoy, Istio), or sticky by
/// a hash of a header or cookie, so one user stays on one destination while the split holds
/// over users (a mesh extension).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SplitKey {
    /// A fresh draw per request.
    #[default]
    PerRequest,
    /// Hash of this header's value (a request without it gets a fresh draw).
    Header(HeaderName),
    /// Hash of this cookie's value (a request without it gets a fresh draw).
    Cookie(String),
}

// === the table ===

/// Compiled virtual hosts and routes. See the module docs.
#[derive(Debug)]
pub struct RouteTable {
    hosts: Box<[VirtualHost]>,
    exact: HashMap<Box<str>, usize>,
    /// `(".suffix", host)`, longest suffix first.
    suffixes: Box<[(Box<str>, usize)]>,
    any: Option<usize>,
    split_key: SplitKey,
    random: Arc<Random>,
    notes: Vec<String>,
}

#[derive(Debug)]
struct VirtualHost {
    name: Arc<str>,
    domains: Box<[Box<str>]>,
    routes: Box<[Arc<Route>]>,
    /// Every block in evaluation order, as (route, block), and the index over them.
    order: Box<[(u32, u32)]>,
    index: Option<Index>,
}

/// One compiled route. See the module docs.
#[derive(Debug)]
pub struct Route {
    name: Arc<str>,
    /// The virtual host's split key, when it has one of its own.
    split_key: Option<SplitKey>,
    blocks: Box<[Block]>,
    action: Action,
    headers: HeaderRules,
    rewrite: Rewrite,
    timeout: Option<Duration>,
    mirrors: Box<[Mirror]>,
    /// The route's retry policy (Istio's default when it has no `retries`).
    retry: Arc<RetryPolicy>,
    /// The route's faults.
    fault: Option<Arc<mesh_resilience::fault::FaultPolicy>>,
}

#[derive(Debug)]
struct Block {
    /// As configured (for the index).
    config: HttpMatchRequest,
    matcher: HttpMatch,
    /// The block's `port`, checked per request against the port the request was sent to,
    /// when the table is not compiled for one listener port ([`RouteContext::listener_port`]).
    port: Option<u16>,
    /// `<route>.<match>` when the block is named, else the route's name.
    name: Arc<str>,
    /// The route's condition beyond its blocks (a ServiceProfile's), AND-ed with each.
    condition: Option<RequestCondition>,
}

/// What a route does with a matching request.
#[derive(Debug)]
#[non_exhaustive]
pub enum Action {
    /// Forward to one of the weighted destinations.
    Forward(Split),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    Direct(DirectResponse),
}

/// Weighted destinations with their cumulative weights (SEMANTICS.md 1.8).
#[derive(Debug)]
pub struct Split {
    total: u64,
    targets: Box<[Target]>,
}

/// One destination of a route, with its own header operations.
#[derive(Debug)]
pub struct Target {
    end: u64,
    weight: u64,
    key: Arc<DestinationKey>,
    headers: HeaderRules,
}

#[derive(Debug)]
struct Mirror {
    key: Arc<DestinationKey>,
    /// Out of 1,000,000.
    per_million: u64,
}

impl RouteTable {
    /// Compiles virtual hosts for `context`. The first invalid field is the error.
    pub fn new(hosts: &[VirtualHostConfig], context: &RouteContext) -> Result<Self, InvalidRoute> {
        let mut compiled = Vec::with_capacity(hosts.len());
        let mut notes = Vec::new();
        let mut exact = HashMap::new();
        let mut suffixes = Vec::new();
        let mut any = None;
        for (h, config) in hosts.iter().enumerate() {
            let mut routes = Vec::with_capacity(config.routes.len());
            let mut reachable = true;
            for (i, route) in config.routes.iter().enumerate() {
                let path = format!("http[{i}]");
                let compiled_route = Route::new(route, i, &path, context)?;
                if !reachable {
                    notes.push(format!(
                        "{}: {path} is unreachable: an earlier route matches every request",
                        config.name
                    ));
                    continue;
                }
                let Some((mut compiled_route, catch_all)) = compiled_route else { continue };
                reachable = !catch_all;
                compiled_route.split_key = config.split_key.clone();
                routes.push(Arc::new(compiled_route));
            }
            for domain in &config.domains {
                let domain = domain.to_ascii_lowercase();
                if domain == "*" {
                    any.get_or_insert(h);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    suffixes.push((suffix.into(), h));
                } else {
                    exact.entry(domain.into_boxed_str()).or_insert(h);
                }
            }
            let order: Box<[(u32, u32)]> = routes
                .iter()
                .enumerate()
                .flat_map(|(r, route)| (0..route.blocks.len()).map(move |b| (r as u32, b as u32)))
                .collect();
            let configs: Vec<&HttpMatchRequest> =
                order.iter().map(|&(r, b)| &routes[r as usize].blocks[b as usize].config).collect();
            let index = Index::new(&configs);
            compiled.push(VirtualHost {
                name: config.name.as_str().into(),
                domains: config.domains.iter().map(|d| d.as_str().into()).collect(),
                routes: routes.into(),
                order,
                index,
            });
        }
        suffixes.sort_by_key(|(suffix, _): &(Box<str>, usize)| std::cmp::Reverse(suffix.len()));
        Ok(Self {
            hosts: compiled.into(),
            exact,
            suffixes: suffixes.into(),
            any,
            split_key: SplitKey::PerRequest,
            random: Arc::new(Random::from_entropy()),
            notes,
        })
    }

    /// A table of one virtual host that answers to every authority: what a service that is
    /// itself the gateway, or a client with one route list, needs.
    pub fn from_routes(routes: &[HttpRoute]) -> Result<Self, InvalidRoute> {
        Self::new(&[VirtualHostConfig::new("default", vec!["*".into()], routes.to_vec())], &RouteContext::default())
    }

    /// Draws from `random` (seed it for deterministic tests).
    pub fn with_random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }

    /// Makes the weighted choice sticky by `key`.
    pub fn with_split_key(mut self, key: SplitKey) -> Self {
        self.split_key = key;
        self
    }

    /// Routes after catch-alls, and similar findings a loader should warn about.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The random source the table draws from.
    pub fn random(&self) -> &Random {
        &self.random
    }

    /// Every destination any route may send to (mirrors included), once each.
    pub fn destinations(&self) -> Vec<Arc<DestinationKey>> {
        let mut all: Vec<Arc<DestinationKey>> = self
            .hosts
            .iter()
            .flat_map(|h| h.routes.iter())
            .flat_map(|r| {
                let targets = match &r.action {
                    Action::Forward(split) => &split.targets[..],
                    _ => &[],
                };
                targets.iter().map(|t| t.key.clone()).chain(r.mirrors.iter().map(|m| m.key.clone()))
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// `(virtual host name, domains, routes)` for each virtual host, for admin pages.
    pub fn virtual_hosts(&self) -> impl Iterator<Item = (&str, &[Box<str>], &[Arc<Route>])> {
        self.hosts.iter().map(|h| (&*h.name, &*h.domains, &*h.routes))
    }

    /// The route a request takes, and which of its blocks matched; `None` is "no route" (404 NR).
    pub fn find<B>(&self, req: &Request<B>) -> Option<(&Arc<Route>, usize)> {
        let host = &self.hosts[self.host_for(req)?];
        let cookies_joined;
        let headers = if req.version() >= http::Version::HTTP_2 && req.headers().get_all(COOKIE).iter().nth(1).is_some()
        {
            let mut joined = req.headers().clone();
            mesh_core::matching::join_cookie_crumbs(&mut joined);
            cookies_joined = joined;
            &cookies_joined
        } else {
            req.headers()
        };
        // Cookies and the query are parsed once for all the blocks that read them.
        let view = RequestView::new(req.method(), req.uri(), headers);
        match &host.index {
            // Only the blocks the index cannot rule out are evaluated, in order.
            Some(index) => {
                let found = index.first(&view, |i| {
                    let (r, b) = host.order[i];
                    host.routes[r as usize].blocks[b as usize].holds(&view)
                })?;
                let (r, b) = host.order[found];
                Some((&host.routes[r as usize], b as usize))
            }
            None => host
                .routes
                .iter()
                .find_map(|route| route.blocks.iter().position(|b| b.holds(&view)).map(|block| (route, block))),
        }
    }

    /// The route and, for a forwarding route, the weighted destination chosen for `req`.
    pub fn decide<B>(&self, req: &Request<B>) -> Option<(&Arc<Route>, &Target)> {
        let (route, _) = self.find(req)?;
        let Action::Forward(split) = &route.action else { return None };
        Some((route, split.pick(self.draw_for(route, req))))
    }

    /// The number the weighted choice uses for `req`: a fresh draw, or the hash of the
    /// split key.
    pub fn draw<B>(&self, req: &Request<B>) -> u64 {
        self.draw_by(&self.split_key, req)
    }

    /// The number the weighted choice of `route` uses for `req`: by its virtual host's split
    /// key, or the table's.
    pub fn draw_for<B>(&self, route: &Route, req: &Request<B>) -> u64 {
        self.draw_by(route.split_key.as_ref().unwrap_or(&self.split_key), req)
    }

    fn draw_by<B>(&self, key: &SplitKey, req: &Request<B>) -> u64 {
        let value = match key {
            SplitKey::PerRequest => None,
            SplitKey::Header(name) => req.headers().get(name).map(|v| v.as_bytes()),
            SplitKey::Cookie(name) => cookie(req.headers(), name),
        };
        match value {
            Some(v) => xxhash_rust::xxh64::xxh64(v, 0x6d65_7368),
            None => self.random.next_u64(),
        }
    }

    fn host_for<B>(&self, req: &Request<B>) -> Option<usize> {
        if self.hosts.len() == 1 && self.any == Some(0) {
            return Some(0);
        }
        let authority = match req.uri().authority() {
            // `[::1]` as the Host header's form is read below: without brackets.
            Some(a) => a.host().trim_start_matches('[').trim_end_matches(']'),
            None => {
                // No authority at all: only a `*` host answers.
                let Some(host) = req.headers().get(HOST).and_then(|h| h.to_str().ok()) else { return self.any };
                host.strip_prefix('[').map_or_else(
                    || {
                        host.rsplit_once(':')
                            .map_or(host, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
                    },
                    |v6| v6.split(']').next().unwrap_or(v6),
                )
            }
        };
        let authority = authority.strip_suffix('.').unwrap_or(authority);
        let lower;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = authority.to_ascii_lowercase();
            lower.as_str()
        } else {
            authority
        };
        if let Some(&h) = self.exact.get(authority) {
            return Some(h);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| authority.len() > suffix.len() && authority.ends_with(&**suffix))
            .map(|(_, h)| *h)
            .or(self.any)
    }
}

/// The value of cookie `name` in the request's `cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(COOKIE).iter().flat_map(|v| v.as_bytes().split(|&b| b == b';')).find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

// === Route ===

impl Route {
    /// Compiles route `index`; `None` when every match block is filtered out by `context`. The
    /// flag says whether the route matches every request (routes after it are unreachable).
    fn new(
        route: &HttpRoute,
        index: usize,
        path: &str,
        context: &RouteContext,
    ) -> Result<Option<(Self, bool)>, InvalidRoute> {
        let name: Arc<str> = match &route.name {
            Some(n) if !n.is_empty() => n.as_str().into(),
            _ => format!("route-{index}").into(),
        };
        let actions = usize::from(!route.route.is_empty())
            + usize::from(route.redirect.is_some())
            + usize::from(route.direct_response.is_some());
        if actions != 1 {
            let why = if actions == 0 {
                "an HTTP route needs one of `route`, `redirect` or `directResponse`"
            } else {
                "`route`, `redirect` and `directResponse` are mutually exclusive"
            };
            return Err(InvalidRoute::new(path, why));
        }
        if route.redirect.is_some() && route.rewrite.is_some() {
            return Err(InvalidRoute::new(path, "`redirect` and `rewrite` are mutually exclusive"));
        }
        if route.redirect.is_some() && route.fault.is_some() {
            return Err(InvalidRoute::new(path, "`redirect` and `fault` are mutually exclusive"));
        }
        if route.mirror.is_some() && !route.mirrors.is_empty() {
            return Err(InvalidRoute::new(path, "`mirror` and `mirrors` are mutually exclusive"));
        }
        let mut blocks = Vec::with_capacity(route.matches.len().max(1));
        let mut catch_all = route.matches.is_empty() && route.condition.is_none();
        for (j, m) in route.matches.iter().enumerate() {
            let field = format!("{path}.match[{j}]");
            let matcher = HttpMatch::new(m).map_err(|e| InvalidRoute::new(&field, &e.to_string()))?;
            if !applies(m, context) {
                continue;
            }
            let port = match (m.port, context.listener_port) {
                (Some(p), None) if p != 0 => Some(
                    u16::try_from(p)
                        .map_err(|_| InvalidRoute::new(&format!("{field}.port"), "must be a port from 1 to 65535"))?,
                ),
                _ => None,
            };
            catch_all |= matcher.is_catch_all() && port.is_none() && route.condition.is_none();
            let name = match &m.name {
                Some(n) if !n.is_empty() => format!("{name}.{n}").into(),
                _ => name.clone(),
            };
            blocks.push(Block { config: m.clone(), matcher, port, name, condition: route.condition.clone() });
        }
        if route.matches.is_empty() {
            blocks.push(Block {
                config: HttpMatchRequest::default(),
                matcher: HttpMatch::any(),
                port: None,
                name: name.clone(),
                condition: route.condition.clone(),
            });
        }
        let action = if let Some(r) = &route.redirect {
            Action::Redirect(Redirect::new(r, &format!("{path}.redirect"))?)
        } else if let Some(d) = &route.direct_response {
            Action::Direct(DirectResponse::new(d, &format!("{path}.directResponse"))?)
        } else {
            Action::Forward(Split::new(route, path)?)
        };
        let headers = HeaderRules::new(route.headers.as_ref(), &format!("{path}.headers"))?;
        let rewrite = Rewrite::new(route.rewrite.as_ref(), &format!("{path}.rewrite"))?;
        if rewrite.authority.is_some() && headers.authority.is_some() {
            return Err(InvalidRoute::new(
                &format!("{path}.headers.request"),
                "the authority is rewritten both here and in `rewrite.authority`",
            ));
        }
        let timeout = match route.timeout {
            Some(t) if t.get() < Duration::from_millis(1) => {
                return Err(InvalidRoute::new(&format!("{path}.timeout"), "must be at least 1ms"));
            }
            Some(t) if !t.get().subsec_nanos().is_multiple_of(1_000_000) => {
                return Err(InvalidRoute::new(&format!("{path}.timeout"), "must be a whole number of milliseconds"));
            }
            t => t.map(|t| t.get()),
        };
        let mut mirrors = Vec::new();
        if let Some(m) = &route.mirror {
            let pct = route.mirror_percentage.map_or(100.0, |p| p.value());
            mirrors.push(Mirror::new(m, pct, &format!("{path}.mirror"))?);
        }
        for (k, m) in route.mirrors.iter().enumerate() {
            let pct = m.percentage.map_or(100.0, |p| p.value());
            mirrors.push(Mirror::new(&m.destination, pct, &format!("{path}.mirrors[{k}].destination"))?);
        }
        let fault = route
            .fault
            .as_ref()
            .map(|f| f.to_policy().map(Arc::new).map_err(|e| e.within(&format!("{path}.fault"))))
            .transpose()?;
        let retry = match (&route.retry_policy, &route.retries) {
            (Some(policy), _) => policy.clone(),
            (None, Some(r)) => Arc::new(
                RetryPolicy::from_istio(r)
                    .map_err(|e| InvalidRoute::new(&format!("{path}.retries.{}", e.field()), &e.to_string()))?,
            ),
            (None, None) => Arc::new(RetryPolicy::istio_default()),
        };
        if blocks.is_empty() {
            return Ok(None);
        }
        let route = Self {
            name,
            split_key: None,
            blocks: blocks.into(),
            action,
            headers,
            rewrite,
            timeout,
            mirrors: mirrors.into(),
            retry,
            fault,
        };
        Ok(Some((route, catch_all)))
    }

    /// The route's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The name of match block `block` (`<route>.<match>` when the block is named).
    pub fn block_name(&self, block: usize) -> &Arc<str> {
        self.blocks.get(block).map_or(&self.name, |b| &b.name)
    }

    /// What the route does.
    pub fn action(&self) -> &Action {
        &self.action
    }

    /// The route timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The route's faults, if any.
    pub fn fault(&self) -> Option<&Arc<mesh_resilience::fault::FaultPolicy>> {
        self.fault.as_ref()
    }

    /// The route's condition beyond its match blocks (a ServiceProfile route's), if any.
    pub fn condition(&self) -> Option<&RequestCondition> {
        self.blocks.first().and_then(|b| b.condition.as_ref())
    }

    /// The route's retry policy: its `retries`, or Istio's default.
    pub fn retry_policy(&self) -> &Arc<RetryPolicy> {
        &self.retry
    }

    /// The mirrors chosen for one request (each by its own percentage).
    pub fn mirrors_for(&self, random: &Random) -> impl Iterator<Item = &Arc<DestinationKey>> {
        self.mirrors
            .iter()
            .filter(|m| m.per_million >= 1_000_000 || random.below(1_000_000) < m.per_million)
            .map(|m| &m.key)
    }

    /// Rewrites `req` as the route and `target` say: the path (keeping the old one in
    /// `x-envoy-original-path`), the authority, and the request header operations (the
    /// destination's, then the route's).
    pub fn prepare_request<B>(&self, block: usize, target: Option<&Target>, req: &mut Request<B>) {
        if self.rewrite.rewrites_path() {
            let b = self.blocks.get(block);
            if let Some(pq) = self.rewrite.path(req.uri(), b.and_then(|b| b.config.uri.as_ref())) {
                action::set_path(req, pq);
            }
        }
        let authority = self
            .rewrite
            .authority
            .as_ref()
            .or(self.headers.authority.as_ref())
            .or(target.and_then(|t| t.headers.authority.as_ref()));
        if let Some(a) = authority {
            action::set_authority(req, a);
        }
        if let Some(t) = target {
            t.headers.request.apply(req.headers_mut());
        }
        self.headers.request.apply(req.headers_mut());
    }

    /// Applies the response header operations (the destination's, then the route's).
    pub fn prepare_response(&self, target: Option<&Target>, headers: &mut http::HeaderMap) {
        if let Some(t) = target {
            t.headers.response.apply(headers);
        }
        self.headers.response.apply(headers);
    }

    /// Whether any response header operation is configured for `target`.
    pub fn has_response_ops(&self, target: Option<&Target>) -> bool {
        !self.headers.response.is_empty() || target.is_some_and(|t| !t.headers.response.is_empty())
    }

    /// The [`RouteDecision`] recording that block `block` of this route sent the request to
    /// `target`.
    pub fn decision(&self, block: usize, target: &Target) -> RouteDecision {
        let key = &target.key;
        let mut d = RouteDecision::new(self.block_name(block).clone(), key.host.clone());
        if let Some(s) = &key.subset {
            d = d.with_subset(s.clone());
        }
        if let Some(p) = key.port {
            d = d.with_port(p);
        }
        d
    }
}

impl Block {
    /// Whether the block holds for a request.
    fn holds(&self, view: &RequestView<'_>) -> bool {
        self.port.is_none_or(|p| request_port(view) == p)
            && self.matcher.matches_view(view)
            && self.condition.as_ref().is_none_or(|c| {
                let (method, uri, _) = view.parts();
                c.matches(method, uri.path())
            })
    }
}

/// The port a request was sent to: its authority's, or its scheme's default.
fn request_port(view: &RequestView<'_>) -> u16 {
    let (_, uri, headers) = view.parts();
    let explicit = match uri.authority() {
        Some(a) => a.port_u16(),
        None => headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':'))
            .filter(|(host, _)| !host.ends_with(':') && (!host.contains(':') || host.ends_with(']')))
            .and_then(|(_, port)| port.parse().ok()),
    };
    explicit.unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 })
}

/// Whether a match block's config-time conditions hold for `context`.
fn applies(m: &HttpMatchRequest, context: &RouteContext) -> bool {
    let port_ok = match (m.port, context.listener_port) {
        (Some(p), Some(l)) if p != 0 => p == u32::from(l),
        _ => true,
    };
    let gateways_ok = m.gateways.is_empty() || m.gateways.iter().any(|g| context.serves(g));
    let ns_ok = m.source_namespace.as_deref().is_none_or(|ns| context.namespace.as_deref() == Some(ns));
    let labels_ok = !m.gateways.is_empty()
        || m.source_labels.iter().all(|(k, v)| context.labels.get(k).is_some_and(|have| have == v));
    port_ok && gateways_ok && ns_ok && labels_ok
}

// === Split ===

impl Split {
    fn new(route: &HttpRoute, path: &str) -> Result<Self, InvalidRoute> {
        let single = route.route.len() == 1;
        let mut targets = Vec::with_capacity(route.route.len());
        let mut total: u64 = 0;
        for (k, d) in route.route.iter().enumerate() {
            let field = format!("{path}.route[{k}]");
            let weight = match d.weight {
                Some(w) if w < 0 => return Err(InvalidRoute::new(&format!("{field}.weight"), "must not be negative")),
                Some(w) if w > i64::from(u32::MAX) => {
                    return Err(InvalidRoute::new(&format!("{field}.weight"), "must be at most 4294967295"));
                }
                // One destination gets everything, whatever its weight says.
                _ if single => 1,
                Some(w) => w as u64,
                None => 0,
            };
            let key = DestinationKey::from_model(&d.destination, &format!("{field}.destination"))?;
            let headers = HeaderRules::new(d.headers.as_ref(), &format!("{field}.headers"))?;
            if weight == 0 {
                continue;
            }
            total += weight;
            targets.push(Target { end: total, weight, key: Arc::new(key), headers });
        }
        if targets.is_empty() {
            return Err(InvalidRoute::new(&format!("{path}.route"), "the total destination weight is 0"));
        }
        if total > u64::from(u32::MAX) {
            return Err(InvalidRoute::new(&format!("{path}.route"), "the total destination weight overflows 32 bits"));
        }
        Ok(Self { total, targets: targets.into() })
    }

    /// The destination for draw `r`: `r mod total` falls in one destination's interval of the
    /// cumulative weights, in config order (Envoy's `pickClusterIndex`).
    pub fn pick(&self, r: u64) -> &Target {
        &self.targets[self.pick_index(r)]
    }

    /// The index among [`targets`](Self::targets) of the destination for draw `r`.
    pub fn pick_index(&self, r: u64) -> usize {
        if self.targets.len() == 1 {
            return 0;
        }
        let v = r % self.total;
        self.targets.partition_point(|t| t.end <= v).min(self.targets.len() - 1)
    }

    /// The destinations with weight above zero, in config order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The sum of the weights.
    pub fn total_weight(&self) -> u64 {
        self.total
    }
}

impl Target {
    /// Where this destination sends requests.
    pub fn key(&self) -> &Arc<DestinationKey> {
        &self.key
    }

    /// Its weight.
    pub fn weight(&self) -> u64 {
        self.weight
    }
}

impl Mirror {
    fn new(d: &Destination, percent: f64, path: &str) -> Result<Self, InvalidRoute> {
        Ok(Self {
            key: Arc::new(DestinationKey::from_model(d, path)?),
            per_million: (percent * 10_000.0).round() as u64,
        })
    }
}
