//! Test peers: certificates made with openssl, and a server that answers with the peer
//! identity it saw.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tls::{Accepted, MeshAcceptor};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Runs `openssl-certs.sh` into a fresh temporary directory.
pub fn openssl_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openssl-certs.sh");
    let status = std::process::Command::new("sh").arg(script).arg(dir.path()).status().unwrap();
    assert!(status.success(), "openssl-certs.sh failed");
    dir
}

pub fn pem(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// Credentials from openssl files `name.pem`, `name.key` and `ca.pem`.
pub fn files(dir: &Path, name: &str) -> mesh_tls::CredentialFiles {
    mesh_tls::CredentialFiles {
        cert_chain: dir.join(format!("{name}.pem")),
        private_key: dir.join(format!("{name}.key")),
        trust_bundle: dir.join("ca.pem"),
    }
}

pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// What the test server saw of each connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Opaque,
    Refused(String),
}

/// Serves HTTP on every accepted connection, answering `<peer or none> <version>`; reports
/// opaque and refused connections on the channel.
pub async fn server(acceptor: MeshAcceptor) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(Accepted::Mtls(stream)) => {
                        let peer = stream.peer().to_string();
                        serve_http(TokioIo::new(*stream), Some(peer)).await;
                    }
                    Ok(Accepted::Plaintext(io)) => serve_http(TokioIo::new(io), None).await,
                    Ok(Accepted::Opaque(_)) => {
                        let _ = tx.send(Seen::Opaque);
                    }
                    Err(e) => {
                        let _ = tx.send(Seen::Refused(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn serve_http<I>(io: TokioIo<I>, peer: Option<String>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer: Arc<str> = peer.unwrap_or_else(|| "none".into()).into();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let body = format!("{} {:?}", peer, req.version());
        async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
}
