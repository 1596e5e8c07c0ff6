//! Local rate limiting on `governor`, with Envoy's token-bucket parameters and answers
//! (SEMANTICS.md 4).
//!
//! A [`RateLimiter`] holds a total bucket (every request), keyed buckets (one per value of a
//! [`RateLimitKey`]: a header such as `x-user-id`, a cookie, the client's IP or its network,
//! the peer's SPIFFE identity, or a closure), and per-key overrides (a bigger bucket for one
//! identity, say). A request takes a token from its key's bucket and from the total one;
//! either empty refuses it. Clones share every bucket, so a service cloned per request (axum
//! does) is limited once overall, which tower's `RateLimit` is not.
//!
//! [`TokenBucket`] is Envoy's: `max_tokens` is the burst (and the bucket starts full),
//! `tokens_per_fill` come back every `fill_interval`, continuously (one every
//! `fill_interval / tokens_per_fill`), as Envoy's atomic bucket refills (GCRA underneath).
//!
//! Keyed buckets live in a concurrent map that is swept of idle keys (a full bucket is the
//! same as no entry) every `fill_interval`, and emptied whole if it still holds more than
//! [`RateLimiter::with_max_keys`] keys (100 000 by default; the map is looked at every 1,024
//! checks, so it may pass the cap by that many): memory stays bounded under any number of
//! distinct keys, at the price of forgiving the keys that were limited when that happens.
//!
//! [`RateLimitLayer`] answers a refused request at once: 429 (configurable), body
//! `local_rate_limited`, `Retry-After`, the IETF `RateLimit-Policy` and `RateLimit` fields
//! (SEMANTICS.md 4.4), optionally Envoy's legacy `x-ratelimit-limit / -remaining / -reset`
//! trio, flag `RL`; a gRPC request gets HTTP 200 with `grpc-status` 8 (`RESOURCE_EXHAUSTED`;
//! configured from Envoy's filter, 14 `UNAVAILABLE` unless it says
//! `rate_limited_as_resource_exhausted`, as Envoy does).
//! `filter_enabled` and `filter_enforced` shares (Envoy's) sample which requests are checked
//! and which refusals are enforced (the rest are only counted: shadow mode).
//!
//! ```
//! use std::time::Duration;
//! use mesh_resilience::ratelimit::{RateLimitLayer, RateLimiter, TokenBucket};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let limiter = RateLimiter::total(TokenBucket::new(2, 1, Duration::from_secs(1)).unwrap());
//! let svc = RateLimitLayer::new(limiter).layer(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! }));
//! for expected in [200, 200, 429] {
//!     let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
//!     assert_eq!(res.status(), expected);
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use mesh_core::random::Random;
use mesh_core::{ClientConnection, PeerIdentity, ResponseFlags};
use tower::{Layer, Service};

use crate::LocalOr;

/// A configuration the limiter refuses: the field and why.
pub type InvalidRateLimit = crate::InvalidConfig;

// === clock ===

/// governor's clock on tokio's time, so that paused-time tests drive the buckets.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Direct = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type Keyed = governor::RateLimiter<String, DashMapStateStore<String>, TokioClock, StateInformationMiddleware>;

// === TokenBucket ===

/// Envoy's `token_bucket`. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
}

impl TokenBucket {
    /// A bucket of `max_tokens` (the burst; it starts full), refilled with `tokens_per_fill`
    /// every `fill_interval`, with Envoy's validation (both counts above 0, the interval at
    /// least 50 ms).
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Result<Self, InvalidRateLimit> {
        if max_tokens == 0 {
            return Err(InvalidRateLimit::new("max_tokens", "must be more than 0"));
        }
        if tokens_per_fill == 0 {
            return Err(InvalidRateLimit::new("tokens_per_fill", "must be more than 0"));
        }
        if fill_interval < Duration::from_millis(50) {
            return Err(InvalidRateLimit::new("fill_interval", "must be at least 50ms"));
        }
        Ok(Self { max_tokens, tokens_per_fill, fill_interval })
    }

    /// `n` requests per `window`, with a burst of `n` (Linkerd's `requestsPerSecond` is
    /// `per(n, 1 s)`).
    pub fn per(n: u32, window: Duration) -> Result<Self, InvalidRateLimit> {
        Self::new(n, n, window)
    }

    /// The burst.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// Tokens per fill.
    pub fn tokens_per_fill(&self) -> u32 {
        self.tokens_per_fill
    }

    /// The fill interval.
    pub fn fill_interval(&self) -> Duration {
        self.fill_interval
    }

    fn quota(&self) -> Quota {
        let per_token = self.fill_interval / self.tokens_per_fill;
        let burst = NonZeroU32::new(self.max_tokens).expect("validated");
        Quota::with_period(per_token.max(Duration::from_nanos(1))).expect("a period above 0").allow_burst(burst)
    }
}

// === keys ===

/// A closure that reads a key from a request's head.
pub type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

/// Where a keyed limit's key comes from. A request without one is limited by the total
/// bucket only.
#[derive(Clone)]
#[non_exhaustive]
pub enum RateLimitKey {
    /// A header's value (`x-user-id`, `x-api-key`).
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address (from the `ClientConnection` extension).
    ClientIp,
    /// The client's network: its address with only the first `v4` (IPv4) or `v6` (IPv6)
    /// bits kept.
    ClientNetwork {
        /// Prefix length for IPv4 clients.
        v4: u8,
        /// Prefix length for IPv6 clients.
        v6: u8,
    },
    /// The peer's SPIFFE identity (the `PeerIdentity` extension an mTLS acceptor sets).
    PeerIdentity,
    /// Anything a closure reads from the request's head.
    Custom(KeyFn),
}

impl fmt::Debug for RateLimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitKey::Header(h) => write!(f, "Header({h})"),
            RateLimitKey::Cookie(c) => write!(f, "Cookie({c})"),
            RateLimitKey::ClientIp => f.write_str("ClientIp"),
            RateLimitKey::ClientNetwork { v4, v6 } => write!(f, "ClientNetwork(/{v4}, /{v6})"),
            RateLimitKey::PeerIdentity => f.write_str("PeerIdentity"),
            RateLimitKey::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl RateLimitKey {
    /// The key of a request, if it has one.
    pub fn of(&self, head: &http::request::Parts) -> Option<String> {
        let client = || ClientConnection::of(&head.extensions).map(|c| c.peer.ip());
        match self {
            RateLimitKey::Header(name) => head.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned),
            RateLimitKey::Cookie(name) => mesh_core::matching::RequestView::new(&head.method, &head.uri, &head.headers)
                .cookie(name)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            RateLimitKey::ClientIp => client().map(|ip| ip.to_string()),
            RateLimitKey::ClientNetwork { v4, v6 } => client().map(|ip| network(ip, *v4, *v6)),
            RateLimitKey::PeerIdentity => head.extensions.get::<PeerIdentity>().map(|p| p.0.to_string()),
            RateLimitKey::Custom(f) => f(head),
        }
    }
}

/// `ip` with only its first `v4` / `v6` bits, as `address/len`.
fn network(ip: IpAddr, v4: u8, v6: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let len = v4.min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let len = v6.min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

// === RateLimiter ===

/// The buckets, shared by clones. See the [module docs](self).
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    total: Option<(TokenBucket, Direct)>,
    /// The total bucket applies only to requests without a key (Envoy's
    /// `always_consume_default_token_bucket: false`).
    total_only_without_key: bool,
    keyed: Option<KeyedBuckets>,
    name: String,
    stats: Stats,
}

/// How often (in checks) the keyed store is looked at for a sweep.
const SWEEP_EVERY: u64 = 1024;

struct KeyedBuckets {
    key: RateLimitKey,
    bucket: TokenBucket,
    limiter: ArcSwap<Keyed>,
    overrides: HashMap<String, (TokenBucket, Direct)>,
    max_keys: usize,
    /// When the map was last swept, in ms since `epoch`.
    swept_ms: AtomicU64,
    /// Checks so far (the map is looked at every [`SWEEP_EVERY`]).
    checks: AtomicU64,
    epoch: tokio::time::Instant,
}

/// Counters, as Envoy's `http_local_rate_limit` stats.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests the limiter checked.
    pub enabled: AtomicU64,
    /// Requests it allowed.
    pub ok: AtomicU64,
    /// Requests it found over a limit.
    pub rate_limited: AtomicU64,
    /// Of those, the ones refused.
    pub enforced: AtomicU64,
}

/// What a check decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, with the tokens left in the bucket that had fewest.
    Allowed {
        /// Tokens left.
        remaining: u32,
    },
    /// Over a limit.
    Limited {
        /// The bucket that refused.
        bucket: TokenBucket,
        /// When a token comes back.
        retry_after: Duration,
    },
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("total", &self.inner.total.as_ref().map(|(b, _)| b))
            .field("keyed", &self.inner.keyed.as_ref().map(|k| (&k.key, k.bucket)))
            .finish()
    }
}

fn direct(bucket: TokenBucket) -> Direct {
    governor::RateLimiter::direct_with_clock(bucket.quota(), TokioClock).with_middleware::<StateInformationMiddleware>()
}

fn keyed(bucket: TokenBucket) -> Keyed {
    governor::RateLimiter::dashmap_with_clock(bucket.quota(), TokioClock)
        .with_middleware::<StateInformationMiddleware>()
}

fn wait(not_until: &NotUntil<std::time::Instant>) -> Duration {
    not_until.wait_time_from(TokioClock.now())
}

impl RateLimiter {
    /// One bucket for every request.
    pub fn total(bucket: TokenBucket) -> Self {
        Self::build(Some(bucket), None)
    }

    /// One bucket per key value (requests without the key are not limited).
    pub fn keyed(key: RateLimitKey, bucket: TokenBucket) -> Self {
        Self::build(None, Some((key, bucket)))
    }

    /// A bucket per key value and a total bucket, both applied.
    pub fn keyed_with_total(key: RateLimitKey, bucket: TokenBucket, total: TokenBucket) -> Self {
        Self::build(Some(total), Some((key, bucket)))
    }

    fn build(total: Option<TokenBucket>, keyed_by: Option<(RateLimitKey, TokenBucket)>) -> Self {
        let keyed = keyed_by.map(|(key, bucket)| KeyedBuckets {
            key,
            bucket,
            limiter: ArcSwap::from_pointee(keyed(bucket)),
            overrides: HashMap::new(),
            max_keys: 100_000,
            swept_ms: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        });
        let inner = Inner {
            total: total.map(|b| (b, direct(b))),
            total_only_without_key: false,
            keyed,
            name: "default".into(),
            stats: Stats::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configured before it is cloned")
    }

    /// Gives key `value` its own bucket instead of the keyed one (Linkerd's `overrides`).
    /// Configure before cloning.
    pub fn with_override(mut self, value: impl Into<String>, bucket: TokenBucket) -> Self {
        if let Some(k) = &mut self.inner_mut().keyed {
            k.overrides.insert(value.into(), (bucket, direct(bucket)));
        }
        self
    }

    /// Applies the total bucket only to requests without a key. Configure before cloning.
    pub fn with_total_only_without_key(mut self) -> Self {
        self.inner_mut().total_only_without_key = true;
        self
    }

    /// Keeps at most `n` keys' buckets (see the module docs). Configure before cloning.
    pub fn with_max_keys(mut self, n: usize) -> Self {
        if let Some(k) = &mut self.inner_mut().keyed {
            k.max_keys = n.max(1);
        }
        self
    }

    /// Names the policy in the `RateLimit-Policy` and `RateLimit` fields (`default`).
    /// Configure before cloning.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.inner_mut().name = name.into();
        self
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Keyed buckets held now.
    pub fn keys(&self) -> usize {
        self.inner.keyed.as_ref().map_or(0, |k| k.limiter.load().len())
    }

    /// The bucket that a refusal's headers describe: the keyed one, else the total.
    fn policy_bucket(&self) -> Option<TokenBucket> {
        self.inner.keyed.as_ref().map(|k| k.bucket).or(self.inner.total.as_ref().map(|(b, _)| *b))
    }

    /// Takes a token for `head` from its key's bucket, then from the total bucket (a
    /// refusal by the first takes nothing from the second).
    pub fn check(&self, head: &http::request::Parts) -> Decision {
        let mut remaining = u32::MAX;
        let mut keyed = false;
        if let Some(k) = &self.inner.keyed
            && let Some(value) = k.key.of(head)
        {
            keyed = true;
            let outcome = match k.overrides.get(&value) {
                Some((bucket, limiter)) => limiter.check().map_err(|n| (*bucket, wait(&n))),
                None => {
                    k.sweep();
                    k.limiter.load().check_key(&value).map_err(|n| (k.bucket, wait(&n)))
                }
            };
            match outcome {
                Ok(snapshot) => remaining = snapshot.remaining_burst_capacity(),
                Err((bucket, retry_after)) => return Decision::Limited { bucket, retry_after },
            }
        }
        if let Some((bucket, limiter)) = &self.inner.total
            && !(keyed && self.inner.total_only_without_key)
        {
            match limiter.check() {
                Ok(snapshot) => remaining = remaining.min(snapshot.remaining_burst_capacity()),
                Err(n) => return Decision::Limited { bucket: *bucket, retry_after: wait(&n) },
            }
        }
        Decision::Allowed { remaining }
    }
}

impl KeyedBuckets {
    /// Every fill interval, drops the keys whose buckets are full again; over `max_keys`,
    /// drops them all.
    fn sweep(&self) {
        // Looked at every 1,024 checks only: the store may pass its cap by that many keys.
        if !self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(SWEEP_EVERY) {
            return;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.swept_ms.load(Ordering::Relaxed);
        let every = u64::try_from(self.bucket.fill_interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let limiter = self.limiter.load();
        let due = now.saturating_sub(last) >= every
            && self.swept_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if !due && limiter.len() <= self.max_keys {
            return;
        }
        limiter.retain_recent();
        if limiter.len() > self.max_keys {
            tracing::warn!(
                keys = limiter.len(),
                max = self.max_keys,
                "rate limit keys over the cap; their buckets are reset"
            );
            self.limiter.store(Arc::new(keyed(self.bucket)));
        } else {
            limiter.shrink_to_fit();
        }
    }
}

// === layer ===

/// How a [`RateLimitLayer`] answers and samples. See the [module docs](self).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RateLimitResponse {
    /// The status of a refusal (a value below 400 becomes 429, as in Envoy).
    pub status: StatusCode,
    /// Adds Envoy's `x-ratelimit-limit`, `-remaining` and `-reset` to refusals and to
    /// allowed responses.
    pub legacy_headers: bool,
    /// Share of requests checked, in millionths (all by default).
    pub enabled_per_million: u32,
    /// Share of refusals enforced, in millionths (all by default; the rest only count).
    pub enforced_per_million: u32,
    /// The `grpc-status` of a refused gRPC call (`RESOURCE_EXHAUSTED` by default; Envoy's
    /// filter says `UNAVAILABLE` unless `rate_limited_as_resource_exhausted`).
    pub grpc_status: mesh_core::classify::GrpcCode,
}

impl Default for RateLimitResponse {
    fn default() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            legacy_headers: false,
            enabled_per_million: 1_000_000,
            enforced_per_million: 1_000_000,
            grpc_status: mesh_core::classify::GrpcCode::RESOURCE_EXHAUSTED,
        }
    }
}

/// Layer of [`RateLimit`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: RateLimiter,
    response: Arc<RateLimitResponse>,
    random: Arc<Random>,
}

impl RateLimitLayer {
    /// Limits by `limiter` (its buckets shared by every service this layer makes).
    pub fn new(limiter: RateLimiter) -> Self {
        Self::with_response(limiter, RateLimitResponse::default())
    }

    /// Limits by `limiter`, answering and sampling as `response` says.
    pub fn with_response(limiter: RateLimiter, mut response: RateLimitResponse) -> Self {
        if response.status.as_u16() < 400 {
            response.status = StatusCode::TOO_MANY_REQUESTS;
        }
        Self { limiter, response: Arc::new(response), random: Arc::new(Random::from_entropy()) }
    }

    /// Draws the sampling from `random` (seed it for deterministic tests).
    pub fn with_random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }

    /// The limiter (its counters, its keys).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { inner, limiter: self.limiter.clone(), response: self.response.clone(), random: self.random.clone() }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: RateLimiter,
    response: Arc<RateLimitResponse>,
    random: Arc<Random>,
}

impl<S, B, RB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<LocalOr<RB>>;
    type Error = S::Error;
    type Future = RateLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let response = &self.response;
        let draw = |share: u32| share >= 1_000_000 || self.random.below(1_000_000) < u64::from(share);
        if !draw(response.enabled_per_million) {
            return RateLimitFuture { state: RlState::Pass { fut: self.inner.call(req), legacy: None } };
        }
        let stats = &self.limiter.inner.stats;
        stats.enabled.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let decision = self.limiter.check(&parts);
        let bucket = self.limiter.policy_bucket();
        match decision {
            Decision::Allowed { remaining } => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                let legacy = response.legacy_headers.then_some((bucket, remaining));
                let fut = self.inner.call(Request::from_parts(parts, body));
                RateLimitFuture { state: RlState::Pass { fut, legacy } }
            }
            Decision::Limited { bucket, retry_after } => {
                stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                if !draw(response.enforced_per_million) {
                    // Shadow mode: counted, let through.
                    let fut = self.inner.call(Request::from_parts(parts, body));
                    return RateLimitFuture { state: RlState::Pass { fut, legacy: None } };
                }
                stats.enforced.fetch_add(1, Ordering::Relaxed);
                let res = refusal(&parts, bucket, retry_after, response, &self.limiter.inner.name);
                RateLimitFuture { state: RlState::Refused { res: Some(res) } }
            }
        }
    }
}

/// Whole seconds, rounded up (a `Retry-After` earlier than the token would be wrong).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The answer to a refused request.
fn refusal(
    head: &http::request::Parts,
    bucket: TokenBucket,
    retry_after: Duration,
    response: &RateLimitResponse,
    name: &str,
) -> Response<Bytes> {
    let grpc =
        head.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut res = if grpc {
        let mut res = Response::new(Bytes::new());
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        res.headers_mut().insert("grpc-status", HeaderValue::from(response.grpc_status.as_u32()));
        res.headers_mut().insert("grpc-message", HeaderValue::from_static("local_rate_limited"));
        res
    } else {
        let mut res = Response::new(Bytes::from_static(b"local_rate_limited"));
        *res.status_mut() = response.status;
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        res
    };
    let secs = ceil_secs(retry_after);
    let window =
        ceil_secs(bucket.fill_interval.saturating_mul(bucket.max_tokens.div_ceil(bucket.tokens_per_fill))).max(1);
    let headers = res.headers_mut();
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    let quoted = name.replace(['"', '\\'], "");
    if let Ok(v) = HeaderValue::from_str(&format!("\"{quoted}\";q={};w={window}", bucket.max_tokens)) {
        headers.insert("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{quoted}\";r=0;t={secs}")) {
        headers.insert("ratelimit", v);
    }
    if response.legacy_headers {
        legacy(headers, bucket, 0, secs);
    }
    ResponseFlags::record(res.extensions_mut(), ResponseFlags::RATE_LIMITED);
    res
}

fn legacy(headers: &mut http::HeaderMap, bucket: TokenBucket, remaining: u32, reset: u64) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(bucket.max_tokens));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

pin_project_lite::pin_project! {
    /// Response future of [`RateLimit`].
    pub struct RateLimitFuture<F> {
        #[pin]
        state: RlState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = RlStateProj]
    enum RlState<F> {
        Pass { #[pin] fut: F, legacy: Option<(Option<TokenBucket>, u32)> },
        Refused { res: Option<Response<Bytes>> },
    }
}

impl<F> fmt::Debug for RateLimitFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RateLimitFuture")
    }
}

impl<F, RB, E> Future for RateLimitFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<LocalOr<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            RlStateProj::Pass { fut, legacy } => fut.poll(cx).map(|r| {
                r.map(|res| {
                    let mut res = res.map(LocalOr::inner);
                    if let Some((Some(bucket), remaining)) = legacy.take() {
                        legacy_headers_on(&mut res, bucket, remaining);
                    }
                    res
                })
            }),
            RlStateProj::Refused { res } => {
                let res = res.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(LocalOr::local)))
            }
        }
    }
}

fn legacy_headers_on<RB>(res: &mut Response<LocalOr<RB>>, bucket: TokenBucket, remaining: u32) {
    let reset = ceil_secs(bucket.fill_interval);
    legacy(res.headers_mut(), bucket, remaining, reset);
}

// === configuration shapes ===

/// Envoy's `LocalRateLimit` filter configuration (`envoy.filters.http.local_ratelimit`), as an
/// EnvoyFilter's patch carries it (snake_case, as Envoy writes it). The fields this crate acts
/// on; [`LocalRateLimitConfig::to_layer`] compiles it (SEMANTICS.md 4.1).
///
/// Descriptors are supported in the form that keys a bucket by a request header: a
/// `rate_limits` action `request_headers {header_name, descriptor_key}` and a descriptor
/// whose one entry has that key. An entry without a `value` gives each header value its own
/// bucket; an entry with a value gives that value its own (an override).
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct LocalRateLimitConfig {
    /// The stats prefix.
    pub stat_prefix: String,
    /// The default bucket.
    pub token_bucket: Option<TokenBucketConfig>,
    /// Share of requests checked; unset: none (Envoy's default, the filter does nothing).
    pub filter_enabled: Option<RuntimeFraction>,
    /// Share of refusals enforced; unset: none (only counted).
    pub filter_enforced: Option<RuntimeFraction>,
    /// The refusal's status.
    pub status: Option<HttpStatusConfig>,
    /// Per-descriptor buckets.
    pub descriptors: Vec<DescriptorConfig>,
    /// Actions producing the request's descriptors.
    pub rate_limits: Vec<RateLimitActions>,
    /// `DRAFT_VERSION_03` adds Envoy's `x-ratelimit-*` headers.
    pub enable_x_ratelimit_headers: Option<String>,
    /// Whether the default bucket applies when a descriptor matched too (default yes).
    pub always_consume_default_token_bucket: Option<bool>,
    /// gRPC refusals say `RESOURCE_EXHAUSTED` instead of `UNAVAILABLE`.
    pub rate_limited_as_resource_exhausted: bool,
}

/// Envoy's `TokenBucket`.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TokenBucketConfig {
    /// The burst.
    pub max_tokens: u32,
    /// Tokens per fill (default 1).
    pub tokens_per_fill: Option<u32>,
    /// The fill interval.
    pub fill_interval: Option<mesh_core::config::Duration>,
}

/// Envoy's `RuntimeFractionalPercent` (its default value; runtime keys are ignored).
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RuntimeFraction {
    /// The runtime key (ignored: one proxy, no runtime).
    pub runtime_key: Option<String>,
    /// The fraction.
    pub default_value: Option<FractionalPercent>,
}

/// Envoy's `FractionalPercent`.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct FractionalPercent {
    /// The numerator.
    pub numerator: u32,
    /// `HUNDRED` (default), `TEN_THOUSAND` or `MILLION`.
    pub denominator: Option<String>,
}

/// Envoy's `HttpStatus`.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HttpStatusConfig {
    /// The status code.
    pub code: u16,
}

/// Envoy's `LocalRateLimitDescriptor`.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct DescriptorConfig {
    /// The entries (one is supported).
    pub entries: Vec<DescriptorEntry>,
    /// The descriptor's bucket.
    pub token_bucket: Option<TokenBucketConfig>,
}

/// One `key` / `value` of a descriptor.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct DescriptorEntry {
    /// The descriptor key.
    pub key: String,
    /// The value; empty: every value has a bucket of its own.
    pub value: Option<String>,
}

/// A `rate_limits` entry: the actions that make a request's descriptor.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RateLimitActions {
    /// The actions (`request_headers` is supported).
    pub actions: Vec<RateLimitAction>,
}

/// One action.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RateLimitAction {
    /// A descriptor entry from a request header.
    pub request_headers: Option<RequestHeadersAction>,
}

/// `request_headers`: the descriptor entry `descriptor_key` = the header's value.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RequestHeadersAction {
    /// The header.
    pub header_name: String,
    /// The descriptor key it becomes.
    pub descriptor_key: String,
}

#[cfg(feature = "serde")]
impl TokenBucketConfig {
    fn to_bucket(&self, field: &'static str) -> Result<TokenBucket, InvalidRateLimit> {
        let interval = self.fill_interval.ok_or_else(|| InvalidRateLimit::new(field, "needs a fill_interval"))?;
        TokenBucket::new(self.max_tokens, self.tokens_per_fill.unwrap_or(1), interval.get())
            .map_err(|e| InvalidRateLimit::new(field, format!("{}: {}", e.field(), e.reason())))
    }
}

#[cfg(feature = "serde")]
impl RuntimeFraction {
    fn per_million(f: Option<&RuntimeFraction>, field: &'static str) -> Result<u32, InvalidRateLimit> {
        let Some(value) = f.and_then(|f| f.default_value.as_ref()) else { return Ok(0) };
        let scale = match value.denominator.as_deref() {
            None | Some("HUNDRED") => 10_000,
            Some("TEN_THOUSAND") => 100,
            Some("MILLION") => 1,
            Some(other) => return Err(InvalidRateLimit::new(field, format!("unknown denominator `{other}`"))),
        };
        Ok(value.numerator.saturating_mul(scale).min(1_000_000))
    }
}

#[cfg(feature = "serde")]
impl LocalRateLimitConfig {
    /// The layer this configuration describes, or `None` when it limits nothing (no bucket).
    pub fn to_layer(&self) -> Result<Option<RateLimitLayer>, InvalidRateLimit> {
        // Without a default bucket the filter limits nothing (Envoy's HCM-level config).
        let Some(total) = self.token_bucket.as_ref().map(|b| b.to_bucket("token_bucket")).transpose()? else {
            return Ok(None);
        };
        let mut keyed: Option<(HeaderName, TokenBucket)> = None;
        let mut overrides = Vec::new();
        for d in &self.descriptors {
            let [entry] = d.entries.as_slice() else {
                return Err(InvalidRateLimit::new("descriptors", "only descriptors of one entry are supported"));
            };
            let header = self
                .rate_limits
                .iter()
                .flat_map(|r| &r.actions)
                .filter_map(|a| a.request_headers.as_ref())
                .find(|h| h.descriptor_key == entry.key)
                .ok_or_else(|| {
                    InvalidRateLimit::new(
                        "descriptors",
                        format!("no rate_limits request_headers action makes descriptor key `{}`", entry.key),
                    )
                })?;
            let name = HeaderName::from_bytes(header.header_name.as_bytes()).map_err(|_| {
                InvalidRateLimit::new("rate_limits", format!("`{}` is not a header name", header.header_name))
            })?;
            let bucket = d
                .token_bucket
                .as_ref()
                .ok_or_else(|| InvalidRateLimit::new("descriptors", "a descriptor needs a token_bucket"))?
                .to_bucket("descriptors.token_bucket")?;
            match entry.value.as_deref().filter(|v| !v.is_empty()) {
                None if keyed.is_some() => {
                    return Err(InvalidRateLimit::new(
                        "descriptors",
                        "only one descriptor without a value is supported",
                    ));
                }
                None => keyed = Some((name, bucket)),
                Some(value) => overrides.push((name, value.to_owned(), bucket)),
            }
        }
        let limiter = match keyed {
            Some((name, bucket)) => {
                if let Some((other, ..)) = overrides.iter().find(|(n, ..)| *n != name) {
                    return Err(InvalidRateLimit::new(
                        "descriptors",
                        format!(
                            "a descriptor with a value must key on the header of the one without (`{name}`, not `{other}`)"
                        ),
                    ));
                }
                let limiter = RateLimiter::keyed_with_total(RateLimitKey::Header(name), bucket, total);
                // Without `always_consume_default_token_bucket`, the default bucket is for
                // requests that matched no descriptor.
                if self.always_consume_default_token_bucket == Some(false) {
                    limiter.with_total_only_without_key()
                } else {
                    limiter
                }
            }
            None if !overrides.is_empty() => {
                return Err(InvalidRateLimit::new(
                    "descriptors",
                    "descriptors with values need one without a value for the same key (per-value buckets)",
                ));
            }
            None => RateLimiter::total(total),
        };
        let limiter = overrides.into_iter().fold(limiter, |l, (_, value, bucket)| l.with_override(value, bucket));
        let limiter = if self.stat_prefix.is_empty() { limiter } else { limiter.with_name(self.stat_prefix.clone()) };
        let mut response = RateLimitResponse {
            enabled_per_million: RuntimeFraction::per_million(self.filter_enabled.as_ref(), "filter_enabled")?,
            enforced_per_million: RuntimeFraction::per_million(self.filter_enforced.as_ref(), "filter_enforced")?,
            legacy_headers: self.enable_x_ratelimit_headers.as_deref() == Some("DRAFT_VERSION_03"),
            grpc_status: if self.rate_limited_as_resource_exhausted {
                mesh_core::classify::GrpcCode::RESOURCE_EXHAUSTED
            } else {
                mesh_core::classify::GrpcCode::UNAVAILABLE
            },
            ..RateLimitResponse::default()
        };
        if let Some(status) = &self.status {
            response.status = StatusCode::from_u16(status.code)
                .map_err(|_| InvalidRateLimit::new("status", format!("{} is not a status", status.code)))?;
        }
        Ok(Some(RateLimitLayer::with_response(limiter, response)))
    }
}

/// Linkerd's `HTTPLocalRateLimitPolicy` spec (`policy.linkerd.io`): a total rate, a rate per
/// client identity, and overrides for named clients, each in requests per second (a bucket
/// whose burst is one second's worth). Clients without an identity count as one identity.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct HttpLocalRateLimitPolicySpec {
    /// The `Server` the policy applies to (accepted; one proxy serves one workload).
    pub target_ref: Option<serde_json::Value>,
    /// Every request.
    pub total: Option<RequestsPerSecond>,
    /// Each client identity.
    pub identity: Option<RequestsPerSecond>,
    /// Rates of their own for some clients.
    pub overrides: Vec<LinkerdOverride>,
}

/// `{requestsPerSecond: n}`.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct RequestsPerSecond {
    /// Requests per second.
    pub requests_per_second: u32,
}

/// An override: a rate for the clients it names.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct LinkerdOverride {
    /// Requests per second for each of them.
    pub requests_per_second: u32,
    /// The clients: `ServiceAccount`s by name and namespace.
    pub client_refs: Vec<ClientRef>,
}

/// A client, by its service account.
#[cfg(feature = "serde")]
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct ClientRef {
    /// `ServiceAccount`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace (the policy's when unset).
    pub namespace: Option<String>,
}

/// The key of a client without an identity.
#[cfg(feature = "serde")]
const UNAUTHENTICATED: &str = "unauthenticated";

#[cfg(feature = "serde")]
impl HttpLocalRateLimitPolicySpec {
    /// The layer, for a policy in `namespace` of a mesh whose trust domain is `trust_domain`
    /// (override clients are `spiffe://<trust domain>/ns/<namespace>/sa/<name>`); `None`
    /// when it limits nothing.
    pub fn to_layer(&self, trust_domain: &str, namespace: &str) -> Result<Option<RateLimitLayer>, InvalidRateLimit> {
        let per_second = |r: &RequestsPerSecond, field: &'static str| {
            TokenBucket::per(r.requests_per_second, Duration::from_secs(1))
                .map_err(|e| InvalidRateLimit::new(field, format!("requestsPerSecond: {}", e.reason())))
        };
        let total = self.total.as_ref().map(|t| per_second(t, "total")).transpose()?;
        let identity = self.identity.as_ref().map(|t| per_second(t, "identity")).transpose()?;
        let key = RateLimitKey::Custom(Arc::new(|head: &http::request::Parts| {
            Some(head.extensions.get::<PeerIdentity>().map_or_else(|| UNAUTHENTICATED.to_owned(), |p| p.0.to_string()))
        }));
        let mut limiter = match (identity, total) {
            (Some(each), Some(total)) => RateLimiter::keyed_with_total(key, each, total),
            // Overrides need keyed buckets: without `identity`, other clients are unlimited
            // per identity (a bucket as large as the total, or none).
            (None, total) if !self.overrides.is_empty() => {
                let each = total.unwrap_or(TokenBucket::new(u32::MAX, u32::MAX, Duration::from_secs(1))?);
                match total {
                    Some(total) => RateLimiter::keyed_with_total(key, each, total),
                    None => RateLimiter::keyed(key, each),
                }
            }
            (Some(each), None) => RateLimiter::keyed(key, each),
            (None, Some(total)) => RateLimiter::total(total),
            (None, None) => return Ok(None),
        };
        for o in &self.overrides {
            let bucket = per_second(&RequestsPerSecond { requests_per_second: o.requests_per_second }, "overrides")?;
            for client in &o.client_refs {
                if client.kind != "ServiceAccount" {
                    return Err(InvalidRateLimit::new(
                        "overrides",
                        format!("clientRefs of kind `{}` are not supported", client.kind),
                    ));
                }
                let ns = client.namespace.as_deref().unwrap_or(namespace);
                limiter = limiter.with_override(format!("spiffe://{trust_domain}/ns/{ns}/sa/{}", client.name), bucket);
            }
        }
        Ok(Some(RateLimitLayer::new(limiter)))
    }
}
