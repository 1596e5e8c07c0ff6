//! Fault injection, as Istio's VirtualService `fault` configures Envoy's fault filter
//! (SEMANTICS.md 1.14): delay some requests, abort some with a status of your choosing.
//!
//! A [`FaultPolicy`] has a delay (`fixedDelay`, for a share of requests) and an abort (an
//! HTTP status or a gRPC status, for a share of requests). [`FaultLayer`] draws for each
//! request: the delay first (flag `DI`), then, in an independent draw, the abort (flag `FI`):
//! a request can be both delayed and aborted. An aborted request never reaches the inner
//! service, so it is never retried and never seen by outlier detection. The answer:
//!
//! * `httpStatus`: that status, body `fault filter abort`;
//! * `grpcStatus` (or an HTTP abort of a gRPC request, mapped as Envoy maps local replies):
//!   HTTP 200, trailers-only, `grpc-status` and `grpc-message: fault filter abort`.
//!
//! Shares are Istio's `percentage`, kept in millionths as Envoy keeps them (the value × 10 000,
//! truncated); a fault without one never fires. Draws come from a [`Random`] that tests seed.
//! A routing layer can give each request its route's policy ([`RouteFault`]); the layer's own
//! applies otherwise.
//!
//! ```
//! use std::time::Duration;
//! use mesh_resilience::fault::{Abort, FaultLayer, FaultPolicy};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let policy = FaultPolicy::default()
//!     .with_delay(Duration::from_secs(5), 100.0)
//!     .with_abort(Abort::Http(http::StatusCode::SERVICE_UNAVAILABLE), 100.0);
//! let svc = FaultLayer::new(policy).layer(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! }));
//! let start = tokio::time::Instant::now();
//! let res = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!((res.status(), start.elapsed()), (http::StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5)));
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::ResponseFlags;
use mesh_core::classify::GrpcCode;
use mesh_core::random::Random;
use tower::{Layer, Service};

use crate::LocalOr;

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(StatusCode),
    /// A gRPC status (HTTP 200, trailers-only).
    Grpc(GrpcCode),
}

/// A route's faults. See the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPolicy {
    delay: Option<(Duration, u32)>,
    abort: Option<(Abort, u32)>,
}

/// Istio's percentage in millionths, truncated as Istio converts it.
fn per_million(percent: f64) -> u32 {
    (percent.clamp(0.0, 100.0) * 10_000.0) as u32
}

impl FaultPolicy {
    /// Delays `percent` % of requests by `delay`.
    pub fn with_delay(mut self, delay: Duration, percent: f64) -> Self {
        self.delay = Some((delay, per_million(percent)));
        self
    }

    /// Aborts `percent` % of requests with `abort`.
    pub fn with_abort(mut self, abort: Abort, percent: f64) -> Self {
        self.abort = Some((abort, per_million(percent)));
        self
    }

    /// The delay and its share in millionths.
    pub fn delay(&self) -> Option<(Duration, u32)> {
        self.delay
    }

    /// The abort and its share in millionths.
    pub fn abort(&self) -> Option<(Abort, u32)> {
        self.abort
    }
}

/// Request extension: the fault policy of the request's route, set by a routing layer.
/// [`FaultService`] applies it in place of its own.
#[derive(Clone, Debug)]
pub struct RouteFault(pub Arc<FaultPolicy>);

/// Layer of [`FaultService`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct FaultLayer {
    policy: Option<Arc<FaultPolicy>>,
    random: Arc<Random>,
}

impl FaultLayer {
    /// Injects `policy`'s faults (a request's [`RouteFault`] takes precedence).
    pub fn new(policy: FaultPolicy) -> Self {
        Self { policy: Some(Arc::new(policy)), random: Arc::new(Random::from_entropy()) }
    }

    /// Injects only the faults requests carry ([`RouteFault`]).
    pub fn from_routes() -> Self {
        Self { policy: None, random: Arc::new(Random::from_entropy()) }
    }

    /// Draws from `random` (seed it for deterministic tests).
    pub fn with_random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService { inner, policy: self.policy.clone(), random: self.random.clone() }
    }
}

/// See [`FaultLayer`].
#[derive(Clone)]
pub struct FaultService<S> {
    inner: S,
    policy: Option<Arc<FaultPolicy>>,
    random: Arc<Random>,
}

impl<S> fmt::Debug for FaultService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultService").field("policy", &self.policy).finish()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<Request<B>> for FaultService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<LocalOr<RB>>;
    type Error = S::Error;
    type Future = FaultFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let policy = match req.extensions().get::<RouteFault>() {
            Some(RouteFault(route)) => Some(route.clone()),
            None => self.policy.clone(),
        };
        let draw = |share: u32| share > 0 && self.random.below(1_000_000) < u64::from(share);
        let delay = policy.as_ref().and_then(|p| p.delay).filter(|&(d, share)| !d.is_zero() && draw(share));
        let abort = policy.as_ref().and_then(|p| p.abort).filter(|&(_, share)| draw(share));
        if delay.is_none() && abort.is_none() {
            return FaultFuture { state: FaultState::Pass { fut: self.inner.call(req) } };
        }
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // The ready service takes this request; a clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut: BoxFuture<Result<Response<LocalOr<RB>>, S::Error>> = Box::pin(async move {
            let mut flags = ResponseFlags::empty();
            if let Some((delay, _)) = delay {
                tokio::time::sleep(delay).await;
                flags |= ResponseFlags::DELAY_INJECTED;
            }
            let mut res = match abort {
                Some((abort, _)) => {
                    flags |= ResponseFlags::FAULT_INJECTED;
                    aborted(abort, grpc)
                }
                None => inner.call(req).await?.map(LocalOr::inner),
            };
            ResponseFlags::record(res.extensions_mut(), flags);
            Ok(res)
        });
        FaultFuture { state: FaultState::Injected { fut } }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`FaultService`]: the inner service's, polled in place, or a
    /// boxed one for a request with a fault.
    pub struct FaultFuture<F, RB, E> {
        #[pin]
        state: FaultState<F, RB, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = FaultStateProj]
    enum FaultState<F, RB, E> {
        Pass { #[pin] fut: F },
        Injected { fut: BoxFuture<Result<Response<LocalOr<RB>>, E>> },
    }
}

impl<F, RB, E> fmt::Debug for FaultFuture<F, RB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultFuture")
    }
}

impl<F, RB, E> Future for FaultFuture<F, RB, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<LocalOr<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FaultStateProj::Pass { fut } => fut.poll(cx).map(|r| r.map(|res| res.map(LocalOr::inner))),
            FaultStateProj::Injected { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// An abort's answer.
fn aborted<RB>(abort: Abort, grpc: bool) -> Response<LocalOr<RB>> {
    const MESSAGE: &str = "fault filter abort";
    let code = match (abort, grpc) {
        (Abort::Grpc(code), _) => Some(code),
        (Abort::Http(status), true) => Some(GrpcCode::from_http_status(status)),
        (Abort::Http(_), false) => None,
    };
    match (abort, code) {
        (_, Some(code)) => {
            let mut res = Response::new(LocalOr::local(Bytes::new()));
            let headers = res.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(code.as_u32()));
            headers.insert("grpc-message", HeaderValue::from_static(MESSAGE));
            res
        }
        (Abort::Http(status), None) => {
            let mut res = Response::new(LocalOr::local(Bytes::from_static(MESSAGE.as_bytes())));
            *res.status_mut() = status;
            res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            res
        }
        (Abort::Grpc(_), None) => unreachable!("a gRPC abort always has a code"),
    }
}
