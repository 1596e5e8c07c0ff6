//! Local replies: the answers the proxy gives itself, as Envoy gives them, when a request
//! cannot be forwarded or its upstream failed. The stack's errors become these at its edge.

use std::error::Error as StdError;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use mesh_core::ResponseFlags;
use mesh_core::classify::{Failure, Outcome};
use mesh_core::flags::FlaggedError;

use crate::body::ProxyBody;
use crate::error::{BODY_UNREADABLE, BadRequest, ClientBodyError, DisplayChain, NoCluster, NoHealthyUpstream};

/// The answer to a plain CONNECT (a TCP tunnel to any address): a sidecar is not a forward
/// proxy.
pub(crate) fn connect_refused() -> Response<ProxyBody> {
    text_reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"CONNECT is not supported here\n"), None)
}

/// A short plain-text answer of the proxy's own, with the response flags it records.
pub(crate) fn text_reply(status: StatusCode, body: Bytes, flags: Option<ResponseFlags>) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::local(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(flags) = flags {
        ResponseFlags::record(res.extensions_mut(), flags);
    }
    res
}

/// The answer the proxy gives itself when the upstream did not answer.
pub(crate) fn local_reply(error: &(dyn StdError + 'static), grpc: bool) -> Response<ProxyBody> {
    let res = http_reply(error);
    if grpc { as_grpc(res) } else { res }
}

/// An answer the stack made itself (no route, no cluster, no healthy upstream, a refusal),
/// which a gRPC client gets as a `grpc-status`.
pub(crate) fn is_local_refusal(res: &Response<ProxyBody>) -> bool {
    let flags = ResponseFlags::of(res.extensions());
    [ResponseFlags::NO_ROUTE_FOUND, ResponseFlags::NO_CLUSTER_FOUND, ResponseFlags::NO_HEALTHY_UPSTREAM]
        .into_iter()
        .any(|f| flags.contains(f))
}

/// Whether a request is gRPC (`content-type: application/grpc`, `+proto` and the like).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A local reply for a gRPC client, as Envoy sends it: HTTP 200, trailers-only, with the
/// `grpc-status` Envoy maps the HTTP status to and the reply's text as `grpc-message`.
pub(crate) fn as_grpc(res: Response<ProxyBody>) -> Response<ProxyBody> {
    let code = mesh_core::GrpcCode::from_http_status(res.status()).as_u32();
    let (mut parts, body) = res.into_parts();
    let message = body.local_text().unwrap_or_default();
    parts.status = StatusCode::OK;
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    parts.headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(m) = HeaderValue::from_str(message.trim_end()) {
        parts.headers.insert("grpc-message", m);
    }
    Response::from_parts(parts, ProxyBody::local(Bytes::new()))
}

fn http_reply(error: &(dyn StdError + 'static)) -> Response<ProxyBody> {
    if let Some(bad) = client_fault(error) {
        tracing::debug!(error = %DisplayChain(error), "bad request");
        let body = Bytes::from(format!("bad request: {bad}\n"));
        return text_reply(StatusCode::BAD_REQUEST, body, Some(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR));
    }
    if let Some(e) = find::<NoCluster>(error) {
        tracing::debug!(error = %e, "cluster not found");
        return text_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"cluster not found\n"),
            Some(ResponseFlags::NO_CLUSTER_FOUND),
        );
    }
    if let Some(e) = find::<NoHealthyUpstream>(error) {
        tracing::debug!(error = %e, "no healthy upstream");
        return text_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"no healthy upstream\n"),
            Some(ResponseFlags::NO_HEALTHY_UPSTREAM),
        );
    }
    if let Some(e) = find::<mesh_resilience::pool::Overloaded>(error) {
        // Envoy's circuit-breaker overflow: at once, never retried, not an upstream failure.
        tracing::debug!(error = %e, "upstream overflow");
        let mut res = text_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"upstream connect error or disconnect/reset before headers. reset reason: overflow\n"),
            Some(ResponseFlags::UPSTREAM_OVERFLOW),
        );
        res.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        return res;
    }
    let outcome = Outcome::from_error(error);
    let (status, body): (StatusCode, &'static str) = match outcome.failure() {
        Some(Failure::ConnectFailure) => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error: the upstream could not be reached\n")
        }
        Some(Failure::Timeout) => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
        Some(Failure::ConnectionTerminated) => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream connection closed before response headers\n")
        }
        Some(Failure::StreamReset | Failure::RefusedStream) => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream reset the stream before response headers\n")
        }
        _ => (StatusCode::BAD_GATEWAY, "upstream protocol error\n"),
    };
    let flags = match outcome.response_flags() {
        f if f.is_empty() => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
        f => f,
    } | FlaggedError::flags_of(error);
    log_failure(status, flags, error);
    text_reply(status, Bytes::from_static(body.as_bytes()), Some(flags))
}

/// The first error of type `E` in `error`'s chain.
fn find<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// What the client did wrong, if the failure was its own (anywhere in the error's chain).
pub(crate) fn client_fault(error: &(dyn StdError + 'static)) -> Option<&'static str> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(BadRequest(why)) = e.downcast_ref::<BadRequest>() {
            return Some(why);
        }
        if e.is::<ClientBodyError>() {
            return Some(BODY_UNREADABLE);
        }
        next = e.source();
    }
    None
}

/// Logs an upstream failure: at WARN at most once a second (with how many were not logged
/// since), so an outage does not flood the log, and every one at DEBUG.
pub(crate) fn log_failure(status: StatusCode, flags: ResponseFlags, error: &(dyn StdError + 'static)) {
    static LAST_WARN: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let suppressed = {
        let mut last = LAST_WARN.lock().unwrap_or_else(|p| p.into_inner());
        match last.0 {
            Some(at) if at.elapsed() < Duration::from_secs(1) => {
                last.1 += 1;
                None
            }
            _ => Some(std::mem::replace(&mut *last, (Some(Instant::now()), 0)).1),
        }
    };
    match suppressed {
        Some(0) => tracing::warn!(%status, %flags, error = %DisplayChain(error), "upstream request failed"),
        Some(n) => tracing::warn!(
            %status, %flags, error = %DisplayChain(error), not_logged = n,
            "upstream request failed (and {n} more in the last second or so)"
        ),
        None => tracing::debug!(%status, %flags, error = %DisplayChain(error), "upstream request failed"),
    }
}
