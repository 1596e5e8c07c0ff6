//! Envoy's response flags (`%RESPONSE_FLAGS%`), carried as a response extension.
//!
//! A layer that answers on its own, or that sees an upstream fail, records why with
//! [`ResponseFlags::record`]; telemetry reads the union with [`ResponseFlags::of`] and
//! prints it as Envoy does: short names joined by `,` in the order of Envoy's flag enum (the
//! order of the table below, so a timeout that exhausted the retries is `UT,URX`), or `-`
//! when none is set.
//!
//! | flag | set when | typical status |
//! |---|---|---|
//! | `LH` | local health check failed | 503 |
//! | `UH` | no healthy upstream | 503 |
//! | `UT` | upstream request timeout | 504 |
//! | `LR` | local reset | 503 |
//! | `UR` | upstream remote reset | 503 |
//! | `UF` | upstream connection failure | 503 |
//! | `UC` | upstream connection termination | 503 |
//! | `UO` | upstream overflow (circuit breaker) | 503 |
//! | `NR` | no route | 404 |
//! | `DI` | fault delay injected | |
//! | `FI` | fault abort injected | configured |
//! | `RL` | rate limited | 429 |
//! | `UAEX` | external authorization denied | 403 |
//! | `RLSE` | rate-limit service error | |
//! | `DC` | downstream connection terminated | |
//! | `URX` | retry limit exceeded | upstream's |
//! | `SI` | stream idle timeout | 408/504 |
//! | `IH` | invalid `x-envoy-*` request header | 400 |
//! | `DPE` | downstream protocol error | 400 |
//! | `UMSDR` | upstream max stream duration reached | |
//! | `RFCF` | response from cache filter | |
//! | `NFCF` | no filter config found | |
//! | `DT` | max duration exceeded | |
//! | `UPE` | upstream protocol error | 502 |
//! | `NC` | no cluster | 503 |
//! | `OM` | overload manager terminated | |
//! | `DF` | DNS resolution failed | |
//! | `DO` | drop overload | |
//! | `DR` | downstream remote reset | |
//! | `RBAC` | denied by authorization policy | 403 |
//!
//! `RBAC` is this project's addition: Envoy records an RBAC denial only in its response
//! details, which leaves metrics unable to count denials by flag.
//!
//! # Example
//!
//! ```
//! use mesh_core::ResponseFlags;
//!
//! let mut response = http::Response::new(());
//! ResponseFlags::record(response.extensions_mut(), ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
//! ResponseFlags::record(response.extensions_mut(), ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
//! assert_eq!(ResponseFlags::of(response.extensions()).to_string(), "UF,URX");
//! assert_eq!(ResponseFlags::empty().to_string(), "-");
//! ```

use std::fmt;
use std::str::FromStr;

/// A set of response flags. See the module docs.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

macro_rules! flags {
    ($($(#[$doc:meta])* $name:ident = $bit:literal, $short:literal;)*) => {
        impl ResponseFlags {
            $(
                $(#[$doc])*
                #[doc = concat!("Short name `", $short, "`.")]
                pub const $name: ResponseFlags = ResponseFlags(1 << $bit);
            )*

            /// Every flag with its short name, in display order.
            pub const ALL: &'static [(ResponseFlags, &'static str)] = &[$((ResponseFlags::$name, $short),)*];
        }
    };
}

flags! {
    /// The local service failed its health check.
    FAILED_LOCAL_HEALTH_CHECK = 0, "LH";
    /// No healthy upstream host.
    NO_HEALTHY_UPSTREAM = 1, "UH";
    /// The upstream request timed out.
    UPSTREAM_REQUEST_TIMEOUT = 2, "UT";
    /// The connection was reset locally.
    LOCAL_RESET = 3, "LR";
    /// The upstream reset the stream.
    UPSTREAM_REMOTE_RESET = 4, "UR";
    /// The upstream connection could not be established.
    UPSTREAM_CONNECTION_FAILURE = 5, "UF";
    /// The upstream connection closed before the response was complete.
    UPSTREAM_CONNECTION_TERMINATION = 6, "UC";
    /// A circuit breaker overflowed.
    UPSTREAM_OVERFLOW = 7, "UO";
    /// No route matched.
    NO_ROUTE_FOUND = 8, "NR";
    /// A fault-injection delay was applied.
    DELAY_INJECTED = 9, "DI";
    /// A fault-injection abort was applied.
    FAULT_INJECTED = 10, "FI";
    /// The request was rate limited.
    RATE_LIMITED = 11, "RL";
    /// External authorization denied the request.
    UNAUTHORIZED_EXTERNAL_SERVICE = 12, "UAEX";
    /// The rate-limit service failed.
    RATE_LIMIT_SERVICE_ERROR = 13, "RLSE";
    /// The downstream connection terminated.
    DOWNSTREAM_CONNECTION_TERMINATION = 14, "DC";
    /// The retry limit was reached.
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 15, "URX";
    /// The stream idle timeout expired.
    STREAM_IDLE_TIMEOUT = 16, "SI";
    /// An `x-envoy-*` request header was invalid.
    INVALID_ENVOY_REQUEST_HEADERS = 17, "IH";
    /// The downstream request was malformed.
    DOWNSTREAM_PROTOCOL_ERROR = 18, "DPE";
    /// The upstream maximum stream duration was reached.
    UPSTREAM_MAX_STREAM_DURATION_REACHED = 19, "UMSDR";
    /// The response came from a cache.
    RESPONSE_FROM_CACHE_FILTER = 20, "RFCF";
    /// A filter's configuration was missing.
    NO_FILTER_CONFIG_FOUND = 21, "NFCF";
    /// A maximum stream or connection duration was exceeded.
    DURATION_TIMEOUT = 22, "DT";
    /// The upstream response was malformed.
    UPSTREAM_PROTOCOL_ERROR = 23, "UPE";
    /// The route's destination is unknown.
    NO_CLUSTER_FOUND = 24, "NC";
    /// The overload manager terminated the request.
    OVERLOAD_MANAGER = 25, "OM";
    /// DNS resolution failed.
    DNS_RESOLUTION_FAILED = 26, "DF";
    /// The request was dropped by overload policy.
    DROP_OVERLOAD = 27, "DO";
    /// The downstream reset the stream.
    DOWNSTREAM_REMOTE_RESET = 28, "DR";
    /// An authorization policy denied the request (this project's addition).
    RBAC_ACCESS_DENIED = 29, "RBAC";
}

impl ResponseFlags {
    /// No flag.
    pub const fn empty() -> Self {
        ResponseFlags(0)
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets every flag of `other`.
    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// The flags recorded in a response's (or request's) extensions; empty when none were.
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<ResponseFlags>().copied().unwrap_or_default()
    }

    /// Adds `flags` to those recorded in `extensions`.
    pub fn record(extensions: &mut http::Extensions, flags: ResponseFlags) {
        extensions.get_or_insert_default::<ResponseFlags>().insert(flags);
    }

    /// Iterates over the short names of the flags set, in display order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().filter(move |(f, _)| self.contains(*f)).map(|(_, name)| *name)
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;

    fn bitor(self, rhs: Self) -> Self {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, name) in self.names().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

/// A flag name that is not one of [`ResponseFlags::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown response flag `{0}`")]
pub struct UnknownFlag(String);

impl FromStr for ResponseFlags {
    type Err = UnknownFlag;

    /// Parses the display form: `-`, or short names joined by `,`.
    fn from_str(s: &str) -> Result<Self, UnknownFlag> {
        if s == "-" {
            return Ok(ResponseFlags::empty());
        }
        s.split(',').try_fold(ResponseFlags::empty(), |acc, name| {
            let (flag, _) = Self::ALL.iter().find(|(_, n)| *n == name).ok_or_else(|| UnknownFlag(name.into()))?;
            Ok(acc | *flag)
        })
    }
}

/// An error that ends a request without a response, with the response flags a layer recorded
/// about it (a retry layer marks the last try's error `URX` when its retries ran out): the
/// error's counterpart of [`ResponseFlags::record`]. Its [`source`](std::error::Error::source)
/// is the error itself, so classification ([`Outcome::from_error`](crate::Outcome::from_error))
/// sees through it.
///
/// ```
/// use mesh_core::flags::{FlaggedError, ResponseFlags};
///
/// let error: Box<dyn std::error::Error + Send + Sync> = "connection refused".into();
/// let error = FlaggedError::new(error, ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, 3);
/// assert_eq!(FlaggedError::flags_of(&error), ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
/// assert_eq!(error.to_string(), "gave up after 3 tries (URX)");
/// assert_eq!(std::error::Error::source(&error).unwrap().to_string(), "connection refused");
/// ```
#[derive(Debug)]
pub struct FlaggedError {
    source: Box<dyn std::error::Error + Send + Sync>,
    flags: ResponseFlags,
    tries: u32,
}

impl FlaggedError {
    /// `source`, flagged `flags`, after `tries` tries.
    pub fn new(source: Box<dyn std::error::Error + Send + Sync>, flags: ResponseFlags, tries: u32) -> Self {
        Self { source, flags, tries }
    }

    /// The flags.
    pub fn flags(&self) -> ResponseFlags {
        self.flags
    }

    /// How many tries the request took.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The flags of every `FlaggedError` in `error`'s chain (empty when there is none).
    pub fn flags_of(error: &(dyn std::error::Error + 'static)) -> ResponseFlags {
        let mut flags = ResponseFlags::empty();
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(f) = e.downcast_ref::<FlaggedError>() {
                flags |= f.flags;
            }
            next = e.source();
        }
        flags
    }
}

impl fmt::Display for FlaggedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gave up after {} tries ({})", self.tries, self.flags)
    }
}

impl std::error::Error for FlaggedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
