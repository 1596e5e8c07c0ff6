//! [`Balance`]: a tower service that sends each request to an endpoint its [`Balancer`]
//! picks, through a per-endpoint service made on first use (a hyper-util client bound to that
//! address, say).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::SET_COOKIE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use mesh_core::{ClientConnection, ResponseFlags, TriedEndpoints};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use super::{Balancer, Endpoint, HashKey, HealthView, Picked};
use crate::layer::RoutingBody;
use crate::random::Random;

/// Makes the service of one endpoint. Closures `Fn(&Endpoint) -> S` are one.
pub trait MakeEndpoint {
    /// The per-endpoint service.
    type Service;

    /// Makes the service for `endpoint`.
    fn make(&self, endpoint: &Endpoint) -> Self::Service;
}

impl<F: Fn(&Endpoint) -> S, S> MakeEndpoint for F {
    type Service = S;

    fn make(&self, endpoint: &Endpoint) -> S {
        self(endpoint)
    }
}

/// Sends each request to the endpoint a [`Balancer`] picks (skipping those the health view
/// rejects), hashing the request by a [`HashKey`] for the consistent-hash policies. The
/// client's address, for `useSourceIp`, comes from the [`ClientConnection`] extension. A
/// request with nowhere to go is answered 503 with flag `UH`; when an `httpCookie` key with a
/// `ttl` finds no cookie, the balancer generates one and the response sets it. Clones share
/// the balancer, its counters and the endpoint services. A retry (a request carrying
/// [`TriedEndpoints`]) goes to an endpoint no earlier try went to, when there is one. See the
/// [module docs](super).
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use mesh_routing::balance::{Balance, Balancer, Endpoint, LbPolicy};
/// use tower::{ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let balancer = Balancer::new(LbPolicy::RoundRobin, vec![Endpoint::new("10.0.0.1:80"), Endpoint::new("10.0.0.2:80")])?;
/// let svc = Balance::new(balancer, |e: &Endpoint| {
///     let address = e.address().to_string();
///     // A real client would send to `address`; this one says where it would have.
///     service_fn(move |_req: http::Request<()>| {
///         let address = address.clone();
///         async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(address)))) }
///     })
/// });
/// let res = svc.clone().oneshot(http::Request::new(())).await?;
/// assert_eq!(res.status(), 200);
/// # Ok(()) }
/// ```
pub struct Balance<M: MakeEndpoint> {
    balancer: Balancer,
    hash_key: Option<HashKey>,
    health: Arc<dyn HealthView>,
    random: Arc<Random>,
    make: Arc<M>,
    services: Arc<ArcSwap<HashMap<Arc<str>, M::Service>>>,
    writing: Arc<Mutex<()>>,
}

impl<M: MakeEndpoint> Clone for Balance<M> {
    fn clone(&self) -> Self {
        Self {
            balancer: self.balancer.clone(),
            hash_key: self.hash_key.clone(),
            health: self.health.clone(),
            random: self.random.clone(),
            make: self.make.clone(),
            services: self.services.clone(),
            writing: self.writing.clone(),
        }
    }
}

impl<M: MakeEndpoint> fmt::Debug for Balance<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance").field("balancer", &self.balancer).field("hash_key", &self.hash_key).finish()
    }
}

impl<M: MakeEndpoint> Balance<M>
where
    M::Service: Clone,
{
    /// Balances over `balancer`'s endpoints, with services made by `make`.
    pub fn new(balancer: Balancer, make: M) -> Self {
        Self {
            balancer,
            hash_key: None,
            health: Arc::new(()),
            random: Arc::new(Random::from_entropy()),
            make: Arc::new(make),
            services: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            writing: Arc::new(Mutex::new(())),
        }
    }

    /// Hashes requests by `key` (for ring hash and maglev).
    pub fn with_hash_key(mut self, key: HashKey) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// Skips the endpoints `health` rejects (outlier detection's view, say).
    pub fn with_health(mut self, health: Arc<dyn HealthView>) -> Self {
        self.health = health;
        self
    }

    /// The balancer (to [`update`](Balancer::update) its endpoints).
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Drops the services of endpoints no longer in the balancer's set.
    pub fn retire_departed(&self) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.balancer.endpoints();
        let services = self.services.load();
        let next: HashMap<_, _> = services
            .iter()
            .filter(|(a, _)| current.iter().any(|e| e.address() == *a))
            .map(|(a, s)| (a.clone(), s.clone()))
            .collect();
        self.services.store(Arc::new(next));
    }

    fn service(&self, endpoint: &Endpoint) -> M::Service {
        if let Some(s) = self.services.load().get(endpoint.address()) {
            return s.clone();
        }
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.services.load();
        if let Some(s) = current.get(endpoint.address()) {
            return s.clone();
        }
        let service = self.make.make(endpoint);
        let mut next = HashMap::clone(&current);
        next.insert(endpoint.address().clone(), service.clone());
        self.services.store(Arc::new(next));
        service
    }
}

impl<M, B, RB> Service<Request<B>> for Balance<M>
where
    M: MakeEndpoint,
    M::Service: Service<Request<B>, Response = Response<RB>> + Clone,
    RB: Body<Data = Bytes>,
{
    type Response = Response<RoutingBody<RB>>;
    type Error = <M::Service as Service<Request<B>>>::Error;
    type Future = BalanceFuture<Oneshot<M::Service, Request<B>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each endpoint's service is made ready in its own call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let peer = ClientConnection::of(req.extensions()).map(|c| c.peer);
        let mut set_cookie = None;
        let hash = self.hash_key.as_ref().and_then(|key| {
            key.hash(&req, peer).or_else(|| match key {
                HashKey::Cookie { ttl: Some(_), .. } => {
                    let (hash, cookie) = key.cookie_to_set(&self.random, peer)?;
                    set_cookie = Some(cookie);
                    Some(hash)
                }
                _ => None,
            })
        });
        let tried = TriedEndpoints::of(req.extensions());
        let Some(picked) = self.balancer.pick_avoiding(hash, &*self.health, tried) else {
            let mut res = Response::new(Bytes::from_static(b"no healthy upstream\n"));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            ResponseFlags::record(res.extensions_mut(), ResponseFlags::NO_HEALTHY_UPSTREAM);
            return BalanceFuture { state: State::Local { res: Some(res) } };
        };
        let fut = self.service(picked.endpoint()).oneshot(req);
        BalanceFuture { state: State::Inner { fut, picked: Some(picked), set_cookie } }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Balance`]: the endpoint counts as active until it completes.
    pub struct BalanceFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Local { res: Option<Response<Bytes>> },
        Inner { #[pin] fut: F, picked: Option<Picked>, set_cookie: Option<HeaderValue> },
    }
}

impl<F> fmt::Debug for BalanceFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BalanceFuture")
    }
}

impl<F, RB, E> Future for BalanceFuture<F>
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
            StateProj::Inner { fut, picked, set_cookie } => {
                let mut res = ready!(fut.poll(cx))?;
                picked.take();
                if let Some(cookie) = set_cookie.take() {
                    res.headers_mut().append(SET_COOKIE, cookie);
                }
                Poll::Ready(Ok(res.map(RoutingBody::inner)))
            }
        }
    }
}
