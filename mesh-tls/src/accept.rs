//! Accepting connections as PeerAuthentication says: STRICT (mTLS only), PERMISSIVE (mTLS or
//! plaintext, told apart by the first bytes), DISABLE (plaintext).
//!
//! [`MeshAcceptor::accept`] reads the first bytes of a connection. A TLS handshake record
//! (`0x16`) starts TLS; anything else is plaintext. Under PERMISSIVE, TLS whose ClientHello
//! offers none of Istio's in-mesh ALPN tokens ([`ISTIO_ALPNS`](crate::ISTIO_ALPNS)) is the
//! application's own TLS and is handed back untouched ([`Accepted::Opaque`]), as Istio's
//! passthrough filter chain does. The bytes read are never lost: every variant replays them.
//!
//! The caller bounds the time a connection may take to open (a timeout around `accept`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use mesh_core::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::config::{TlsVersions, is_mesh_alpn};
use crate::identity::Identity;
use crate::svid::leaf_svid;

/// The mTLS mode of a port (PeerAuthentication `mtls.mode`, resolved: `UNSET` inherits, and
/// nothing set means PERMISSIVE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// mTLS only: plaintext connections are closed.
    Strict,
    /// mTLS for mesh peers, plaintext for the rest.
    #[default]
    Permissive,
    /// Plaintext only; TLS is passed through to the application.
    Disable,
}

/// The longest ClientHello read before giving up (a hello of several records, with large
/// extensions, stays far below).
const MAX_HELLO: usize = 64 << 10;

/// Why a connection was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// Plaintext under STRICT.
    #[error("plaintext connection refused: mTLS is STRICT")]
    PlaintextRefused,
    /// The client closed before sending anything.
    #[error("the client closed the connection before sending anything")]
    Closed,
    /// Reading or writing failed (the handshake included).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The ClientHello was malformed.
    #[error("bad TLS ClientHello: {0}")]
    Hello(rustls::Error),
    /// The peer's certificate was accepted by the verifier but is not an SVID (cannot happen
    /// with this crate's verifier; kept for custom configurations).
    #[error(transparent)]
    Svid(#[from] crate::SvidError),
}

/// A connection as [`MeshAcceptor::accept`] hands it over.
#[derive(Debug)]
pub enum Accepted<IO> {
    /// mTLS terminated; the peer's identity verified.
    Mtls(Box<MtlsStream<IO>>),
    /// Plaintext, with the bytes read replayed.
    Plaintext(Rewind<IO>),
    /// TLS that is not the mesh's (PERMISSIVE without an Istio ALPN token, or DISABLE): to be
    /// passed through as opaque TCP, with the bytes read replayed.
    Opaque(Rewind<IO>),
}

/// Accepts connections for one port's mTLS mode with one identity.
#[derive(Clone)]
pub struct MeshAcceptor {
    mode: MtlsMode,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for MeshAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshAcceptor").field("mode", &self.mode).field("tls", &self.tls.is_some()).finish()
    }
}

impl MeshAcceptor {
    /// An acceptor for `mode`, terminating mTLS with `identity` (TLS 1.3 only).
    pub fn new(mode: MtlsMode, identity: &Identity) -> Self {
        Self::with_config(mode, identity.server_config(TlsVersions::default()))
    }

    /// The same with a server configuration of the caller's (it should require and verify
    /// client certificates, as [`Identity::server_config`] does).
    pub fn with_config(mode: MtlsMode, config: Arc<rustls::ServerConfig>) -> Self {
        Self { mode, tls: Some(tokio_rustls::TlsAcceptor::from(config)) }
    }

    /// A plaintext-only acceptor (DISABLE without credentials).
    pub fn plaintext() -> Self {
        Self { mode: MtlsMode::Disable, tls: None }
    }

    /// The mode.
    pub fn mode(&self) -> MtlsMode {
        self.mode
    }

    /// Reads the start of the connection and accepts it as the mode says.
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(&self, mut io: IO) -> Result<Accepted<IO>, AcceptError> {
        let mut buf = BytesMut::with_capacity(2048);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(AcceptError::Closed);
        }
        // A TLS record of type handshake; no HTTP/1.x method or h2 preface starts with 0x16.
        if buf[0] != 0x16 {
            return match self.mode {
                MtlsMode::Strict => Err(AcceptError::PlaintextRefused),
                _ => Ok(Accepted::Plaintext(Rewind::new(buf.freeze(), io))),
            };
        }
        let tls = match (&self.tls, self.mode) {
            (Some(tls), MtlsMode::Strict | MtlsMode::Permissive) => tls,
            _ => return Ok(Accepted::Opaque(Rewind::new(buf.freeze(), io))),
        };
        let mut hello = rustls::server::Acceptor::default();
        let mut fed = 0;
        let mesh = loop {
            while fed < buf.len() {
                match hello.read_tls(&mut &buf[fed..]) {
                    Ok(0) => break,
                    Ok(n) => fed += n,
                    Err(e) => return Err(AcceptError::Io(e)),
                }
            }
            match hello.accept() {
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    break self.mode == MtlsMode::Strict || hello.alpn().is_some_and(is_mesh_alpn);
                }
                Ok(None) if buf.len() < MAX_HELLO => {
                    if io.read_buf(&mut buf).await? == 0 {
                        return Err(AcceptError::Closed);
                    }
                }
                Ok(None) => return Err(AcceptError::Hello(rustls::Error::General("ClientHello too large".into()))),
                Err((e, _)) => return Err(AcceptError::Hello(e)),
            }
        };
        let rewound = Rewind::new(buf.freeze(), io);
        if !mesh {
            return Ok(Accepted::Opaque(rewound));
        }
        // The hello is parsed a second time by the real handshake: microseconds, and no
        // private rustls API.
        let stream = tls.accept(rewound).await?;
        let (_, session) = stream.get_ref();
        let leaf = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"))?;
        let peer = leaf_svid(leaf)?.id;
        let sni = session.server_name().map(Arc::from);
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        Ok(Accepted::Mtls(Box::new(MtlsStream { stream, peer, sni, alpn })))
    }
}

pin_project_lite::pin_project! {
    /// An mTLS server connection with its verified peer.
    #[derive(Debug)]
    pub struct MtlsStream<IO> {
        #[pin]
        stream: tokio_rustls::server::TlsStream<Rewind<IO>>,
        peer: SpiffeId,
        sni: Option<Arc<str>>,
        alpn: Option<Vec<u8>>,
    }
}

impl<IO> MtlsStream<IO> {
    /// The client's SPIFFE ID.
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }

    /// The server name the client asked for.
    pub fn sni(&self) -> Option<&Arc<str>> {
        self.sni.as_ref()
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// Whether the negotiated protocol is HTTP/2 (`h2` or `istio-h2`); otherwise the caller
    /// sniffs.
    pub fn is_h2(&self) -> bool {
        matches!(self.alpn.as_deref(), Some(b"h2" | b"istio-h2"))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MtlsStream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MtlsStream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// An I/O object whose reads first return bytes already read from it.
    #[derive(Debug)]
    pub struct Rewind<IO> {
        prefix: Bytes,
        #[pin]
        io: IO,
    }
}

impl<IO> Rewind<IO> {
    /// `io`, with `prefix` to be read first.
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }

    /// The bytes not yet replayed, and the I/O object.
    pub fn into_parts(self) -> (Bytes, IO) {
        (self.prefix, self.io)
    }

    /// The I/O object.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead> AsyncRead for Rewind<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.io.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for Rewind<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Records a connection's peer on every request served on it: the [`mesh_core::PeerIdentity`] of an
/// mTLS peer (which [`crate::authz::AuthorizationLayer`] reads) and its
/// [`mesh_core::ClientConnection`] (addresses and SNI, for `ipBlocks`, `destination.port` and
/// `connection.sni`). Wrap the per-connection service with it:
///
/// ```no_run
/// # async fn run(acceptor: mesh_tls::MeshAcceptor, app: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::service::TowerToHyperService;
/// use mesh_tls::{Accepted, PeerLayer};
/// use tower::Layer;
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
/// loop {
///     let (tcp, peer) = listener.accept().await?;
///     let local = tcp.local_addr()?;
///     let (acceptor, app) = (acceptor.clone(), app.clone());
///     tokio::spawn(async move {
///         let Ok(Accepted::Mtls(tls)) = acceptor.accept(tcp).await else { return };
///         let service = PeerLayer::for_mtls(&tls, peer, local).layer(app);
///         let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
///             .serve_connection(TokioIo::new(*tls), TowerToHyperService::new(service))
///             .await;
///     });
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PeerLayer {
    peer: Option<mesh_core::PeerIdentity>,
    connection: mesh_core::ClientConnection,
}

impl PeerLayer {
    /// For an mTLS connection from `peer` accepted on `local`.
    pub fn for_mtls<IO>(stream: &MtlsStream<IO>, peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Self {
        let connection = mesh_core::ClientConnection::new(peer, local);
        let connection = match stream.sni() {
            Some(sni) => connection.with_sni(sni.clone()),
            None => connection,
        };
        Self { peer: Some(mesh_core::PeerIdentity(stream.peer().clone())), connection }
    }

    /// For a plaintext connection (no identity).
    pub fn plaintext(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Self {
        Self { peer: None, connection: mesh_core::ClientConnection::new(peer, local) }
    }
}

impl<S> tower::Layer<S> for PeerLayer {
    type Service = WithPeer<S>;
    fn layer(&self, inner: S) -> WithPeer<S> {
        WithPeer { inner, layer: self.clone() }
    }
}

/// The service of [`PeerLayer`].
#[derive(Debug, Clone)]
pub struct WithPeer<S> {
    inner: S,
    layer: PeerLayer,
}

impl<S, B> tower::Service<http::Request<B>> for WithPeer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(peer) = &self.layer.peer {
            req.extensions_mut().insert(peer.clone());
        }
        req.extensions_mut().insert(self.layer.connection.clone());
        self.inner.call(req)
    }
}
