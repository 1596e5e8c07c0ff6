//! Routing on the request path: the current [`Snapshot`], and one connection pool per
//! endpoint.
//!
//! Each request reads the snapshot with one atomic load, takes its route from the snapshot's
//! table (404 `NR` when none matches; redirects and direct responses are answered here), has
//! its weighted destination chosen and the route's rewrites applied (all by mesh-routing), and
//! then gets an endpoint from its destination's balancer (503 `NC` for an unknown
//! destination, 503 `UH` when it has no endpoint). The endpoint's pool is made on first use
//! and kept across reloads while the endpoint stays in the configuration; a reload drops the
//! pools of endpoints that left it (their connections close once their last request ends).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::ResponseFlags;
use mesh_routing::{Action, SharedRouteTable};

use crate::body::ProxyBody;
use crate::config::{ProxyConfig, UpstreamAddr};
use crate::error::{BoxError, NoHealthyUpstream};
use crate::snapshot::Snapshot;
use crate::upstream::Upstream;

/// The routing state shared by every connection.
pub(crate) struct Routes {
    snapshot: ArcSwap<Snapshot>,
    /// The snapshot's route table, as the routing layer reads it.
    table: SharedRouteTable,
    /// Called with each new snapshot (the dispatch cache retires destinations that left).
    hooks: Mutex<Vec<Box<dyn Fn(&Snapshot) + Send + Sync>>>,
    random: mesh_routing::random::Random,
    pools: ArcSwap<HashMap<Arc<str>, Arc<Upstream>>>,
    writing: Mutex<()>,
    config: ProxyConfig,
    /// Snapshots swapped in, and reloads refused.
    pub(crate) reloads: AtomicU64,
    pub(crate) reload_failures: AtomicU64,
}

impl Routes {
    pub(crate) fn new(snapshot: Snapshot, config: &ProxyConfig) -> Self {
        Self {
            table: SharedRouteTable::from_shared(snapshot.table.clone()),
            hooks: Mutex::new(Vec::new()),
            random: mesh_routing::random::Random::from_entropy(),
            snapshot: ArcSwap::from_pointee(snapshot),
            pools: ArcSwap::from_pointee(HashMap::new()),
            writing: Mutex::new(()),
            config: config.clone(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in `snapshot` and drops the pools of endpoints it no longer has.
    pub(crate) fn store(&self, snapshot: Snapshot) {
        let keep: HashSet<Arc<str>> = snapshot
            .clusters
            .values()
            .flat_map(|c| c.balancer.endpoints().iter().map(|e| e.address().clone()).collect::<Vec<_>>())
            .collect();
        // The snapshot first (destination services are made from it), then the table that
        // routes to them, then the hooks (which retire services made from the old one).
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(snapshot.clone());
        self.table.store_shared(snapshot.table.clone());
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

    /// A random source for the balancers' generated hash cookies.
    pub(crate) fn random(&self) -> &mesh_routing::random::Random {
        &self.random
    }

    /// The route table the routing layer reads, swapped on each reload.
    pub(crate) fn route_table(&self) -> SharedRouteTable {
        self.table.clone()
    }

    /// Calls `hook` with every snapshot stored from now on.
    pub(crate) fn on_store(&self, hook: Box<dyn Fn(&Snapshot) + Send + Sync>) {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// Addresses with an open pool.
    pub(crate) fn pooled(&self) -> Vec<Arc<str>> {
        let mut all: Vec<_> = self.pools.load().keys().cloned().collect();
        all.sort();
        all
    }

    /// The pool of endpoint `address`, made on first use.
    pub(crate) fn pool(&self, address: &Arc<str>) -> Result<Arc<Upstream>, BoxError> {
        if let Some(p) = self.pools.load().get(address) {
            return Ok(p.clone());
        }
        let addr: UpstreamAddr = address
            .parse()
            .map_err(|_| NoHealthyUpstream(format!("{address} (the endpoint address is not HOST:PORT)")))?;
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.pools.load();
        if let Some(p) = current.get(address) {
            return Ok(p.clone());
        }
        let pool = Upstream::for_addr(addr, &self.config);
        let mut next = HashMap::clone(&current);
        next.insert(address.clone(), pool.clone());
        self.pools.store(Arc::new(next));
        Ok(pool)
    }

    /// The endpoint pool an extended CONNECT (a WebSocket over HTTP/2) goes to, with its
    /// route's rewrites applied to `req`; or the answer when it goes nowhere. Other requests
    /// are routed by the stack ([`crate::stack`]).
    #[expect(clippy::result_large_err, reason = "the answer is made once per refused request and returned at once")]
    pub(crate) fn select_tunnel<B>(&self, req: &mut Request<B>) -> Result<Arc<Upstream>, Response<ProxyBody>> {
        let snapshot = self.snapshot.load();
        let Some((route, block)) = snapshot.table.find(req) else {
            return Err(reply(StatusCode::NOT_FOUND, "", ResponseFlags::NO_ROUTE_FOUND));
        };
        let split = match route.action() {
            Action::Redirect(r) => return Err(r.respond(req).map(ProxyBody::local)),
            Action::Direct(d) => return Err(d.respond().map(ProxyBody::local)),
            Action::Forward(split) => split,
            _ => return Err(reply(StatusCode::NOT_FOUND, "", ResponseFlags::NO_ROUTE_FOUND)),
        };
        let target = split.pick(snapshot.table.draw(req));
        route.prepare_request(block, Some(target), req);
        let Some(cluster) = snapshot.clusters.get(&**target.key()) else {
            return Err(reply(StatusCode::SERVICE_UNAVAILABLE, "cluster not found\n", ResponseFlags::NO_CLUSTER_FOUND));
        };
        let hash = cluster.hash_key.as_ref().and_then(|key| key.hash(req, None));
        let Some(picked) = cluster.balancer.pick(hash, &()) else {
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                ResponseFlags::NO_HEALTHY_UPSTREAM,
            ));
        };
        self.pool(picked.endpoint().address()).map_err(|e| crate::reply::local_reply(&*e, false))
    }
}

fn reply(status: StatusCode, body: &'static str, flags: ResponseFlags) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::local(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    ResponseFlags::record(res.extensions_mut(), flags);
    res
}
