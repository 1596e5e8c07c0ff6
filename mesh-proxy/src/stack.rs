//! The request stack: the `tower` services between the per-connection servers and the
//! endpoint pools.
//!
//! ```text
//! server adapter (per connection: request timeout, client connection, local replies)
//!   -> RateLimit (mesh-resilience: the configuration's local rate limit, 429 RL)
//!   -> Routing (mesh-routing: route, weighted destination, rewrites, RouteDecision,
//!      404 NR, redirects, direct responses, response header operations)
//!   -> Fault (mesh-resilience: the route's `fault`: delays, aborts with DI / FI)
//!   -> RouteTimeout (the route's `timeout`: 504 UT, over every try)
//!   -> Dispatch (mesh-routing: one service per destination, made lazily, cached, retired
//!      on reload; mirrors)
//!   -> Retry (mesh-resilience: the route's `retries`, or Istio's default; bodies replayed
//!      from a capped recording; URX when retries run out; each try picks an endpoint anew)
//!   -> Cluster (the destination's balancer picks an endpoint: 503 NC / UH; a client span
//!      per try when spans are exported)
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
use http_body::Body;
use mesh_core::classify::Outcome;
use mesh_core::classify::TimeoutError;
use mesh_core::{ClientConnection, TriedEndpoints, TryDeadline};
use mesh_resilience::LocalOr;
use mesh_resilience::fault::{FaultLayer, FaultService};
use mesh_resilience::outlier::HostMonitor;
use mesh_resilience::retry::{ReplayBody, Retry, RetryLayer, RetryPolicy};
use mesh_routing::balance::HashKey;
use mesh_routing::balance::HealthView;
use mesh_routing::{DestinationKey, Dispatch, MakeDestination, RouteTimeout, Routing, RoutingBody, RoutingLayer};
use tower::{Layer, Service, ServiceExt};

use crate::body::{BodyEnd, ProxyBody, RequestBody};
use crate::config::UpstreamProtocol;
use crate::error::{BoxError, NoCluster, NoHealthyUpstream};
use crate::proxy::{Endpoint, EndpointSettings};
use crate::routes::Routes;
use crate::snapshot::Cluster;
use crate::upstream::Upstream;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

/// The routed stack's type.
pub(crate) type Routed = Routing<FaultService<RouteTimeoutService<Dispatch<MakeCluster>>>>;

/// The retry layer's recorded body, as the body the rest of the stack takes.
type Replayed<S> = tower::util::MapRequest<S, fn(Request<ReplayBody<RequestBody>>) -> Request<RequestBody>>;

fn replayed(req: Request<ReplayBody<RequestBody>>) -> Request<RequestBody> {
    req.map(|body| if body.is_end_stream() { RequestBody::empty() } else { RequestBody::new(body) })
}

/// The stack a [`Forward`](crate::proxy::Forward) calls.
#[derive(Clone)]
pub(crate) enum Stack {
    /// Everything to one endpoint (no configuration).
    Plain(Endpoint),
    /// Routed by the configuration (the routes give the snapshot's rate limit).
    Routed(Routed, Arc<Routes>),
    /// The inbound listener's: JWT validation and authorization, then the local application.
    Inbound(Inbound),
}

/// The inbound stack: the current snapshot's RequestAuthentication and AuthorizationPolicies
/// (mesh-tls's authenticator and authorizer, the primitives its layers wrap), then the local
/// application.
#[derive(Clone)]
pub(crate) struct Inbound {
    pub(crate) routes: Arc<Routes>,
    pub(crate) app: Endpoint,
    /// The application's address, for access logs.
    pub(crate) app_host: mesh_core::UpstreamHost,
    pub(crate) identity: Option<mesh_tls::Identity>,
}

impl Inbound {
    /// The request as the application gets it, or the refusal.
    #[expect(clippy::result_large_err, reason = "either is moved on at once; a refusal is rare")]
    fn admit(&self, mut req: Request<RequestBody>) -> Result<Request<RequestBody>, Response<ProxyBody>> {
        let snapshot = self.routes.snapshot();
        let security = &snapshot.security;
        // Only the sidecar says who the peer is.
        req.headers_mut().remove(&crate::headers::XFCC);
        if let (Some(peer), Some(identity)) = (mesh_core::PeerIdentity::of(req.extensions()), &self.identity) {
            let value = format!("By={};URI={peer}", identity.current().id());
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                req.headers_mut().insert(crate::headers::XFCC, v);
            }
        }
        if let Some(jwt) = &security.jwt {
            match jwt.authenticate(&mut req) {
                Ok(Some(auth)) => {
                    req.extensions_mut().insert(auth);
                }
                Ok(None) => {}
                Err(why) => {
                    return Err(mesh_tls::jwt::unauthorized::<ProxyBody>(req.headers(), why).map(ProxyBody::from));
                }
            }
        }
        match security.authorizer.decide(&mesh_tls::authz::RequestAttrs::of(&req)) {
            mesh_tls::authz::Decision::Allow => Ok(req),
            mesh_tls::authz::Decision::Deny { policy } => {
                tracing::debug!(%policy, method = %req.method(), path = req.uri().path(), "denied by authorization policy");
                Err(mesh_tls::authz::denied::<ProxyBody>(req.headers()).map(ProxyBody::from))
            }
        }
    }
}

impl Stack {
    /// The routed stack over `routes`; reloads swap the route table it reads and retire the
    /// destinations that left.
    pub(crate) fn routed(routes: Arc<Routes>, settings: Arc<EndpointSettings>) -> Self {
        let table = routes.route_table();
        Self::routed_by(routes, settings, table)
    }

    /// The same over another of the routes' tables (a gateway listener's).
    pub(crate) fn routed_by(
        routes: Arc<Routes>,
        settings: Arc<EndpointSettings>,
        table: mesh_routing::SharedRouteTable,
    ) -> Self {
        let dispatch = Dispatch::new(MakeCluster { routes: routes.clone(), settings });
        let cache = dispatch.clone();
        // Each destination's service holds its cluster and pools as of the snapshot it was
        // made from: a new snapshot retires them all, and they are made again on first use.
        routes.on_store(Box::new(move |_| cache.retain(|_| false)));
        // Faults come before the route timeout starts, as Envoy's fault filter runs before
        // its router.
        let faults = FaultLayer::from_routes().layer(RouteTimeoutService(dispatch));
        let stack = RoutingLayer::shared(table).layer(faults);
        Stack::Routed(stack, routes)
    }

    /// Sends `req` down the stack.
    pub(crate) fn call(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, BoxError>> + Send + use<> {
        match self {
            Stack::Plain(endpoint) => Either::Left(endpoint.clone().send(req)),
            Stack::Inbound(inbound) => {
                if let Some(tried) = req.extensions().get::<crate::telemetry::TriedUpstream>() {
                    tried.set(&inbound.app_host.0);
                }
                let admitted = inbound.admit(req);
                let (app, host) = (inbound.app.clone(), inbound.app_host.clone());
                let answer: BoxFuture = Box::pin(async move {
                    match admitted {
                        Ok(req) => {
                            let mut res = app.send(req).await?;
                            res.extensions_mut().insert(host);
                            Ok(res)
                        }
                        Err(refusal) => Ok(refusal),
                    }
                });
                Either::Right(Either::Right(Either::Right(answer)))
            }
            Stack::Routed(routed, routes) => match routes.rate_limit() {
                None => Either::Right(Either::Left(
                    routed.clone().oneshot(req).map(|result| result.map(|res| res.map(flatten))),
                )),
                // The configuration's local rate limit, before routing.
                Some(limit) => {
                    Either::Right(Either::Right(Either::Left(limit.layer(routed.clone()).oneshot(req).map(|result| {
                        result.map(|res| {
                            res.map(|body| match body.into_inner() {
                                Ok(routed) => flatten(routed),
                                Err(refusal) => ProxyBody::local(refusal),
                            })
                        })
                    }))))
                }
            },
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

impl From<LocalOr<ProxyBody>> for ProxyBody {
    fn from(body: LocalOr<ProxyBody>) -> Self {
        body.into_inner().unwrap_or_else(ProxyBody::local)
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
/// layer), as Envoy's route timeout does: the response head must arrive within it (else the
/// error is a timeout, 504 `UT` at the edge) and its body must end by the same deadline (else
/// the body fails, and the client's stream is reset). mesh-resilience will own this layer.
#[derive(Clone, Debug)]
pub(crate) struct RouteTimeoutService<S>(S);

impl<S> Service<Request<RequestBody>> for RouteTimeoutService<S>
where
    S: Service<Request<RequestBody>, Response = Response<RoutingBody<ProxyBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Either<
        futures_util::future::MapOk<S::Future, fn(Response<RoutingBody<ProxyBody>>) -> Response<ProxyBody>>,
        BoxFuture,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        use futures_util::TryFutureExt;
        let limit = req.extensions().get::<RouteTimeout>().map(|t| t.0);
        if let Some(limit) = limit {
            // For the layers below that tell a timed-out try from an abandoned one.
            TryDeadline::tighten(req.extensions_mut(), (tokio::time::Instant::now() + limit).into_std());
        }
        let fut = self.0.call(req);
        let flat: fn(Response<RoutingBody<ProxyBody>>) -> Response<ProxyBody> = |res| res.map(flatten);
        match limit {
            None => Either::Left(fut.map_ok(flat)),
            Some(limit) => Either::Right(Box::pin(async move {
                // The whole exchange: the head within the limit, and the body by the same
                // deadline (Envoy's route timeout ends when the response is complete).
                let deadline = tokio::time::Instant::now() + limit;
                let mut res = timeout(limit, fut).await?.map(flatten);
                res.body_mut().set_deadline(deadline);
                Ok(res)
            })),
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
    /// The destination's retries around its cluster: each try picks an endpoint anew. The
    /// route's policy comes with the request (`RoutePolicy`, set by the routing layer; none,
    /// no retries); retried requests need no extensions below here.
    type Service = Retry<Replayed<ClusterService>>;

    fn make(&self, key: &DestinationKey) -> Self::Service {
        let replayed: fn(Request<ReplayBody<RequestBody>>) -> Request<RequestBody> = replayed;
        let cluster = self.cluster(key);
        let mut retry = RetryLayer::new(RetryPolicy::none());
        // Retries need no extensions below here but the client's address, when the cluster
        // hashes on it (the tried endpoints are carried anyway).
        // And the request's span, whose child each try's span is, when spans are exported.
        let traced = self.routes.client_spans.get().is_some();
        retry = match (cluster.cluster.as_ref().and_then(|c| c.hash_key.as_ref()), traced) {
            (Some(_), _) => retry.carrying_extensions(carry_client_connection),
            (None, true) => retry.carrying_extensions(carry_trace),
            (None, false) => retry.without_extensions(),
        };
        // Retries go to another endpoint than the one that failed, when there is another.
        let endpoints = cluster.cluster.as_ref().map_or(0, |c| c.balancer.endpoints().len());
        // Not under consistent hashing, where Istio leaves the predicate out: a retry stays
        // with the key's endpoint.
        let hashed = cluster.cluster.as_ref().is_some_and(|c| c.hash_key.is_some());
        retry = retry.recording_tried_endpoints(endpoints > 1 && !hashed);
        // The destination's retry budget, shared by every request to it.
        if let Some(budget) = cluster.cluster.as_ref().and_then(|c| c.retry_budget.clone()) {
            retry = retry.with_budget(budget);
        }
        retry.layer(tower::util::MapRequest::new(cluster, replayed))
    }
}

/// A try's client span: ended with the try's answer or failure, or, when the try is dropped
/// unanswered (its timeout, or the client went away), as an error saying so.
struct TrySpan(Option<mesh_telemetry::span::Span>);

impl TrySpan {
    /// The try failed: the span ends with `why`.
    fn fail(&mut self, why: &dyn std::fmt::Display) {
        if let Some(mut span) = self.0.take() {
            span.set_error(why);
        }
    }

    /// The try was answered `code`: the span, to end with the response body.
    fn answered(&mut self, code: u16) -> Option<mesh_telemetry::span::Span> {
        let mut span = self.0.take()?;
        span.set_status_code(code);
        Some(span)
    }
}

impl Drop for TrySpan {
    fn drop(&mut self) {
        self.fail(&"no response: the try was cancelled or timed out");
    }
}

/// Records a timeout for a try dropped unanswered at or after its deadline.
struct Unanswered {
    monitor: Option<HostMonitor>,
    deadline: Option<TryDeadline>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let (Some(monitor), Some(TryDeadline(deadline))) = (self.monitor.take(), self.deadline)
            && tokio::time::Instant::now().into_std() >= deadline
        {
            monitor.record_failure(mesh_core::classify::Failure::Timeout);
        }
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Tells outlier detection how a try went: by the response's status, or for a gRPC call by
/// its `grpc-status` (from the head, or else from the trailers once the body ends), or by the
/// failure.
fn record(monitor: HostMonitor, grpc: bool, result: &mut Result<Response<ProxyBody>, BoxError>) {
    let res = match result {
        Ok(res) => res,
        Err(e) => {
            // A failure the client caused (its request body broke) says nothing of the
            // upstream.
            if crate::reply::client_fault(&**e).is_none()
                && let Some(failure) = Outcome::from_error(&**e).failure()
            {
                monitor.record_failure(failure);
            }
            return;
        }
    };
    if monitor.record_head(res.status(), res.headers(), grpc) {
        res.body_mut().on_end(Box::new(move |end, _| match end {
            BodyEnd::Trailers(t) => monitor.record_trailers(Some(t)),
            // The upstream ended the call without its status: a failure.
            BodyEnd::Ended | BodyEnd::Failed => monitor.record_trailers(None),
            // The client went away: nothing said about the upstream.
            BodyEnd::Dropped => {}
        }));
    }
}

/// Copies a sampled request's trace context (unsampled ones make no spans).
fn carry_trace(from: &http::Extensions, to: &mut http::Extensions) {
    if let Some(context) = from.get::<mesh_telemetry::propagation::TraceContext>().filter(|c| c.sampled()) {
        to.insert(context.clone());
    }
}

fn carry_client_connection(from: &http::Extensions, to: &mut http::Extensions) {
    carry_trace(from, to);
    if let Some(connection) = ClientConnection::of(from) {
        to.insert(connection.clone());
    }
}

impl MakeCluster {
    fn cluster(&self, key: &DestinationKey) -> ClusterService {
        let cluster = self.routes.cluster(key);
        let pools = cluster.as_ref().map_or_else(Vec::new, |c| {
            c.balancer
                .endpoints()
                .iter()
                .filter_map(|e| {
                    let monitor = c.outlier.as_ref().and_then(|d| d.monitor(e.address()));
                    Some((e.address().clone(), self.routes.pool(e.address(), &c.pool).ok()?, monitor))
                })
                .collect()
        });
        // The destination's own protocol (`h2UpgradePolicy`), else the proxy's.
        let settings = match cluster.as_ref().and_then(|c| c.protocol) {
            Some(protocol) if protocol != self.settings.protocol => {
                Arc::new(EndpointSettings { protocol, ..EndpointSettings::clone(&self.settings) })
            }
            _ => self.settings.clone(),
        };
        ClusterService(Arc::new(ClusterState {
            key: key.clone(),
            cluster,
            pools: pools.into(),
            routes: self.routes.clone(),
            settings,
        }))
    }
}

/// One destination: its balancer picks an endpoint for each request, whose [`Endpoint`]
/// forwards it. Made from one snapshot (the dispatch cache is emptied on reload).
#[derive(Clone)]
pub(crate) struct ClusterService(Arc<ClusterState>);

/// What a destination's service holds (one `Arc`: cloned per request by the retry layer).
pub(crate) struct ClusterState {
    key: DestinationKey,
    cluster: Option<Arc<Cluster>>,
    /// The pool of each endpoint, and its outlier monitor, by address (few: scanned by
    /// pointer, then by value).
    pools: Box<[EndpointEntry]>,
    routes: Arc<Routes>,
    settings: Arc<EndpointSettings>,
}

/// An endpoint's address, pool and outlier monitor.
type EndpointEntry = (Arc<str>, Arc<Upstream>, Option<HostMonitor>);

impl std::ops::Deref for ClusterService {
    type Target = ClusterState;

    fn deref(&self) -> &ClusterState {
        &self.0
    }
}

impl ClusterService {
    fn pool(&self, address: &Arc<str>) -> Result<(Arc<Upstream>, Option<HostMonitor>), BoxError> {
        let found = self
            .pools
            .iter()
            .find(|(a, ..)| Arc::ptr_eq(a, address))
            .or_else(|| self.pools.iter().find(|(a, ..)| a == address));
        match found {
            Some((_, pool, monitor)) => Ok((pool.clone(), monitor.clone())),
            None => {
                let settings = self.cluster.as_ref().map(|c| c.pool.clone()).unwrap_or_default();
                Ok((self.routes.pool(address, &settings)?, None))
            }
        }
    }
}

impl Service<Request<RequestBody>> for ClusterService {
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> BoxFuture {
        let Some(cluster) = &self.cluster else {
            return Box::pin(std::future::ready(Err(NoCluster(self.key.to_string()).into())));
        };
        let peer = ClientConnection::of(req.extensions()).map(|c| c.peer);
        let mut set_cookie = None;
        let hash = cluster.hash_key.as_ref().and_then(|key| {
            key.hash(&req, peer).or_else(|| match key {
                HashKey::Cookie { ttl: Some(_), .. } => {
                    let (hash, cookie) = key.cookie_to_set(self.routes.random(), peer)?;
                    set_cookie = Some(cookie);
                    Some(hash)
                }
                _ => None,
            })
        });
        if mesh_core::ResendCount::of(req.extensions()).is_some() {
            cluster.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let tried = TriedEndpoints::of(req.extensions());
        let health: &dyn HealthView = match &cluster.outlier {
            Some(detector) => detector,
            None => &(),
        };
        let Some(picked) = cluster.balancer.pick_avoiding(hash, health, tried) else {
            return Box::pin(std::future::ready(Err(NoHealthyUpstream(self.key.to_string()).into())));
        };
        let upstream_host = mesh_core::UpstreamHost(picked.endpoint().address().clone());
        if let Some(tried) = req.extensions().get::<crate::telemetry::TriedUpstream>() {
            tried.set(&upstream_host.0);
        }
        // This try's client span, a child of the request's server span (none when the
        // workload's Telemetry turned span reporting off).
        let mut span = TrySpan(self.routes.client_spans().and_then(|layer| {
            let mut span = layer.start(&mut req)?;
            span.set_attribute(mesh_telemetry::span::KeyValue::new("upstream.address", upstream_host.0.to_string()));
            span.set_attribute(mesh_telemetry::span::KeyValue::new("upstream_cluster", self.key.to_string()));
            Some(span)
        }));
        let (pool, monitor) = match self.pool(picked.endpoint().address()) {
            Ok(found) => found,
            Err(e) => {
                span.fail(&*e);
                return Box::pin(std::future::ready(Err(e)));
            }
        };
        let grpc = monitor.is_some() && is_grpc(req.headers());
        // A try dropped unanswered at its deadline timed out; one dropped before it was
        // abandoned by the client (nothing to record).
        let deadline = monitor.is_some().then(|| TryDeadline::of(req.extensions())).flatten();
        let mut watch = Unanswered { monitor, deadline };
        let endpoint = Endpoint::new(pool, self.settings.clone());
        let breaker = cluster.breaker.clone();
        let multiplexed = match self.settings.protocol {
            UpstreamProtocol::H2 => true,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Downstream => req.version() == http::Version::HTTP_2,
        };
        Box::pin(async move {
            // Connection-pool limits: wait as pending for a connection, or overflow at once.
            let admitted = match &breaker {
                Some(breaker) if multiplexed => Some(breaker.admit_multiplexed().await),
                Some(breaker) => Some(breaker.admit().await),
                None => None,
            };
            let admission = match admitted {
                Some(Ok(admission)) => Some(admission),
                Some(Err(overflow)) => {
                    span.fail(&overflow);
                    return Err(overflow.into());
                }
                None => None,
            };
            let mut result = endpoint.send(req).await;
            let span = match &result {
                Ok(res) => span.answered(res.status().as_u16()),
                Err(e) => {
                    span.fail(&**e);
                    None
                }
            };
            if let (Some(admission), Ok(res)) = (admission, &mut result) {
                // The connection is busy until the response body has ended.
                res.body_mut().on_end(Box::new(move |_, _| drop(admission)));
            }
            if let Some(monitor) = watch.monitor.take() {
                record(monitor, grpc, &mut result);
            }
            let mut res = result?;
            // The endpoint counted as active (least request) until its response head.
            drop(picked);
            if let Some(cookie) = set_cookie {
                res.headers_mut().append(SET_COOKIE, cookie);
            }
            if let Some(span) = span {
                // The try's span ends with its response body.
                res.body_mut().on_end(Box::new(move |_, _| drop(span)));
            }
            res.extensions_mut().insert(upstream_host);
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests {
    //! The stack in process, with `ServiceExt::oneshot` on its services and a real backend on
    //! 127.0.0.1: what each layer answers, and that failures reach the edge as errors.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::path::Path;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use mesh_core::ResponseFlags;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{ProxyConfig, UpstreamProtocol};
    use crate::upstream::Tunnels;

    /// A backend answering `NAME METHOD PATH BODY`; `/slow` answers after 10 s.
    async fn backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    if req.uri().path() == "/stall" {
                        // The head and a first chunk, then nothing.
                        let chunks =
                            futures_util::stream::once(async { Ok(http_body::Frame::data(Bytes::from("first"))) })
                                .chain(futures_util::stream::pending());
                        let body: Boxed = http_body_util::StreamBody::new(chunks).boxed_unsync();
                        return Ok::<_, Infallible>(Response::new(body));
                    }
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let text =
                        format!("{name} {} {} {}", parts.method, parts.uri.path(), String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)).boxed_unsync()))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        addr
    }

    fn stack(yaml: &str) -> Stack {
        let mut loaded = crate::loader::Loaded::default();
        crate::loader::load_text(Path::new("test.yaml"), yaml, &mut loaded);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let snapshot = crate::snapshot::compile(loaded.resources).unwrap();
        let config = ProxyConfig { upstream_protocol: UpstreamProtocol::Http1, ..ProxyConfig::default() };
        let routes = Arc::new(Routes::new(snapshot, &config));
        let settings = Arc::new(EndpointSettings {
            protocol: UpstreamProtocol::Http1,
            stream_idle: None,
            tunnels: Arc::new(Tunnels::default()),
        });
        Stack::routed(routes, settings)
    }

    fn config(v1: SocketAddr) -> String {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  ports: [{{number: 9080, name: http}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - name: empty-subset
    match: [{{headers: {{x-to: {{exact: v2}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: unknown-subset
    match: [{{headers: {{x-to: {{exact: v9}}}}}}]
    route: [{{destination: {{host: reviews, subset: v9}}}}]
  - name: slow
    match: [{{uri: {{regex: "/(slow|stall)"}}}}]
    timeout: 50ms
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: rest
    rewrite: {{uri: /v1/}}
    headers: {{response: {{set: {{x-routed: "yes"}}}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
"#,
            port = v1.port()
        )
    }

    fn get(host: &str, path: &str, header: Option<(&str, &str)>) -> Request<RequestBody> {
        let mut req = Request::get(path).header("host", host);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        req.body(RequestBody::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_routed_request_is_rewritten_forwarded_and_its_response_decorated() {
        let stack = stack(&config(backend("v1").await));
        let res = stack.call(get("reviews", "/reviews/1", None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-routed"], "yes");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "v1 GET /v1/reviews/1 ");
    }

    #[tokio::test]
    async fn unmatched_requests_are_answered_404_nr_by_the_routing_layer() {
        let stack = stack(&config(backend("v1").await));
        let res = stack.call(get("ratings", "/", None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert!(ResponseFlags::of(res.extensions()).contains(ResponseFlags::NO_ROUTE_FOUND));
        // The edge gives a gRPC client the same answer as UNIMPLEMENTED, trailers-only.
        assert!(crate::reply::is_local_refusal(&res));
        let grpc = crate::reply::as_grpc(res);
        assert_eq!(
            (grpc.status(), &grpc.headers()["grpc-status"]),
            (StatusCode::OK, &http::HeaderValue::from_static("12"))
        );
    }

    #[tokio::test]
    async fn failures_travel_as_errors_to_the_edge() {
        let stack = stack(&config(backend("v1").await));
        // A subset with no endpoint: no healthy upstream.
        let err = stack.call(get("reviews", "/", Some(("x-to", "v2")))).await.unwrap_err();
        assert!(err.is::<NoHealthyUpstream>(), "{err}");
        let reply = crate::reply::local_reply(&*err, false);
        assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(ResponseFlags::of(reply.extensions()).contains(ResponseFlags::NO_HEALTHY_UPSTREAM));
        // gRPC clients get a trailers-only answer with grpc-status UNAVAILABLE.
        let grpc = crate::reply::local_reply(&*err, true);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "14");
        // A subset no DestinationRule defines: no cluster.
        let err = stack.call(get("reviews", "/", Some(("x-to", "v9")))).await.unwrap_err();
        assert!(err.is::<NoCluster>(), "{err}");
        let reply = crate::reply::local_reply(&*err, false);
        assert!(ResponseFlags::of(reply.extensions()).contains(ResponseFlags::NO_CLUSTER_FOUND));
    }

    #[tokio::test]
    async fn the_route_timeout_ends_the_exchange_as_a_timeout() {
        let stack = stack(&config(backend("v1").await));
        let err = tokio::time::timeout(Duration::from_secs(5), stack.call(get("reviews", "/slow", None)))
            .await
            .expect("the route timeout (50ms) fires first")
            .unwrap_err();
        let reply = crate::reply::local_reply(&*err, false);
        assert_eq!(reply.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(ResponseFlags::of(reply.extensions()).contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
    }

    #[tokio::test]
    async fn the_route_timeout_also_ends_a_body_that_stalls() {
        let stack = stack(&config(backend("v1").await));
        let res = tokio::time::timeout(Duration::from_secs(5), stack.call(get("reviews", "/stall", None)))
            .await
            .expect("the head comes at once")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the route timeout (50ms) ends the body")
            .expect("an error, not the end of the body")
            .unwrap_err();
        assert!(mesh_core::Outcome::from_error(&*end).is_timeout(), "{end}");
    }

    #[tokio::test]
    async fn an_endpoint_takes_any_request_body() {
        let addr = backend("plain").await;
        let config = ProxyConfig { upstream: addr.to_string().parse().unwrap(), ..ProxyConfig::default() };
        let settings = Arc::new(EndpointSettings {
            protocol: UpstreamProtocol::Http1,
            stream_idle: None,
            tunnels: Arc::new(Tunnels::default()),
        });
        let endpoint = Endpoint::new(crate::upstream::Upstream::for_addr(config.upstream.clone(), &config), settings);
        let req = Request::post("/echo")
            .header("host", "app")
            .body(RequestBody::new(Full::new(Bytes::from_static(b"replayed"))))
            .unwrap();
        let res = endpoint.oneshot(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "plain POST /echo replayed");
    }
}
