//! Retries as Istio's `retries` block says, with budgets, replayable bodies and back-off.
//!
//! [`Retry`] sends a request to its inner service and, when the answer is a failure its
//! [`RetryPolicy`] retries on ([`RetryOn`]: Envoy's meaning of every `retryOn` token), sends it
//! again, up to the policy's count of retries, each after a fully jittered exponential
//! back-off (25 ms base, 250 ms cap by default), each bounded by the per-try timeout. A retry
//! also needs:
//!
//! * a body it can send again: the first try's body is recorded as it is sent, up to 64 KiB
//!   by default ([`ReplayBody`]); a longer body, or one still streaming when the answer came,
//!   is not retried and passes through untouched;
//! * an idempotent method, unless the failure happened before the request was sent (connect
//!   failure, refused stream) or [`RetryPolicy::retrying_non_idempotent`] says otherwise;
//! * the budget's consent, when there is one ([`TokenBudget`], [`ConcurrencyBudget`]), shared
//!   by every clone of the layer.
//!
//! A response that says when to come back (`Retry-After`, `x-ratelimit-reset`) is retried
//! after that long instead of the back-off when the policy is told to honour it
//! ([`RetryPolicy::honouring_retry_after`]).
//!
//! When the retries run out, the last response is returned with flag `URX`; when the budget
//! refuses, with flag `UO`. A retried response carries the [`Attempts`] it took. A per-try timeout
//! that is not retried answers with a timeout error (504 `UT` at a proxy's edge).
//!
//! Errors are classified by mesh-core ([`Outcome::from_error`](mesh_core::Outcome::from_error))
//! through [`RetryableError`], implemented for `Box<dyn Error + Send + Sync>` (what hyper-util
//! and tower services usually return, after `map_err(Into::into)`) and for `Infallible`.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use mesh_resilience::retry::{RetryLayer, RetryPolicy, TokenBudget};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let flaky = service_fn(move |_req: http::Request<_>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n < 2 { 503 } else { 200 };
//!         let mut res = http::Response::new(Full::new(Bytes::new()));
//!         *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
//!         Ok::<_, Infallible>(res)
//!     }
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryPolicy::new(3, "5xx".parse()?)).with_budget(Arc::new(TokenBudget::linkerd_default())))
//!     .service(flaky);
//! let res = svc.oneshot(http::Request::new(Full::new(Bytes::new()))).await?;
//! assert_eq!(res.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # Ok(()) }
//! ```

mod body;
mod budget;
mod policy;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use mesh_core::classify::{Failure, Outcome, TimeoutError};
use mesh_core::flags::FlaggedError;
use mesh_core::random::Random;
use mesh_core::{ResponseFlags, TriedEndpoints, TryDeadline};
use tower::{Layer, Service, ServiceExt};

pub use body::{Replay, ReplayBody};
pub use budget::{ConcurrencyBudget, RequestGuard, RetryBudget, RetryGuard, TokenBudget};
pub use policy::{DEFAULT_BACKOFF, DEFAULT_MAX_REPLAY_BYTES, HttpRetry, InvalidRetry, RetryOn, RetryPolicy};

/// Request extension: the retry policy of the request's route, set by a routing layer
/// (mesh-routing's `RoutingLayer` sets it from the route's `retries`). [`Retry`] uses it in
/// place of its own policy.
#[derive(Clone, Debug)]
pub struct RoutePolicy(pub Arc<RetryPolicy>);

/// Response extension: how many tries the response took, when it was retried (absent: one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts(pub u32);

/// An error a retry decision can read.
pub trait RetryableError: Sized {
    /// What the failure was, if it is one retries know.
    fn failure(&self) -> Option<Failure>;
    /// The error a per-try timeout becomes, if this error type can carry it (else per-try
    /// timeouts are not applied).
    fn timeout() -> Option<Self>;
    /// This error, marked with the flags the retries end on (`URX`, `UO`) after `tries` tries,
    /// if the error type can carry them (by default it cannot, and is returned as it is).
    fn flagged(self, flags: ResponseFlags, tries: u32) -> Self {
        let _ = (flags, tries);
        self
    }
}

impl RetryableError for Box<dyn StdError + Send + Sync> {
    fn failure(&self) -> Option<Failure> {
        Outcome::from_error(&**self).failure()
    }

    fn timeout() -> Option<Self> {
        Some(Box::new(TimeoutError::new()))
    }

    /// Wraps the error in a [`FlaggedError`], whose source it stays.
    fn flagged(self, flags: ResponseFlags, tries: u32) -> Self {
        Box::new(FlaggedError::new(self, flags, tries))
    }
}

impl RetryableError for Infallible {
    fn failure(&self) -> Option<Failure> {
        match *self {}
    }

    fn timeout() -> Option<Self> {
        None
    }
}

// === RetryLayer ===

/// Layer of [`Retry`]. See the module docs.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<dyn RetryBudget>>,
    random: Arc<Random>,
    extensions: Carry,
    previous_hosts: bool,
}

/// Which request extensions a retry carries.
#[derive(Clone, Copy)]
enum Carry {
    All,
    None,
    Some(fn(&http::Extensions, &mut http::Extensions)),
}

impl fmt::Debug for Carry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Carry::All => "all",
            Carry::None => "none",
            Carry::Some(_) => "some",
        })
    }
}

impl RetryLayer {
    /// Retries by `policy`, with no budget.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
            budget: None,
            random: Arc::new(Random::from_entropy()),
            extensions: Carry::All,
            previous_hosts: true,
        }
    }

    /// Whether requests carry the [`TriedEndpoints`] record that lets a balancer below send
    /// a retry elsewhere, when their policy asks for it (the default). Turn it off over a
    /// service with one endpoint, where the record would cost allocations per request and
    /// change nothing.
    pub fn recording_tried_endpoints(mut self, record: bool) -> Self {
        self.previous_hosts = record;
        self
    }

    /// Retries carry the request's method, target, version and headers but not its
    /// extensions, which then need not be cloned for every request (for an inner service that
    /// reads none; the first try always has them). The [`TriedEndpoints`] record is carried
    /// all the same.
    pub fn without_extensions(mut self) -> Self {
        self.extensions = Carry::None;
        self
    }

    /// Retries carry the extensions `copy` copies from the request's into theirs (say, the
    /// client's address that source-IP hashing reads), and no others. `copy` runs once per
    /// request, before the first try.
    pub fn carrying_extensions(mut self, copy: fn(&http::Extensions, &mut http::Extensions)) -> Self {
        self.extensions = Carry::Some(copy);
        self
    }

    /// Caps retries with `budget`, shared by every service this layer makes.
    pub fn with_budget(mut self, budget: Arc<dyn RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Draws back-off jitter from `random` (seed it for deterministic tests).
    pub fn with_random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        let shared = Shared {
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            random: self.random.clone(),
            extensions: self.extensions,
            previous_hosts: self.previous_hosts,
        };
        Retry { inner, shared: Arc::new(shared) }
    }
}

/// Retries failed requests. See the module docs.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What every clone of a [`Retry`] and every request's retries share (one reference count
/// per request, not one per part).
struct Shared {
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<dyn RetryBudget>>,
    random: Arc<Random>,
    extensions: Carry,
    previous_hosts: bool,
}

impl<S> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry").field("policy", &self.shared.policy).field("budget", &self.shared.budget).finish()
    }
}

fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// Whether `result` of a request with head `head` is one `policy` retries. Upgrades and
/// tunnels are never retried (their connection cannot be replayed); a non-idempotent request
/// only when it never left, or when it is gRPC (whose retry conditions are its own), or when
/// the policy says so.
fn should_retry<RB, E: RetryableError>(
    policy: &RetryPolicy,
    head: &http::request::Parts,
    result: &Result<Response<RB>, E>,
) -> bool {
    // The answer first: most are not retried, and then the request's headers need no look.
    let (retried, before_send) = match result {
        Ok(res) => (policy.retry_on().on_response(res.status(), res.headers()), false),
        Err(e) => match e.failure() {
            Some(f) => {
                let before_send = matches!(f, Failure::ConnectFailure | Failure::RefusedStream);
                (policy.retry_on().on_failure(f, !before_send), before_send)
            }
            None => (false, false),
        },
    };
    if !retried || head.method == Method::CONNECT || head.headers.contains_key(http::header::UPGRADE) {
        return false;
    }
    // A non-idempotent request that reached the upstream was processed.
    before_send || idempotent(&head.method) || policy.retries_non_idempotent() || is_grpc(head)
}

fn is_grpc(head: &http::request::Parts) -> bool {
    head.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What a retry needs once the first try has answered.
struct Retrying<S, B> {
    svc: S,
    head: http::request::Parts,
    tried: Option<TriedEndpoints>,
    route_deadline: Option<TryDeadline>,
    replay: Replay<B>,
    /// The route's policy, when the request named one (else the layer's).
    route_policy: Option<Arc<RetryPolicy>>,
    shared: Arc<Shared>,
    _request: Option<RequestGuard>,
}

impl<S, B> Retrying<S, B> {
    fn policy(&self) -> &RetryPolicy {
        self.route_policy.as_deref().unwrap_or(&self.shared.policy)
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: RetryableError + Send,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready inner service takes the first try; clones take the retries.
        let clone = self.inner.clone();
        let mut first = std::mem::replace(&mut self.inner, clone);
        let route_policy = req.extensions().get::<RoutePolicy>().map(|RoutePolicy(route)| route.clone());
        let policy: &RetryPolicy = route_policy.as_deref().unwrap_or(&self.shared.policy);
        let (mut parts, body) = req.into_parts();
        if policy.retries() == 0 {
            let (body, _) = ReplayBody::new(body, 0);
            let fut = first.call(Request::from_parts(parts, body));
            return ResponseFuture { state: State::First { fut: FirstTry::Plain { fut }, retrying: None } };
        }
        let shared = &self.shared;
        let head = match shared.extensions {
            Carry::All => parts.clone(),
            Carry::None | Carry::Some(_) => {
                let mut head = Request::new(());
                *head.method_mut() = parts.method.clone();
                *head.uri_mut() = parts.uri.clone();
                *head.version_mut() = parts.version;
                *head.headers_mut() = parts.headers.clone();
                if let Carry::Some(copy) = shared.extensions {
                    copy(&parts.extensions, head.extensions_mut());
                }
                head.into_parts().0
            }
        };
        // Every try records its endpoint here, and retries avoid them (previous hosts). The
        // retries get it from `tried`: the head copied above has no need of it.
        let tried = (shared.previous_hosts && policy.avoids_previous_hosts()).then(TriedEndpoints::default);
        if let Some(tried) = &tried {
            parts.extensions.insert(tried.clone());
        }
        // The route's deadline, which every try keeps (retries carry no other extension).
        let route_deadline = TryDeadline::of(&parts.extensions);
        if let Some(limit) = policy.per_try_timeout().filter(|_| S::Error::timeout().is_some()) {
            let deadline = (tokio::time::Instant::now() + limit).into_std();
            TryDeadline::tighten(&mut parts.extensions, deadline);
        }
        let (body, replay) = ReplayBody::new(body, policy.max_replay_bytes());
        let fut = first.call(Request::from_parts(parts, body));
        let fut = match (policy.per_try_timeout(), S::Error::timeout().is_some()) {
            (Some(limit), true) => FirstTry::Timed { fut: tokio::time::timeout(limit, fut) },
            _ => FirstTry::Plain { fut },
        };
        let retrying = Retrying {
            svc: first,
            head,
            tried,
            route_deadline,
            replay,
            _request: shared.budget.as_ref().map(|b| b.deposit()),
            route_policy,
            shared: shared.clone(),
        };
        ResponseFuture { state: State::First { fut, retrying: Some(retrying) } }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Retry`]: the first try polled in place; the retries, when there
    /// are any, in a boxed loop.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

type Looping<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        First { #[pin] fut: FirstTry<S::Future>, retrying: Option<Retrying<S, B>> },
        Looping { fut: Looping<S::Response, S::Error> },
    }
}

pin_project_lite::pin_project! {
    #[project = FirstTryProj]
    enum FirstTry<F> {
        Plain { #[pin] fut: F },
        Timed { #[pin] fut: tokio::time::Timeout<F> },
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("retry::ResponseFuture")
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: RetryableError + Send,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    RB: Send + 'static,
{
    type Output = Result<Response<RB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::First { fut, retrying } => {
                    let result = match fut.project() {
                        FirstTryProj::Plain { fut } => ready!(fut.poll(cx)),
                        FirstTryProj::Timed { fut } => match ready!(fut.poll(cx)) {
                            Ok(result) => result,
                            Err(_) => Err(S::Error::timeout().expect("timed only when the error can say so")),
                        },
                    };
                    let Some(r) = retrying.take() else { return Poll::Ready(result) };
                    if !should_retry(r.policy(), &r.head, &result) {
                        return Poll::Ready(finish(result, 1, ResponseFlags::empty()));
                    }
                    this.state.set(State::Looping { fut: Box::pin(retry_loop(r, result)) });
                }
                StateProj::Looping { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

/// The retries after a first try that should be retried.
async fn retry_loop<S, B, RB>(
    r: Retrying<S, B>,
    mut result: Result<Response<RB>, S::Error>,
) -> Result<Response<RB>, S::Error>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: RetryableError + Send,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    RB: Send + 'static,
{
    let Retrying { svc, head, tried, route_deadline, replay, route_policy, shared, _request } = r;
    let policy: &RetryPolicy = route_policy.as_deref().unwrap_or(&shared.policy);
    let (budget, random) = (&shared.budget, &*shared.random);
    let mut tries = 1;
    // Held while a retry is in flight (the concurrency budget counts it).
    let mut _retry_guard = None;
    loop {
        if tries > 1 && !should_retry(policy, &head, &result) {
            return finish(result, tries, ResponseFlags::empty());
        }
        if tries > policy.retries() {
            return finish(result, tries, ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        }
        let Some(body) = replay.body() else {
            // The body is too long to replay, or was still streaming.
            return finish(result, tries, ResponseFlags::empty());
        };
        match budget.as_ref().map(|b| b.withdraw()) {
            Some(None) => return finish(result, tries, ResponseFlags::UPSTREAM_OVERFLOW),
            Some(Some(guard)) => _retry_guard = Some(guard),
            None => {}
        }
        let asked = result.as_ref().ok().and_then(|res| policy.requested_delay(res.headers()));
        let wait = match asked {
            // Up to half again, so that the clients told the same time do not all come back
            // at once (Envoy's jittered lower bound).
            Some(asked) => asked + Duration::from_nanos(random.below(nanos(asked) / 2 + 1)),
            None => policy.backoff(tries, random),
        };
        tokio::time::sleep(wait).await;
        drop(result);
        let mut svc = svc.clone();
        let mut req = Request::from_parts(head.clone(), body);
        req.extensions_mut().insert(mesh_core::ResendCount(tries));
        if let Some(tried) = &tried {
            req.extensions_mut().insert(tried.clone());
        }
        // This try's deadline: the route's, or its per-try timeout's if sooner.
        if let Some(TryDeadline(route)) = route_deadline {
            TryDeadline::tighten(req.extensions_mut(), route);
        }
        if let Some(limit) = policy.per_try_timeout().filter(|_| S::Error::timeout().is_some()) {
            TryDeadline::tighten(req.extensions_mut(), (tokio::time::Instant::now() + limit).into_std());
        }
        result = match svc.ready().await {
            Ok(svc) => try_once(policy.per_try_timeout(), svc.call(req)).await,
            Err(e) => Err(e),
        };
        tries += 1;
        // That retry is over: its place in the concurrency budget is free again.
        _retry_guard = None;
    }
}

/// One try, bounded by the per-try timeout when the error type can say so.
async fn try_once<F, R, E>(limit: Option<std::time::Duration>, fut: F) -> Result<R, E>
where
    F: Future<Output = Result<R, E>>,
    E: RetryableError,
{
    match (limit, E::timeout()) {
        (Some(limit), Some(timeout)) => tokio::time::timeout(limit, fut).await.unwrap_or(Err(timeout)),
        _ => fut.await,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn finish<RB, E: RetryableError>(
    result: Result<Response<RB>, E>,
    tries: u32,
    flags: ResponseFlags,
) -> Result<Response<RB>, E> {
    let result = match result {
        Err(e) if !flags.is_empty() => return Err(e.flagged(flags, tries)),
        result => result,
    };
    result.map(|mut res| {
        // One try is the common case, and an extension costs an allocation: it is recorded
        // only when there were retries.
        if tries > 1 {
            res.extensions_mut().insert(Attempts(tries));
        }
        if !flags.is_empty() {
            ResponseFlags::record(res.extensions_mut(), flags);
        }
        res
    })
}
