//! mesh-proxy's HTTP/1.1 request handling on structured requests: each input becomes one
//! request (method, target, version, header fields, body framing and body, all arbitrary
//! bytes where a peer could send any) written to a real routed mesh-proxy server on
//! 127.0.0.1, in front of a loopback backend that answers 200. The proxy must not panic (the
//! panic hook aborts, so a panic in any of its tasks is a crash) and must answer whatever it
//! answers with a well-formed status line that is never a 500: a malformed request is the
//! client's fault (4xx), a backend that cannot be reached a 502 / 503 / 504.
#![no_main]
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Put,
    Head,
    Options,
    Connect,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Framing {
    None,
    Length,
    WrongLength(u16),
    Chunked,
    ChunkedAndLength,
    RawChunks(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: Method,
    target: Vec<u8>,
    /// 0: HTTP/1.1, 1: HTTP/1.0, anything else: as written.
    version: (u8, Vec<u8>),
    host: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    framing: Framing,
    body: Vec<u8>,
    /// Bytes after the request (a pipelined one, or garbage).
    tail: Vec<u8>,
}

impl Request {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.method {
            Method::Get => out.extend_from_slice(b"GET"),
            Method::Post => out.extend_from_slice(b"POST"),
            Method::Put => out.extend_from_slice(b"PUT"),
            Method::Head => out.extend_from_slice(b"HEAD"),
            Method::Options => out.extend_from_slice(b"OPTIONS"),
            Method::Connect => out.extend_from_slice(b"CONNECT"),
            Method::Raw(m) => out.extend_from_slice(m),
        }
        out.push(b' ');
        if self.target.is_empty() {
            out.push(b'/');
        } else {
            out.extend_from_slice(&self.target);
        }
        out.push(b' ');
        match self.version.0 {
            0 => out.extend_from_slice(b"HTTP/1.1"),
            1 => out.extend_from_slice(b"HTTP/1.0"),
            _ => out.extend_from_slice(&self.version.1),
        }
        out.extend_from_slice(b"\r\n");
        if let Some(host) = &self.host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(host);
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let length = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        let chunked = |out: &mut Vec<u8>| out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        match &self.framing {
            Framing::None => out.extend_from_slice(b"\r\n"),
            Framing::Length => {
                length(&mut out, self.body.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&self.body);
            }
            Framing::WrongLength(n) => {
                length(&mut out, usize::from(*n));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&self.body);
            }
            Framing::Chunked | Framing::ChunkedAndLength => {
                chunked(&mut out);
                if matches!(self.framing, Framing::ChunkedAndLength) {
                    length(&mut out, self.body.len());
                }
                out.extend_from_slice(b"\r\n");
                if !self.body.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                    out.extend_from_slice(&self.body);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Framing::RawChunks(raw) => {
                chunked(&mut out);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(raw);
            }
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

/// The proxy's address, started once: a routed mesh-proxy in front of a backend answering 200.
fn proxy() -> SocketAddr {
    static PROXY: OnceLock<SocketAddr> = OnceLock::new();
    *PROXY.get_or_init(|| {
        // A panic in any task is a crash, not a dropped connection.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let backend_addr = backend.local_addr().unwrap();
                tokio::spawn(async move {
                    loop {
                        let Ok((stream, _)) = backend.accept().await else { continue };
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(|_req| async {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                ))
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        });
                    }
                });
                let yaml = format!(
                    r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend]
  ports: [{{number: 80, name: http}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: all}}
spec:
  hosts: ["*"]
  http:
  - match: [{{headers: {{x-canary: {{regex: "t.*e"}}}}}}, {{uri: {{prefix: /v2}}}}]
    route: [{{destination: {{host: backend}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
  - route: [{{destination: {{host: backend}}, weight: 90}}, {{destination: {{host: backend}}, weight: 10}}]
"#,
                    port = backend_addr.port()
                );
                let mut loaded = mesh_proxy::loader::Loaded::default();
                mesh_proxy::loader::load_text(Path::new("fuzz.yaml"), &yaml, &mut loaded);
                assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
                let snapshot = mesh_proxy::snapshot::compile(loaded.resources).unwrap();
                let mut config = mesh_proxy::ProxyConfig::default();
                config.listen = "127.0.0.1:0".parse().unwrap();
                config.admin = None;
                config.request_headers_timeout = Some(Duration::from_secs(1));
                let server = mesh_proxy::Server::bind_routed(config, Some(snapshot)).await.unwrap();
                tx.send(server.local_addr()).unwrap();
                server.serve(std::future::pending()).await;
            });
        });
        rx.recv().unwrap()
    })
}

fuzz_target!(|req: Request| {
    let addr = proxy();
    let bytes = req.bytes();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    // Closed without an answer (an unparseable head may be), or a client that opened with
    // `PRI` and got HTTP/2 frames (h2c by prior knowledge is told apart by those bytes).
    if answer.is_empty() || bytes.starts_with(b"PRI") {
        return;
    }
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .unwrap_or_else(|| panic!("not a status line: {head:?}"));
    assert_ne!(status, "500", "an internal error for {req:?}");
});
