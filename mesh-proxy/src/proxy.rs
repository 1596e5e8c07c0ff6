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
//!   connection (`Endpoint::extended_connect`), through the stack like any request (so it
//!   is routed). A plain CONNECT (a TCP tunnel to any
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
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use mesh_core::classify::TimeoutError;
use mesh_core::matching::join_cookie_crumbs;
use mesh_core::{ClientConnection, ResponseFlags};

use crate::body::{ProxyBody, RequestBody};
use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::downstream::{Elapsed, InFlight};
use crate::error::{BadRequest, BoxError};
use crate::h2body::H2Recv;
use crate::headers::*;
use crate::reply::{connect_refused, local_reply, text_reply};
use crate::routes::Routes;
use crate::upstream::{Tunnels, Upstream};

/// What every endpoint service shares: the upstream protocol, the tunnel idle limit and the
/// count of open tunnels.
#[derive(Clone)]
pub(crate) struct EndpointSettings {
    pub(crate) protocol: UpstreamProtocol,
    pub(crate) stream_idle: Option<Duration>,
    pub(crate) tunnels: Arc<Tunnels>,
}

/// The innermost service of the stack: forwards a request to one endpoint's pool. Upstream
/// failures are errors ([`BoxError`]); the edge ([`Forward::call`]) answers them.
#[derive(Clone)]
pub(crate) struct Endpoint {
    upstream: Arc<Upstream>,
    settings: Arc<EndpointSettings>,
}

/// The server adapters' entry to the request stack; cheap to clone (all state is shared).
///
/// It is the edge: the stack's errors become Envoy's local replies here (with a
/// `grpc-status` for gRPC requests), the per-connection request timeout is applied around the
/// stack's (`'static`) future, and the client connection is recorded on each request.
#[derive(Clone)]
pub(crate) struct Forward {
    stack: crate::stack::Stack,
    /// The endpoint of `--upstream` (unrouted), and the settings every endpoint shares.
    plain: Endpoint,
    request_timeout: Option<Duration>,
    client: Option<ClientConnection>,
    /// The peer's verified identity (inbound mTLS connections).
    peer: Option<mesh_core::PeerIdentity>,
    /// Request ids, trace context and metrics (with a configuration).
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// A gateway listener's connection: the edge of the mesh.
    edge: Option<Edge>,
}

/// What a gateway listener does to the requests of a client of the mesh: the
/// `x-forwarded-*` headers are the proxy's to set (Envoy's `use_remote_address` and
/// `SANITIZE_SET` for the client certificate header, as Istio configures its gateways), and a
/// terminated TLS connection serves its server's hosts only.
#[derive(Clone)]
pub(crate) struct Edge {
    /// Whether the client connected over TLS.
    pub(crate) https: bool,
    /// The hosts of the server the TLS connection reached.
    pub(crate) hosts: Option<crate::gateway::ServerHosts>,
}

impl Edge {
    /// The request as the mesh gets it, or the answer to a request for a host its server
    /// does not serve.
    #[expect(clippy::result_large_err, reason = "either is moved on at once; a refusal is rare")]
    fn admit(
        &self,
        mut req: Request<RequestBody>,
        client: Option<&ClientConnection>,
    ) -> Result<Request<RequestBody>, Response<ProxyBody>> {
        if let Some(hosts) = &self.hosts {
            let authority = req
                .uri()
                .authority()
                .map(http::uri::Authority::as_str)
                .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
            if !authority.is_some_and(|a| hosts.admit(a)) {
                return Err(text_reply(
                    StatusCode::MISDIRECTED_REQUEST,
                    Bytes::from_static(b"misdirected request: this connection's server does not serve that host"),
                    Some(ResponseFlags::NO_ROUTE_FOUND),
                ));
            }
        }
        let headers = req.headers_mut();
        headers.remove(XFCC);
        let proto = if self.https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        if let Some(client) = client {
            let ip = client.peer.ip().to_string();
            let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(before) if !before.trim().is_empty() => format!("{before}, {ip}"),
                _ => ip,
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        Ok(req)
    }
}

const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

impl Forward {
    pub(crate) fn new(config: &ProxyConfig, routes: Option<Arc<Routes>>, tunnels: Arc<Tunnels>) -> Self {
        let settings = Arc::new(EndpointSettings {
            protocol: config.upstream_protocol,
            stream_idle: config.stream_idle_timeout,
            tunnels,
        });
        let plain = Endpoint::new(Upstream::for_addr(config.upstream.clone(), config), settings.clone());
        let stack = match &routes {
            Some(routes) => crate::stack::Stack::routed(routes.clone(), settings),
            None => crate::stack::Stack::Plain(plain.clone()),
        };
        Self {
            stack,
            plain,
            request_timeout: config.request_timeout,
            client: None,
            peer: None,
            telemetry: None,
            edge: None,
        }
    }

    /// A gateway listener's: routed by the route table of Gateway port `port`.
    pub(crate) fn gateway(config: &ProxyConfig, routes: Arc<Routes>, port: u16, tunnels: Arc<Tunnels>) -> Self {
        let unrouted = Self::new(config, None, tunnels);
        let table = routes.gateway_table(port);
        let stack = crate::stack::Stack::routed_by(routes, unrouted.plain.settings.clone(), table);
        Self { stack, edge: Some(Edge { https: false, hosts: None }), ..unrouted }
    }

    /// The same, for a connection whose TLS was terminated for a server with these hosts.
    pub(crate) fn for_tls_server(&self, hosts: crate::gateway::ServerHosts) -> Self {
        Self { edge: Some(Edge { https: true, hosts: Some(hosts) }), ..self.clone() }
    }

    /// The same, with request ids, trace context and metrics.
    pub(crate) fn with_telemetry(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The inbound listener's: JWT validation and authorization by the current snapshot of
    /// `routes`, then the local application of `inbound`.
    pub(crate) fn inbound(
        config: &ProxyConfig,
        inbound: &crate::config::InboundConfig,
        routes: Arc<Routes>,
        tunnels: Arc<Tunnels>,
    ) -> Self {
        let settings = Arc::new(EndpointSettings {
            protocol: inbound.app_protocol,
            stream_idle: config.stream_idle_timeout,
            tunnels,
        });
        let app = Endpoint::new(Upstream::for_addr(inbound.app.clone(), config), settings);
        let stack = crate::stack::Stack::Inbound(crate::stack::Inbound {
            routes,
            app: app.clone(),
            app_host: mesh_core::UpstreamHost(inbound.app.as_str().into()),
            identity: config.identity.clone(),
        });
        Self {
            stack,
            plain: app,
            request_timeout: config.request_timeout,
            client: None,
            peer: None,
            telemetry: None,
            edge: None,
        }
    }

    /// The same, for requests of a peer with this verified identity.
    pub(crate) fn for_peer(&self, peer: mesh_core::PeerIdentity) -> Self {
        Self { peer: Some(peer), ..self.clone() }
    }

    /// The same, for requests from `client`.
    pub(crate) fn for_client(&self, client: ClientConnection) -> Self {
        Self { client: Some(client), ..self.clone() }
    }

    /// The upgraded connections that are still open.
    pub(crate) fn tunnels(&self) -> &Arc<Tunnels> {
        &self.plain.settings.tunnels
    }

    /// How long a tunnel may go without a byte moving either way (the stream idle timeout).
    pub(crate) fn tunnel_idle_limit(&self) -> Option<Duration> {
        self.plain.settings.stream_idle
    }

    /// Forwards one request through the stack. Never fails: errors become local replies.
    /// `in_flight` is held until the response body has ended.
    pub(crate) async fn call(
        self,
        mut req: Request<RequestBody>,
        in_flight: InFlight,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let grpc = crate::reply::is_grpc(req.headers());
        // Envoy's internal headers (`x-envoy-*`) are the proxy's to set: a client that is not
        // on this host (the local application is trusted) cannot pass them on.
        if self.client.as_ref().is_some_and(|c| !c.peer.ip().is_loopback()) {
            crate::headers::strip_envoy_internal(req.headers_mut());
        }
        if let Some(edge) = &self.edge {
            req = match edge.admit(req, self.client.as_ref()) {
                Ok(req) => req,
                Err(refusal) => return Ok(refusal),
            };
        }
        // Only layers read it (the plain stack has none): spare the plain path the map.
        if let (Some(client), crate::stack::Stack::Routed(..) | crate::stack::Stack::Inbound(..)) =
            (&self.client, &self.stack)
        {
            req.extensions_mut().insert(client.clone());
        }
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        // Only a configured proxy keeps telemetry: the plain path stays as it was.
        let started = self.telemetry.as_ref().map(|telemetry| {
            telemetry.trace(&mut req);
            let mut started = telemetry.start(&req, matches!(self.stack, crate::stack::Stack::Inbound(..)));
            started.track_upstream(&mut req);
            started
        });
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
            Ok(res) if grpc && crate::reply::is_local_refusal(&res) => crate::reply::as_grpc(res),
            Ok(res) => res,
            Err(e) => local_reply(&*e, grpc),
        };
        if let (Some(telemetry), Some(started)) = (&self.telemetry, started) {
            telemetry.finish(started, &mut res);
        }
        res.body_mut().in_flight = Some(in_flight);
        Ok(res)
    }

    /// The checks every request passes before the stack, then the stack.
    fn exchange(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, BoxError>> + use<> {
        let refused = if req.method() == Method::CONNECT && req.extensions().get::<h2::ext::Protocol>().is_none() {
            Some(Ok(connect_refused()))
        } else if req.headers().len() > crate::config::MAX_HEADERS {
            // HTTP/2 heads (HTTP/1.1 ones are held to the count by hyper).
            Some(Ok(text_reply(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Bytes::from_static(b"too many header fields\n"),
                Some(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR),
            )))
        } else {
            crate::headers::check_target(&req).and_then(|()| check_host(&req)).err().map(|e| Err(e.into()))
        };
        match refused {
            Some(answer) => Either::Left(std::future::ready(answer)),
            None => Either::Right(self.stack.call(req)),
        }
    }
}

impl Endpoint {
    pub(crate) fn new(upstream: Arc<Upstream>, settings: Arc<EndpointSettings>) -> Self {
        Self { upstream, settings }
    }

    /// Forwards a request to the endpoint.
    pub(crate) async fn send(self, mut req: Request<RequestBody>) -> Result<Response<ProxyBody>, BoxError> {
        if let Some(protocol) = req.extensions().get::<h2::ext::Protocol>().cloned() {
            // Boxed: tunnels are rare.
            return Box::pin(self.extended_connect(req, protocol.as_str())).await;
        }
        let upstream = &self.upstream;
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
                return Box::pin(self.upgrade(req, protocol)).await;
            }
        }
        let h2 = match self.settings.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2 => true,
            UpstreamProtocol::Downstream => req.version() == Version::HTTP_2,
        };
        let (mut parts, body) = if h2 {
            to_h2(&mut req, upstream.addr().authority())?;
            let (res, active) = upstream.send_h2(req).await?;
            let (parts, body) = res.into_parts();
            (parts, ProxyBody::h2(H2Recv::new(body).holding(active)))
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
    ) -> Result<Response<ProxyBody>, BoxError> {
        let upstream = &self.upstream;
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
        let settings = &self.settings;
        tokio::spawn(crate::tunnel::tunnel(downstream, upstream, settings.stream_idle, settings.tunnels.open()));
        Ok(Response::from_parts(parts, ProxyBody::empty()))
    }
}

/// Response extension: the upstream connection of an extended CONNECT that the upstream
/// accepted, for the server adapter to join to the client's stream.
#[derive(Clone)]
pub(crate) struct UpstreamTunnel(Arc<std::sync::Mutex<Option<hyper::upgrade::Upgraded>>>);

impl UpstreamTunnel {
    /// Takes the connection (once).
    pub(crate) fn take(&self) -> Option<hyper::upgrade::Upgraded> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Endpoint {
    /// Forwards an HTTP/2 extended CONNECT (RFC 8441, e.g. WebSocket over HTTP/2) as an
    /// HTTP/1.1 upgrade (RFC 6455 for WebSocket) on an upstream connection of its own.
    ///
    /// The client's headers go along (hop-by-hop ones dropped), with `host` from
    /// `:authority`, `Connection: upgrade` and `Upgrade: <:protocol>`; a WebSocket request also
    /// gets the `Sec-WebSocket-Key` that HTTP/2 clients do not send. The upstream's `101` becomes
    /// `200` for the client, without the `Sec-WebSocket-Accept` that answers our key, and with
    /// the upgraded connection as an [`UpstreamTunnel`] extension. That answer is checked: a
    /// `101` with a wrong or missing one fails the handshake (502 `UPE`).
    async fn extended_connect(
        &self,
        req: Request<RequestBody>,
        protocol: &str,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let upstream = &self.upstream;
        let (parts, _empty) = req.into_parts();
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
            return Ok(Response::from_parts(parts, ProxyBody::upstream(body, None)));
        }
        if let Some(key) = our_key {
            let expected = websocket_accept(key.as_bytes());
            if res.headers().get(SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
                return Err("the upstream's Sec-WebSocket-Accept does not answer the proxy's Sec-WebSocket-Key".into());
            }
        }
        let upgraded = hyper::upgrade::on(&mut res).await?;
        let (mut parts, _empty) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
        parts.status = StatusCode::OK;
        parts.extensions.insert(UpstreamTunnel(Arc::new(std::sync::Mutex::new(Some(upgraded)))));
        Ok(Response::from_parts(parts, ProxyBody::empty()))
    }
}

impl Forward {
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
