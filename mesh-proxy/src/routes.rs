//! Routing on the request path: the current [`Snapshot`], and one connection pool per
//! endpoint.
//!
//! The routing itself is the request stack's (`stack.rs`); this is the state it reads: the
//! snapshot, its route table (swapped on reload) and the endpoint pools. The endpoint's pool
//! is made on first use
//! and kept across reloads while the endpoint stays in the configuration; a reload drops the
//! pools of endpoints that left it (their connections close once their last request ends).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_routing::SharedRouteTable;

use crate::config::{ProxyConfig, UpstreamAddr};
use crate::error::{BoxError, NoHealthyUpstream};
use crate::snapshot::Snapshot;
use crate::upstream::{PoolSettings, Upstream};

/// Endpoint pools by address and the settings of the destinations that use it.
type Pools = HashMap<(Arc<str>, PoolSettings), Arc<Upstream>>;

/// Called with each new snapshot.
pub(crate) type Hook = Box<dyn Fn(&Snapshot) + Send + Sync>;

/// The routing state shared by every connection.
pub(crate) struct Routes {
    snapshot: ArcSwap<Snapshot>,
    /// The snapshot before: a request routed by its table just before a reload still finds
    /// its destination's cluster there.
    previous: ArcSwap<Option<Arc<Snapshot>>>,
    /// The snapshot's route table, as the routing layer reads it.
    table: SharedRouteTable,
    /// Each gateway listener's route table, by Gateway port number.
    gateway_tables: HashMap<u16, SharedRouteTable>,
    /// Called with each new snapshot (the dispatch cache retires destinations that left).
    hooks: Mutex<Vec<Hook>>,
    random: mesh_routing::random::Random,
    /// Pools by endpoint address and the settings of the destinations that use it.
    pools: ArcSwap<Pools>,
    writing: Mutex<()>,
    config: ProxyConfig,
    /// Snapshots swapped in, and reloads refused.
    pub(crate) reloads: AtomicU64,
    pub(crate) reload_failures: AtomicU64,
    /// A client span for every try, when spans are exported.
    pub(crate) client_spans: std::sync::OnceLock<mesh_telemetry::span::ClientSpanLayer>,
}

/// The route table `snapshot` has for gateway port `port`, or one without routes.
fn gateway_table(snapshot: &Snapshot, port: u16) -> Arc<mesh_routing::RouteTable> {
    snapshot.gateway.as_ref().and_then(|g| g.ports.get(&port)).map_or_else(empty_table, |p| p.table.clone())
}

fn empty_table() -> Arc<mesh_routing::RouteTable> {
    Arc::new(
        mesh_routing::RouteTable::new(&[], &mesh_routing::RouteContext::default()).expect("an empty table compiles"),
    )
}

impl Routes {
    pub(crate) fn new(snapshot: Snapshot, config: &ProxyConfig) -> Self {
        let gateway_tables = config
            .gateway_listeners
            .iter()
            .map(|(port, _)| (*port, SharedRouteTable::from_shared(gateway_table(&snapshot, *port))))
            .collect();
        Self {
            gateway_tables,
            table: SharedRouteTable::from_shared(snapshot.table.clone()),
            hooks: Mutex::new(Vec::new()),
            random: mesh_routing::random::Random::from_entropy(),
            snapshot: ArcSwap::from_pointee(snapshot),
            previous: ArcSwap::from_pointee(None),
            pools: ArcSwap::from_pointee(HashMap::new()),
            writing: Mutex::new(()),
            config: config.clone(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            client_spans: std::sync::OnceLock::new(),
        }
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The layer that gives each try a client span: none without a collector, or when the
    /// current snapshot's Telemetry turned span reporting off (read without cloning it).
    pub(crate) fn client_spans(&self) -> Option<&mesh_telemetry::span::ClientSpanLayer> {
        self.client_spans.get().filter(|_| !self.snapshot.load().span_reporting_disabled)
    }

    /// The cluster of `key` in the current snapshot, or else in the one before (for requests
    /// routed by the previous table while a reload swapped it).
    pub(crate) fn cluster(&self, key: &mesh_routing::DestinationKey) -> Option<Arc<crate::snapshot::Cluster>> {
        if let Some(c) = self.snapshot.load().clusters.get(key) {
            return Some(c.clone());
        }
        self.previous.load().as_ref().as_ref().and_then(|s| s.clusters.get(key).cloned())
    }

    /// Swaps in `snapshot` and drops the pools of endpoints it no longer has.
    pub(crate) fn store(&self, mut snapshot: Snapshot) {
        // Outlier detection keeps its state (ejections, back-offs) across a reload that does
        // not change its configuration; endpoints that stay keep theirs.
        let previous = self.snapshot.load_full();
        for (key, cluster) in snapshot.clusters.iter_mut() {
            let (Some(cluster), Some(before)) = (Arc::get_mut(cluster), previous.clusters.get(key)) else { continue };
            if let (Some(new), Some(old)) = (&cluster.outlier, &before.outlier)
                && new.config() == old.config()
            {
                old.set_hosts(cluster.balancer.endpoints().iter().map(|e| e.address().clone()));
                cluster.outlier = Some(old.clone());
            }
        }
        // Circuit breakers keep their counts across a reload that keeps their limits.
        for (key, cluster) in snapshot.clusters.iter_mut() {
            let (Some(cluster), Some(before)) = (Arc::get_mut(cluster), previous.clusters.get(key)) else { continue };
            if let (Some(new), Some(old)) = (&cluster.breaker, &before.breaker)
                && new.limits() == old.limits()
            {
                cluster.breaker = Some(old.clone());
            }
        }
        // Pools by address and settings: one whose destination's settings changed goes.
        let keep: HashSet<(Arc<str>, PoolSettings)> = snapshot
            .clusters
            .values()
            .flat_map(|c| {
                c.balancer.endpoints().iter().map(|e| (e.address().clone(), c.pool.clone())).collect::<Vec<_>>()
            })
            .collect();
        // The snapshot first (destination services are made from it), then the table that
        // routes to them, then the hooks (which retire services made from the old one).
        let snapshot = Arc::new(snapshot);
        let old = self.snapshot.swap(snapshot.clone());
        self.previous.store(Arc::new(Some(old)));
        self.table.store_shared(snapshot.table.clone());
        for (port, table) in &self.gateway_tables {
            table.store_shared(gateway_table(&snapshot, *port));
        }
        for hook in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(&snapshot);
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let pools = self.pools.load();
        if pools.keys().any(|k| !keep.contains(k)) {
            let next = pools.iter().filter(|(k, _)| keep.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
            self.pools.store(Arc::new(next));
        }
    }

    /// The current snapshot's local rate limit, if it has one.
    pub(crate) fn rate_limit(&self) -> Option<Arc<mesh_resilience::ratelimit::RateLimitLayer>> {
        self.snapshot.load().rate_limit.clone()
    }

    /// A random source for the balancers' generated hash cookies.
    pub(crate) fn random(&self) -> &mesh_routing::random::Random {
        &self.random
    }

    /// The route table the routing layer reads, swapped on each reload.
    pub(crate) fn route_table(&self) -> SharedRouteTable {
        self.table.clone()
    }

    /// The route table of gateway port `port` (no routes if the proxy has no such listener).
    pub(crate) fn gateway_table(&self, port: u16) -> SharedRouteTable {
        match self.gateway_tables.get(&port) {
            Some(table) => table.clone(),
            None => SharedRouteTable::from_shared(empty_table()),
        }
    }

    /// Calls `hook` with every snapshot stored from now on.
    pub(crate) fn on_store(&self, hook: Hook) {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// Addresses with an open pool.
    pub(crate) fn pooled(&self) -> Vec<Arc<str>> {
        let mut all: Vec<_> = self.pools.load().keys().map(|(a, _)| a.clone()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// The proxy's configuration.
    pub(crate) fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The pool of endpoint `address`, made on first use.
    pub(crate) fn pool(&self, address: &Arc<str>, settings: &PoolSettings) -> Result<Arc<Upstream>, BoxError> {
        let key = (address.clone(), settings.clone());
        if let Some(p) = self.pools.load().get(&key) {
            return Ok(p.clone());
        }
        let addr: UpstreamAddr = address
            .parse()
            .map_err(|_| NoHealthyUpstream(format!("{address} (the endpoint address is not HOST:PORT)")))?;
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.pools.load();
        if let Some(p) = current.get(&key) {
            return Ok(p.clone());
        }
        let pool = Upstream::with_settings(addr, &self.config, settings).map_err(|e| {
            tracing::warn!(endpoint = %address, error = %e, "cannot set up the endpoint's connections");
            NoHealthyUpstream(format!("{address} ({e})"))
        })?;
        let mut next = HashMap::clone(&current);
        next.insert(key, pool.clone());
        self.pools.store(Arc::new(next));
        Ok(pool)
    }
}
