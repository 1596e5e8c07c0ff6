//! The routing layers: [`RoutingLayer`] decides, [`DispatchLayer`] sends.
//!
//! [`Routing`] finds the request's route in a [`RouteTable`] (which can be swapped while
//! requests flow, see [`SharedRouteTable`]), chooses the weighted destination, rewrites the
//! request as the route says and records the choice as the [`RouteDecision`] request
//! extension, with the route's timeout as [`RouteTimeout`], its retry policy as
//! [`RoutePolicy`](mesh_resilience::retry::RoutePolicy) (for a retry layer below) and the
//! mirrors chosen for this request as [`MirrorTo`]. Requests that no route matches are answered 404 with flag `NR`;
//! redirects and direct responses are answered by the layer itself. The response gets the
//! route's and the destination's response header operations.
//!
//! [`Dispatch`] sends each request to a service of its destination, made on first use by a
//! [`MakeDestination`] (a closure works) and cached; [`Dispatch::retain`] retires the services
//! of destinations that left the configuration. A request with no decision is answered 503
//! with flag `NC`. Requests named in [`MirrorTo`] are copied, head only, to their
//! destinations' services when their body is empty, fire and forget (with a tokio runtime).
//!
//! Both layers answer with responses, never errors (`Error = S::Error`), so they drop into
//! `axum::Router::layer` as they are.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use mesh_routing::{DestinationKey, DispatchLayer, RouteTable, RoutingLayer, model::HttpRoute};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let table = RouteTable::from_routes(&[HttpRoute::named("all").to("reviews", Some("v1"), 1)])?;
//! let svc = ServiceBuilder::new()
//!     .layer(RoutingLayer::new(table))
//!     .layer(DispatchLayer::new(|key: &DestinationKey| {
//!         let name = format!("{}", key);
//!         service_fn(move |_req: Request<Full<Bytes>>| {
//!             let name = name.clone();
//!             async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name)))) }
//!         })
//!     }))
//!     .service_fn(|_: Request<Full<Bytes>>| async { unreachable!() });
//! # let _ = svc;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use mesh_core::{ResponseFlags, RouteDecision};
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::table::{Action, DestinationKey, Route, RouteTable};

// === extensions ===

/// Request extension: the matched route's timeout (for a timeout layer to enforce).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTimeout(pub Duration);

/// Request extension: the mirror destinations chosen for this request.
#[derive(Clone, Debug, Default)]
pub struct MirrorTo(pub Vec<Arc<DestinationKey>>);

// === SharedRouteTable ===

/// A route table that can be replaced while requests flow: each request reads the current
/// one with one atomic load; requests in flight finish on the table they started with.
#[derive(Clone)]
pub struct SharedRouteTable(Arc<ArcSwap<RouteTable>>);

impl SharedRouteTable {
    /// Shares `table`.
    pub fn new(table: RouteTable) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(table)))
    }

    /// The current table.
    pub fn load(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }

    /// Replaces the table.
    pub fn store(&self, table: RouteTable) {
        self.0.store(Arc::new(table));
    }

    /// Replaces the table with one that is shared with its owner (a config snapshot).
    pub fn store_shared(&self, table: Arc<RouteTable>) {
        self.0.store(table);
    }

    /// Shares a table its owner keeps too.
    pub fn from_shared(table: Arc<RouteTable>) -> Self {
        Self(Arc::new(ArcSwap::new(table)))
    }
}

impl fmt::Debug for SharedRouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedRouteTable").finish_non_exhaustive()
    }
}

// === Routing ===

/// Layer of [`Routing`]. See the module docs.
#[derive(Clone, Debug)]
pub struct RoutingLayer {
    table: SharedRouteTable,
}

impl RoutingLayer {
    /// Routes by `table`.
    pub fn new(table: RouteTable) -> Self {
        Self { table: SharedRouteTable::new(table) }
    }

    /// Routes by a table that can be swapped later.
    pub fn shared(table: SharedRouteTable) -> Self {
        Self { table }
    }
}

impl<S> Layer<S> for RoutingLayer {
    type Service = Routing<S>;

    fn layer(&self, inner: S) -> Routing<S> {
        Routing { inner, table: self.table.clone() }
    }
}

/// Makes the routing decision. See the module docs.
#[derive(Clone, Debug)]
pub struct Routing<S> {
    inner: S,
    table: SharedRouteTable,
}

impl<S, B, RB> Service<Request<B>> for Routing<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body<Data = Bytes>,
{
    type Response = Response<RoutingBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let table = self.table.load();
        let Some((route, block)) = table.find(&req) else {
            return ResponseFuture::local(not_found());
        };
        let route = route.clone();
        // The route's response header operations apply to its own answers too (Envoy).
        let answer = |mut res: Response<Bytes>| {
            route.prepare_response(None, res.headers_mut());
            ResponseFuture::local(res)
        };
        match route.action() {
            Action::Redirect(r) => answer(r.respond(&req)),
            Action::Direct(d) => answer(d.respond()),
            Action::Forward(split) => {
                let index = split.pick_index(table.draw_for(&route, &req));
                let target = &split.targets()[index];
                route.prepare_request(block, Some(target), &mut req);
                let decision = route.decision(block, target);
                let ext = req.extensions_mut();
                ext.insert(decision);
                if let Some(t) = route.timeout() {
                    ext.insert(RouteTimeout(t));
                }
                ext.insert(mesh_resilience::retry::RoutePolicy(route.retry_policy().clone()));
                if let Some(fault) = route.fault() {
                    ext.insert(mesh_resilience::fault::RouteFault(fault.clone()));
                }
                let mirrors: Vec<_> = route.mirrors_for(table.random()).cloned().collect();
                if !mirrors.is_empty() {
                    ext.insert(MirrorTo(mirrors));
                }
                let after = route.has_response_ops(Some(target)).then_some((route.clone(), index));
                ResponseFuture::inner(self.inner.call(req), after)
            }
        }
    }
}

fn not_found() -> Response<Bytes> {
    local(StatusCode::NOT_FOUND, Bytes::new(), ResponseFlags::NO_ROUTE_FOUND)
}

fn local(status: StatusCode, body: Bytes, flags: ResponseFlags) -> Response<Bytes> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    if !res.body().is_empty() {
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    ResponseFlags::record(res.extensions_mut(), flags);
    res
}

pin_project_lite::pin_project! {
    /// Response future of [`Routing`] and [`Dispatch`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Answered by the layer.
        Local { res: Option<Response<Bytes>> },
        // Forwarded; the route's response header operations still to apply.
        Inner { #[pin] fut: F, after: Option<(Arc<Route>, usize)> },
    }
}

impl<F> ResponseFuture<F> {
    fn local(res: Response<Bytes>) -> Self {
        Self { state: State::Local { res: Some(res) } }
    }

    fn inner(fut: F, after: Option<(Arc<Route>, usize)>) -> Self {
        Self { state: State::Inner { fut, after } }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body<Data = Bytes>,
{
    type Output = Result<Response<RoutingBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Local { res } => {
                let res = res.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(RoutingBody::local)))
            }
            StateProj::Inner { fut, after } => {
                let mut res = ready!(fut.poll(cx))?;
                if let Some((route, index)) = after.take()
                    && let Action::Forward(split) = route.action()
                {
                    route.prepare_response(split.targets().get(index), res.headers_mut());
                }
                Poll::Ready(Ok(res.map(|body| RoutingBody { inner: BodyInner::Inner { body } })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Response body of [`Routing`] and [`Dispatch`]: the inner service's, or a local reply's.
    pub struct RoutingBody<B> {
        #[pin]
        inner: BodyInner<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = BodyProj]
    enum BodyInner<B> {
        Inner { #[pin] body: B },
        Local { data: Option<Bytes> },
    }
}

impl<B> RoutingBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self { inner: BodyInner::Inner { body } }
    }

    /// The inner service's body, or the local reply's bytes (`None` when empty).
    pub fn into_inner(self) -> Result<B, Option<Bytes>> {
        match self.inner {
            BodyInner::Inner { body } => Ok(body),
            BodyInner::Local { data } => Err(data),
        }
    }

    pub(crate) fn local(data: Bytes) -> Self {
        Self { inner: BodyInner::Local { data: Some(data).filter(|d| !d.is_empty()) } }
    }
}

impl<B> fmt::Debug for RoutingBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            BodyInner::Inner { .. } => f.write_str("RoutingBody::Inner"),
            BodyInner::Local { data } => write!(f, "RoutingBody::Local({:?})", data.as_ref().map(Bytes::len)),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RoutingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            BodyProj::Inner { body } => body.poll_frame(cx),
            BodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            BodyInner::Inner { body } => body.is_end_stream(),
            BodyInner::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            BodyInner::Inner { body } => body.size_hint(),
            BodyInner::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

// === Dispatch ===

/// Makes the service for a destination. Closures `Fn(&DestinationKey) -> S` are one.
pub trait MakeDestination {
    /// The per-destination service.
    type Service;

    /// Makes the service for `key`.
    fn make(&self, key: &DestinationKey) -> Self::Service;
}

impl<F, S> MakeDestination for F
where
    F: Fn(&DestinationKey) -> S,
{
    type Service = S;

    fn make(&self, key: &DestinationKey) -> S {
        self(key)
    }
}

/// Layer of [`Dispatch`]. See the module docs.
#[derive(Clone, Debug)]
pub struct DispatchLayer<M> {
    make: M,
}

impl<M> DispatchLayer<M> {
    /// Dispatches to services made by `make`.
    pub fn new(make: M) -> Self {
        Self { make }
    }
}

impl<M: MakeDestination + Clone, S> Layer<S> for DispatchLayer<M>
where
    M::Service: Clone,
{
    type Service = Dispatch<M>;

    /// The inner service is not used: every routed request goes to its destination's service.
    fn layer(&self, _inner: S) -> Dispatch<M> {
        Dispatch::new(self.make.clone())
    }
}

/// Sends each request to its destination's service. See the module docs.
pub struct Dispatch<M: MakeDestination> {
    make: Arc<M>,
    cache: Arc<Cache<M::Service>>,
}

struct Cache<S> {
    services: ArcSwap<HashMap<DestinationKey, S>>,
    writing: Mutex<()>,
}

impl<M: MakeDestination> Clone for Dispatch<M> {
    fn clone(&self) -> Self {
        Self { make: self.make.clone(), cache: self.cache.clone() }
    }
}

impl<M: MakeDestination> fmt::Debug for Dispatch<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch").field("destinations", &self.cache.services.load().len()).finish()
    }
}

impl<M: MakeDestination> Dispatch<M>
where
    M::Service: Clone,
{
    /// Dispatches to services made by `make`.
    pub fn new(make: M) -> Self {
        Self {
            make: Arc::new(make),
            cache: Arc::new(Cache { services: ArcSwap::from_pointee(HashMap::new()), writing: Mutex::new(()) }),
        }
    }

    /// The service of `key`, made now if there is none yet.
    pub fn service(&self, key: &DestinationKey) -> M::Service {
        if let Some(s) = self.cache.services.load().get(key) {
            return s.clone();
        }
        let _writing = self.cache.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.cache.services.load();
        if let Some(s) = current.get(key) {
            return s.clone();
        }
        let service = self.make.make(key);
        let mut next = HashMap::clone(&current);
        next.insert(key.clone(), service.clone());
        self.cache.services.store(Arc::new(next));
        service
    }

    /// Drops the services of destinations `keep` rejects (destinations that left the config).
    pub fn retain(&self, keep: impl Fn(&DestinationKey) -> bool) {
        let _writing = self.cache.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.cache.services.load();
        if current.keys().all(&keep) {
            return;
        }
        let next = current.iter().filter(|(k, _)| keep(k)).map(|(k, s)| (k.clone(), s.clone())).collect();
        self.cache.services.store(Arc::new(next));
    }

    /// The destinations with a service, in no particular order.
    pub fn destinations(&self) -> Vec<DestinationKey> {
        self.cache.services.load().keys().cloned().collect()
    }
}

impl<M, B, RB> Service<Request<B>> for Dispatch<M>
where
    M: MakeDestination,
    M::Service: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    <M::Service as Service<Request<B>>>::Future: Send,
    RB: Body<Data = Bytes>,
    B: Body + Default + Send + 'static,
{
    type Response = Response<RoutingBody<RB>>;
    type Error = <M::Service as Service<Request<B>>>::Error;
    type Future = ResponseFuture<Oneshot<M::Service, Request<B>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each destination's service is made ready in its own call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(decision) = RouteDecision::of(req.extensions()) else {
            return ResponseFuture::local(local(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"no routing decision for this request\n"),
                ResponseFlags::NO_CLUSTER_FOUND,
            ));
        };
        let key = DestinationKey::of(decision);
        if let Some(MirrorTo(mirrors)) = req.extensions_mut().remove::<MirrorTo>()
            && req.body().is_end_stream()
            // An upgrade or a tunnel cannot be copied: only the original gets it.
            && req.method() != http::Method::CONNECT
            && !req.headers().contains_key(http::header::UPGRADE)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let route_name = RouteDecision::of(req.extensions()).map(|d| d.route_name.clone());
            for m in mirrors {
                let mut copy = Request::new(B::default());
                *copy.method_mut() = req.method().clone();
                *copy.uri_mut() = req.uri().clone();
                *copy.headers_mut() = req.headers().clone();
                let mut decision = RouteDecision::new(route_name.clone().unwrap_or_default(), m.host.clone());
                if let Some(subset) = &m.subset {
                    decision = decision.with_subset(subset.clone());
                }
                if let Some(port) = m.port {
                    decision = decision.with_port(port);
                }
                copy.extensions_mut().insert(decision);
                let svc = self.service(&m);
                handle.spawn(async move {
                    let _ = svc.oneshot(copy).await;
                });
            }
        }
        let svc = self.service(&key);
        ResponseFuture::inner(svc.oneshot(req), None)
    }
}
