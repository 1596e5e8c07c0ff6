//! The compiled configuration: one immutable [`Snapshot`] built from [`Resources`], swapped
//! in whole on reload.
//!
//! Names resolve as Istio resolves them: a short host (no dot) in a resource of namespace
//! `ns` is `host.ns.svc.cluster.local` (the suffix comes from `MeshProxy`'s `domainSuffix`);
//! a name with a dot is taken as written. ServiceEntry hosts are resolved the same way, so a
//! ServiceEntry for `reviews` and a route to `reviews` in one namespace meet.
//!
//! Every VirtualService becomes a virtual host answering to its hosts and, for cluster-local
//! names, to the short forms a client in the proxy's namespace uses (`reviews`,
//! `reviews.default`, `reviews.default.svc`). Every service of a ServiceEntry or TrafficSplit
//! that no VirtualService covers gets a default virtual host sending everything to it.
//! Destinations (host, subset, port) become clusters: the service's endpoints whose labels
//! include the subset's, balanced by the DestinationRule's `loadBalancer` (the subset's own
//! when it has one; least request by default, as Istio). A destination whose host no
//! ServiceEntry describes is sent to the host name itself (resolved by DNS at connect time,
//! port 80 unless the route names one), as Istio's `resolution: DNS` would.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mesh_routing::balance::{Balancer, Endpoint, HashKey, LbPolicy};
use mesh_routing::model::{
    DestinationRuleSpec, HttpRoute, LoadBalancerSettings, ServiceProfileSpec, TrafficPolicy, VirtualServiceSpec,
};
use mesh_routing::{DestinationKey, RouteContext, RouteTable, SplitKey, VirtualHostConfig};

use crate::loader::{Resource, Resources, ServiceEntrySpec};

/// The annotation that makes a VirtualService's splits sticky: `header:NAME` or `cookie:NAME`.
pub const STICKY_ANNOTATION: &str = "mesh.dev/sticky-split";

/// One compiled configuration. See the module docs.
#[derive(Debug)]
pub struct Snapshot {
    /// The route table.
    pub table: Arc<RouteTable>,
    /// What the gateway listeners serve (with a `MeshProxy` that has some).
    pub gateway: Option<Arc<crate::gateway::Plan>>,
    /// Clusters by destination.
    pub clusters: HashMap<DestinationKey, Arc<Cluster>>,
    /// What the snapshot was compiled from (for `/config_dump`).
    pub resources: Resources,
    /// Findings worth a warning (unreachable routes, unknown subsets, …).
    pub notes: Vec<String>,
    /// The local rate limit every request passes first (an EnvoyFilter's or a Linkerd
    /// HTTPLocalRateLimitPolicy's).
    pub rate_limit: Option<Arc<mesh_resilience::ratelimit::RateLimitLayer>>,
    /// What the inbound listener enforces.
    pub security: Arc<Security>,
    /// Telemetry's tracing sampling for new traces, 0–100 (none: Istio's default, 1).
    pub trace_sampling: Option<f64>,
    /// Telemetry's access logging switched off for this workload.
    pub access_log_disabled: bool,
    /// Telemetry's `customTags`, added to each server span.
    pub span_tags: Vec<SpanTag>,
    /// Telemetry's `disableSpanReporting`: no spans from this workload.
    pub span_reporting_disabled: bool,
}

/// A span attribute from Telemetry's `customTags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanTag {
    /// A fixed value (a `literal`, or an `environment` variable read when compiled).
    Literal {
        /// The attribute.
        name: String,
        /// Its value.
        value: String,
    },
    /// A request header's value, or the default.
    Header {
        /// The attribute.
        name: String,
        /// The header.
        header: http::HeaderName,
        /// The value without the header (none: no attribute).
        default: Option<String>,
    },
}

/// The inbound side's policies for this workload: its PeerAuthentication mode,
/// RequestAuthentication and AuthorizationPolicies, scoped by namespace and selector.
#[derive(Debug, Default)]
pub struct Security {
    /// The mTLS mode of the inbound port.
    pub mode: mesh_tls::MtlsMode,
    /// JWT validation (none without a RequestAuthentication).
    pub jwt: Option<mesh_tls::jwt::JwtAuthenticator>,
    /// Authorization.
    pub authorizer: Arc<mesh_tls::authz::Authorizer>,
}

/// The endpoints of one destination and how to choose among them.
#[derive(Debug)]
pub struct Cluster {
    /// The destination.
    pub key: DestinationKey,
    /// The balancer over its endpoints.
    pub balancer: Balancer,
    /// The consistent-hash key, when the policy hashes.
    pub hash_key: Option<HashKey>,
    /// Outlier detection over the endpoints, when the DestinationRule asks for it.
    pub outlier: Option<mesh_resilience::outlier::OutlierDetector>,
    /// The connection-pool circuit breaker, when the DestinationRule sets a limit.
    pub breaker: Option<mesh_resilience::pool::CircuitBreaker>,
    /// The endpoints' connection settings (`connectionPool`).
    pub(crate) pool: crate::upstream::PoolSettings,
    /// HTTP/2 to the endpoints, or not (`h2UpgradePolicy`; mesh mTLS implies it unless the
    /// rule says `DO_NOT_UPGRADE`); `None`: the proxy's protocol.
    pub(crate) protocol: Option<crate::config::UpstreamProtocol>,
    /// The retry budget shared by every request to this destination: the DestinationRule's
    /// `retryBudget`, else the ServiceProfile's of the service it belongs to.
    pub retry_budget: Option<Arc<dyn mesh_resilience::retry::RetryBudget>>,
    /// Retries sent to this destination (for `/metrics`).
    pub(crate) retries: std::sync::atomic::AtomicU64,
}

/// A configuration that cannot be compiled.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct CompileError {
    /// `Kind namespace/name`, and the file and line it came from.
    pub resource: String,
    /// What is wrong, with the field path.
    pub message: String,
}

struct Service<'a> {
    entry: &'a Resource<ServiceEntrySpec>,
}

/// Compiles `resources`.
pub fn compile(resources: Resources) -> Result<Snapshot, CompileError> {
    let proxy = resources.mesh_proxy.as_ref().map(|r| &r.spec);
    let default_ns = proxy.and_then(|p| p.workload.namespace.clone()).unwrap_or_else(|| "default".into());
    let suffix = proxy.and_then(|p| p.domain_suffix.clone()).unwrap_or_else(|| "cluster.local".into());
    let fqdn = |name: &str, ns: &str| resolve(name, ns, &suffix);
    let mut notes = Vec::new();
    // Relative file names in a resource are relative to the file it came from.
    let dir_of = |file: &std::path::Path| file.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let proxy_base = resources.mesh_proxy.as_ref().map(|r| dir_of(&r.file)).unwrap_or_default();

    // Services.
    let mut services: BTreeMap<String, Service<'_>> = BTreeMap::new();
    for se in &resources.service_entries {
        let ns = se.namespace(&default_ns);
        for host in &se.spec.hosts {
            services.insert(fqdn(host, ns), Service { entry: se });
        }
    }
    // Destination rules, by resolved host (a later one replaces an earlier one).
    let mut rules: BTreeMap<String, &Resource<DestinationRuleSpec>> = BTreeMap::new();
    for dr in &resources.destination_rules {
        if rules.insert(fqdn(&dr.spec.host, dr.namespace(&default_ns)), dr).is_some() {
            notes.push(format!("DestinationRule {}: replaces an earlier rule for the same host", dr.metadata.name));
        }
    }

    // Service profiles, by resolved host (their name), and the budget each gives the
    // services it covers.
    let mut profiles: BTreeMap<String, &Resource<ServiceProfileSpec>> = BTreeMap::new();
    let mut profile_budgets: BTreeMap<String, Arc<dyn mesh_resilience::retry::RetryBudget>> = BTreeMap::new();
    for sp in &resources.service_profiles {
        let host = fqdn(&sp.metadata.name, sp.namespace(&default_ns));
        if profiles.insert(host, sp).is_some() {
            notes.push(format!("ServiceProfile {}: replaces an earlier profile of the same service", sp.metadata.name));
        }
    }
    // Profiled services no ServiceEntry describes are routed all the same (sent by name).
    let profiled: Vec<String> = profiles.keys().filter(|h| !services.contains_key(*h)).cloned().collect();
    // The routes of the virtual host of `apex`: the profile's, if it has one, then `route`.
    let mut with_profile = |apex: &str, route: HttpRoute| {
        let Some(sp) = profiles.remove(apex) else { return Ok(vec![route]) };
        let err = |message: String| CompileError {
            resource: format!("ServiceProfile {} ({}:{})", sp.metadata.name, sp.file.display(), sp.line),
            message,
        };
        let mut routes = sp.spec.routes(&route).map_err(|e| err(format!("spec.{e}")))?;
        let budget: Arc<dyn mesh_resilience::retry::RetryBudget> =
            Arc::new(sp.spec.retry_budget().map_err(|e| err(format!("spec.retryBudget.{e}")))?);
        for d in &route.route {
            profile_budgets.insert(d.destination.host.clone(), budget.clone());
        }
        routes.push(route);
        Ok(routes)
    };

    // A VirtualService's routes, destinations as FQDNs.
    let http_routes = |vs: &Resource<VirtualServiceSpec>| -> Vec<HttpRoute> {
        let ns = vs.namespace(&default_ns);
        vs.spec
            .http
            .iter()
            .map(|r| {
                let mut r = r.clone();
                for d in &mut r.route {
                    d.destination.host = fqdn(&d.destination.host, ns);
                }
                if let Some(m) = &mut r.mirror {
                    m.host = fqdn(&m.host, ns);
                }
                for m in &mut r.mirrors {
                    m.destination.host = fqdn(&m.destination.host, ns);
                }
                r
            })
            .collect()
    };

    // Virtual hosts.
    let mut hosts = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for vs in &resources.virtual_services {
        let ns = vs.namespace(&default_ns);
        let spec = &vs.spec;
        if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
            continue;
        }
        let name = format!("{ns}/{}", vs.metadata.name);
        let err = |message: String| CompileError {
            resource: format!("VirtualService {name} ({}:{})", vs.file.display(), vs.line),
            message,
        };
        if spec.hosts.is_empty() {
            return Err(err("spec.hosts: a VirtualService needs at least one host".into()));
        }
        let routes = http_routes(vs);
        let mut domains = Vec::new();
        for host in &spec.hosts {
            let full = fqdn(host, ns);
            covered.insert(full.clone());
            domains.extend(aliases(&full, &default_ns, &suffix));
        }
        let mut host = VirtualHostConfig::new(name.clone(), domains, routes);
        if let Some(sticky) = vs.metadata.annotations.get(STICKY_ANNOTATION) {
            let split_key = match sticky.split_once(':') {
                Some(("header", h)) => SplitKey::Header(h.trim().parse().map_err(|_| {
                    err(format!("metadata.annotations.{STICKY_ANNOTATION}: `{h}` is not a header name"))
                })?),
                Some(("cookie", c)) => SplitKey::Cookie(c.trim().to_owned()),
                _ => {
                    return Err(err(format!(
                        "metadata.annotations.{STICKY_ANNOTATION}: expected `header:NAME` or `cookie:NAME`"
                    )));
                }
            };
            host = host.with_split_key(split_key);
        }
        hosts.push(host);
    }
    for ts in &resources.traffic_splits {
        let ns = ts.namespace(&default_ns);
        let apex = fqdn(&ts.spec.service, ns);
        if !covered.insert(apex.clone()) {
            notes.push(format!(
                "TrafficSplit {ns}/{}: a VirtualService already routes {apex}; the split is ignored",
                ts.metadata.name
            ));
            continue;
        }
        let mut route = ts.spec.to_route();
        for d in &mut route.route {
            d.destination.host = fqdn(&d.destination.host, ns);
        }
        let routes = with_profile(&apex, route)?;
        hosts.push(VirtualHostConfig::new(
            format!("{ns}/{}", ts.metadata.name),
            aliases(&apex, &default_ns, &suffix),
            routes,
        ));
    }
    for host in services.keys().chain(&profiled) {
        // A VirtualService for `*.example.com` (or `*`) routes `api.example.com` too.
        let wildcard =
            covered.iter().any(|c| c == "*" || c.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix)));
        if covered.contains(host) || host.starts_with('*') || wildcard {
            continue;
        }
        let route = HttpRoute::named(format!("default-{host}")).to(host.clone(), None, 1);
        let routes = with_profile(host, route)?;
        hosts.push(VirtualHostConfig::new(format!("default/{host}"), aliases(host, &default_ns, &suffix), routes));
    }
    for (host, sp) in &profiles {
        notes.push(format!(
            "ServiceProfile {}: a VirtualService already routes {host}; the profile is ignored",
            sp.metadata.name
        ));
    }

    let mut context = RouteContext::default();
    context.namespace = Some(default_ns.clone());
    context.labels = proxy.map(|p| p.workload.labels.clone()).unwrap_or_default();
    let table = RouteTable::new(&hosts, &context).map_err(|e| CompileError {
        resource: format!("VirtualService {}", vhost_names(&hosts)),
        message: e.to_string(),
    })?;
    notes.extend(table.notes().iter().cloned());

    // The gateway listeners' servers and routes.
    let labels = proxy.map(|p| p.workload.labels.clone()).unwrap_or_default();
    let gateway = crate::gateway::compile(
        &crate::gateway::Inputs {
            resources: &resources,
            default_ns: &default_ns,
            labels: &labels,
            http_routes: &http_routes,
            fqdn: &fqdn,
        },
        &mut notes,
    )?
    .map(Arc::new);

    // Clusters.
    let mut clusters = HashMap::new();
    let mut destinations = table.destinations();
    if let Some(plan) = &gateway {
        destinations.extend(plan.destinations());
        destinations.sort();
        destinations.dedup();
    }
    for key in destinations {
        let rule = rules.get(&*key.host).copied();
        let subset = match (&key.subset, rule) {
            (None, _) => None,
            (Some(name), Some(dr)) => match dr.spec.subsets.iter().find(|s| s.name == **name) {
                Some(s) => Some(s),
                None => {
                    notes.push(format!(
                        "{key}: no subset `{name}` in DestinationRule {}; requests get 503 NC",
                        dr.metadata.name
                    ));
                    continue;
                }
            },
            (Some(name), None) => {
                notes.push(format!("{key}: no DestinationRule defines subset `{name}`; requests get 503 NC"));
                continue;
            }
        };
        let endpoints = match services.get(&*key.host) {
            Some(service) => endpoints_of(service.entry, key.port, subset.map(|s| &s.labels), &mut notes, &key),
            None => {
                let port = key.port.unwrap_or(80);
                notes.push(format!(
                    "{key}: no ServiceEntry describes {}; sent to {}:{port} by name",
                    key.host, key.host
                ));
                vec![Endpoint::new(format!("{}:{port}", key.host))]
            }
        };
        // The service's port, for port-level settings: the route's, or the service's only one.
        let port = key.port.or_else(|| {
            let ports = &services.get(&*key.host)?.entry.spec.ports;
            (ports.len() == 1).then(|| u16::try_from(ports[0].number).ok()).flatten()
        });
        let policy = TrafficPolicy::merged(
            rule.and_then(|r| r.spec.traffic_policy.as_ref()),
            subset.and_then(|s| s.traffic_policy.as_ref()),
            port,
        );
        let rule_err =
            |message: String| CompileError { resource: format!("DestinationRule for {}", key.host), message };
        let (lb_policy, hash_key) = lb_policy(policy.load_balancer.as_ref())
            .map_err(|message| CompileError { resource: format!("DestinationRule for {}", key.host), message })?;
        let balancer = Balancer::new(lb_policy, endpoints)
            .map_err(|e| CompileError { resource: format!("cluster {key}"), message: e.to_string() })?;
        let pool_spec = policy.connection_pool.as_ref();
        let breaker = pool_spec
            .map(|p| p.limits().map_err(|e| rule_err(format!("trafficPolicy.connectionPool.{e}"))))
            .transpose()?
            .filter(|l| *l != mesh_resilience::pool::PoolLimits::default())
            .map(mesh_resilience::pool::CircuitBreaker::new);
        let (mut pool, mut protocol) = pool_settings(pool_spec);
        pool.tls = origination(
            policy.tls.as_ref(),
            services.get(&*key.host).map(|s| s.entry),
            &balancer.endpoints(),
            &default_ns,
            &rule.map(|r| dir_of(&r.file)).unwrap_or_default(),
        )
        .map_err(|message| rule_err(format!("trafficPolicy.tls.{message}")))?;
        if matches!(pool.tls, Some(crate::upstream::Origination::Mesh { .. })) && protocol.is_none() {
            // Between sidecars: HTTP/2 over mTLS, whatever the application speaks.
            protocol = Some(crate::config::UpstreamProtocol::H2);
        }
        // Envoy's `max_retries` breaker: retries in flight, when no budget is set.
        let max_retries = pool_spec
            .and_then(|p| p.http.as_ref())
            .and_then(|h| h.max_retries)
            .filter(|n| *n > 0)
            .and_then(|n| mesh_resilience::retry::ConcurrencyBudget::new(0.0, n as usize).ok())
            .map(|b| Arc::new(b) as Arc<dyn mesh_resilience::retry::RetryBudget>);
        let retry_budget = policy
            .retry_budget
            .as_ref()
            .map(|b| {
                let percent = b.percent.map_or(20.0, |p| p.value());
                // 0 is proto3's "unset": Envoy's default of 3.
                let min = b.min_retry_concurrency.filter(|n| *n > 0).unwrap_or(3) as usize;
                mesh_resilience::retry::ConcurrencyBudget::new(percent, min)
                    .map(|b| Arc::new(b) as Arc<dyn mesh_resilience::retry::RetryBudget>)
                    .map_err(|e| CompileError {
                        resource: format!("DestinationRule for {}", key.host),
                        message: format!("trafficPolicy.retryBudget.{e}"),
                    })
            })
            .transpose()?
            .or(max_retries);
        // A ServiceProfile's retryable routes retry until their budget refuses: its budget
        // wins over the DestinationRule's, which would let them retry without end.
        let retry_budget = profile_budgets.get(&*key.host).cloned().or(retry_budget);
        let outlier = policy
            .outlier_detection
            .as_ref()
            .map(|spec| {
                let detector =
                    spec.to_config().and_then(mesh_resilience::outlier::OutlierDetector::new).map_err(|e| {
                        CompileError {
                            resource: format!("DestinationRule for {}", key.host),
                            message: format!("trafficPolicy.outlierDetection.{e}"),
                        }
                    })?;
                detector.set_hosts(balancer.endpoints().iter().map(|e| e.address().clone()));
                Ok(detector)
            })
            .transpose()?;
        clusters.insert(
            (*key).clone(),
            Arc::new(Cluster {
                key: (*key).clone(),
                balancer,
                hash_key,
                outlier,
                breaker,
                pool,
                protocol,
                retry_budget,
                retries: std::sync::atomic::AtomicU64::new(0),
            }),
        );
    }
    let rate_limit = rate_limit(&resources, proxy, &default_ns, &mut notes)?;
    let security = Arc::new(security(&resources, proxy, &default_ns, &proxy_base)?);
    let t = telemetry(&resources, proxy, &default_ns)?;
    Ok(Snapshot {
        table: Arc::new(table),
        gateway,
        clusters,
        resources,
        notes,
        rate_limit,
        security,
        trace_sampling: t.sampling,
        access_log_disabled: t.access_log_disabled,
        span_tags: t.tags,
        span_reporting_disabled: t.span_reporting_disabled,
    })
}

/// The Telemetry settings of this workload: a selector's resource, else its namespace's,
/// else the root namespace's (Istio's precedence); the first of each kind found.
/// What the applicable Telemetry resources say.
struct TelemetrySettings {
    sampling: Option<f64>,
    access_log_disabled: bool,
    tags: Vec<SpanTag>,
    span_reporting_disabled: bool,
}

/// The Telemetry settings for this workload: each field from the most specific resource
/// that sets it (workload selector, then namespace, then root namespace), as Istio merges.
fn telemetry(
    resources: &Resources,
    proxy: Option<&crate::loader::MeshProxySpec>,
    default_ns: &str,
) -> Result<TelemetrySettings, CompileError> {
    let root = proxy.and_then(|p| p.root_namespace.as_deref()).unwrap_or(ROOT_NAMESPACE);
    let no_labels = BTreeMap::new();
    let labels = proxy.map_or(&no_labels, |p| &p.workload.labels);
    let rank = |r: &Resource<crate::loader::TelemetrySpec>| {
        let ns = r.namespace(default_ns);
        match &r.spec.selector {
            Some(sel) if ns == default_ns && sel.selects(labels) => Some(0),
            None if ns == default_ns => Some(1),
            None if ns == root => Some(2),
            _ => None,
        }
    };
    let mut applicable: Vec<_> = resources.telemetries.iter().filter_map(|r| Some((rank(r)?, r))).collect();
    applicable.sort_by_key(|(rank, _)| *rank);
    let sampling = applicable.iter().find_map(|(_, r)| r.spec.tracing.first()?.random_sampling_percentage);
    let disabled = applicable.iter().find_map(|(_, r)| r.spec.access_logging.first()?.disabled).unwrap_or(false);
    let span_reporting_disabled =
        applicable.iter().find_map(|(_, r)| r.spec.tracing.first()?.disable_span_reporting).unwrap_or(false);
    let mut tags = Vec::new();
    let tagged = applicable.iter().find(|(_, r)| r.spec.tracing.first().is_some_and(|t| !t.custom_tags.is_empty()));
    if let Some((_, r)) = tagged {
        let error = |name: &str, what: &str| CompileError {
            resource: format!(
                "Telemetry {}/{} ({}:{})",
                r.namespace(default_ns),
                r.metadata.name,
                r.file.display(),
                r.line
            ),
            message: format!("spec.tracing[0].customTags.{name}: {what}"),
        };
        for (name, tag) in &r.spec.tracing[0].custom_tags {
            let tag = match (&tag.literal, &tag.environment, &tag.header) {
                (Some(l), None, None) => SpanTag::Literal { name: name.clone(), value: l.value.clone() },
                (None, Some(e), None) => match std::env::var(&e.name).ok().or_else(|| e.default_value.clone()) {
                    Some(value) => SpanTag::Literal { name: name.clone(), value },
                    None => continue,
                },
                (None, None, Some(h)) => SpanTag::Header {
                    name: name.clone(),
                    header: http::HeaderName::try_from(h.name.as_str())
                        .map_err(|_| error(name, &format!("`{}` is not a header name", h.name)))?,
                    default: h.default_value.clone(),
                },
                _ => return Err(error(name, "set exactly one of literal, environment and header")),
            };
            tags.push(tag);
        }
    }
    Ok(TelemetrySettings { sampling, access_log_disabled: disabled, tags, span_reporting_disabled })
}

/// The mesh's root namespace.
const ROOT_NAMESPACE: &str = "istio-system";

/// The inbound policies that apply to this workload.
fn security(
    resources: &Resources,
    proxy: Option<&crate::loader::MeshProxySpec>,
    default_ns: &str,
    base: &std::path::Path,
) -> Result<Security, CompileError> {
    let root = proxy.and_then(|p| p.root_namespace.as_deref()).unwrap_or(ROOT_NAMESPACE);
    let no_labels = BTreeMap::new();
    let labels = proxy.map_or(&no_labels, |p| &p.workload.labels);
    let selects = |ns: &str, sel: Option<&mesh_tls::authz::WorkloadSelector>| {
        (ns == default_ns || ns == root) && sel.is_none_or(|s| s.selects(labels))
    };
    let mut policies = Vec::new();
    for r in &resources.authorization_policies {
        let mut policy = mesh_tls::authz::Policy::new(r.namespace(default_ns), &r.metadata.name, r.spec.clone());
        policy.dry_run = r.metadata.annotations.get("istio.io/dry-run").is_some_and(|v| v == "true");
        if policy.applies_to(default_ns, labels, root) {
            policies.push(policy);
        }
    }
    let authorizer = mesh_tls::authz::Authorizer::new(policies).map_err(|e| CompileError {
        resource: format!("AuthorizationPolicy {}", e.policy),
        message: format!("{}: {}", e.field, e.reason),
    })?;
    let rules: Vec<mesh_tls::jwt::JwtRule> = resources
        .request_authentications
        .iter()
        .filter(|r| selects(r.namespace(default_ns), r.spec.selector.as_ref()))
        .flat_map(|r| r.spec.jwt_rules.iter().cloned())
        .collect();
    let jwt = if rules.is_empty() {
        None
    } else {
        let roots = jwks_roots(proxy, base);
        let source = |_: usize, rule: &mesh_tls::jwt::JwtRule| {
            let uri = rule.jwks_uri.as_deref()?;
            if let Some(path) = uri.strip_prefix("file://") {
                return Some(mesh_tls::jwt::JwksSource::File(base.join(path)));
            }
            let timeout = rule.timeout.map_or(Duration::from_secs(5), |t| t.get());
            Some(mesh_tls::jwt::JwksSource::Https { uri: uri.parse().ok()?, roots: roots.clone(), timeout })
        };
        Some(
            mesh_tls::jwt::JwtAuthenticator::new(&rules, source)
                .map_err(|e| CompileError { resource: "RequestAuthentication".into(), message: e.to_string() })?,
        )
    };
    let peers: Vec<mesh_tls::peer::PeerAuthentication> = resources
        .peer_authentications
        .iter()
        .map(|r| mesh_tls::peer::PeerAuthentication {
            namespace: r.namespace(default_ns).to_owned(),
            spec: r.spec.clone(),
        })
        .collect();
    let port = proxy
        .and_then(|p| p.inbound.as_ref())
        .and_then(|i| i.port.or_else(|| i.app.as_deref().or(proxy?.app.as_deref())?.rsplit_once(':')?.1.parse().ok()));
    let mode = mesh_tls::peer::resolve_mode(&peers, default_ns, labels, root, port);
    Ok(Security { mode, jwt, authorizer: Arc::new(authorizer) })
}

/// The CAs a `jwksUri` is verified with: the system's bundle and the mesh's.
fn jwks_roots(proxy: Option<&crate::loader::MeshProxySpec>, base: &std::path::Path) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut files = vec![std::path::PathBuf::from("/etc/ssl/certs/ca-certificates.crt")];
    if let Some(files_) = proxy.and_then(|p| p.identity.as_ref()).and_then(|i| i.files(base).ok()) {
        files.push(files_.trust_bundle);
    }
    for file in files {
        let Ok(pem) = std::fs::read(&file) else { continue };
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
            let _ = roots.add(cert);
        }
    }
    Arc::new(roots)
}

/// How connections to a destination's endpoints are secured: a DestinationRule's `tls`, or
/// Istio's auto mTLS (every endpoint labelled `security.istio.io/tlsMode: istio`).
fn origination(
    tls: Option<&mesh_routing::model::ClientTlsSettings>,
    service: Option<&Resource<ServiceEntrySpec>>,
    endpoints: &[Endpoint],
    default_ns: &str,
    base: &std::path::Path,
) -> Result<Option<crate::upstream::Origination>, String> {
    let service_accounts = || -> Vec<(String, String)> {
        let Some(se) = service else { return Vec::new() };
        let ns = se.namespace(default_ns).to_owned();
        let mut accounts: Vec<(String, String)> =
            se.spec.endpoints.iter().filter_map(|e| Some((ns.clone(), e.service_account.clone()?))).collect();
        accounts.sort();
        accounts.dedup();
        accounts
    };
    let names = |tls: Option<&mesh_routing::model::ClientTlsSettings>| -> Vec<String> {
        let mut names = tls.map(|t| t.subject_alt_names.clone()).unwrap_or_default();
        if names.is_empty() {
            names = service.map(|s| s.spec.subject_alt_names.clone()).unwrap_or_default();
        }
        names
    };
    let mode = tls.and_then(|t| t.mode.as_deref());
    match mode {
        Some("ISTIO_MUTUAL") => {
            Ok(Some(crate::upstream::Origination::Mesh { names: names(tls), service_accounts: service_accounts() }))
        }
        Some("DISABLE") => Ok(None),
        Some(m @ ("SIMPLE" | "MUTUAL")) => {
            let t = tls.expect("a mode comes with its block");
            if t.insecure_skip_verify == Some(true) {
                return Err("insecureSkipVerify: not supported: the server is always verified".into());
            }
            if t.credential_name.is_some() {
                return Err("credentialName: not supported (no Kubernetes API); give the files".into());
            }
            let client = if m == "MUTUAL" {
                match (&t.client_certificate, &t.private_key) {
                    (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
                    _ => return Err("clientCertificate: MUTUAL needs `clientCertificate` and `privateKey`".into()),
                }
            } else {
                None
            };
            Ok(Some(crate::upstream::Origination::Files {
                ca: t.ca_certificates.as_ref().map(|c| base.join(c)),
                client,
                sni: t.sni.clone(),
                names: names(tls),
            }))
        }
        Some(other) => Err(format!("mode: `{other}` is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL")),
        None => {
            let auto = !endpoints.is_empty()
                && service.is_some_and(|se| {
                    !se.spec.endpoints.is_empty()
                        && se
                            .spec
                            .endpoints
                            .iter()
                            .all(|e| e.labels.get("security.istio.io/tlsMode").is_some_and(|m| m == "istio"))
                });
            Ok(auto.then(|| crate::upstream::Origination::Mesh {
                names: names(None),
                service_accounts: service_accounts(),
            }))
        }
    }
}

/// The virtual hosts' names, for an error the table could not place in one of them.
/// The local rate limit: the first EnvoyFilter local rate limit patch for this workload, else
/// the first Linkerd HTTPLocalRateLimitPolicy. The proxy has one listener today, so every
/// patch context (`SIDECAR_INBOUND`, `SIDECAR_OUTBOUND`, `GATEWAY`, `ANY`) applies to it.
fn rate_limit(
    resources: &Resources,
    proxy: Option<&crate::loader::MeshProxySpec>,
    default_ns: &str,
    notes: &mut Vec<String>,
) -> Result<Option<Arc<mesh_resilience::ratelimit::RateLimitLayer>>, CompileError> {
    let labels = proxy.map(|p| &p.workload.labels);
    let mut found = Vec::new();
    for ef in &resources.envoy_filters {
        let selected = ef
            .spec
            .workload_selector
            .as_ref()
            .is_none_or(|sel| sel.labels.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)));
        if !selected {
            continue;
        }
        for patch in &ef.spec.config_patches {
            let Some(config) = patch.local_rate_limit() else { continue };
            let err = |message: String| CompileError {
                resource: format!("EnvoyFilter {} ({}:{})", ef.metadata.name, ef.file.display(), ef.line),
                message,
            };
            let layer = config.map_err(|e| err(e.to_string()))?.to_layer().map_err(|e| err(e.to_string()))?;
            if let Some(layer) = layer {
                found.push((format!("EnvoyFilter {}", ef.metadata.name), layer));
            }
        }
    }
    for policy in &resources.rate_limit_policies {
        let ns = policy.namespace(default_ns);
        let layer = policy.spec.to_layer("cluster.local", ns).map_err(|e| CompileError {
            resource: format!(
                "HTTPLocalRateLimitPolicy {} ({}:{})",
                policy.metadata.name,
                policy.file.display(),
                policy.line
            ),
            message: e.to_string(),
        })?;
        if let Some(layer) = layer {
            found.push((format!("HTTPLocalRateLimitPolicy {}", policy.metadata.name), layer));
        }
    }
    let mut found = found.into_iter();
    let first = found.next();
    for (name, _) in found {
        notes.push(format!("{name}: only one local rate limit applies (the first read); this one is ignored"));
    }
    Ok(first.map(|(_, layer)| Arc::new(layer)))
}

/// The endpoints' connection settings and protocol from a `connectionPool` block.
fn pool_settings(
    spec: Option<&mesh_routing::model::ConnectionPoolSettings>,
) -> (crate::upstream::PoolSettings, Option<crate::config::UpstreamProtocol>) {
    let mut settings = crate::upstream::PoolSettings::default();
    let Some(spec) = spec else { return (settings, None) };
    let positive = |d: Option<mesh_core::config::Duration>| d.map(|d| d.get()).filter(|d| !d.is_zero());
    // An idle timeout of 0s disables it (connections are never closed for idleness).
    let idle = |d: Option<mesh_core::config::Duration>| {
        d.map(|d| if d.get().is_zero() { Duration::from_secs(100 * 365 * 86_400) } else { d.get() })
    };
    if let Some(tcp) = &spec.tcp {
        settings.connect_timeout = positive(tcp.connect_timeout);
        settings.idle_timeout = idle(tcp.idle_timeout);
        settings.keepalive = tcp.tcp_keepalive.as_ref().map(|k| (k.probes, positive(k.time), positive(k.interval)));
    }
    let mut protocol = None;
    if let Some(http) = &spec.http {
        // `http.idleTimeout` wins over `tcp.idleTimeout` for HTTP, as in Istio.
        settings.idle_timeout = idle(http.idle_timeout).or(settings.idle_timeout);
        settings.max_requests_per_connection = http.max_requests_per_connection.filter(|n| *n > 0).map(|n| n as u32);
        settings.max_concurrent_streams = http.max_concurrent_streams.filter(|n| *n > 0).map(|n| n as usize);
        protocol = match http.h2_upgrade_policy.as_deref() {
            Some("UPGRADE") => Some(crate::config::UpstreamProtocol::H2),
            Some("DO_NOT_UPGRADE") => Some(crate::config::UpstreamProtocol::Http1),
            _ => None,
        };
    }
    (settings, protocol)
}

fn vhost_names(hosts: &[VirtualHostConfig]) -> String {
    hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// `name` in namespace `ns` as Istio resolves it.
pub fn resolve(name: &str, ns: &str, suffix: &str) -> String {
    let name = name.trim().to_ascii_lowercase();
    if name.contains('.') || name == "*" || name.starts_with('*') { name } else { format!("{name}.{ns}.svc.{suffix}") }
}

/// The names a client reaches `fqdn` by: for `name.ns.svc.suffix`, also `name.ns.svc` and
/// `name.ns`, and `name` when `ns` is the proxy's namespace.
fn aliases(fqdn: &str, proxy_ns: &str, suffix: &str) -> Vec<String> {
    let mut out = vec![fqdn.to_owned()];
    if let Some(rest) = fqdn.strip_suffix(&format!(".svc.{suffix}")) {
        out.push(format!("{rest}.svc"));
        if let Some((name, ns)) = rest.split_once('.') {
            out.push(rest.to_owned());
            if ns == proxy_ns {
                out.push(name.to_owned());
            }
        }
    }
    out
}

fn endpoints_of(
    se: &Resource<ServiceEntrySpec>,
    port: Option<u16>,
    selector: Option<&BTreeMap<String, String>>,
    notes: &mut Vec<String>,
    key: &DestinationKey,
) -> Vec<Endpoint> {
    let spec = &se.spec;
    let service_port = match port {
        Some(p) => spec.ports.iter().find(|sp| sp.number == u32::from(p)),
        None => spec.ports.first(),
    };
    let Some(service_port) = service_port else {
        notes.push(format!("{key}: the ServiceEntry has no such port"));
        return Vec::new();
    };
    let number = service_port.number;
    let target = service_port.target_port.unwrap_or(number);
    if spec.endpoints.is_empty() {
        // DNS resolution of the host itself.
        return spec.hosts.first().map(|h| vec![Endpoint::new(format!("{h}:{target}"))]).unwrap_or_default();
    }
    let mut seen = std::collections::HashSet::new();
    let endpoints: Vec<Endpoint> = spec
        .endpoints
        .iter()
        .filter(|e| selector.is_none_or(|sel| sel.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
        .map(|e| {
            let p = e.ports.get(&service_port.name).copied().unwrap_or(target);
            let address = if e.address.contains(':') && !e.address.starts_with('[') {
                format!("[{}]:{p}", e.address)
            } else {
                format!("{}:{p}", e.address)
            };
            Endpoint::new(address).with_labels(e.labels.clone()).with_weight(e.weight.unwrap_or(1).max(1))
        })
        // One address is one endpoint (its pool, its active count): a repeat is dropped.
        .filter(|e| seen.insert(e.address().clone()))
        .collect();
    let listed = spec
        .endpoints
        .iter()
        .filter(|e| selector.is_none_or(|sel| sel.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
        .count();
    if listed > endpoints.len() {
        notes.push(format!(
            "{key}: {} endpoint(s) repeat an address listed before and are ignored",
            listed - endpoints.len()
        ));
    }
    endpoints
}

/// The balancer policy and hash key of a `loadBalancer` block.
fn lb_policy(lb: Option<&LoadBalancerSettings>) -> Result<(LbPolicy, Option<HashKey>), String> {
    let Some(lb) = lb else { return Ok((LbPolicy::LeastRequest, None)) };
    if let Some(ch) = &lb.consistent_hash {
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys != 1 {
            return Err("trafficPolicy.loadBalancer.consistentHash: set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into());
        }
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(
                h.parse().map_err(|_| format!("consistentHash.httpHeaderName: `{h}` is not a header name"))?,
            )
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie { name: c.name.clone(), ttl: c.ttl.map(|t| t.get()), path: c.path.clone() }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParam(q.clone())
        } else {
            HashKey::SourceIp
        };
        let policy = match &ch.maglev {
            Some(m) => LbPolicy::Maglev { table_size: m.table_size.unwrap_or(LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE) },
            None => LbPolicy::RingHash {
                minimum_ring_size: ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .unwrap_or(LbPolicy::DEFAULT_MINIMUM_RING_SIZE),
            },
        };
        return Ok((policy, Some(key)));
    }
    let policy = match lb.simple.as_deref() {
        None | Some("UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN") => LbPolicy::LeastRequest,
        Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
        Some("RANDOM") => LbPolicy::Random,
        Some("PASSTHROUGH") => return Err("trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported".into()),
        Some(other) => return Err(format!("trafficPolicy.loadBalancer.simple: unknown policy `{other}`")),
    };
    Ok((policy, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_text(yaml: &str) -> Result<Snapshot, CompileError> {
        let mut loaded = crate::loader::Loaded::default();
        crate::loader::load_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        compile(loaded.resources)
    }

    #[test]
    fn telemetry_sampling_and_access_logging_follow_istios_precedence() {
        let telemetry = |ns: &str, selector: &str, body: &str| {
            format!(
                "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: {ns}}}\nspec:\n{selector}{body}---\n"
            )
        };
        let proxy = "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {name: p}\nspec:\n  workload: {name: web, namespace: shop, labels: {app: web}}\n---\n";
        let mesh = telemetry("istio-system", "", "  tracing: [{randomSamplingPercentage: 100}]\n");
        let s = compile_text(&format!("{proxy}{mesh}")).unwrap();
        assert_eq!((s.trace_sampling, s.access_log_disabled), (Some(100.0), false));
        let tags = telemetry(
            "shop",
            "",
            "  tracing:\n  - customTags:\n      zone: {literal: {value: eu-1}}\n      user: {header: {name: x-user, defaultValue: anon}}\n      node: {environment: {name: MESH_TEST_UNSET_VARIABLE, defaultValue: n1}}\n    disableSpanReporting: true\n",
        );
        let s = compile_text(&format!("{proxy}{mesh}{tags}")).unwrap();
        assert_eq!(s.trace_sampling, Some(100.0), "the namespace's resource sets no sampling: the root's applies");
        assert!(s.span_reporting_disabled);
        assert_eq!(
            s.span_tags,
            [
                SpanTag::Literal { name: "node".into(), value: "n1".into() },
                SpanTag::Header {
                    name: "user".into(),
                    header: http::HeaderName::from_static("x-user"),
                    default: Some("anon".into())
                },
                SpanTag::Literal { name: "zone".into(), value: "eu-1".into() },
            ]
        );
        let bad = telemetry(
            "shop",
            "",
            "  tracing:\n  - customTags:\n      both: {literal: {value: a}, header: {name: b}}\n",
        );
        let e = compile_text(&format!("{proxy}{bad}")).unwrap_err();
        assert!(e.to_string().contains("spec.tracing[0].customTags.both: set exactly one"), "{e}");
        let namespace = telemetry("shop", "", "  tracing: [{randomSamplingPercentage: 25}]\n");
        let workload =
            telemetry("shop", "  selector: {matchLabels: {app: web}}\n", "  accessLogging: [{disabled: true}]\n");
        let other =
            telemetry("shop", "  selector: {matchLabels: {app: db}}\n", "  tracing: [{randomSamplingPercentage: 0}]\n");
        let s = compile_text(&format!("{proxy}{mesh}{other}{workload}{namespace}")).unwrap();
        assert_eq!((s.trace_sampling, s.access_log_disabled), (Some(25.0), true));
        let s = compile_text(proxy).unwrap();
        assert_eq!((s.trace_sampling, s.access_log_disabled), (None, false));
    }

    #[test]
    fn a_destination_rule_retry_budget_becomes_the_clusters_budget() {
        let yaml = |budget: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [r]\n  http:\n  - route: [{{destination: {{host: r}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n  host: r\n  trafficPolicy:\n    retryBudget: {budget}\n"
            )
        };
        let snapshot = compile_text(&yaml("{percent: {value: 50}, minRetryConcurrency: 1}")).unwrap();
        let cluster = snapshot.clusters.values().next().unwrap();
        let budget = cluster.retry_budget.as_ref().expect("a budget");
        let _requests: Vec<_> = (0..4).map(|_| mesh_resilience::retry::RetryBudget::deposit(&**budget)).collect();
        let admitted: Vec<_> =
            (0..5).filter_map(|_| mesh_resilience::retry::RetryBudget::withdraw(&**budget)).collect();
        assert_eq!(admitted.len(), 2, "50 % of 4 requests in flight");
        // Istio's percent is 0 to 100: the loader refuses more, with the field.
        let mut loaded = crate::loader::Loaded::default();
        crate::loader::load_text(std::path::Path::new("t.yaml"), &yaml("{percent: {value: 150}}"), &mut loaded);
        assert!(loaded.has_errors(), "{:?}", loaded.diagnostics);
    }

    #[test]
    fn short_names_resolve_in_their_namespace() {
        assert_eq!(resolve("reviews", "default", "cluster.local"), "reviews.default.svc.cluster.local");
        assert_eq!(
            resolve("Reviews.prod.svc.cluster.local", "default", "cluster.local"),
            "reviews.prod.svc.cluster.local"
        );
        assert_eq!(resolve("api.example.com", "default", "cluster.local"), "api.example.com");
        assert_eq!(
            aliases("reviews.default.svc.cluster.local", "default", "cluster.local"),
            ["reviews.default.svc.cluster.local", "reviews.default.svc", "reviews.default", "reviews"]
        );
        assert_eq!(aliases("reviews.prod.svc.cluster.local", "default", "cluster.local").len(), 3);
    }
}
