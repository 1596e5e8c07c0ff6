//! The connection pool to the one upstream: pooled HTTP/1.1 keep-alive connections and
//! shared, multiplexed h2c connections (one, and another whenever those open are at the
//! peer's `SETTINGS_MAX_CONCURRENT_STREAMS`).
//!
//! The h2c connection is driven with the `h2` crate directly rather than through hyper's
//! client: a request is handed to the connection without a channel or a task of its own
//! (only a request body that is still streaming gets a task), which measured 7 % less proxy
//! CPU per request with h2c on both sides. When the upstream sends GOAWAY (a graceful
//! shutdown), the streams it already accepted finish on the old connection and new requests
//! go on a new one; none is failed for it.
//!
//! HTTP/1.1 connections are checked out most-recently-used first (so a small hot set stays
//! warm and the rest expire), and checked back in when the response body has been read to
//! its end; a response body dropped early closes its connection rather than leaving it in an
//! unknown state. A request that a pooled connection could not even start sending (because
//! the upstream had closed it meanwhile) is moved to the next connection; once any byte has
//! been sent it is not replayed.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_core::classify::ConnectError;
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

use crate::body::RequestBody;
use crate::config::{ProxyConfig, UpstreamAddr};
use crate::error::ClientBodyError;
use crate::h2body::SendBody;

pub(crate) use crate::error::BoxError;

/// A connection checked out of the HTTP/1.1 pool; goes back with [`Checkout::release`].
pub(crate) struct Checkout {
    pool: Arc<Upstream>,
    tx: http1::SendRequest<RequestBody>,
    /// Requests this connection has carried, this one included.
    uses: u32,
}

impl Checkout {
    /// Returns the connection to the idle pool (the response it carried is complete).
    pub(crate) fn release(self) {
        self.pool.check_in(self.tx, self.uses);
    }
}

struct Idle {
    tx: http1::SendRequest<RequestBody>,
    /// The reaper's epoch when the connection went idle.
    epoch: u64,
    uses: u32,
}

/// A destination's settings for its endpoints' connections (DestinationRule
/// `connectionPool`); unset fields take the proxy's. Endpoints with different settings (one
/// address in two destinations) get pools of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct PoolSettings {
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    /// Requests a connection carries before it is closed (HTTP/1.1) or retired (h2c).
    pub(crate) max_requests_per_connection: Option<u32>,
    /// TCP keepalive: (probes, idle time, interval), each unset for the system's.
    pub(crate) keepalive: Option<(Option<u32>, Option<Duration>, Option<Duration>)>,
    /// Streams at once on one h2c connection (beyond the peer's own limit).
    pub(crate) max_concurrent_streams: Option<usize>,
    /// TLS to the endpoints (DestinationRule `tls`, or auto mTLS).
    pub(crate) tls: Option<Origination>,
}

/// How connections to a destination's endpoints are secured.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Origination {
    /// `ISTIO_MUTUAL`: mTLS with the workload's identity. The server must present one of
    /// `names` (SPIFFE IDs), else one of the endpoints' service accounts in the workload's
    /// trust domain, else any SVID of that trust domain.
    Mesh { names: Vec<String>, service_accounts: Vec<(String, String)> },
    /// `SIMPLE` / `MUTUAL`: TLS verified against `ca` (the system's CAs without one), with a
    /// client certificate for MUTUAL.
    Files {
        ca: Option<std::path::PathBuf>,
        client: Option<(std::path::PathBuf, std::path::PathBuf)>,
        sni: Option<String>,
        names: Vec<String>,
    },
}

/// The shared h2c connection: its sender, and whether the task driving it has ended.
struct H2Conn {
    tx: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Streams opened on it.
    streams: Arc<std::sync::atomic::AtomicU32>,
    /// Streams in flight on it (until their response bodies end).
    active: Arc<AtomicUsize>,
    /// Which connection this is (one more per connection opened).
    id: u64,
}

/// HTTP/2 flow-control windows towards the upstream: a stream may have 256 KiB in flight, the
/// connection 256 times as much; at most 1 MiB per stream waits in the send buffer.
///
/// The connection is shared by every client, and what it receives for a stream stays counted
/// against its window until that stream's client reads it. So the connection window must not
/// be a few stream windows (it was 5 MiB for 2 MiB streams, and three clients that stopped
/// reading stopped every response on the connection): it covers 256 stalled streams, more than
/// most servers' stream limit (hyper 200, Go 250, nginx 128). That is also the most a stalled
/// connection can hold in memory, 64 MiB. 256 KiB per stream is still far more than a
/// loopback or in-cluster bandwidth-delay product.
/// An h2c connection's sender, its id, its stream count, and this stream's place among its
/// active streams.
type H2Handle = (h2::client::SendRequest<Bytes>, u64, Arc<std::sync::atomic::AtomicU32>, ActiveStream);

/// A stream's place among its connection's active streams, given back on drop (when the
/// response body ends, or the exchange fails).
#[derive(Debug)]
pub(crate) struct ActiveStream(Arc<AtomicUsize>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

const H2_STREAM_WINDOW: u32 = 256 << 10;
const H2_CONNECTION_WINDOW: u32 = H2_STREAM_WINDOW * 256;
const H2_SEND_BUFFER: usize = 1 << 20;

/// HTTP/1.1 connects in flight at once to one endpoint; more requests wait for one to end.
const MAX_CONNECTING: usize = 64;

/// h2c: dials (TCP, and TLS when the destination asks for it) in flight at once to one
/// endpoint, and connections kept dialled for the next connect.
const MAX_H2_DIALS: usize = 4;

/// h2c: how long a connection dialled for a request that went away waits for the next
/// connect before it is let go.
const SPARE_TTL: Duration = Duration::from_secs(5);

/// The reaper ticks four times per idle timeout; a connection idle for five epochs has been
/// idle for between one and one and a quarter idle timeouts, and is closed. No clock is read
/// on the request path.
const IDLE_EPOCHS: u64 = 5;

pub(crate) struct Upstream {
    addr: UpstreamAddr,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<VecDeque<Idle>>,
    epoch: AtomicU64,
    /// The h2c connections: a new one is opened when every open one is at its peer's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (or the destination's `maxConcurrentStreams`).
    h2: Mutex<Vec<H2Conn>>,
    h2_connecting: tokio::sync::Mutex<()>,
    /// Dials in flight (bounded), and their results that no request waited for.
    h2_dials: Arc<tokio::sync::Semaphore>,
    spare_h2: Mutex<Vec<(std::time::Instant, UpstreamIo)>>,
    max_concurrent_streams: Option<usize>,
    next_h2_id: AtomicU64,
    /// Connects in flight to this endpoint (bounded).
    connecting: Arc<tokio::sync::Semaphore>,
    max_requests_per_connection: Option<u32>,
    keepalive: Option<(Option<u32>, Option<Duration>, Option<Duration>)>,
    /// TLS origination, if the destination asks for it.
    tls: Option<UpstreamTls>,
}

/// The TLS connectors of one endpoint: one offering HTTP/2 by ALPN, one HTTP/1.1.
struct UpstreamTls {
    h2: tokio_rustls::TlsConnector,
    http1: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl UpstreamTls {
    fn new(origination: &Origination, addr: &UpstreamAddr, config: &ProxyConfig) -> Result<Self, BoxError> {
        let host = addr.authority().host().trim_start_matches('[').trim_end_matches(']').to_owned();
        match origination {
            Origination::Mesh { names, service_accounts } => {
                let identity = config
                    .identity
                    .as_ref()
                    .ok_or("ISTIO_MUTUAL origination needs the workload's identity (MeshProxy spec.identity)")?;
                let td = identity.current().trust_domain().clone();
                let expected = if !names.is_empty() {
                    mesh_tls::ExpectedPeer::OneOf(names.iter().map(|n| n.parse()).collect::<Result<_, _>>()?)
                } else if !service_accounts.is_empty() {
                    let ids =
                        service_accounts.iter().map(|(ns, sa)| mesh_core::SpiffeId::for_service_account(&td, ns, sa));
                    mesh_tls::ExpectedPeer::OneOf(ids.collect::<Result<_, _>>()?)
                } else {
                    mesh_tls::ExpectedPeer::AnyInTrustDomain
                };
                let make = |h2| {
                    tokio_rustls::TlsConnector::from(identity.client_config(
                        expected.clone(),
                        mesh_tls::TlsVersions::default(),
                        mesh_tls::mesh_alpn(h2),
                    ))
                };
                // SPIFFE identity is verified, not the name: it is only sent as SNI.
                let name = rustls::pki_types::ServerName::try_from(host)
                    .unwrap_or_else(|_| "mesh.invalid".try_into().expect("valid"));
                Ok(Self { h2: make(true), http1: make(false), name })
            }
            Origination::Files { ca, client, sni, names: _ } => {
                use rustls::pki_types::pem::PemObject;
                let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
                let mut roots = rustls::RootCertStore::empty();
                let ca = ca.clone().unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&read(&ca)?) {
                    roots.add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)?;
                }
                let builder = rustls::ClientConfig::builder_with_provider(mesh_tls::identity::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots);
                let base = match client {
                    Some((cert, key)) => {
                        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&read(cert)?)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| format!("{}: {e}", cert.display()))?;
                        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&read(key)?)
                            .map_err(|e| format!("{}: {e}", key.display()))?;
                        builder.with_client_auth_cert(chain, key)?
                    }
                    None => builder.with_no_client_auth(),
                };
                let make = |alpn: &[u8]| {
                    let mut c = base.clone();
                    c.alpn_protocols = vec![alpn.to_vec()];
                    tokio_rustls::TlsConnector::from(Arc::new(c))
                };
                let name = rustls::pki_types::ServerName::try_from(sni.clone().unwrap_or(host))?;
                Ok(Self { h2: make(b"h2"), http1: make(b"http/1.1"), name })
            }
        }
    }
}

/// A connection to an endpoint: plain TCP, or TLS over it.
pub(crate) enum UpstreamIo {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Upstream {
    /// A pool for one endpoint, `addr`, with a task that closes expired idle connections.
    pub(crate) fn for_addr(addr: UpstreamAddr, config: &ProxyConfig) -> Arc<Self> {
        Self::with_settings(addr, config, &PoolSettings::default()).expect("no TLS, nothing to fail")
    }

    /// A pool for `addr` with a destination's `settings` over the proxy's `config`; fails
    /// when the TLS the settings ask for cannot be set up (no identity, unreadable files).
    pub(crate) fn with_settings(
        addr: UpstreamAddr,
        config: &ProxyConfig,
        settings: &PoolSettings,
    ) -> Result<Arc<Self>, BoxError> {
        let tls = settings.tls.as_ref().map(|o| UpstreamTls::new(o, &addr, config)).transpose()?;
        let pool = Arc::new(Self {
            tls,
            addr,
            connect_timeout: settings.connect_timeout.unwrap_or(config.connect_timeout),
            max_idle: config.max_idle,
            idle: Mutex::new(VecDeque::new()),
            epoch: AtomicU64::new(0),
            h2: Mutex::new(Vec::new()),
            h2_connecting: tokio::sync::Mutex::new(()),
            h2_dials: Arc::new(tokio::sync::Semaphore::new(MAX_H2_DIALS)),
            spare_h2: Mutex::new(Vec::new()),
            max_concurrent_streams: settings.max_concurrent_streams,
            next_h2_id: AtomicU64::new(0),
            connecting: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTING)),
            max_requests_per_connection: settings.max_requests_per_connection,
            keepalive: settings.keepalive,
        });
        tokio::spawn(reap_idle(Arc::downgrade(&pool), settings.idle_timeout.unwrap_or(config.idle_timeout)));
        Ok(pool)
    }

    pub(crate) fn addr(&self) -> &UpstreamAddr {
        &self.addr
    }

    // === HTTP/1.1 ===

    /// Sends `req` on a pooled HTTP/1.1 connection, or a new one. The returned [`Checkout`]
    /// must be released once the response body has ended.
    pub(crate) async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkout), BoxError> {
        while let Some((mut tx, uses)) = self.check_out() {
            match tx.try_send_request(req).await {
                Ok(res) => return Ok((res, Checkout { pool: self.clone(), tx, uses: uses + 1 })),
                Err(mut e) => match e.take_message() {
                    // Not even started (the upstream closed it meanwhile): use the next one.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // Boxed: connecting is the rare path, and its future would otherwise make every
        // request's future (moved into a task per HTTP/2 stream) larger.
        let mut tx = Box::pin(self.clone().connect_http1_detached()).await?;
        let res = tx.send_request(req).await?;
        Ok((res, Checkout { pool: self.clone(), tx, uses: 1 }))
    }

    /// The most recently used idle connection that can take a request right now. One that is
    /// still busy (its response ended before the upstream finished reading the request body)
    /// is let go rather than waited for: hyper closes it once that exchange ends.
    fn check_out(&self) -> Option<(http1::SendRequest<RequestBody>, u32)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(Idle { tx, uses, .. }) = idle.pop_back() {
            if tx.is_ready() {
                return Some((tx, uses));
            }
        }
        None
    }

    fn check_in(&self, tx: http1::SendRequest<RequestBody>, uses: u32) {
        // A connection that carried its share of requests is closed (dropped).
        if tx.is_closed() || self.max_requests_per_connection.is_some_and(|max| uses >= max) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push_back(Idle { tx, epoch: self.epoch.load(Ordering::Relaxed), uses });
        }
    }

    /// Opens a connection on a task of its own, at most [`MAX_CONNECTING`] at a time: if the
    /// request that wanted it goes away (its client reset it, say), the connect still
    /// completes, into the idle pool, instead of being thrown away for the next request to
    /// start again (which turned a burst of cancelled requests into as many connects).
    async fn connect_http1_detached(self: Arc<Self>) -> Result<http1::SendRequest<RequestBody>, BoxError> {
        let permit = self.connecting.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (out, answer) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        tokio::spawn(async move {
            let result = pool.connect_http1().await;
            drop(permit);
            if let Err(Ok(tx)) = out.send(result) {
                // Nobody is waiting any more: the connection goes to the pool.
                pool.check_in(tx, 0);
            }
        });
        answer.await.unwrap_or_else(|_| Err("the upstream connect task ended".into()))
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<RequestBody>, BoxError> {
        let io = self.connect_io(false).await?;
        // One write per message (head and body copied together) is cheaper on TCP than a
        // vectored write of several small buffers.
        // Response heads have the limits request heads have.
        let (tx, conn) = http1::Builder::new()
            .writev(false)
            .max_buf_size(crate::config::MAX_HEAD_BYTES)
            .max_headers(crate::config::MAX_HEADERS)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// Sends an upgrade request on a new HTTP/1.1 connection of its own, which becomes the
    /// upgraded connection if the upstream answers 101.
    pub(crate) async fn send_upgrade(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, BoxError> {
        let io = self.connect_io(false).await?;
        let (mut tx, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        Ok(tx.send_request(req).await?)
    }

    // === h2c ===

    /// Sends `req` on the shared h2c connection, connecting first if there is none. The
    /// request body, if any, is sent by a task of its own, so that it can keep streaming
    /// after the response has arrived.
    pub(crate) async fn send_h2(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<(Response<RecvStream>, ActiveStream), BoxError> {
        let (tx, id, streams, mut active) = match self.current_h2() {
            Some(current) => current,
            None => Box::pin(self.connect_h2()).await?,
        };
        // A connection that carried its share of streams takes no more (they finish on it).
        if self.max_requests_per_connection.is_some_and(|max| streams.fetch_add(1, Ordering::Relaxed) + 1 >= max) {
            self.retire_h2(id);
        }
        let mut tx = match tx.ready().await {
            Ok(tx) => tx,
            // The upstream sent GOAWAY (it is shutting down gracefully), or the connection
            // broke: nothing of this request went out on it, so it goes on a new connection.
            Err(e) => {
                tracing::debug!(error = %e, "upstream h2c connection no longer takes requests; reconnecting");
                self.retire_h2(id);
                let (tx, _, _, again) = Box::pin(self.connect_h2()).await?;
                active = again;
                tx.ready().await?
            }
        };
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let (response, send) = tx.send_request(Request::from_parts(parts, ()), end)?;
        // Until the response arrives, the body's task goes with this exchange: if the exchange
        // is dropped (a timeout, or the client went away), the task is aborted, and with the
        // last handle on the stream gone h2 resets it (CANCEL) instead of leaving it open.
        let body_task = (!end).then(|| {
            AbortOnDropHandle::new(tokio::spawn(async move {
                if let Err(e) = SendBody::new(body, send).await {
                    tracing::debug!(error = %e, "request body to the h2c upstream ended early");
                }
            }))
        });
        let response = response.await;
        // Answered: the rest of the body streams on its own (full duplex).
        if let (Ok(_), Some(task)) = (&response, body_task) {
            task.detach();
        }
        response.map(|res| (res, active)).map_err(|e| {
            // The only stream resets the proxy sends upstream on its own are for a request
            // body that failed: the client's failure, not the upstream's.
            if e.is_reset() && !e.is_remote() && !e.is_library() && e.reason() == Some(h2::Reason::CANCEL) {
                Box::new(ClientBodyError(e.into())) as BoxError
            } else {
                e.into()
            }
        })
    }

    /// An open connection with room for one more stream (which it counts), if there is one.
    fn current_h2(&self) -> Option<H2Handle> {
        let mut conns = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let room = |c: &H2Conn| {
            let active = c.active.load(Ordering::Relaxed);
            // The peer's limit is only asked for once a stream is in flight (it takes h2's
            // lock); until its SETTINGS arrive h2 reports no limit.
            active == 0
                || active < c.tx.current_max_send_streams().min(self.max_concurrent_streams.unwrap_or(usize::MAX))
        };
        let c = conns.iter().find(|c| room(c))?;
        c.active.fetch_add(1, Ordering::Relaxed);
        Some((c.tx.clone(), c.id, c.streams.clone(), ActiveStream(c.active.clone())))
    }

    /// Stops using connection `id` for new requests.
    fn retire_h2(&self, id: u64) {
        let conns = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.iter().find(|c| c.id == id) {
            c.closed.store(true, Ordering::Release);
        }
    }

    async fn connect_h2(self: &Arc<Self>) -> Result<H2Handle, BoxError> {
        // One connection attempt at a time; latecomers reuse its result.
        let _connecting = self.h2_connecting.lock().await;
        if let Some(current) = self.current_h2() {
            return Ok(current);
        }
        // Every open connection (if any) is full: one more. The handshake is made here, with
        // the request, so that what the upstream answers reaches it as it did.
        let io = self.dial_h2().await?;
        let (tx, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_SEND_BUFFER)
            .max_header_list_size(crate::config::MAX_HEAD_BYTES as u32)
            .handshake(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2c connection ended with an error");
            }
            ended.store(true, Ordering::Release);
        });
        let id = self.next_h2_id.fetch_add(1, Ordering::Relaxed);
        let streams = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let active = Arc::new(AtomicUsize::new(1));
        let conn = H2Conn { tx: tx.clone(), closed, streams: streams.clone(), active: active.clone(), id };
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok((tx, id, streams, ActiveStream(active)))
    }

    /// A connection for a new h2c connection: one dialled earlier for a request that went
    /// away meanwhile, or a new one, dialled on a task of its own (at most [`MAX_H2_DIALS`]
    /// at a time) so that a request cancelled while it connects does not throw the connect
    /// away for the next request to start again; that connect is kept for the next.
    async fn dial_h2(self: &Arc<Self>) -> Result<UpstreamIo, ConnectError> {
        if let Some(io) = self.take_spare_h2() {
            return Ok(io);
        }
        let permit = self.h2_dials.clone().acquire_owned().await.expect("the semaphore is never closed");
        // A dial that ended while this waited may have left its connection.
        if let Some(io) = self.take_spare_h2() {
            return Ok(io);
        }
        let (out, answer) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        tokio::spawn(async move {
            let result = pool.connect_io(true).await;
            if let Err(Ok(io)) = out.send(result) {
                let mut spare = pool.spare_h2.lock().unwrap_or_else(|p| p.into_inner());
                if spare.len() < MAX_H2_DIALS {
                    spare.push((std::time::Instant::now(), io));
                }
            }
            // Only now: a request waiting for the permit finds the spare first.
            drop(permit);
        });
        answer.await.unwrap_or_else(|_| Err(ConnectError::new(io::Error::other("the upstream connect task ended"))))
    }

    fn take_spare_h2(&self) -> Option<UpstreamIo> {
        let mut spare = self.spare_h2.lock().unwrap_or_else(|p| p.into_inner());
        spare.retain(|(at, _)| at.elapsed() < SPARE_TTL);
        spare.pop().map(|(_, io)| io)
    }

    // === TCP ===

    /// A TCP connection, with the TLS handshake when the destination asks for TLS (offering
    /// HTTP/2 by ALPN when `h2`). A failed handshake is a connect failure (`UF`).
    async fn connect_io(&self, h2: bool) -> Result<UpstreamIo, ConnectError> {
        let tcp = self.connect_tcp().await?;
        let Some(tls) = &self.tls else { return Ok(UpstreamIo::Tcp(tcp)) };
        let connector = if h2 { &tls.h2 } else { &tls.http1 };
        let handshake = connector.connect(tls.name.clone(), tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(stream)) => Ok(UpstreamIo::Tls(Box::new(stream))),
            Ok(Err(e)) => Err(ConnectError::new(e)),
            Err(_) => Err(ConnectError::new(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))),
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, ConnectError> {
        let connect = TcpStream::connect(self.addr.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectError::new(e)),
            Err(_) => {
                let msg = format!("connect timed out after {:?}", self.connect_timeout);
                return Err(ConnectError::new(io::Error::new(io::ErrorKind::TimedOut, msg)));
            }
        };
        stream.set_nodelay(true).map_err(ConnectError::new)?;
        if let Some((probes, time, interval)) = self.keepalive {
            let mut keepalive = socket2::TcpKeepalive::new();
            if let Some(time) = time {
                keepalive = keepalive.with_time(time);
            }
            if let Some(interval) = interval {
                keepalive = keepalive.with_interval(interval);
            }
            if let Some(probes) = probes {
                keepalive = keepalive.with_retries(probes);
            }
            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive).map_err(ConnectError::new)?;
        }
        Ok(stream)
    }
}

/// Counts the upgraded (tunnelled) connections that are open, so that a drain can wait for
/// them: unlike an HTTP exchange, a tunnel cannot be asked to finish, so it is given until the
/// drain timeout to end by itself.
#[derive(Default)]
pub(crate) struct Tunnels {
    open: AtomicUsize,
    all_closed: tokio::sync::Notify,
}

impl Tunnels {
    /// One more tunnel is open until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> TunnelGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        TunnelGuard(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Completes once no tunnel is open.
    pub(crate) async fn all_closed(&self) {
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read: a last close in between is not missed.
            closed.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// An open tunnel, counted in [`Tunnels`].
pub(crate) struct TunnelGuard(Arc<Tunnels>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// Closes idle connections past their idle timeout (see [`IDLE_EPOCHS`]) or closed by the
/// upstream, until the pool is dropped.
async fn reap_idle(pool: Weak<Upstream>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let epoch = pool.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        pool.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| epoch - i.epoch < IDLE_EPOCHS && !i.tx.is_closed());
        // Dialled connections no connect took are closed once too old to hand out.
        pool.spare_h2.lock().unwrap_or_else(|p| p.into_inner()).retain(|(at, _)| at.elapsed() < SPARE_TTL);
    }
}
