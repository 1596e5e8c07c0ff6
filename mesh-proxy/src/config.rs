//! The proxy's settings and its embedded default.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::uri::Authority;

/// Where the proxy listens when not told otherwise (Istio's outbound capture port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15001";
/// Where the proxy forwards when not told otherwise.
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:8080";
/// Where the admin server listens when not told otherwise (Envoy's admin port).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// Everything the proxy needs to run. [`ProxyConfig::default`] is the embedded default the
/// binary runs with when given no arguments.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// The address served with HTTP/1.1 and h2c (prior knowledge), detected per connection.
    pub listen: SocketAddr,
    /// The inbound listener (peers to the local application), if any.
    pub inbound: Option<InboundConfig>,
    /// Gateway listeners: a Gateway port number and the local address serving it (see
    /// [`gateway`](crate::gateway)).
    pub gateway_listeners: Vec<(u16, SocketAddr)>,
    /// Where the JSON access log goes (`-`: standard output); `None`: no access log.
    pub access_log: Option<std::path::PathBuf>,
    /// Where spans are exported (the `MeshProxy`'s `tracing`); `None`: trace context is
    /// propagated, no span is recorded.
    pub tracing: Option<TracingConfig>,
    /// The workload's identity: mTLS on the inbound listener, and for origination to
    /// destinations whose DestinationRule says `ISTIO_MUTUAL` (or auto mTLS).
    pub identity: Option<mesh_tls::Identity>,
    /// The one upstream every request goes to.
    pub upstream: UpstreamAddr,
    /// Which protocol to speak to the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// The admin server's address (`/ready`, `/live`); `None` disables it.
    pub admin: Option<SocketAddr>,
    /// How long a TCP connect to the upstream may take before it fails with `UF`.
    pub connect_timeout: Duration,
    /// How long the upstream may take to send response headers (from the moment the request
    /// arrives) before the proxy answers 504 `UT`; `None` disables it. Unlike Envoy's route
    /// timeout it does not cover the response body, so long downloads are not cut off.
    /// HTTP/1.x requests are timed by a per-connection tick, eight per timeout, so they fail
    /// between one and one and an eighth timeouts after they arrived; HTTP/2 requests to the
    /// millisecond.
    pub request_timeout: Option<Duration>,
    /// How long an idle pooled upstream connection is kept: it is closed after between one
    /// and one and a quarter of this.
    pub idle_timeout: Duration,
    /// How long a downstream connection may go without a request (none in flight, none
    /// started) before it is closed gracefully (HTTP/2: GOAWAY), like Envoy's connection
    /// `idle_timeout`. Checked four times per period, so a connection closes after between
    /// one and one and a quarter periods. `None` keeps idle connections open.
    pub downstream_idle_timeout: Option<Duration>,
    /// How long an HTTP/1.x client may take to send a request head, from its first byte to
    /// its last, like Envoy's `request_headers_timeout`; `None` disables it. A client that
    /// takes longer (one that stalls half-way, or trickles its head in) is answered
    /// `408 Request Timeout` and its connection closed, as Envoy does, whether or not there is
    /// an idle timeout: between one and one and a quarter periods after the head's first byte
    /// (it is checked eight times per period). A connection that cannot take the answer at
    /// once (its client is not reading an earlier response) is dropped instead, an eighth of a
    /// period later.
    ///
    /// On HTTP/2 the head is a header block: from a HEADERS frame's header to the end of the
    /// frame that carries END_HEADERS (the client's I/O follows its frames). A block open for
    /// longer (a HEADERS frame whose CONTINUATION never comes, or CONTINUATIONs trickled in)
    /// loses its connection, as the client may send no other frame meanwhile.
    ///
    /// Not covered: the start of a head that arrives before the previous exchange has ended,
    /// pipelined (which a client can do on purpose). The idle timeout bounds that; keep one as
    /// the backstop.
    /// The first head also has the opening limit (at most this, 10 s) to show its protocol.
    pub request_headers_timeout: Option<Duration>,
    /// How long a client connection with a request in flight may go without a byte moving
    /// either way on it, like Envoy's `stream_idle_timeout` (5 minutes by default there too);
    /// `None` disables it. It ends exchanges whose client stopped reading, or vanished without
    /// closing, and whose upstream went silent mid-body, which would otherwise hold the
    /// connection, and the upstream connection or stream behind it, for ever. Such a
    /// connection is dropped; an HTTP/1.x request still waiting for response headers is
    /// answered 504 instead. Checked eight times per period: it acts between one and one and
    /// an eighth periods after the last byte moved (later by up to a quarter idle timeout
    /// when the connection had been idle before).
    ///
    /// Tunnels (HTTP/1.1 upgrades and HTTP/2 extended CONNECT, i.e. WebSocket) are timed each
    /// on its own: one on which nothing has moved either way for this long is closed. An
    /// HTTP/2 tunnel alone on its connection is timed by the connection too, so either its
    /// stream is reset or the whole connection dropped, whichever notices first.
    ///
    /// Envoy times each HTTP/2 stream; for requests this times the connection. A client that
    /// keeps one h2c stream's window shut while other streams on the same connection move is
    /// not caught: at most the stream's send buffer waits for it.
    pub stream_idle_timeout: Option<Duration>,
    /// How many idle HTTP/1.1 connections to the upstream are kept at most.
    pub max_idle: usize,
    /// Premature resets an h2c client connection may make (streams it cancels before their
    /// response has been sent) before it gets GOAWAY `ENHANCE_YOUR_CALM`, once they are also
    /// more than half of its streams; `None` allows any. The rapid-reset defence (CVE-2023-44487)
    /// in the form that cancels streams after they were accepted, which the `h2` crate's own
    /// limit does not see. The upstream then receives at most this many cancelled requests
    /// per connection, plus those in flight at the moment (at most the 200 concurrent
    /// streams a client may open).
    pub max_premature_resets: Option<u64>,
    /// Client connections open at once on the data port; more are refused at accept (closed
    /// at once), as Envoy's overload manager `max_active_downstream_connections` does. `None`
    /// allows any. The admin port takes at most [`ADMIN_MAX_CONNECTIONS`].
    pub max_connections: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM / Ctrl-C.
    pub drain_timeout: Duration,
    /// Worker threads; 1 runs everything on the calling thread (a sidecar's budget).
    pub workers: usize,
    /// Configuration files and directories (Istio / SMI / `MeshProxy` YAML). Empty: forward
    /// everything to `upstream`, unrouted.
    pub config_paths: Vec<std::path::PathBuf>,
    /// How often the configuration files are checked for changes.
    pub reload_interval: Duration,
}

/// Connections the admin port serves at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;

/// The largest request or response head accepted, in bytes (Envoy's `max_request_headers_kb`
/// default, 60 KiB), on both protocols.
pub const MAX_HEAD_BYTES: usize = 60 << 10;

/// The most header fields a request or response may carry (Envoy's `max_headers_count`).
pub const MAX_HEADERS: usize = 100;

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            inbound: None,
            gateway_listeners: Vec::new(),
            identity: None,
            access_log: None,
            tracing: None,
            upstream: DEFAULT_UPSTREAM.parse().expect("valid default"),
            upstream_protocol: UpstreamProtocol::Downstream,
            admin: Some(DEFAULT_ADMIN.parse().expect("valid default")),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(15)),
            idle_timeout: Duration::from_secs(90),
            downstream_idle_timeout: Some(Duration::from_secs(60)),
            request_headers_timeout: Some(Duration::from_secs(10)),
            stream_idle_timeout: Some(Duration::from_secs(300)),
            max_idle: 256,
            max_premature_resets: Some(100),
            max_connections: Some(10_000),
            drain_timeout: Duration::from_secs(5),
            workers: 1,
            config_paths: Vec::new(),
            reload_interval: Duration::from_secs(1),
        }
    }
}

/// The inbound listener: where peers connect, and the local application their requests go
/// to (after PeerAuthentication, mTLS, JWT validation and authorization).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InboundConfig {
    /// Where peers connect.
    pub listen: SocketAddr,
    /// The local application.
    pub app: UpstreamAddr,
    /// What the application speaks (HTTP/1.1 by default: peers' HTTP/2 is not passed on to
    /// an application that may not speak it).
    pub app_protocol: UpstreamProtocol,
}

impl InboundConfig {
    /// Peers on `listen`, to the application at `app`, over HTTP/1.1.
    pub fn new(listen: SocketAddr, app: UpstreamAddr) -> Self {
        Self { listen, app, app_protocol: UpstreamProtocol::Http1 }
    }
}

/// The upstream's `host:port`. The host may be a name, resolved at each new connection.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamAddr(Authority);

impl UpstreamAddr {
    /// `host:port`.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// As a URI authority.
    pub fn authority(&self) -> &Authority {
        &self.0
    }
}

/// An upstream address that is not `host:port`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{0}` is not HOST:PORT (for example 127.0.0.1:8080 or app.local:80)")]
pub struct InvalidUpstream(String);

impl FromStr for UpstreamAddr {
    type Err = InvalidUpstream;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidUpstream(s.into());
        let authority: Authority = s.parse().map_err(|_| invalid())?;
        if authority.port_u16().is_none_or(|p| p == 0) || authority.host().is_empty() || s.contains('@') {
            return Err(invalid());
        }
        Ok(UpstreamAddr(authority))
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamAddr({})", self.as_str())
    }
}

/// The protocol spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), all requests multiplexed on one connection.
    H2,
    /// The protocol the request arrived with: HTTP/1.x upstream for HTTP/1.x requests, h2c for
    /// HTTP/2 requests (so gRPC and trailers keep working end to end).
    Downstream,
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Downstream => "downstream",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_addresses() {
        for ok in ["127.0.0.1:8080", "app.default.svc:80", "[::1]:9000", "localhost:1"] {
            assert_eq!(ok.parse::<UpstreamAddr>().unwrap().as_str(), ok);
        }
        for bad in ["127.0.0.1", "app", ":80", "app:0", "app:99999", "user@app:80", "http://app:80", ""] {
            let err = bad.parse::<UpstreamAddr>().unwrap_err().to_string();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn embedded_default() {
        let c = ProxyConfig::default();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream.as_str(), DEFAULT_UPSTREAM);
        assert_eq!(c.admin.unwrap().to_string(), DEFAULT_ADMIN);
        assert_eq!(c.upstream_protocol, UpstreamProtocol::Downstream);
        assert_eq!(c.workers, 1);
    }
}

/// Trace context formats and span export (OTLP to a collector).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TracingConfig {
    /// The collector (`http://otel-collector:4317` for gRPC, `:4318` for HTTP); none: no
    /// spans are recorded.
    pub endpoint: Option<String>,
    /// The formats read and written, in order (default: W3C, then B3).
    pub propagators: Vec<mesh_telemetry::propagation::Propagator>,
    /// gRPC (the default) or protobuf over HTTP.
    pub protocol: mesh_telemetry::span::OtlpProtocol,
    /// The spans' `service.name` (Istio's default: `app.namespace`).
    pub service_name: String,
}

impl TracingConfig {
    /// OTLP over gRPC to `endpoint`, as `service_name`.
    pub fn grpc(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            endpoint: Some(endpoint.into()),
            propagators: vec![
                mesh_telemetry::propagation::Propagator::W3c,
                mesh_telemetry::propagation::Propagator::B3,
            ],
            protocol: mesh_telemetry::span::OtlpProtocol::Grpc,
            service_name: service_name.into(),
        }
    }
}
