//! Connection-pool circuit breaking, as Istio's DestinationRule `connectionPool` configures
//! Envoy's circuit breakers (SEMANTICS.md 2.3): fail fast instead of queueing without bound.
//!
//! A [`CircuitBreaker`] is shared by everything that sends to one cluster. Before a request
//! goes out it asks for admission ([`CircuitBreaker::admit`]):
//!
//! * `max_requests` (Istio `http2MaxRequests`): requests in flight to the cluster; one more is
//!   refused at once;
//! * `max_connections` (Istio `tcp.maxConnections`): connections busy with a request (an
//!   HTTP/1.1 connection carries one exchange at a time, and an idle pooled connection is
//!   reused before a new one is opened, so this bounds the connections the cluster needs); a
//!   request that finds them all busy waits for one as *pending*. Requests to a multiplexed
//!   (HTTP/2) upstream share its connection and skip this limit
//!   ([`CircuitBreaker::admit_multiplexed`])...
//! * ...up to `max_pending` (Istio `http1MaxPendingRequests`) waiting at once; one more is
//!   refused at once.
//!
//! A refusal is an [`Overloaded`] error: a proxy answers it 503 with flag `UO` and
//! `x-envoy-overloaded: true`; it is never retried and never counted by outlier detection,
//! as in Envoy. What admission grants is an [`Admission`], held until the response body has
//! ended (the connection is busy until then): [`CircuitBreakerLayer`] holds it in the body.
//! Unset limits are unlimited (Istio's defaults are 2³² − 1).
//!
//! ```
//! use mesh_resilience::pool::{CircuitBreaker, PoolLimits};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = CircuitBreaker::new(PoolLimits::default().max_connections(1).max_pending(1));
//! let first = breaker.admit().await.expect("a free connection");
//! let second = tokio::spawn({ let b = breaker.clone(); async move { b.admit().await.is_ok() } });
//! tokio::task::yield_now().await; // the second waits as pending
//! assert!(breaker.admit().await.is_err(), "a third overflows at once");
//! drop(first);
//! assert!(second.await.unwrap());
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// The limits, each `None` for unlimited. See the [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolLimits {
    /// Connections busy at once (`tcp.maxConnections`).
    pub max_connections: Option<usize>,
    /// Requests waiting for a connection at once (`http.http1MaxPendingRequests`).
    pub max_pending: Option<usize>,
    /// Requests in flight at once (`http.http2MaxRequests`).
    pub max_requests: Option<usize>,
}

impl PoolLimits {
    /// Sets the most connections busy at once.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Sets the most requests waiting for a connection at once.
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = Some(n);
        self
    }

    /// Sets the most requests in flight at once.
    pub fn max_requests(mut self, n: usize) -> Self {
        self.max_requests = Some(n);
        self
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overflow {
    /// Too many requests in flight.
    Requests,
    /// Too many requests waiting for a connection.
    Pending,
}

/// A request the circuit breaker refused. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream overflow: {}", match .0 { Overflow::Requests => "too many requests in flight", Overflow::Pending => "too many requests waiting for a connection" })]
pub struct Overloaded(pub Overflow);

/// Admission control over one cluster. Clones share the counters. See the [module docs](self).
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

struct Inner {
    limits: PoolLimits,
    connections: Option<Arc<Semaphore>>,
    pending: AtomicUsize,
    requests: AtomicUsize,
    overflows: AtomicU64,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("limits", &self.inner.limits)
            .field("requests", &self.inner.requests.load(Ordering::Relaxed))
            .field("pending", &self.inner.pending.load(Ordering::Relaxed))
            .finish()
    }
}

/// What admission grants: the request's place among those in flight and, when connections
/// are limited, its connection. Release it when the exchange is over (drop it).
pub struct Admission {
    inner: Arc<Inner>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission").field("connection", &self._connection.is_some()).finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.inner.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Leaves the pending count when the wait ends, however it ends.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CircuitBreaker {
    /// A breaker with `limits`.
    pub fn new(limits: PoolLimits) -> Self {
        let inner = Inner {
            limits,
            connections: limits.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            pending: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            overflows: AtomicU64::new(0),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The limits.
    pub fn limits(&self) -> PoolLimits {
        self.inner.limits
    }

    /// Requests in flight now.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Requests refused so far.
    pub fn overflows(&self) -> u64 {
        self.inner.overflows.load(Ordering::Relaxed)
    }

    fn overflow(&self, which: Overflow) -> Overloaded {
        self.inner.overflows.fetch_add(1, Ordering::Relaxed);
        Overloaded(which)
    }

    /// Admits a request to an HTTP/1.1 upstream: at once, after waiting as pending for a
    /// connection, or not at all ([`Overloaded`], at once). See the [module docs](self).
    pub async fn admit(&self) -> Result<Admission, Overloaded> {
        self.admit_with(true).await
    }

    /// Admits a request to a multiplexed (HTTP/2) upstream, whose streams share connections:
    /// only `max_requests` applies.
    pub async fn admit_multiplexed(&self) -> Result<Admission, Overloaded> {
        self.admit_with(false).await
    }

    async fn admit_with(&self, needs_connection: bool) -> Result<Admission, Overloaded> {
        let inner = &self.inner;
        // A connection first (waiting as pending if need be), then the request's place among
        // those in flight, as Envoy checks `max_requests` when the stream is attached.
        let mut connection = None;
        if let Some(connections) = inner.connections.as_ref().filter(|_| needs_connection) {
            connection = match connections.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let waiting = inner.pending.fetch_add(1, Ordering::AcqRel);
                    let _pending = Pending(&inner.pending);
                    if inner.limits.max_pending.is_some_and(|max| waiting >= max) {
                        return Err(self.overflow(Overflow::Pending));
                    }
                    Some(connections.clone().acquire_owned().await.expect("the semaphore is never closed"))
                }
            };
        }
        let in_flight = inner.requests.fetch_add(1, Ordering::AcqRel);
        // From here on the request counts as in flight; the admission gives it back on drop.
        let admission = Admission { inner: inner.clone(), _connection: connection };
        if inner.limits.max_requests.is_some_and(|max| in_flight >= max) {
            return Err(self.overflow(Overflow::Requests));
        }
        Ok(admission)
    }
}

// === layer ===

/// Layer of [`CircuitBreak`]: admission by a shared [`CircuitBreaker`] before each request,
/// held until the response body ends.
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer {
    breaker: CircuitBreaker,
}

impl CircuitBreakerLayer {
    /// Admits by `breaker` (shared by every service this layer makes).
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreak<S>;

    fn layer(&self, inner: S) -> CircuitBreak<S> {
        CircuitBreak { inner, breaker: self.breaker.clone() }
    }
}

/// See [`CircuitBreakerLayer`]. Its error type must hold an [`Overloaded`]
/// (`Box<dyn Error + Send + Sync>` does).
#[derive(Clone, Debug)]
pub struct CircuitBreak<S> {
    inner: S,
    breaker: CircuitBreaker,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<Request<B>> for CircuitBreak<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: From<Overloaded> + Send,
    B: Send + 'static,
{
    type Response = Response<AdmittedBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<AdmittedBody<RB>>, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Admission is the wait; the inner service is made ready after it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (breaker, mut inner) = (self.breaker.clone(), self.inner.clone());
        Box::pin(async move {
            let admission = breaker.admit().await?;
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let res = inner.call(req).await?;
            Ok(res.map(|body| AdmittedBody { body, admission: Some(admission) }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's [`Admission`] until it ends.
    pub struct AdmittedBody<B> {
        #[pin]
        body: B,
        admission: Option<Admission>,
    }
}

impl<B> fmt::Debug for AdmittedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmittedBody").field("admitted", &self.admission.is_some()).finish()
    }
}

impl<B: Body<Data = Bytes>> Body for AdmittedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.admission.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
