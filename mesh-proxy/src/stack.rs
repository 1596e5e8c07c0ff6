//! The request stack: the `tower` services between the per-connection servers and the
//! endpoint pools.
//!
//! ```text
//! server adapter (per connection: request timeout, client connection, local replies)
//!   -> Routing (mesh-routing: route, weighted destination, rewrites, RouteDecision,
//!      404 NR, redirects, direct responses, response header operations)
//!   -> RouteTimeout (the route's `timeout`: 504 UT)
//!   -> Dispatch (mesh-routing: one service per destination, made lazily, cached, retired
//!      on reload; mirrors)
//!   -> Cluster (the destination's balancer picks an endpoint: 503 NC / UH)
//!   -> Endpoint (the pooled HTTP/1.1 or h2c client of one endpoint)
//! ```
//!
//! Without a configuration the stack is the one [`Endpoint`] of `--upstream`. Every service
//! is always ready and cheap to clone; failures travel as errors ([`BoxError`]) to the edge,
//! where the adapter turns them into Envoy's local replies, so a retry or outlier layer put
//! in between sees them. Later issues add their layers (retries, outlier detection, limits,
//! authorization, telemetry) here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::SET_COOKIE;
use http::{Request, Response};
use mesh_core::ClientConnection;
use mesh_core::classify::TimeoutError;
use mesh_routing::balance::HashKey;
use mesh_routing::{DestinationKey, Dispatch, MakeDestination, RouteTimeout, Routing, RoutingBody, RoutingLayer};
use tower::{Layer, Service, ServiceExt};

use crate::body::{ProxyBody, RequestBody};
use crate::error::{BoxError, NoCluster, NoHealthyUpstream};
use crate::proxy::{Endpoint, EndpointSettings};
use crate::routes::Routes;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

/// The routed stack's type.
pub(crate) type Routed = Routing<RouteTimeoutService<Dispatch<MakeCluster>>>;

/// The stack a [`Forward`](crate::proxy::Forward) calls.
#[derive(Clone)]
pub(crate) enum Stack {
    /// Everything to one endpoint (no configuration).
    Plain(Endpoint),
    /// Routed by the configuration.
    Routed(Routed),
}

impl Stack {
    /// The routed stack over `routes`; reloads swap the route table it reads and retire the
    /// destinations that left.
    pub(crate) fn routed(routes: Arc<Routes>, settings: Arc<EndpointSettings>) -> Self {
        let dispatch = Dispatch::new(MakeCluster { routes: routes.clone(), settings });
        let cache = dispatch.clone();
        routes.on_store(Box::new(move |snapshot| cache.retain(|key| snapshot.clusters.contains_key(key))));
        let stack = RoutingLayer::shared(routes.route_table()).layer(RouteTimeoutService(dispatch));
        Stack::Routed(stack)
    }

    /// Sends `req` down the stack.
    pub(crate) fn call(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, BoxError>> + Send + use<> {
        match self {
            Stack::Plain(endpoint) => Either::Left(endpoint.clone().send(req)),
            Stack::Routed(routed) => {
                Either::Right(routed.clone().oneshot(req).map(|result| result.map(|res| res.map(flatten))))
            }
        }
    }
}

/// The inner body of a routing layer's response, or its local reply as a [`ProxyBody`].
fn flatten<B: Into<ProxyBody>>(body: RoutingBody<B>) -> ProxyBody {
    match body.into_inner() {
        Ok(inner) => inner.into(),
        Err(local) => ProxyBody::local(local.unwrap_or_default()),
    }
}

impl From<RoutingBody<ProxyBody>> for ProxyBody {
    fn from(body: RoutingBody<ProxyBody>) -> Self {
        flatten(body)
    }
}

// === Endpoint ===

impl Service<Request<RequestBody>> for Endpoint {
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> BoxFuture {
        Box::pin(self.clone().send(req))
    }
}

// === RouteTimeout ===

/// Bounds a request by its route's `timeout` ([`RouteTimeout`], recorded by the routing
/// layer): the whole exchange up to the response head, as the request timeout is. On expiry
/// the error is a timeout (504 `UT` at the edge). mesh-resilience will own this layer.
#[derive(Clone, Debug)]
pub(crate) struct RouteTimeoutService<S>(S);

impl<S, RB> Service<Request<RequestBody>> for RouteTimeoutService<S>
where
    S: Service<Request<RequestBody>, Response = Response<RB>, Error = BoxError>,
    RB: 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Either<S::Future, Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let limit = req.extensions().get::<RouteTimeout>().map(|t| t.0);
        let fut = self.0.call(req);
        match limit {
            None => Either::Left(fut),
            Some(limit) => Either::Right(Box::pin(timeout(limit, fut))),
        }
    }
}

async fn timeout<T>(limit: Duration, fut: impl Future<Output = Result<T, BoxError>>) -> Result<T, BoxError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| Err(Box::new(TimeoutError::new())))
}

// === Cluster ===

/// Makes the [`ClusterService`] of a destination.
#[derive(Clone)]
pub(crate) struct MakeCluster {
    routes: Arc<Routes>,
    settings: Arc<EndpointSettings>,
}

impl MakeDestination for MakeCluster {
    type Service = ClusterService;

    fn make(&self, key: &DestinationKey) -> ClusterService {
        ClusterService { key: Arc::new(key.clone()), routes: self.routes.clone(), settings: self.settings.clone() }
    }
}

/// One destination: its balancer picks an endpoint (from the current snapshot) for each
/// request, whose [`Endpoint`] forwards it.
#[derive(Clone)]
pub(crate) struct ClusterService {
    key: Arc<DestinationKey>,
    routes: Arc<Routes>,
    settings: Arc<EndpointSettings>,
}

impl Service<Request<RequestBody>> for ClusterService {
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> BoxFuture {
        let snapshot = self.routes.snapshot();
        let Some(cluster) = snapshot.clusters.get(&*self.key) else {
            return Box::pin(std::future::ready(Err(NoCluster(self.key.to_string()).into())));
        };
        let peer = ClientConnection::of(req.extensions()).map(|c| c.peer);
        let mut set_cookie = None;
        let hash = cluster.hash_key.as_ref().and_then(|key| {
            key.hash(&req, peer).or_else(|| match key {
                HashKey::Cookie { ttl: Some(_), .. } => {
                    let (hash, cookie) = key.cookie_to_set(snapshot.table.random(), peer)?;
                    set_cookie = Some(cookie);
                    Some(hash)
                }
                _ => None,
            })
        });
        let Some(picked) = cluster.balancer.pick(hash, &()) else {
            return Box::pin(std::future::ready(Err(NoHealthyUpstream(self.key.to_string()).into())));
        };
        let pool = match self.routes.pool(picked.endpoint().address()) {
            Ok(pool) => pool,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let send = Endpoint::new(pool, self.settings.clone()).send(req);
        Box::pin(async move {
            let mut res = send.await?;
            // The endpoint counted as active (least request) until its response head.
            drop(picked);
            if let Some(cookie) = set_cookie {
                res.headers_mut().append(SET_COOKIE, cookie);
            }
            Ok(res)
        })
    }
}
