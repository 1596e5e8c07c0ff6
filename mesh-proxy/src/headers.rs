//! Header rules of the forwarding path: hop-by-hop headers, `host` checks, the request target
//! and framing each upstream protocol needs, and the WebSocket handshake values the proxy
//! makes itself.

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body::Body;
use mesh_core::matching::join_cookie_crumbs;

use crate::body::RequestBody;
use crate::error::{BadRequest, BoxError};

pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
pub(crate) const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 section 4.1), from
/// tungstenite.
pub(crate) fn websocket_key() -> HeaderValue {
    HeaderValue::from_str(&tungstenite::handshake::client::generate_key()).expect("base64 is a valid header value")
}

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 section 4.2.2), from tungstenite.
pub(crate) fn websocket_accept(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` and `Upgrade`).
pub(crate) fn requested_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let protocol = req.headers().get(UPGRADE)?;
    // Upgrading to h2c is not forwarded (RFC 9113 deprecates it; h2c clients here use prior
    // knowledge): the request goes on as an ordinary one.
    if protocol.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return None;
    }
    let asked = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asked.then(|| protocol.clone())
}

pub(crate) fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Prepares a request for an HTTP/1.1 upstream: origin-form target, `host` header, and an
/// HTTP/2 request's cookie crumbs joined into one `cookie` header (RFC 9113 section 8.2.3).
pub(crate) fn to_http1<B>(req: &mut Request<B>, fallback: &http::uri::Authority) -> Result<(), BoxError> {
    if req.version() >= Version::HTTP_2 {
        // HTTP/1.1 allows one `cookie` header; HTTP/2 clients may split it into crumbs.
        join_cookie_crumbs(req.headers_mut());
    }
    *req.version_mut() = Version::HTTP_11;
    if req.uri().authority().is_none() {
        // Already origin-form, with the client's own `host` (checked). An HTTP/1.0 client, or
        // an HTTP/2 one without `:authority`, may have sent none, and HTTP/1.1 requires one:
        // the upstream's.
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, HeaderValue::from_str(fallback.as_str())?);
        }
        return Ok(());
    }
    let uri = std::mem::take(req.uri_mut());
    let mut parts = uri.into_parts();
    // The target's authority (HTTP/2's `:authority`, or an absolute-form HTTP/1.1 target)
    // replaces any `host` (RFC 9112 section 3.2.2).
    if let Some(authority) = parts.authority.take() {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| BadRequest("invalid authority"))?;
        req.headers_mut().insert(HOST, host);
    }
    *req.uri_mut() = parts.path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")).into();
    Ok(())
}

/// Makes sure a GET or HEAD request's body of unknown length reaches an HTTP/1.1 upstream.
/// hyper's client sends such a request with no body at all (`content-length: 0` framing)
/// unless told otherwise: a chunked HTTP/1.1 body, or an h2c body without `content-length`,
/// would be dropped. Chunked framing carries it, as Envoy does.
pub(crate) fn frame_http1_body(req: &mut Request<RequestBody>) {
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none()
        && !req.headers().contains_key(CONTENT_LENGTH)
    {
        req.headers_mut().insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// Prepares a request for an h2c upstream: absolute URI with the client's authority.
pub(crate) fn to_h2<B>(req: &mut Request<B>, fallback: &http::uri::Authority) -> Result<(), BoxError> {
    *req.version_mut() = Version::HTTP_2;
    let host = req.headers_mut().remove(HOST);
    let uri = std::mem::take(req.uri_mut());
    let mut parts = uri.into_parts();
    if parts.authority.is_none() {
        parts.authority = Some(match host {
            Some(h) => h.to_str().ok().and_then(|h| h.parse().ok()).ok_or(BadRequest("invalid Host header"))?,
            None => fallback.clone(),
        });
    }
    parts.scheme = Some(Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| BadRequest("invalid request target"))?;
    Ok(())
}

/// The header that tells the application who called (Envoy's name and format); only the
/// proxy sets it.
pub(crate) const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// Removes every `x-envoy-*` header (Envoy's internal headers, which only the proxy sets).
///
/// `x-forwarded-for` is left as the client sent it and not appended to, as Envoy does with
/// `use_remote_address: false`, its default and a sidecar's setting for traffic from its own
/// application; an ingress facing the internet would append (the inbound and gateway
/// listeners of a later issue).
pub(crate) fn strip_envoy_internal(headers: &mut http::HeaderMap) {
    let internal: Vec<http::HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("x-envoy-")).cloned().collect();
    for name in internal {
        headers.remove(name);
    }
}

/// RFC 9112 section 3.2: the asterisk form (`*`) is for OPTIONS only, and the authority form
/// (`host:port`) for CONNECT only.
pub(crate) fn check_target<B>(req: &Request<B>) -> Result<(), BadRequest> {
    let uri = req.uri();
    if uri.path() == "*" && uri.authority().is_none() && req.method() != http::Method::OPTIONS {
        return Err(BadRequest("the asterisk-form target is for OPTIONS only"));
    }
    if uri.scheme().is_none() && uri.authority().is_some() && req.method() != http::Method::CONNECT {
        return Err(BadRequest("the authority-form target is for CONNECT only"));
    }
    Ok(())
}

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `host`, and a valid one (an
/// HTTP/1.0 or HTTP/2 request may carry none).
pub(crate) fn check_host<B>(req: &Request<B>) -> Result<(), BadRequest> {
    // The target's authority (absolute form, or HTTP/2's `:authority`) becomes the upstream
    // request's `host`: it follows the same rules (no userinfo, RFC 9110 section 4.2.4).
    if let Some(authority) = req.uri().authority()
        && !is_valid_host(authority.as_str().as_bytes())
    {
        return Err(BadRequest("invalid authority in the request target"));
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => Err(BadRequest("no Host header")),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err(BadRequest("more than one Host header")),
        (Some(host), None) if is_valid_host(host.as_bytes()) => Ok(()),
        (Some(_), None) => Err(BadRequest("invalid Host header")),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 section 7.2, RFC 3986 section 3.2.2): a bracketed IP
/// literal or a non-empty registered name or IPv4 address, then an optional port; no userinfo.
pub(crate) fn is_valid_host(host: &[u8]) -> bool {
    let (name, port) = if let Some(literal) = host.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else { return false };
        let inside = &literal[..end];
        let ok = !inside.is_empty() && inside.iter().all(|&b| b.is_ascii_hexdigit() || b":.%vV-_~".contains(&b));
        if !ok {
            return false;
        }
        match &literal[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&b"x"[..], port),
            _ => return false,
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &b""[..]),
        }
    };
    let name_ok =
        !name.is_empty() && name.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
    name_ok && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if has_hop_by_hop(headers) {
        remove_hop_by_hop(headers);
    }
}

/// One pass over the (few) names: most messages carry no hop-by-hop header at all, and
/// comparing names is cheaper than hashing each candidate for a lookup.
pub(crate) fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(is_hop_by_hop)
}

pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            // `TE` is settled below; `Host` is never hop-by-hop, whatever `Connection` says.
            if name != TE && name != HOST {
                headers.remove(name);
            }
        }
        headers.remove(CONNECTION);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    headers.remove(UPGRADE);
    // Of `TE`, only whether the client accepts trailers goes on, as the one form HTTP/2
    // allows (RFC 9113 section 8.2.2): `te: trailers`.
    if headers.contains_key(TE) {
        let trailers = headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|coding| coding.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("trailers"));
        headers.remove(TE);
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Removes what must not travel in trailers: hop-by-hop fields, and fields HTTP/2 forbids
/// anywhere (RFC 9113 section 8.2.2), which would make the h2 crate refuse the whole trailer
/// block and leave the stream unfinished.
pub(crate) fn strip_trailers(trailers: &mut HeaderMap) {
    if has_hop_by_hop(trailers) {
        remove_hop_by_hop(trailers);
        trailers.remove(TE);
    }
}

/// A `Transfer-Encoding` other than plain `chunked` (RFC 9112 section 6.1). hyper frames
/// `gzip, chunked` as chunked and hands on the still-gzipped bytes; forwarded without the
/// coding, they would arrive as a different body. A request's is answered 501, a response's
/// 502.
pub(crate) fn unsupported_transfer_coding(headers: &HeaderMap) -> bool {
    if !headers.contains_key(TRANSFER_ENCODING) {
        return false;
    }
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    !matches!((codings.next(), codings.next()), (Some(c), None) if c.eq_ignore_ascii_case(b"chunked"))
}

/// Refuses an upstream response in a transfer coding besides chunked: hyper takes off only
/// the chunked framing, and the rest of the coding would reach the client undeclared. A
/// protocol error (502 UPE), as Envoy has it.
pub(crate) fn check_response_coding(headers: &HeaderMap) -> Result<(), BoxError> {
    if unsupported_transfer_coding(headers) {
        return Err("the upstream's response has a transfer coding other than chunked".into());
    }
    Ok(())
}

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == TE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_are_checked_like_rfc_9110_says() {
        for valid in
            ["app.test", "app.test:8080", "127.0.0.1", "127.0.0.1:0", "[::1]", "[::1]:80", "a-b_c~d.e", "%41pp"]
        {
            assert!(is_valid_host(valid.as_bytes()), "{valid}");
        }
        for invalid in [
            "",
            ":80",
            "app test",
            "user@app.test",
            "app.test:http",
            "app.test:123456",
            "[::1",
            "[]",
            "[::1]x",
            "app/x",
            "app?x",
        ] {
            assert!(!is_valid_host(invalid.as_bytes()), "{invalid}");
        }
    }

    #[test]
    fn websocket_accept_matches_rfc_6455() {
        // The example of RFC 6455 section 1.3.
        assert_eq!(websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn websocket_keys_are_16_bytes_and_differ() {
        let (a, b) = (websocket_key(), websocket_key());
        assert_eq!(a.len(), 24, "16 bytes in base64");
        assert!(a.as_bytes().ends_with(b"=="));
        assert_ne!(a, b);
    }
}

#[cfg(test)]
mod envoy_internal_tests {
    #[test]
    fn only_x_envoy_headers_go() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        headers.insert("x-envoy-upstream-rq-timeout-ms", "1".parse().unwrap());
        headers.insert("x-envoyish", "kept".parse().unwrap());
        headers.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        super::strip_envoy_internal(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-envoyish", "x-forwarded-for"]);
    }
}
