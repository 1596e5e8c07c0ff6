//! The forwarding path: one request in, one request to the upstream, one response back.
//!
//! * Hop-by-hop headers (`connection` and the headers it names, `keep-alive`,
//!   `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other than `trailers`) are
//!   removed in both directions; hyper frames each side's message itself.
//! * Bodies stream through in both directions, frame by frame, trailers included: nothing is
//!   buffered beyond what one read returns. Trailers reach an HTTP/1.1 client only when the
//!   response declares them in a `Trailer` header (hyper's rule); otherwise they are dropped
//!   there, as Envoy drops them for HTTP/1.1 clients unless `enable_trailers` is set. gRPC,
//!   which needs them, runs over HTTP/2 end to end.
//! * HTTP/1.1 upgrades (WebSocket and any other `Upgrade` protocol) are forwarded on an
//!   upstream HTTP/1.1 connection of their own, whatever `--upstream-protocol` says. If the
//!   upstream answers `101 Switching Protocols`, the proxy answers 101 too and then copies
//!   bytes both ways between the two connections until either side closes; any other answer
//!   is forwarded as usual. A drain waits for open tunnels as it waits for requests in
//!   flight: they keep working until they close by themselves or the drain timeout ends
//!   them (a byte tunnel cannot be asked to finish).
//! * HTTP/2 extended CONNECT (RFC 8441: WebSocket over HTTP/2) is forwarded the same way, as
//!   an HTTP/1.1 upgrade, and tunnelled between the client's stream and the upstream
//!   connection ([`Forward::extended_connect`]). A plain CONNECT (a TCP tunnel to any
//!   address) is refused with 405: a sidecar is not a forward proxy.
//! * HTTP/2 requests forwarded over HTTP/1.1 get a `host` header from their `:authority`;
//!   HTTP/1.1 requests forwarded over h2c get an `:authority` from their `host` header.
//! * An HTTP/1.1 request must carry exactly one valid `host` (RFC 9112 section 3.2); one
//!   that does not is answered 400 with the flag `DPE`, and is not forwarded. An
//!   absolute-form target's authority replaces the `host`; an HTTP/1.0 request without one
//!   gets the upstream's. A request body that breaks off or is malformed is the client's
//!   failure too (400 `DPE`), not the upstream's. HTTP/1.1 CONNECT is refused with 405, as
//!   over HTTP/2, and an `Upgrade: h2c` is dropped (the request goes on as an ordinary one).
//! * When the upstream fails, the proxy answers as Envoy does and records the response flag
//!   on the response ([`ResponseFlags`]):
//!
//! | what happened | status | flag |
//! |---|---|---|
//! | the upstream could not be reached (refused, unreachable, connect timeout) | 503 | `UF` |
//! | the upstream closed the connection before response headers | 503 | `UC` |
//! | the upstream reset the HTTP/2 stream before response headers | 503 | `UR` |
//! | no response headers within the request timeout | 504 | `UT` |
//! | the upstream sent a malformed response | 502 | `UPE` |

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use mesh_core::ResponseFlags;
use mesh_core::classify::{Failure, Outcome, TimeoutError};
use mesh_core::matching::join_cookie_crumbs;

use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::downstream::{BodyInFlight, ConnState, Elapsed, InFlight};
use crate::h2body::H2Recv;
use crate::routes::Routes;
use crate::upstream::{BoxError, Checkout, Tunnels, Upstream};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// The forwarding service; cheap to clone (all state is shared).
#[derive(Clone)]
pub(crate) struct Forward {
    upstream: Arc<Upstream>,
    /// With a configuration: the routes, which choose each request's upstream.
    routes: Option<Arc<Routes>>,
    tunnels: Arc<Tunnels>,
    protocol: UpstreamProtocol,
    request_timeout: Option<Duration>,
    stream_idle: Option<Duration>,
}

impl Forward {
    pub(crate) fn new(config: &ProxyConfig, routes: Option<Arc<Routes>>, tunnels: Arc<Tunnels>) -> Self {
        Self {
            upstream: Upstream::for_addr(config.upstream.clone(), config),
            routes,
            tunnels,
            protocol: config.upstream_protocol,
            request_timeout: config.request_timeout,
            stream_idle: config.stream_idle_timeout,
        }
    }

    /// The upgraded connections that are still open.
    pub(crate) fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// How long a tunnel may go without a byte moving either way (the stream idle timeout).
    pub(crate) fn tunnel_idle_limit(&self) -> Option<Duration> {
        self.stream_idle
    }

    /// Forwards one request. Never fails: upstream failures become local replies. `in_flight`
    /// is held until the response body has ended.
    pub(crate) async fn call(
        self,
        req: Request<RequestBody>,
        in_flight: InFlight,
    ) -> Result<Response<ProxyBody>, Infallible> {
        // Each arm builds its own exchange future: one made before the `match` and moved
        // into an arm would take room in this future's state twice.
        let result = match self.request_timeout {
            // HTTP/1.x: one request at a time per connection, timed by the connection's
            // watchdog (no timer per request).
            Some(_) if req.version() != Version::HTTP_2 => in_flight
                .headers_deadline(self.exchange(req))
                .await
                .unwrap_or_else(|_: Elapsed| Err(Box::new(TimeoutError::new()))),
            _ => self.timed(self.exchange(req)).await,
        };
        let mut res = match result {
            Ok(res) => res,
            Err(e) => local_reply(&*e),
        };
        res.body_mut().in_flight = Some(in_flight);
        Ok(res)
    }

    async fn exchange(&self, req: Request<RequestBody>) -> Result<Response<ProxyBody>, BoxError> {
        if req.method() == Method::CONNECT {
            return Ok(connect_refused());
        }
        check_host(&req)?;
        match &self.routes {
            // Boxed: the routed path's state stays out of the plain forwarding future.
            Some(routes) => Box::pin(self.routed(req, routes)).await,
            None => self.send(req, &self.upstream).await,
        }
    }

    /// Routes a request by the configuration, then forwards it to the chosen endpoint.
    async fn routed(&self, mut req: Request<RequestBody>, routes: &Routes) -> Result<Response<ProxyBody>, BoxError> {
        let selection = match routes.select(&mut req) {
            Ok(selection) => selection,
            Err(answer) => return Ok(answer),
        };
        if !selection.mirrors.is_empty() && req.body().is_end_stream() {
            for pool in &selection.mirrors {
                let mut copy = crate::routes::mirror_copy(&req);
                let pool = pool.clone();
                // Fire and forget: the copy's fate never touches the original.
                tokio::spawn(async move {
                    remove_hop_by_hop(copy.headers_mut());
                    if to_http1(&mut copy, pool.addr().authority()).is_ok()
                        && let Err(e) = pool.send_http1(copy).await
                    {
                        tracing::debug!(error = %e, "mirrored request failed");
                    }
                });
            }
        }
        let send = self.send(req, &selection.upstream);
        let mut res = match selection.timeout() {
            Some(limit) => {
                tokio::time::timeout(limit, send).await.unwrap_or_else(|_| Err(Box::new(TimeoutError::new())))?
            }
            None => send.await?,
        };
        selection.finish_response(res.headers_mut());
        Ok(res)
    }

    /// Forwards a request to `upstream`.
    async fn send(
        &self,
        mut req: Request<RequestBody>,
        upstream: &Arc<Upstream>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        // Most requests carry no hop-by-hop header at all, so no `upgrade` either.
        if has_hop_by_hop(req.headers()) {
            if unsupported_transfer_coding(req.headers()) {
                return Ok(text_reply(
                    StatusCode::NOT_IMPLEMENTED,
                    Bytes::from_static(b"transfer codings other than chunked are not supported\n"),
                    Some(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR),
                ));
            }
            let upgrade = requested_upgrade(&req);
            remove_hop_by_hop(req.headers_mut());
            if let Some(protocol) = upgrade {
                return Box::pin(self.upgrade(req, protocol, upstream)).await;
            }
        }
        let h2 = match self.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2 => true,
            UpstreamProtocol::Downstream => req.version() == Version::HTTP_2,
        };
        let (mut parts, body) = if h2 {
            to_h2(&mut req, upstream.addr().authority())?;
            let (parts, body) = upstream.send_h2(req).await?.into_parts();
            (parts, ProxyBody::h2(H2Recv::new(body)))
        } else {
            to_http1(&mut req, upstream.addr().authority())?;
            frame_http1_body(&mut req);
            let head = req.method() == Method::HEAD;
            let (res, checkout) = upstream.send_http1(req).await?;
            // On failure the connection, its framing unsure, is not reused.
            check_response_coding(res.headers())?;
            let (parts, body) = res.into_parts();
            // After HEAD the connection is closed, not pooled: an upstream that sends a body
            // anyway (its `content-length` is the GET body's) would otherwise hand it to the
            // next request, another client's, as that request's response.
            (parts, ProxyBody::upstream(body, (!head).then_some(checkout)))
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
    }

    /// Forwards an upgrade request on a connection of its own, and tunnels the two upgraded
    /// connections together if the upstream agrees.
    async fn upgrade(
        &self,
        mut req: Request<RequestBody>,
        protocol: HeaderValue,
        upstream: &Arc<Upstream>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let downstream = hyper::upgrade::on(&mut req);
        to_http1(&mut req, upstream.addr().authority())?;
        set_upgrade(req.headers_mut(), protocol);
        let mut res = upstream.send_upgrade(req).await?;
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused (or ignored): an ordinary response, on a connection nobody reuses.
            check_response_coding(res.headers())?;
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.version = Version::HTTP_11;
            return Ok(Response::from_parts(parts, ProxyBody::upstream(body, None)));
        }
        let upstream = hyper::upgrade::on(&mut res);
        let (mut parts, _empty) = res.into_parts();
        let agreed = parts.headers.get(UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = agreed {
            set_upgrade(&mut parts.headers, protocol);
        }
        tokio::spawn(crate::tunnel::tunnel(downstream, upstream, self.stream_idle, self.tunnels.open()));
        Ok(Response::from_parts(parts, ProxyBody::empty()))
    }
}

/// What an extended CONNECT led to.
pub(crate) enum Connected {
    /// The upstream switched protocols: the response head for the client (200) and the
    /// upstream connection to tunnel to.
    Tunnel(http::response::Parts, hyper::upgrade::Upgraded),
    /// Anything else (a refusal, a failure): answer the client with this.
    Answer(Response<ProxyBody>),
}

impl Forward {
    /// Forwards an HTTP/2 extended CONNECT (RFC 8441, e.g. WebSocket over HTTP/2) as an
    /// HTTP/1.1 upgrade (RFC 6455 for WebSocket) on an upstream connection of its own.
    ///
    /// The client's headers go along (hop-by-hop ones dropped), with `host` from
    /// `:authority`, `Connection: upgrade` and `Upgrade: <:protocol>`; a WebSocket request also
    /// gets the `Sec-WebSocket-Key` that HTTP/2 clients do not send. The upstream's `101` becomes
    /// `200` for the client, without the `Sec-WebSocket-Accept` that answers our key. That
    /// answer is checked: a `101` with a wrong or missing one fails the handshake (502 `UPE`).
    pub(crate) async fn extended_connect(&self, parts: http::request::Parts, protocol: &str) -> Connected {
        // Routed like any request (its route's rewrites apply); the tunnel itself is not timed
        // by the route timeout.
        let (parts, upstream) = match &self.routes {
            None => (parts, self.upstream.clone()),
            Some(routes) => {
                let mut probe = Request::from_parts(parts, ());
                match routes.select(&mut probe) {
                    Ok(selection) => (probe.into_parts().0, selection.upstream.clone()),
                    Err(answer) => return Connected::Answer(answer),
                }
            }
        };
        let exchange = async {
            let mut headers = parts.headers;
            strip_hop_by_hop(&mut headers);
            join_cookie_crumbs(&mut headers);
            let authority = match parts.uri.authority() {
                Some(authority) if is_valid_host(authority.as_str().as_bytes()) => authority,
                Some(_) => return Err(BadRequest("invalid :authority").into()),
                None => upstream.addr().authority(),
            };
            headers.insert(HOST, HeaderValue::from_str(authority.as_str())?);
            set_upgrade(&mut headers, HeaderValue::from_str(protocol).map_err(|_| BadRequest("invalid :protocol"))?);
            // The handshake the proxy makes itself, it checks (RFC 6455 section 4.1).
            let mut our_key = None;
            if protocol.eq_ignore_ascii_case("websocket") && !headers.contains_key(SEC_WEBSOCKET_KEY) {
                let key = websocket_key();
                headers.insert(SEC_WEBSOCKET_KEY, key.clone());
                our_key = Some(key);
            }
            let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
            let mut req = Request::new(RequestBody::empty());
            *req.uri_mut() = path.into();
            *req.headers_mut() = headers;
            let mut res = upstream.send_upgrade(req).await?;
            if res.status() != StatusCode::SWITCHING_PROTOCOLS {
                // A refusal goes back as it came. A success that is not 101 (the upstream
                // ignored the upgrade and served a page) cannot: a 2xx to the client's CONNECT
                // says the tunnel is open (RFC 9113 section 8.5).
                if res.status().is_success() {
                    return Err(format!("the upstream answered an upgrade with {}, not 101", res.status()).into());
                }
                check_response_coding(res.headers())?;
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Ok(Connected::Answer(Response::from_parts(parts, ProxyBody::upstream(body, None))));
            }
            if let Some(key) = our_key {
                let expected = websocket_accept(key.as_bytes());
                if res.headers().get(SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
                    return Err(
                        "the upstream's Sec-WebSocket-Accept does not answer the proxy's Sec-WebSocket-Key".into()
                    );
                }
            }
            let upgraded = hyper::upgrade::on(&mut res).await?;
            let (mut parts, _empty) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
            parts.status = StatusCode::OK;
            Ok::<_, BoxError>(Connected::Tunnel(parts, upgraded))
        };
        self.timed(exchange).await.unwrap_or_else(|e| Connected::Answer(local_reply(&*e)))
    }

    /// `exchange` bounded by the request timeout with a timer of its own (HTTP/2 streams and
    /// tunnels; HTTP/1.x requests use the connection's watchdog instead).
    ///
    /// A combinator rather than an `async fn`, which would hold `exchange` twice in its state
    /// (as its argument and inside the timeout).
    fn timed<T>(
        &self,
        exchange: impl Future<Output = Result<T, BoxError>>,
    ) -> impl Future<Output = Result<T, BoxError>> {
        match self.request_timeout {
            Some(limit) => Either::Left(
                tokio::time::timeout(limit, exchange)
                    .map(|timed| timed.unwrap_or_else(|_| Err(Box::new(TimeoutError::new())))),
            ),
            None => Either::Right(exchange),
        }
    }
}

/// The answer to a plain CONNECT (a TCP tunnel to any address): a sidecar is not a forward
/// proxy.
pub(crate) fn connect_refused() -> Response<ProxyBody> {
    text_reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"CONNECT is not supported here\n"), None)
}

/// A short plain-text answer of the proxy's own, with the response flags it records.
fn text_reply(status: StatusCode, body: Bytes, flags: Option<ResponseFlags>) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::local(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(flags) = flags {
        ResponseFlags::record(res.extensions_mut(), flags);
    }
    res
}

/// A fresh `Sec-WebSocket-Key`: 16 unpredictable bytes, base64 (RFC 6455 section 4.1). It
/// only has to differ between handshakes; std's randomly seeded hasher provides that.
fn websocket_key() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    HeaderValue::from_str(&base64(&bytes)).expect("base64 is a valid header value")
}

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 section 4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    use sha1::Digest;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    base64(&sha1::Sha1::new().chain_update(key).chain_update(GUID).finalize())
}

/// Standard base64 with padding (RFC 4648), for the one short value above.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` and `Upgrade`).
fn requested_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
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

fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Prepares a request for an HTTP/1.1 upstream: origin-form target, `host` header, and an
/// HTTP/2 request's cookie crumbs joined into one `cookie` header (RFC 9113 section 8.2.3).
fn to_http1<B>(req: &mut Request<B>, fallback: &http::uri::Authority) -> Result<(), BoxError> {
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
fn frame_http1_body(req: &mut Request<RequestBody>) {
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none()
        && !req.headers().contains_key(CONTENT_LENGTH)
    {
        req.headers_mut().insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// Prepares a request for an h2c upstream: absolute URI with the client's authority.
fn to_h2<B>(req: &mut Request<B>, fallback: &http::uri::Authority) -> Result<(), BoxError> {
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

const BODY_UNREADABLE: &str = "the request body could not be read";

/// The client's request body failed (malformed, or the client went away) while it was being
/// forwarded: the exchange is the client's failure, not the upstream's (400, `DPE`).
#[derive(Debug)]
pub(crate) struct ClientBodyError(pub(crate) BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{BODY_UNREADABLE}: {}", self.0)
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// A request the proxy does not forward: answered 400, with the flag `DPE`.
#[derive(Debug)]
pub(crate) struct BadRequest(&'static str);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for BadRequest {}

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `host`, and a valid one (an
/// HTTP/1.0 or HTTP/2 request may carry none).
fn check_host<B>(req: &Request<B>) -> Result<(), BadRequest> {
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
fn is_valid_host(host: &[u8]) -> bool {
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
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(is_hop_by_hop)
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
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
fn unsupported_transfer_coding(headers: &HeaderMap) -> bool {
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
fn check_response_coding(headers: &HeaderMap) -> Result<(), BoxError> {
    if unsupported_transfer_coding(headers) {
        return Err("the upstream's response has a transfer coding other than chunked".into());
    }
    Ok(())
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == TE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// The answer the proxy gives itself when the upstream did not answer.
fn local_reply(error: &(dyn StdError + 'static)) -> Response<ProxyBody> {
    if let Some(bad) = client_fault(error) {
        tracing::debug!(error = %DisplayChain(error), "bad request");
        let body = Bytes::from(format!("bad request: {bad}\n"));
        return text_reply(StatusCode::BAD_REQUEST, body, Some(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR));
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
    };
    log_failure(status, flags, error);
    text_reply(status, Bytes::from_static(body.as_bytes()), Some(flags))
}

/// What the client did wrong, if the failure was its own (anywhere in the error's chain).
fn client_fault(error: &(dyn StdError + 'static)) -> Option<&'static str> {
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
fn log_failure(status: StatusCode, flags: ResponseFlags, error: &(dyn StdError + 'static)) {
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

/// Displays an error with its sources, `a: b: c`.
struct DisplayChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

// === RequestBody ===

pin_project_lite::pin_project! {
    /// The body of a request being forwarded: from an HTTP/1.1 client (through hyper) or
    /// from an h2c client (through the `h2` crate).
    #[project = RequestBodyProj]
    pub(crate) enum RequestBody {
        Http1 { #[pin] body: Incoming, reading: Option<BodyInFlight> },
        H2 { body: H2Recv },
        Empty,
    }
}

impl RequestBody {
    /// An HTTP/1.x request's body, in flight on its connection (`conn`) until it has ended.
    pub(crate) fn http1(body: Incoming, conn: &Arc<ConnState>) -> Self {
        let reading = conn.body_in_flight(body.is_end_stream());
        RequestBody::Http1 { body, reading }
    }

    pub(crate) fn h2(body: H2Recv) -> Self {
        RequestBody::H2 { body }
    }

    pub(crate) fn empty() -> Self {
        RequestBody::Empty
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        fn client(e: impl Into<BoxError>) -> BoxError {
            Box::new(ClientBodyError(e.into()))
        }
        match self.project() {
            RequestBodyProj::Http1 { body, reading } => {
                let frame = ready!(body.poll_frame(cx));
                if frame.is_none() {
                    reading.take();
                }
                Poll::Ready(frame.map(|f| f.map_err(client)))
            }
            RequestBodyProj::H2 { body } => body.poll_frame(cx).map(|f| f.map(|f| f.map_err(client))),
            RequestBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http1 { body, .. } => body.is_end_stream(),
            RequestBody::H2 { body } => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http1 { body, .. } => body.size_hint(),
            RequestBody::H2 { .. } => SizeHint::default(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// === ProxyBody ===

pin_project_lite::pin_project! {
    /// The body of a proxied response: the upstream's, streamed frame by frame, or a short
    /// local reply.
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
        in_flight: Option<InFlight>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner {
        // Streams the upstream's body; returns its HTTP/1.1 connection to the pool at the end.
        Upstream {
            #[pin]
            body: Incoming,
            checkout: Option<Checkout>,
        },
        // Streams an h2c upstream's response body.
        H2 { body: H2Recv },
        Local { data: Option<Bytes> },
    }
}

impl ProxyBody {
    fn upstream(body: Incoming, mut checkout: Option<Checkout>) -> Self {
        if body.is_end_stream() {
            // hyper will not poll an empty body: the connection is free now.
            if let Some(c) = checkout.take() {
                c.release();
            }
        }
        ProxyBody { inner: Inner::Upstream { body, checkout }, in_flight: None }
    }

    fn h2(body: H2Recv) -> Self {
        ProxyBody { inner: Inner::H2 { body }, in_flight: None }
    }

    pub(crate) fn local(data: Bytes) -> Self {
        ProxyBody { inner: Inner::Local { data: Some(data) }, in_flight: None }
    }

    fn empty() -> Self {
        ProxyBody { inner: Inner::Local { data: None }, in_flight: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            InnerProj::Upstream { mut body, checkout } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    // A broken body leaves its connection in an unknown state: close it.
                    Some(Err(_)) => *checkout = None,
                    _ => {
                        if let Some(c) = checkout.take() {
                            c.release();
                        }
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            InnerProj::H2 { body } => body.poll_frame(cx).map(|f| f.map(|f| f.map_err(Into::into))),
            InnerProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body, .. } => body.is_end_stream(),
            Inner::H2 { body } => body.is_end_stream(),
            Inner::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body, .. } => body.size_hint(),
            Inner::H2 { .. } => SizeHint::default(),
            Inner::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Upstream { .. } | Inner::H2 { .. } => f.write_str("ProxyBody::Upstream"),
            Inner::Local { data } => {
                f.debug_struct("ProxyBody::Local").field("len", &data.as_ref().map(Bytes::len)).finish()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

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
