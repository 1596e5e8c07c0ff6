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
use http::header::SET_COOKIE;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::ResponseFlags;
use mesh_routing::balance::{HashKey, Picked};
use mesh_routing::{Action, Route};

use crate::config::{ProxyConfig, UpstreamAddr};
use crate::proxy::{ProxyBody, RequestBody};
use crate::snapshot::Snapshot;
use crate::upstream::Upstream;

/// The routing state shared by every connection.
pub(crate) struct Routes {
    snapshot: ArcSwap<Snapshot>,
    pools: ArcSwap<HashMap<Arc<str>, Arc<Upstream>>>,
    writing: Mutex<()>,
    config: ProxyConfig,
    /// Snapshots swapped in, and reloads refused.
    pub(crate) reloads: AtomicU64,
    pub(crate) reload_failures: AtomicU64,
}

/// Where a routed request goes, and what to do to its response.
pub(crate) struct Selection {
    pub(crate) upstream: Arc<Upstream>,
    route: Arc<Route>,
    target: usize,
    /// Counts as an active request on its endpoint (least request) while held.
    _picked: Picked,
    set_cookie: Option<HeaderValue>,
    /// Pools to send a copy of the request to.
    pub(crate) mirrors: Vec<Arc<Upstream>>,
}

impl Selection {
    /// The route's timeout.
    pub(crate) fn timeout(&self) -> Option<std::time::Duration> {
        self.route.timeout()
    }

    /// Applies the route's and the destination's response header operations, and sets the
    /// hash cookie the balancer generated.
    pub(crate) fn finish_response(&self, headers: &mut http::HeaderMap) {
        if let Action::Forward(split) = self.route.action() {
            self.route.prepare_response(split.targets().get(self.target), headers);
        }
        if let Some(cookie) = &self.set_cookie {
            headers.append(SET_COOKIE, cookie.clone());
        }
    }
}

impl Routes {
    pub(crate) fn new(snapshot: Snapshot, config: &ProxyConfig) -> Self {
        Self {
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
        self.snapshot.store(Arc::new(snapshot));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let pools = self.pools.load();
        if pools.keys().any(|k| !keep.contains(k)) {
            let next = pools.iter().filter(|(k, _)| keep.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
            self.pools.store(Arc::new(next));
        }
    }

    /// Addresses with an open pool.
    pub(crate) fn pooled(&self) -> Vec<Arc<str>> {
        let mut all: Vec<_> = self.pools.load().keys().cloned().collect();
        all.sort();
        all
    }

    /// The pool of endpoint `address`, made on first use.
    #[expect(clippy::result_large_err, reason = "the answer is made once per refused request and returned at once")]
    fn pool(&self, address: &Arc<str>) -> Result<Arc<Upstream>, Response<ProxyBody>> {
        if let Some(p) = self.pools.load().get(address) {
            return Ok(p.clone());
        }
        let addr: UpstreamAddr = address.parse().map_err(|_| {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "endpoint address is not HOST:PORT\n",
                ResponseFlags::NO_HEALTHY_UPSTREAM,
            )
        })?;
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

    /// Routes `req` (rewriting it as its route says), or answers it.
    #[expect(clippy::result_large_err, reason = "the answer is made once per refused request and returned at once")]
    pub(crate) fn select<B>(&self, req: &mut Request<B>) -> Result<Selection, Response<ProxyBody>> {
        let snapshot = self.snapshot.load();
        let Some((route, block)) = snapshot.table.find(req) else {
            let mut res = Response::new(ProxyBody::local(Bytes::new()));
            *res.status_mut() = StatusCode::NOT_FOUND;
            ResponseFlags::record(res.extensions_mut(), ResponseFlags::NO_ROUTE_FOUND);
            return Err(res);
        };
        let route = route.clone();
        let split = match route.action() {
            Action::Redirect(r) => return Err(r.respond(req).map(ProxyBody::local)),
            Action::Direct(d) => return Err(d.respond().map(ProxyBody::local)),
            Action::Forward(split) => split,
            _ => {
                return Err(reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unsupported route action\n",
                    ResponseFlags::NO_ROUTE_FOUND,
                ));
            }
        };
        let target = split.pick_index(snapshot.table.draw(req));
        let chosen = &split.targets()[target];
        route.prepare_request(block, Some(chosen), req);
        let decision = route.decision(block, chosen);
        let Some(cluster) = snapshot.clusters.get(&**chosen.key()) else {
            return Err(reply(StatusCode::SERVICE_UNAVAILABLE, "cluster not found\n", ResponseFlags::NO_CLUSTER_FOUND));
        };
        let mut set_cookie = None;
        let hash = cluster.hash_key.as_ref().and_then(|key| {
            key.hash(req, None).or_else(|| match key {
                HashKey::Cookie { ttl: Some(_), .. } => {
                    let (hash, cookie) = key.cookie_to_set(snapshot.table.random(), None)?;
                    set_cookie = Some(cookie);
                    Some(hash)
                }
                _ => None,
            })
        });
        let Some(picked) = cluster.balancer.pick(hash, &()) else {
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                ResponseFlags::NO_HEALTHY_UPSTREAM,
            ));
        };
        let upstream = self.pool(picked.endpoint().address())?;
        let mut mirrors = Vec::new();
        for key in route.mirrors_for(snapshot.table.random()) {
            if let Some(p) = snapshot.clusters.get(&**key).and_then(|c| c.balancer.pick(None, &()))
                && let Ok(pool) = self.pool(p.endpoint().address())
            {
                mirrors.push(pool);
            }
        }
        req.extensions_mut().insert(decision);
        Ok(Selection { upstream, route, target, _picked: picked, set_cookie, mirrors })
    }
}

fn reply(status: StatusCode, body: &'static str, flags: ResponseFlags) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::local(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    ResponseFlags::record(res.extensions_mut(), flags);
    res
}

/// A copy of `req`'s head with an empty body, for a mirror.
pub(crate) fn mirror_copy(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}
