//! Linkerd ServiceProfiles as routes: what a [`ServiceProfileSpec`] says, compiled into
//! [`HttpRoute`]s of the profile's service (for a [`VirtualHostConfig`](crate::VirtualHostConfig))
//! and into the retry layer's policy and budget.
//!
//! A profile route becomes an `HttpRoute` with
//!
//! * its `condition` compiled into a [`RequestCondition`] (`all`, `any`, `not`, `method`,
//!   `pathRegex` anchored at both ends as Linkerd anchors it, matched against the path without
//!   the query; several fields in one condition are AND-ed);
//! * its `timeout`, or Linkerd's default of 10 s, as the route timeout (over every try);
//! * a retry policy: an `isRetryable` route retries responses its `responseClasses` call
//!   failures (the first class whose condition holds decides; an unclassified response is a
//!   failure when it is 5xx) and trailers-only gRPC responses whose status is not OK, for any
//!   method, bounded by the profile's budget rather than by a count, as Linkerd does; every
//!   route also retries, twice, the failures that never reached the service (connect failure,
//!   refused stream).
//!
//! Decisions where Linkerd and Envoy differ: a retry waits the same jittered back-off as an
//! Istio retry (25 ms base, 250 ms cap; Linkerd retries at once, which only spends the
//! budget faster against a failing service); connection failures are retried on every route
//! (Linkerd's balancer hides them instead).
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! use mesh_routing::model::{HttpRoute, ServiceProfileSpec};
//! use mesh_routing::{RouteTable, VirtualHostConfig};
//!
//! let profile: ServiceProfileSpec = yaml_serde::from_str(r#"
//! routes:
//! - name: GET /books/{id}
//!   condition: {method: GET, pathRegex: '/books/\d+'}
//!   isRetryable: true
//!   timeout: 300ms
//! retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
//! "#).unwrap();
//! let fallback = HttpRoute::named("books").to("books.default.svc.cluster.local", None, 1);
//! let mut routes = profile.routes(&fallback).unwrap();
//! routes.push(fallback);
//! let table = RouteTable::new(&[VirtualHostConfig::new("books", vec!["books".into()], routes)], &Default::default()).unwrap();
//! let get = http::Request::get("http://books/books/42").body(()).unwrap();
//! assert_eq!(&**table.find(&get).unwrap().0.name(), "GET /books/{id}");
//! let post = http::Request::post("http://books/books/42").body(()).unwrap();
//! assert_eq!(&**table.find(&post).unwrap().0.name(), "books");
//! let budget = profile.retry_budget().unwrap();
//! # let _ = budget; }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use mesh_resilience::retry::{InvalidRetry, RetryOn, RetryPolicy, TokenBudget};

use crate::model::{
    HttpRoute, LinkerdRetryBudget, ProfileRequestMatch, ProfileResponseClass, ProfileResponseMatch, ServiceProfileSpec,
};
use crate::table::InvalidRoute;

/// Linkerd's route timeout when a profile route names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

// === RequestCondition ===

/// A compiled ServiceProfile request condition. See the [module docs](self).
#[derive(Clone)]
pub struct RequestCondition {
    node: Arc<Node>,
    /// A canonical rendering (for equality, logs and admin pages).
    text: Arc<str>,
}

enum Node {
    All(Box<[Node]>),
    Any(Box<[Node]>),
    Not(Box<Node>),
    Path(regex::Regex),
    Method(Method),
}

impl RequestCondition {
    /// Compiles `m`; the error names the field under `condition`.
    pub fn new(m: &ProfileRequestMatch) -> Result<Self, InvalidRoute> {
        let node = Node::request(m, "condition")?;
        let text = node.to_string().into();
        Ok(Self { node: Arc::new(node), text })
    }

    /// Whether a request with `method` and `path` (without the query) meets the condition.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.node.matches(method, path)
    }
}

impl Node {
    fn request(m: &ProfileRequestMatch, field: &str) -> Result<Node, InvalidRoute> {
        let list = |ms: &[ProfileRequestMatch], name: &str| -> Result<Box<[Node]>, InvalidRoute> {
            ms.iter().enumerate().map(|(i, m)| Node::request(m, &format!("{field}.{name}[{i}]"))).collect()
        };
        let mut all = Vec::new();
        if let Some(ms) = &m.all {
            all.push(Node::All(list(ms, "all")?));
        }
        if let Some(ms) = &m.any {
            all.push(Node::Any(list(ms, "any")?));
        }
        if let Some(method) = &m.method {
            let method = Method::from_bytes(method.as_bytes())
                .map_err(|_| InvalidRoute::new(&format!("{field}.method"), &format!("`{method}` is not a method")))?;
            all.push(Node::Method(method));
        }
        if let Some(not) = &m.not {
            all.push(Node::Not(Box::new(Node::request(not, &format!("{field}.not"))?)));
        }
        if let Some(re) = &m.path_regex {
            let re = re.trim();
            let anchored = format!(
                "{}{re}{}",
                if re.starts_with('^') { "" } else { "^" },
                if re.ends_with('$') { "" } else { "$" }
            );
            let re = regex::Regex::new(&anchored)
                .map_err(|e| InvalidRoute::new(&format!("{field}.pathRegex"), &format!("not a valid regex: {e}")))?;
            all.push(Node::Path(re));
        }
        match all.len() {
            0 => Err(InvalidRoute::new(field, "a condition needs one of `all`, `any`, `not`, `method`, `pathRegex`")),
            1 => Ok(all.pop().expect("one")),
            _ => Ok(Node::All(all.into())),
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        match self {
            Node::All(nodes) => nodes.iter().all(|n| n.matches(method, path)),
            Node::Any(nodes) => nodes.iter().any(|n| n.matches(method, path)),
            Node::Not(node) => !node.matches(method, path),
            Node::Path(re) => re.is_match(path),
            Node::Method(m) => m == method,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, name: &str, nodes: &[Node]| {
            write!(f, "{name}(")?;
            for (i, n) in nodes.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{n}")?;
            }
            f.write_str(")")
        };
        match self {
            Node::All(nodes) => list(f, "all", nodes),
            Node::Any(nodes) => list(f, "any", nodes),
            Node::Not(node) => write!(f, "not({node})"),
            Node::Path(re) => write!(f, "path ~ {}", re.as_str()),
            Node::Method(m) => write!(f, "method {m}"),
        }
    }
}

impl fmt::Debug for RequestCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestCondition({})", self.text)
    }
}

impl fmt::Display for RequestCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for RequestCondition {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

// === response classes ===

/// A ServiceProfile route's `responseClasses`, compiled. See the [module docs](self).
#[derive(Debug)]
pub struct ResponseClasses {
    classes: Vec<(StatusNode, bool)>,
}

#[derive(Debug)]
enum StatusNode {
    All(Vec<StatusNode>),
    Any(Vec<StatusNode>),
    Not(Box<StatusNode>),
    Range(u16, u16),
}

impl StatusNode {
    fn new(m: &ProfileResponseMatch, field: &str) -> Result<StatusNode, InvalidRoute> {
        let list = |ms: &[ProfileResponseMatch], name: &str| -> Result<Vec<StatusNode>, InvalidRoute> {
            ms.iter().enumerate().map(|(i, m)| StatusNode::new(m, &format!("{field}.{name}[{i}]"))).collect()
        };
        let mut all: Vec<StatusNode> = Vec::new();
        if let Some(ms) = &m.all {
            all.push(StatusNode::All(list(ms, "all")?));
        }
        if let Some(ms) = &m.any {
            all.push(StatusNode::Any(list(ms, "any")?));
        }
        if let Some(not) = &m.not {
            all.push(StatusNode::Not(Box::new(StatusNode::new(not, &format!("{field}.not"))?)));
        }
        if let Some(range) = &m.status {
            let bound = |v: Option<u32>, default: u16, name: &str| match v {
                None | Some(0) => Ok(default),
                Some(v) => u16::try_from(v).ok().filter(|v| (100..=599).contains(v)).ok_or_else(|| {
                    InvalidRoute::new(&format!("{field}.status.{name}"), "must be a status from 100 to 599")
                }),
            };
            let (min, max) = (bound(range.min, 100, "min")?, bound(range.max, 599, "max")?);
            if min > max {
                return Err(InvalidRoute::new(&format!("{field}.status"), "`min` is above `max`"));
            }
            all.push(StatusNode::Range(min, max));
        }
        match all.len() {
            0 => Err(InvalidRoute::new(field, "a response condition needs one of `all`, `any`, `not`, `status`")),
            1 => Ok(all.pop().expect("one")),
            _ => Ok(StatusNode::All(all)),
        }
    }

    fn matches(&self, status: u16) -> bool {
        match self {
            StatusNode::All(nodes) => nodes.iter().all(|n| n.matches(status)),
            StatusNode::Any(nodes) => nodes.iter().any(|n| n.matches(status)),
            StatusNode::Not(node) => !node.matches(status),
            StatusNode::Range(min, max) => (*min..=*max).contains(&status),
        }
    }
}

impl ResponseClasses {
    /// Compiles `classes`; the error names the field under `responseClasses`.
    pub fn new(classes: &[ProfileResponseClass]) -> Result<Self, InvalidRoute> {
        let classes = classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let field = format!("responseClasses[{i}].condition");
                let condition = c.condition.as_ref().ok_or_else(|| InvalidRoute::new(&field, "is required"))?;
                Ok((StatusNode::new(condition, &field)?, c.is_failure))
            })
            .collect::<Result<_, InvalidRoute>>()?;
        Ok(Self { classes })
    }

    /// Whether a response with `status` is a failure: as the first class whose condition
    /// holds says, else when it is 5xx.
    pub fn is_failure(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.classes.iter().find(|(c, _)| c.matches(code)).map_or(status.is_server_error(), |(_, failure)| *failure)
    }
}

// === routes, policies, budgets ===

/// The conditions every profile route retries: failures that never reached the service.
const NEVER_SENT: &str = "connect-failure,refused-stream";

/// The retry policy of a profile route. See the [module docs](self).
pub fn retry_policy(route: &crate::model::ProfileRoute) -> Result<RetryPolicy, InvalidRoute> {
    let classes = ResponseClasses::new(&route.response_classes)?;
    let never_sent: RetryOn = NEVER_SENT.parse().expect("valid conditions");
    if !route.is_retryable {
        return Ok(RetryPolicy::new(2, never_sent));
    }
    let on = never_sent.with_failure_statuses(|s| classes.is_failure(s));
    Ok(RetryPolicy::new(u32::MAX, on).retrying_non_idempotent())
}

impl ServiceProfileSpec {
    /// The profile's routes, each sending where `template` sends (its `route`: the service,
    /// or a split of it) with the profile route's name, condition, timeout and retry policy.
    /// A request no profile route takes should fall through to `template` itself: push it
    /// after these. The error's field path starts at `routes[i]`.
    pub fn routes(&self, template: &HttpRoute) -> Result<Vec<HttpRoute>, InvalidRoute> {
        self.routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = |e: InvalidRoute| e.within(&format!("routes[{i}]"));
                if r.name.is_empty() {
                    return Err(at(InvalidRoute::new("name", "a profile route needs a name")));
                }
                let condition =
                    r.condition.as_ref().ok_or_else(|| at(InvalidRoute::new("condition", "is required")))?;
                let mut route = HttpRoute::named(r.name.clone());
                route.route = template.route.clone();
                route.headers = template.headers.clone();
                route.condition = Some(RequestCondition::new(condition).map_err(at)?);
                route.timeout = Some(r.timeout.unwrap_or(DEFAULT_TIMEOUT.into()));
                route.retry_policy = Some(Arc::new(retry_policy(r).map_err(at)?));
                Ok(route)
            })
            .collect()
    }

    /// The profile's retry budget, shared by every request to the service; Linkerd's default
    /// (0.2, 10 a second, 10 s) when the profile has none.
    pub fn retry_budget(&self) -> Result<TokenBudget, InvalidRetry> {
        match &self.retry_budget {
            None => Ok(TokenBudget::linkerd_default()),
            Some(LinkerdRetryBudget { retry_ratio, min_retries_per_second, ttl }) => {
                let ttl = ttl.ok_or_else(|| InvalidRetry::new("ttl", "is required in a retryBudget"))?;
                TokenBudget::new(*retry_ratio, *min_retries_per_second, ttl.get())
            }
        }
    }
}
