//! What the end-to-end tests share: backends, the proxy process, a keep-alive client.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// A backend answering every request with its name.
pub async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{name} {path}")))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The inbound listener, when the configuration has one.
    pub inbound: Option<SocketAddr>,
    /// The gateway listeners, by Gateway port number.
    pub gateways: Vec<(u16, SocketAddr)>,
}

impl Proxy {
    /// The address of the gateway listener for Gateway port `port`.
    pub fn gateway(&self, port: u16) -> SocketAddr {
        self.gateways.iter().find(|(p, _)| *p == port).map(|(_, a)| *a).expect("a gateway listener on that port")
    }
}

impl Proxy {
    pub fn start(config: &Path) -> Proxy {
        Self::start_logging(config, Stdio::inherit())
    }

    /// Starts the proxy with its log (at `warn`) going to `log`.
    pub fn start_logging(config: &Path, log: Stdio) -> Proxy {
        Self::start_with(config, log, &[])
    }

    /// The same with more arguments.
    pub fn start_with(config: &Path, log: Stdio, extra: &[&str]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--config"])
            .arg(config)
            .args(extra)
            .env("MESH_PROXY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start mesh-proxy");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let after = |line: &str, marker: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(marker)? + marker.len()..];
            rest.split_whitespace().next()?.parse().ok()
        };
        let (mut addr, mut inbound, mut gateways) = (None, None, Vec::new());
        // The banner: the listener, the inbound listener (if any), then the admin server.
        let admin = loop {
            let line = lines.next().expect("a banner line").expect("readable stdout");
            addr = addr.or_else(|| after(&line, "listening on http://"));
            inbound = inbound.or_else(|| after(&line, "inbound on "));
            if let Some(rest) = line.strip_prefix("mesh-proxy: gateway port ")
                && let Some((port, at)) = rest.split_once(" on ")
            {
                gateways.push((port.parse().expect("a port"), at.parse().expect("an address")));
            }
            if let Some(admin) = after(&line, "admin on http://") {
                break admin;
            }
        };
        Proxy { child, addr: addr.expect("the listener's address"), admin, inbound, gateways }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Client(pub hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Client(tx)
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let mut req = Request::get(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.0.ready().await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), self.0.send_request(req.body(Empty::new()).unwrap()))
            .await
            .expect("answered in time")
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

pub async fn admin(addr: SocketAddr, path: &str) -> String {
    Client::connect(addr).await.get("admin", path, &[]).await.1
}

pub fn config_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-proxy-routing-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A ServiceEntry for `name` with one endpoint, 127.0.0.1:`port`, ending in a document
/// separator.
pub fn service_entry(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}]\n  ports: [{{number: 80, name: http}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]\n---\n"
    )
}

/// Writes `text` to `dir/name` atomically (a new file renamed over the old), as editors and
/// Kubernetes volume updates do.
pub fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// An application speaking HTTP/1.1 and h2c that answers each request with `describe(req)`.
pub async fn app(describe: fn(&Request<Incoming>) -> String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = describe(&req);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A request header's value, or "".
pub fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// The openssl-made certificates of mesh-tls's tests (`openssl-certs.sh`), into `dir`.
pub fn openssl_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-tls/tests/openssl-certs.sh");
    let status = Command::new("sh").arg(script).arg(dir).stdout(Stdio::null()).status().unwrap();
    assert!(status.success());
}

/// The sum of the samples of `name` on the admin server's `/metrics` (0 when absent).
pub async fn metric(admin_addr: SocketAddr, name: &str) -> f64 {
    let text = admin(admin_addr, "/metrics").await;
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
