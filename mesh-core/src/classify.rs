//! Response classification shared by every layer: classify once, act many times.
//!
//! An [`Outcome`] says what became of one request: a response (with its status and, for gRPC,
//! its `grpc-status`), or a failure to get one (connect failure, connection terminated, stream
//! reset, refused stream, timeout). Retries, outlier detection, metrics and access logs all
//! read the same value.
//!
//! A gRPC status can arrive in the response head (a "trailers-only" response) or in the
//! trailers at the end of the body. [`Outcome::from_response`] sees the head; a body wrapper
//! that reads to the end calls [`Outcome::with_trailers`] to complete it, so a request is
//! finished at end-of-stream, not at the response head.
//!
//! Errors are classified by walking their [`source`](std::error::Error::source) chain:
//! [`ConnectError`] and [`TimeoutError`] (which this project's connectors and timeouts
//! produce), `h2` stream errors, `hyper` errors and `std::io` error kinds are recognised.
//!
//! # Example
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use mesh_core::classify::{GrpcCode, Outcome};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("content-type", "application/grpc".parse().unwrap());
//! let head = Outcome::from_response(StatusCode::OK, &headers);
//! assert!(head.is_success());
//!
//! let mut trailers = HeaderMap::new();
//! trailers.insert("grpc-status", "14".parse().unwrap());
//! let done = head.with_trailers(&trailers);
//! assert_eq!(done.grpc_status(), Some(GrpcCode::UNAVAILABLE));
//! assert!(!done.is_success());
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::io;

use http::{HeaderMap, HeaderValue, StatusCode};

use crate::flags::ResponseFlags;

/// What became of one request. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived.
    Response {
        /// Its HTTP status.
        status: StatusCode,
        /// Its gRPC status, when it has one, and whether it came in the head or the trailers.
        grpc: Option<GrpcStatus>,
    },
    /// No (complete) response arrived.
    Failure(Failure),
}

/// A response's gRPC status and where it arrived.
///
/// Where matters: Envoy retries on a gRPC code (`retryOn: unavailable`, …) and feeds outlier
/// detection the code's HTTP equivalent only when `grpc-status` is in the response head (a
/// trailers-only response); a status that arrives in the trailers is seen only by telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrpcStatus {
    /// The code.
    pub code: GrpcCode,
    /// `true` when it was in the response head, `false` when it came in the trailers.
    pub in_head: bool,
}

/// Why no response arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Failure {
    /// The upstream connection could not be established (refused, unreachable, connect
    /// timeout). Envoy flag `UF`.
    ConnectFailure,
    /// The upstream connection closed before the response was complete. Envoy flag `UC`.
    ConnectionTerminated,
    /// The upstream reset the stream (HTTP/2 `RST_STREAM`, `GOAWAY`). Envoy flag `UR`.
    StreamReset,
    /// The upstream refused the stream before processing it (HTTP/2 `REFUSED_STREAM`): always
    /// safe to retry. Envoy flag `UR`.
    RefusedStream,
    /// A timeout expired before the response arrived. Envoy flag `UT`.
    Timeout,
    /// The upstream broke the protocol: an HTTP/1 response that does not parse, or an HTTP/2
    /// violation the proxy's codec caught (frame size, flow control, header compression).
    /// Envoy flag `UPE`, answered with 502.
    ProtocolError,
    /// Anything else (a local failure).
    Other,
}

impl Outcome {
    /// Classifies a response head. A `grpc-status` header (a trailers-only gRPC response)
    /// sets the gRPC status; one that is not a number is [`GrpcCode::INVALID`], as Envoy
    /// reads it (an empty one is absent).
    pub fn from_response(status: StatusCode, headers: &HeaderMap) -> Self {
        let grpc = headers.get(GRPC_STATUS).and_then(GrpcCode::from_header_or_invalid);
        Outcome::Response { status, grpc: grpc.map(|code| GrpcStatus { code, in_head: true }) }
    }

    /// Completes a response outcome with the trailers read at end-of-stream. A status
    /// already taken from the head is kept (a head `grpc-status` ends the stream).
    #[must_use]
    pub fn with_trailers(self, trailers: &HeaderMap) -> Self {
        match self {
            Outcome::Response { status, grpc: None } => {
                let grpc = trailers.get(GRPC_STATUS).and_then(GrpcCode::from_header_or_invalid);
                Outcome::Response { status, grpc: grpc.map(|code| GrpcStatus { code, in_head: false }) }
            }
            other => other,
        }
    }

    /// Classifies an error by walking its source chain; the outermost recognised error wins.
    pub fn from_error(error: &(dyn StdError + 'static)) -> Self {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(failure) = classify_one(e) {
                return Outcome::Failure(failure);
            }
            next = e.source();
        }
        Outcome::Failure(Failure::Other)
    }

    /// The HTTP status, when a response arrived.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Outcome::Response { status, .. } => Some(*status),
            Outcome::Failure(_) => None,
        }
    }

    /// The gRPC status, from the head or the trailers, when a gRPC response arrived with one.
    /// This is what telemetry reports.
    pub fn grpc_status(&self) -> Option<GrpcCode> {
        match self {
            Outcome::Response { grpc, .. } => grpc.map(|g| g.code),
            Outcome::Failure(_) => None,
        }
    }

    /// The gRPC status only if it was in the response head (a trailers-only response): the
    /// one Envoy's gRPC retry conditions look at (SEMANTICS 1.13.2).
    pub fn head_grpc_status(&self) -> Option<GrpcCode> {
        match self {
            Outcome::Response { grpc: Some(GrpcStatus { code, in_head: true }), .. } => Some(*code),
            _ => None,
        }
    }

    /// The HTTP status outlier detection counts this outcome as (SEMANTICS 2.4.2, with
    /// local-origin errors not split out, as Istio configures Envoy), or `None` for a local
    /// failure that says nothing about the upstream:
    ///
    /// * a response: for a gRPC request (`grpc_request`), its head `grpc-status` mapped by
    ///   [`GrpcCode::to_http_status`] when there is one; otherwise its HTTP status (a
    ///   `grpc-status` in the trailers is not seen);
    /// * a timeout: 504;
    /// * a connect failure, and any reset, termination or protocol error of the upstream
    ///   (Envoy reports every upstream reset as a local-origin connect failure): 503.
    pub fn outlier_status(&self, grpc_request: bool) -> Option<StatusCode> {
        match self {
            Outcome::Response { grpc: Some(GrpcStatus { code, in_head: true }), .. } if grpc_request => {
                Some(code.to_http_status())
            }
            Outcome::Response { status, .. } => Some(*status),
            Outcome::Failure(Failure::Timeout) => Some(StatusCode::GATEWAY_TIMEOUT),
            Outcome::Failure(
                Failure::ConnectFailure
                | Failure::ConnectionTerminated
                | Failure::StreamReset
                | Failure::RefusedStream
                | Failure::ProtocolError,
            ) => Some(StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Failure(Failure::Other) => None,
        }
    }

    /// The failure, when no response arrived.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            Outcome::Failure(f) => Some(*f),
            Outcome::Response { .. } => None,
        }
    }

    /// A response below 500 whose gRPC status, if any, is `OK`.
    pub fn is_success(&self) -> bool {
        match self {
            Outcome::Response { status, grpc } => {
                !status.is_server_error() && grpc.is_none_or(|g| g.code == GrpcCode::OK)
            }
            Outcome::Failure(_) => false,
        }
    }

    /// A response with a 5xx HTTP status: Envoy's `5xx` retry condition on a response. A
    /// gRPC status does not count (gRPC codes have retry conditions of their own).
    pub fn is_server_error(&self) -> bool {
        self.status().is_some_and(|s| s.is_server_error())
    }

    /// A response with HTTP status 502, 503 or 504: Envoy's `gateway-error` retry condition on
    /// a response.
    pub fn is_gateway_error(&self) -> bool {
        self.status().is_some_and(|s| matches!(s.as_u16(), 502..=504))
    }

    /// The connection to the upstream could not be established.
    pub fn is_connect_failure(&self) -> bool {
        self.failure() == Some(Failure::ConnectFailure)
    }

    /// The upstream closed the connection or reset the stream before the response was
    /// complete (including a refused stream).
    pub fn is_reset(&self) -> bool {
        matches!(self.failure(), Some(Failure::ConnectionTerminated | Failure::StreamReset | Failure::RefusedStream))
    }

    /// The upstream refused the stream (HTTP/2 `REFUSED_STREAM`).
    pub fn is_refused_stream(&self) -> bool {
        self.failure() == Some(Failure::RefusedStream)
    }

    /// A timeout expired before the response arrived.
    pub fn is_timeout(&self) -> bool {
        self.failure() == Some(Failure::Timeout)
    }

    /// The Envoy response flag this outcome implies on its own (empty for responses).
    pub fn response_flags(&self) -> ResponseFlags {
        match self.failure() {
            Some(Failure::ConnectFailure) => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            Some(Failure::ConnectionTerminated) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            Some(Failure::StreamReset | Failure::RefusedStream) => ResponseFlags::UPSTREAM_REMOTE_RESET,
            Some(Failure::Timeout) => ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
            Some(Failure::ProtocolError) => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            Some(Failure::Other) | None => ResponseFlags::empty(),
        }
    }
}

fn classify_one(e: &(dyn StdError + 'static)) -> Option<Failure> {
    if e.is::<ConnectError>() {
        return Some(Failure::ConnectFailure);
    }
    if e.is::<TimeoutError>() {
        return Some(Failure::Timeout);
    }
    #[cfg(feature = "hyper")]
    if let Some(e) = e.downcast_ref::<h2::Error>() {
        if let Some(io) = e.get_io() {
            // h2 does not expose its io::Error as a source: classify it here.
            return classify_one(io);
        }
        return match e.reason() {
            Some(h2::Reason::REFUSED_STREAM) => Some(Failure::RefusedStream),
            // h2 itself caught the peer breaking the protocol, rather than the peer ending
            // the connection or stream.
            Some(
                h2::Reason::PROTOCOL_ERROR
                | h2::Reason::FRAME_SIZE_ERROR
                | h2::Reason::COMPRESSION_ERROR
                | h2::Reason::FLOW_CONTROL_ERROR,
            ) if !e.is_remote() => Some(Failure::ProtocolError),
            Some(_) if e.is_go_away() => Some(Failure::ConnectionTerminated),
            Some(_) => Some(Failure::StreamReset),
            None => None,
        };
    }
    #[cfg(feature = "hyper")]
    if let Some(e) = e.downcast_ref::<hyper::Error>() {
        if e.is_timeout() {
            return Some(Failure::Timeout);
        }
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
            return Some(Failure::ConnectionTerminated);
        }
        if e.is_parse() || e.is_parse_status() {
            return Some(Failure::ProtocolError);
        }
        return None;
    }
    if let Some(e) = e.downcast_ref::<io::Error>() {
        return match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Some(Failure::ConnectFailure)
            }
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => Some(Failure::ConnectionTerminated),
            io::ErrorKind::TimedOut => Some(Failure::Timeout),
            _ => None,
        };
    }
    None
}

// === ConnectError, TimeoutError ===

/// Wraps the error of a failed connection attempt, so that it classifies as
/// [`Failure::ConnectFailure`] whatever the underlying cause (refused, unreachable, timed out).
#[derive(Debug)]
pub struct ConnectError {
    source: Box<dyn StdError + Send + Sync>,
}

impl ConnectError {
    /// Wraps `source`.
    pub fn new(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self { source: source.into() }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("upstream connect error")
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A timeout expired; classifies as [`Failure::Timeout`].
#[derive(Debug, Clone, Copy, Default, thiserror::Error)]
#[error("request timed out")]
pub struct TimeoutError(());

impl TimeoutError {
    /// A new timeout error.
    pub fn new() -> Self {
        Self(())
    }
}

// === GrpcCode ===

const GRPC_STATUS: &str = "grpc-status";

/// A gRPC status code (the numeric value of `grpc-status`). Codes outside the standard range
/// are kept as they are; a `grpc-status` that is not a number is [`GrpcCode::INVALID`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcCode(u32);

/// The value [`GrpcCode::INVALID`] holds, which [`GrpcCode::from_header`] never returns.
const INVALID_CODE: u32 = u32::MAX;

macro_rules! grpc_codes {
    ($($name:ident = $n:literal, $text:literal;)*) => {
        impl GrpcCode {
            $(
                #[doc = concat!("`", $text, "` (", stringify!($n), ").")]
                pub const $name: GrpcCode = GrpcCode($n);
            )*

            /// The standard name (`UNAVAILABLE`), or `None` for a non-standard code.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($n => Some($text),)*
                    _ => None,
                }
            }
        }
    };
}

grpc_codes! {
    OK = 0, "OK";
    CANCELLED = 1, "CANCELLED";
    UNKNOWN = 2, "UNKNOWN";
    INVALID_ARGUMENT = 3, "INVALID_ARGUMENT";
    DEADLINE_EXCEEDED = 4, "DEADLINE_EXCEEDED";
    NOT_FOUND = 5, "NOT_FOUND";
    ALREADY_EXISTS = 6, "ALREADY_EXISTS";
    PERMISSION_DENIED = 7, "PERMISSION_DENIED";
    RESOURCE_EXHAUSTED = 8, "RESOURCE_EXHAUSTED";
    FAILED_PRECONDITION = 9, "FAILED_PRECONDITION";
    ABORTED = 10, "ABORTED";
    OUT_OF_RANGE = 11, "OUT_OF_RANGE";
    UNIMPLEMENTED = 12, "UNIMPLEMENTED";
    INTERNAL = 13, "INTERNAL";
    UNAVAILABLE = 14, "UNAVAILABLE";
    DATA_LOSS = 15, "DATA_LOSS";
    UNAUTHENTICATED = 16, "UNAUTHENTICATED";
}

impl GrpcCode {
    /// A `grpc-status` that is present but not a code (`"abc"`, `"-1"`, `"1x"`):
    /// Envoy's `InvalidCode`. It is not `OK`, matches no gRPC retry condition, counts as 500
    /// for outlier detection, and displays as `-1`, the value Envoy gives it.
    pub const INVALID: GrpcCode = GrpcCode(INVALID_CODE);

    /// A code from its number (`u32::MAX` is [`GrpcCode::INVALID`]).
    pub const fn new(code: u32) -> Self {
        GrpcCode(code)
    }

    /// The numeric value; `u32::MAX` for [`GrpcCode::INVALID`].
    pub const fn as_u32(self) -> u32 {
        self.0
    }

    /// The HTTP status Envoy equates with this code (its `grpcToHttpStatus`, after the gRPC
    /// project's HTTP mapping), used where a gRPC outcome feeds an HTTP-status rule such as
    /// outlier detection. Non-standard codes are 500.
    pub fn to_http_status(self) -> StatusCode {
        let code = match self.0 {
            0 => 200,
            1 => 499,
            3 | 9 | 11 => 400,
            4 => 504,
            5 => 404,
            6 | 10 => 409,
            7 => 403,
            8 => 429,
            12 => 501,
            14 => 503,
            16 => 401,
            // UNKNOWN, INTERNAL, DATA_LOSS and anything non-standard.
            _ => 500,
        };
        StatusCode::from_u16(code).expect("a valid status code")
    }

    /// The code Envoy gives a local reply with HTTP `status` to a gRPC request (its
    /// `httpToGrpcStatus`, after the gRPC project's mapping): 400 INTERNAL, 401
    /// UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429 / 502 / 503 / 504
    /// UNAVAILABLE, anything else UNKNOWN.
    pub fn from_http_status(status: StatusCode) -> Self {
        GrpcCode(match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        })
    }

    /// Parses a `grpc-status` header value as Envoy does (`absl::SimpleAtoi`): decimal
    /// digits, with surrounding whitespace and a leading `+` allowed. `None` for anything
    /// else, and for a number beyond `u32` (which Envoy would read as a non-standard code; it
    /// has the same effects as [`INVALID`](Self::INVALID): a failure and 500).
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        let text = value.as_bytes().trim_ascii();
        let digits = text.strip_prefix(b"+").unwrap_or(text);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let code = digits.iter().try_fold(0u32, |n, d| n.checked_mul(10)?.checked_add(u32::from(d - b'0')))?;
        (code != INVALID_CODE).then_some(GrpcCode(code))
    }

    /// As a response's classification reads `grpc-status`: [`from_header`](Self::from_header),
    /// [`INVALID`](Self::INVALID) if that fails, and `None` (no status) for an empty value.
    fn from_header_or_invalid(value: &HeaderValue) -> Option<Self> {
        if value.is_empty() {
            return None;
        }
        Some(Self::from_header(value).unwrap_or(Self::INVALID))
    }
}

impl fmt::Debug for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None if *self == Self::INVALID => f.write_str("INVALID(-1)"),
            None => write!(f, "GrpcCode({})", self.0),
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::INVALID {
            return f.write_str("-1");
        }
        fmt::Display::fmt(&self.0, f)
    }
}
