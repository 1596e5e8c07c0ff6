//! What is retried, how often and how soon: Istio's `HTTPRetry` as Envoy executes it
//! (SEMANTICS.md 1.13).

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use mesh_core::classify::{Failure, GrpcCode};
use mesh_core::random::Random;

/// A retry configuration that cannot be used: the field and why.
pub type InvalidRetry = crate::InvalidConfig;

// === RetryOn ===

const FIVE_XX: u32 = 1;
const GATEWAY_ERROR: u32 = 1 << 1;
const RESET: u32 = 1 << 2;
const RESET_BEFORE_REQUEST: u32 = 1 << 3;
const CONNECT_FAILURE: u32 = 1 << 4;
const RETRIABLE_4XX: u32 = 1 << 5;
const REFUSED_STREAM: u32 = 1 << 6;
const RETRIABLE_STATUS_CODES: u32 = 1 << 7;
const RETRIABLE_HEADERS: u32 = 1 << 8;
const ENVOY_RATELIMITED: u32 = 1 << 9;
const HTTP3_POST_CONNECT_FAILURE: u32 = 1 << 10;
const CANCELLED: u32 = 1 << 11;
const DEADLINE_EXCEEDED: u32 = 1 << 12;
const INTERNAL: u32 = 1 << 13;
const RESOURCE_EXHAUSTED: u32 = 1 << 14;
const UNAVAILABLE: u32 = 1 << 15;
/// Any of the gRPC conditions.
const GRPC: u32 = CANCELLED | DEADLINE_EXCEEDED | INTERNAL | RESOURCE_EXHAUSTED | UNAVAILABLE;

const TOKENS: [(&str, u32); 16] = [
    ("5xx", FIVE_XX),
    ("gateway-error", GATEWAY_ERROR),
    ("reset", RESET),
    ("reset-before-request", RESET_BEFORE_REQUEST),
    ("connect-failure", CONNECT_FAILURE),
    ("retriable-4xx", RETRIABLE_4XX),
    ("refused-stream", REFUSED_STREAM),
    ("retriable-status-codes", RETRIABLE_STATUS_CODES),
    ("retriable-headers", RETRIABLE_HEADERS),
    ("envoy-ratelimited", ENVOY_RATELIMITED),
    ("http3-post-connect-failure", HTTP3_POST_CONNECT_FAILURE),
    ("cancelled", CANCELLED),
    ("deadline-exceeded", DEADLINE_EXCEEDED),
    ("internal", INTERNAL),
    ("resource-exhausted", RESOURCE_EXHAUSTED),
    ("unavailable", UNAVAILABLE),
];

/// The conditions a failed attempt is retried on: Istio's `retryOn`, with Envoy's meaning of
/// each token (SEMANTICS.md 1.13.2).
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use mesh_resilience::retry::RetryOn;
///
/// let on: RetryOn = "gateway-error,429".parse()?;
/// assert!(on.on_response(StatusCode::BAD_GATEWAY, &HeaderMap::new()));
/// assert!(on.on_response(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new()));
/// assert!(!on.on_response(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new()));
/// # Ok::<(), mesh_resilience::retry::InvalidRetry>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    bits: u32,
    codes: Vec<u16>,
    /// Statuses 100–739 classified as failures (Linkerd's `responseClasses`), one bit each.
    failures: Option<Box<[u64; 10]>>,
}

impl std::str::FromStr for RetryOn {
    type Err = InvalidRetry;

    /// Parses a comma-separated list. Integer tokens with an HTTP reason phrase are
    /// retriable status codes (and turn `retriable-status-codes` on), as Istio translates them.
    fn from_str(s: &str) -> Result<Self, InvalidRetry> {
        let mut on = RetryOn::default();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some((_, bit)) = TOKENS.iter().find(|(name, _)| *name == token) {
                on.bits |= bit;
            } else if let Some(code) = token
                .parse::<u16>()
                .ok()
                .filter(|c| StatusCode::from_u16(*c).ok().and_then(|s| s.canonical_reason()).is_some())
            {
                on.codes.push(code);
                on.bits |= RETRIABLE_STATUS_CODES;
            } else {
                return Err(InvalidRetry::new(
                    "retryOn",
                    format!("`{token}` is not a retry condition or an HTTP status"),
                ));
            }
        }
        Ok(on)
    }
}

impl std::fmt::Display for RetryOn {
    /// The conditions as `retryOn` writes them (`-` for none); classified failure statuses
    /// show as `response-classes`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> =
            TOKENS.iter().filter(|(_, bit)| self.has(*bit)).map(|(name, _)| (*name).to_owned()).collect();
        parts.extend(self.codes.iter().map(u16::to_string));
        if self.failures.is_some() {
            parts.push("response-classes".into());
        }
        if parts.is_empty() {
            return f.write_str("-");
        }
        f.write_str(&parts.join(","))
    }
}

impl RetryOn {
    /// Whether nothing is retried.
    pub fn is_empty(&self) -> bool {
        self.bits == 0 && self.failures.is_none()
    }

    /// Also retries every response whose status `is_failure` says is a failure, and a
    /// trailers-only gRPC response whose `grpc-status` is not OK: how Linkerd retries a
    /// ServiceProfile route marked `isRetryable`, with its `responseClasses`.
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use mesh_resilience::retry::RetryOn;
    ///
    /// let on = RetryOn::default().with_failure_statuses(|s| s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS);
    /// assert!(on.on_response(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new()));
    /// assert!(!on.on_response(StatusCode::NOT_FOUND, &HeaderMap::new()));
    /// ```
    pub fn with_failure_statuses(mut self, is_failure: impl Fn(StatusCode) -> bool) -> Self {
        let mut bits = [0u64; 10];
        for code in 100..740u16 {
            if StatusCode::from_u16(code).is_ok_and(&is_failure) {
                let i = usize::from(code - 100);
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        self.failures = Some(Box::new(bits));
        self
    }

    fn classified_failure(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let Some(bits) = &self.failures else { return false };
        let i = usize::from(status.as_u16().saturating_sub(100));
        if status.as_u16() >= 100 && i < 640 && bits[i / 64] & (1 << (i % 64)) != 0 {
            return true;
        }
        headers.get("grpc-status").and_then(GrpcCode::from_header).is_some_and(|g| g != GrpcCode::OK)
    }

    fn has(&self, bit: u32) -> bool {
        self.bits & bit != 0
    }

    /// Whether a response is retried (`wouldRetryFromHeaders`, in Envoy's order). A
    /// `grpc-status` counts only in the response head (trailers-only responses).
    pub fn on_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        // A rate-limited response is retried on `envoy-ratelimited` alone, whatever else.
        if self.has(ENVOY_RATELIMITED) && headers.contains_key("x-envoy-ratelimited") {
            return true;
        }
        let code = status.as_u16();
        let by_status = self.has(FIVE_XX) && status.is_server_error()
            || self.has(GATEWAY_ERROR) && matches!(code, 502..=504)
            || self.has(RETRIABLE_4XX) && code == 409
            || self.has(RETRIABLE_STATUS_CODES) && self.codes.contains(&code)
            || self.classified_failure(status, headers);
        let retried = by_status || self.has(GRPC) && self.on_grpc(headers);
        // Only a retried answer needs the look for the rate-limit header (most are not).
        retried && !headers.contains_key("x-envoy-ratelimited")
    }

    fn on_grpc(&self, headers: &HeaderMap) -> bool {
        let Some(grpc) = headers.get("grpc-status").and_then(GrpcCode::from_header) else { return false };
        grpc == GrpcCode::CANCELLED && self.has(CANCELLED)
            || grpc == GrpcCode::DEADLINE_EXCEEDED && self.has(DEADLINE_EXCEEDED)
            || grpc == GrpcCode::RESOURCE_EXHAUSTED && self.has(RESOURCE_EXHAUSTED)
            || grpc == GrpcCode::INTERNAL && self.has(INTERNAL)
            || grpc == GrpcCode::UNAVAILABLE && self.has(UNAVAILABLE)
    }

    /// Whether a failure without a response is retried (`wouldRetryFromReset`). `sent` says
    /// whether any of the request went upstream. A per-try timeout is a local reset: retried
    /// only with `5xx`, `gateway-error` or `reset`.
    pub fn on_failure(&self, failure: Failure, sent: bool) -> bool {
        // Not an upstream failure (no healthy host, no cluster, a bad request): Envoy answers
        // those locally at once.
        if failure == Failure::Other {
            return false;
        }
        if failure == Failure::ConnectFailure && self.has(CONNECT_FAILURE) {
            return true;
        }
        let before_request = failure == Failure::ConnectFailure || !sent;
        self.has(RESET_BEFORE_REQUEST) && before_request
            || self.has(RESET)
            || self.has(FIVE_XX | GATEWAY_ERROR)
            || self.has(REFUSED_STREAM) && failure == Failure::RefusedStream
    }
}

// === RetryPolicy ===

/// Istio's `HTTPRetry`, as written in a VirtualService.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, rename_all = "camelCase"))]
#[non_exhaustive]
pub struct HttpRetry {
    /// Retries after the first try; 0 disables retries.
    pub attempts: i64,
    /// Time allowed for each try.
    pub per_try_timeout: Option<mesh_core::config::Duration>,
    /// Comma-separated conditions.
    pub retry_on: Option<String>,
    /// Accepted and ignored: one proxy has no localities to prefer.
    pub retry_remote_localities: Option<bool>,
    /// Whether a retry avoids the endpoints already tried (default yes).
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base interval of the exponential back-off (25 ms by default; its cap is ten times it).
    pub backoff: Option<mesh_core::config::Duration>,
}

/// A compiled retry policy. See the [module docs](super).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    retries: u32,
    per_try_timeout: Option<Duration>,
    retry_on: RetryOn,
    backoff_base: Duration,
    backoff_max: Duration,
    max_replay_bytes: usize,
    retry_non_idempotent: bool,
    avoid_previous: bool,
    /// When set: wait as long as a retried response's `Retry-After` (or
    /// `x-ratelimit-reset`) says, up to this.
    retry_after_max: Option<Duration>,
}

/// Envoy's default back-off base (its cap is ten times it).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// How much of a request body is kept to replay it, by default.
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 64 << 10;

impl RetryPolicy {
    /// `retries` retries (tries = 1 + retries) on `retry_on`, default back-off, no per-try
    /// timeout.
    pub fn new(retries: u32, retry_on: RetryOn) -> Self {
        Self {
            retries,
            per_try_timeout: None,
            retry_on,
            backoff_base: DEFAULT_BACKOFF,
            backoff_max: DEFAULT_BACKOFF * 10,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
            retry_non_idempotent: false,
            avoid_previous: true,
            retry_after_max: None,
        }
    }

    /// Istio's policy for a route with no `retries` block: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` (with no
    /// codes).
    pub fn istio_default() -> Self {
        let on = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".parse().expect("valid");
        Self::new(2, on)
    }

    /// No retries.
    pub fn none() -> Self {
        Self::new(0, RetryOn::default())
    }

    /// Compiles an Istio `HTTPRetry` with Istio's validation.
    pub fn from_istio(r: &HttpRetry) -> Result<Self, InvalidRetry> {
        if r.attempts < 0 {
            return Err(InvalidRetry::new("attempts", "must not be negative"));
        }
        if r.attempts == 0 {
            if r.per_try_timeout.is_some() || r.retry_on.is_some() || r.retry_remote_localities.is_some() {
                return Err(InvalidRetry::new(
                    "attempts",
                    "is 0 (retries off), so perTryTimeout, retryOn and retryRemoteLocalities cannot be set",
                ));
            }
            return Ok(Self::none());
        }
        let retries = u32::try_from(r.attempts).map_err(|_| InvalidRetry::new("attempts", "too large"))?;
        let ms = |field: &'static str, d: mesh_core::config::Duration| {
            let d = d.get();
            if d < Duration::from_millis(1) || !d.subsec_nanos().is_multiple_of(1_000_000) {
                return Err(InvalidRetry::new(field, "must be a whole number of milliseconds, at least 1ms"));
            }
            Ok(d)
        };
        let retry_on = match &r.retry_on {
            Some(s) => s.parse()?,
            // Istio's default conditions when only `attempts` is given.
            None => "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".parse()?,
        };
        let mut policy = Self::new(retries, retry_on);
        policy.per_try_timeout = r.per_try_timeout.map(|d| ms("perTryTimeout", d)).transpose()?;
        if let Some(base) = r.backoff.map(|d| ms("backoff", d)).transpose()? {
            policy.backoff_base = base;
            policy.backoff_max = base * 10;
        }
        policy.avoid_previous = r.retry_ignore_previous_hosts.unwrap_or(true);
        Ok(policy)
    }

    /// Sets the per-try timeout.
    pub fn with_per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// Sets the back-off base and cap.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max.max(base);
        self
    }

    /// Keeps up to `bytes` of a request body to replay it (64 KiB by default); a longer body
    /// is not retried.
    pub fn with_max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Lets a retry go back to an endpoint an earlier try went to (Istio's
    /// `retryIgnorePreviousHosts: false`); by default retries avoid them.
    pub fn allowing_previous_hosts(mut self) -> Self {
        self.avoid_previous = false;
        self
    }

    /// Retries non-idempotent requests (POST, PATCH) after they were sent, too.
    pub fn retrying_non_idempotent(mut self) -> Self {
        self.retry_non_idempotent = true;
        self
    }

    /// Before retrying a response that says when to come back (`Retry-After` or
    /// `x-ratelimit-reset`, in seconds), waits that long instead of the back-off, when it is at
    /// most `max`; a longer wait is ignored and the back-off used (Envoy's
    /// `rate_limited_retry_back_off`, whose default cap is 300 s).
    pub fn honouring_retry_after(mut self, max: Duration) -> Self {
        self.retry_after_max = Some(max);
        self
    }

    /// The wait a response asks for before a retry, when the policy honours it.
    pub fn requested_delay(&self, headers: &HeaderMap) -> Option<Duration> {
        let max = self.retry_after_max?;
        ["retry-after", "x-ratelimit-reset"]
            .iter()
            .find_map(|name| headers.get(*name)?.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .filter(|d| *d <= max && !d.is_zero())
    }

    /// The retries after the first try.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The conditions.
    pub fn retry_on(&self) -> &RetryOn {
        &self.retry_on
    }

    /// The per-try timeout.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout
    }

    /// The body replay cap.
    pub fn max_replay_bytes(&self) -> usize {
        self.max_replay_bytes
    }

    /// Whether non-idempotent requests are retried after being sent.
    pub fn retries_non_idempotent(&self) -> bool {
        self.retry_non_idempotent
    }

    /// Whether a retry should avoid the endpoints already tried (Envoy's previous-hosts).
    pub fn avoids_previous_hosts(&self) -> bool {
        self.avoid_previous
    }

    /// The back-off before retry `k` (1-based): full jitter, uniform in
    /// `[0, min(base × 2^(k−1), max))` (Envoy's `JitteredExponentialBackOffStrategy`).
    pub fn backoff(&self, k: u32, random: &Random) -> Duration {
        let ceiling = self
            .backoff_base
            .checked_mul(1u32.checked_shl(k.saturating_sub(1)).unwrap_or(u32::MAX))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random.below(nanos))
    }
}
