//! mTLS origination for hyper-util clients: [`MtlsConnector`] wraps a connector (hyper-util's
//! `HttpConnector` by default), makes the TLS handshake with the workload's identity and
//! verifies the server's SPIFFE ID against what the client expects.
//!
//! ```no_run
//! # async fn run(identity: mesh_tls::Identity) -> Result<(), Box<dyn std::error::Error>> {
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use mesh_tls::{ExpectedPeer, MtlsConnector};
//!
//! let reviews = "spiffe://cluster.local/ns/shop/sa/reviews".parse()?;
//! let connector = MtlsConnector::new(HttpConnector::new(), &identity, ExpectedPeer::id(reviews), false);
//! let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
//!     Client::builder(TokioExecutor::new()).build(connector);
//! let res = client.get("http://127.0.0.1:9443/api".parse()?).await?;
//! # let _ = res; Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::{ExpectedPeer, TlsVersions, mesh_alpn};
use crate::identity::Identity;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector that originates mTLS over the connections `C` opens (see the module docs).
#[derive(Clone)]
pub struct MtlsConnector<C> {
    inner: C,
    tls: tokio_rustls::TlsConnector,
}

impl<C: std::fmt::Debug> std::fmt::Debug for MtlsConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsConnector").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<C> MtlsConnector<C> {
    /// Originates mTLS with `identity`, accepting servers that are `expected`; offers the
    /// mesh ALPN for HTTP/2 when `h2` (build the client with `http2_only(true)` then), for
    /// HTTP/1.1 otherwise.
    pub fn new(inner: C, identity: &Identity, expected: ExpectedPeer, h2: bool) -> Self {
        Self::with_config(inner, identity.client_config(expected, TlsVersions::default(), mesh_alpn(h2)))
    }

    /// The same with a client configuration of the caller's.
    pub fn with_config(inner: C, config: Arc<rustls::ClientConfig>) -> Self {
        Self { inner, tls: tokio_rustls::TlsConnector::from(config) }
    }
}

impl<C> tower::Service<Uri> for MtlsConnector<C>
where
    C: tower::Service<Uri, Response = TokioIo<TcpStream>> + Send,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = MtlsConnection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MtlsConnection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
        let connecting = self.inner.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await.map_err(Into::into)?.into_inner();
            // SPIFFE identity, not the name, is verified; the name is only sent as SNI.
            let name = ServerName::try_from(host)
                .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a valid DNS name"));
            let stream = tls.connect(name, tcp).await?;
            Ok(MtlsConnection(TokioIo::new(stream)))
        })
    }
}

/// A client mTLS connection made by [`MtlsConnector`].
#[derive(Debug)]
pub struct MtlsConnection(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl MtlsConnection {
    /// The server's certificate chain, leaf first.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.0.inner().get_ref().1.peer_certificates()
    }
}

impl Connection for MtlsConnection {
    fn connected(&self) -> Connected {
        let (tcp, session) = self.0.inner().get_ref();
        let connected = tcp.connected();
        match session.alpn_protocol() {
            Some(b"h2" | b"istio-h2") => connected.negotiated_h2(),
            _ => connected,
        }
    }
}

impl hyper::rt::Read for MtlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
