//! End-to-end tests of the `mesh-proxy` binary: a real process, real sockets on 127.0.0.1,
//! real HTTP/1.1 and h2c clients and upstream servers.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// === the proxy process ===

struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        Self::start_logging_to(upstream, extra, Stdio::inherit())
    }

    fn start_logging_to(upstream: SocketAddr, extra: &[&str], stderr: Stdio) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", &upstream.to_string()])
            .args(extra)
            .env("MESH_PROXY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start mesh-proxy");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr_after = |marker: &str| -> SocketAddr {
            let line = lines.next().expect("a banner line").expect("readable stdout");
            let rest = &line[line.find(marker).unwrap_or_else(|| panic!("`{marker}` in `{line}`")) + marker.len()..];
            rest.split_whitespace().next().unwrap().parse().unwrap()
        };
        let addr = addr_after("listening on http://");
        let admin = addr_after("admin on http://");
        Proxy { child, addr, admin }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn terminate(&self) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mesh-proxy did not exit");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === upstream servers ===

type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFut + Send + Sync>;
type BoxFut = std::pin::Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>>;
type BoxBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(handler: Handler) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), handler).await
    }

    async fn start_on(addr: SocketAddr, handler: Handler) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, connections, task }
    }

    /// Kills the server and every connection it has open.
    fn kill(self) -> SocketAddr {
        self.task.abort();
        self.addr
    }
}

/// Echoes the request: method, path, headers it saw (as `x-seen-*`), body and trailers.
fn echo() -> Handler {
    Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let mut res = Response::builder()
                .header("x-seen-method", parts.method.as_str())
                .header("x-seen-path", parts.uri.path_and_query().map_or("", |p| p.as_str()))
                .header("x-seen-version", format!("{:?}", parts.version))
                .header("connection", "x-hop")
                .header("x-hop", "must not reach the client")
                .header("keep-alive", "timeout=5");
            let host = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| parts.headers.get("host").map(|h| h.to_str().unwrap().to_string()));
            res = res.header("x-seen-host", host.unwrap_or_default());
            let cookies: Vec<_> = parts.headers.get_all("cookie").iter().map(|c| c.to_str().unwrap()).collect();
            res = res.header("x-seen-cookie", cookies.join(" | "));
            for name in parts.headers.keys() {
                res = res.header(format!("x-seen-{name}"), "1");
            }
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            let trailers = trailers.map(|mut t| {
                t.insert("x-echoed-trailer", "yes".parse().unwrap());
                Frame::trailers(t)
            });
            res.body(frames(std::iter::once(Frame::data(data)).chain(trailers))).unwrap()
        })
    })
}

/// A body made of the frames an iterator yields, polled one at a time.
struct Frames<I>(I);

impl<I: Iterator<Item = Frame<Bytes>> + Unpin> http_body::Body for Frames<I> {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.next().map(Ok))
    }
}

fn frames(i: impl Iterator<Item = Frame<Bytes>> + Unpin + Send + Sync + 'static) -> BoxBody {
    Frames(i).boxed()
}

// === clients ===

async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<BoxBody> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    tx
}

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<BoxBody> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    tx
}

/// A `GET /` on an open HTTP/1.1 connection, answered 200 and read to the end.
async fn get_on(tx: &mut hyper::client::conn::http1::SendRequest<BoxBody>) {
    tx.ready().await.unwrap();
    let res = tx.send_request(Request::get("/").header("host", "x").body(full("")).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
}

async fn get(proxy: &Proxy, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    get_owned(proxy.addr, path.to_owned()).await
}

async fn admin_status(proxy: &Proxy, path: &str) -> Option<StatusCode> {
    let io = TokioIo::new(TcpStream::connect(proxy.admin).await.ok()?);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "admin").body(full("")).unwrap();
    Some(tx.send_request(req).await.ok()?.status())
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_http1_with_body_and_strips_hop_by_hop_headers() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);

    let mut tx = h1_client(proxy.addr).await;
    for i in 0..5 {
        let req = Request::post(format!("/items?n={i}"))
            .header("host", "shop.test")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "hop")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept")
            .body(full(format!("payload {i}")))
            .unwrap();
        tx.ready().await.unwrap();
        let res = tx.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers().clone();
        assert_eq!(h["x-seen-method"], "POST");
        assert_eq!(h["x-seen-path"], format!("/items?n={i}").as_str());
        assert_eq!(h["x-seen-host"], "shop.test");
        assert_eq!(h["x-seen-version"], "HTTP/1.1");
        assert!(h.contains_key("x-seen-x-end-to-end"));
        for hop in ["x-seen-x-private", "x-seen-keep-alive", "x-seen-connection"] {
            assert!(!h.contains_key(hop), "{hop} reached the upstream");
        }
        // ... and in the other direction.
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), format!("payload {i}"));
    }
    // Sequential requests reuse one pooled upstream connection.
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_h2c_with_trailers_end_to_end() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    let mut tx = h2_client(proxy.addr).await;

    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let body =
        frames(vec![Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello")), Frame::trailers(trailers)].into_iter());
    let req = Request::post("http://grpc.test/pkg.Svc/Call")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-seen-version"], "HTTP/2.0", "downstream protocol: h2c upstream");
    assert_eq!(res.headers()["x-seen-host"], "grpc.test");
    assert!(res.headers().contains_key("x-seen-te"), "te: trailers is end-to-end");
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echoed-trailer"], "yes");
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x05hello"[..]);

    // Many concurrent streams on one downstream connection.
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("http://grpc.test/{i}")).body(full("")).unwrap();
            let res = tx.send_request(req).await.unwrap();
            res.headers()["x-seen-path"].to_str().unwrap().to_string()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), format!("/{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translates_between_http1_and_h2c() {
    let upstream = Upstream::start(echo()).await;

    // HTTP/1.1 in, h2c out: the host header becomes :authority.
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "h2"]);
    let (status, h, _) = get(&proxy, "/a?b=c").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["x-seen-version"], "HTTP/2.0");
    assert_eq!(h["x-seen-host"], "app.test");
    assert_eq!(h["x-seen-path"], "/a?b=c");
    drop(proxy);

    // h2c in, HTTP/1.1 out: :authority becomes the host header.
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "http1"]);
    let mut tx = h2_client(proxy.addr).await;
    let req = Request::get("http://api.test/v1").body(full("")).unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.headers()["x-seen-version"], "HTTP/1.1");
    assert_eq!(res.headers()["x-seen-host"], "api.test");

    // HTTP/2 cookie crumbs become one HTTP/1.1 `cookie` header (RFC 9113 section 8.2.3); an
    // h2c upstream may get them as they came.
    let crumbs = || {
        Request::get("http://api.test/v1")
            .header("cookie", "a=b")
            .header("cookie", "user=jason")
            .body(full(""))
            .unwrap()
    };
    let res = tx.send_request(crumbs()).await.unwrap();
    assert_eq!(res.headers()["x-seen-cookie"], "a=b; user=jason");
    drop(proxy);
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "h2"]);
    let mut tx = h2_client(proxy.addr).await;
    let res = tx.send_request(crumbs()).await.unwrap();
    assert_eq!(res.headers()["x-seen-version"], "HTTP/2.0");
    assert_eq!(res.headers()["x-seen-cookie"], "a=b | user=jason");
}

/// A GET (or HEAD) with a body of unknown length keeps its body on the way to an HTTP/1.1
/// upstream: chunked from an HTTP/1.1 client, DATA without `content-length` from an h2c one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_bodies_of_unknown_length_reach_an_http1_upstream() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "http1"]);

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /_search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    client.write_all(b"7\r\n{\"q\":1}\r\n0\r\n\r\n").await.unwrap();
    let answer = String::from_utf8(read_until_closed(&mut client).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("x-seen-transfer-encoding: 1\r\n"), "{answer}");
    assert!(answer.contains("\r\n7\r\n{\"q\":1}\r\n0\r\n\r\n"), "the body came back: {answer}");

    let mut tx = h2_client(proxy.addr).await;
    let body =
        frames([Frame::data(Bytes::from_static(b"{\"q\":")), Frame::data(Bytes::from_static(b"2}"))].into_iter());
    let res = tx.send_request(Request::get("http://api.test/_search").body(body).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("x-seen-content-length"));
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), &b"{\"q\":2}"[..]);

    // Without a body, nothing is added.
    let res = tx.send_request(Request::get("http://api.test/").body(full("")).unwrap()).await.unwrap();
    assert!(!res.headers().contains_key("x-seen-transfer-encoding"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mb_each_way_without_buffering() {
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    // Upstream: counts what it receives, then streams TOTAL bytes back.
    let handler: Handler = Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let mut body = req.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                received += frame.unwrap().data_ref().map_or(0, |d| d.len());
            }
            let chunks = (0..TOTAL / CHUNK).map(|_| Frame::data(Bytes::from(vec![7u8; CHUNK])));
            Response::builder().header("x-received", received.to_string()).body(frames(chunks)).unwrap()
        })
    });
    let upstream = Upstream::start(handler).await;
    // HTTP/1.1 end to end, then h2c end to end (HTTP/2 flow control on both hops).
    for h2 in [false, true] {
        let proxy = Proxy::start(upstream.addr, &["--request-timeout", "0"]);
        let chunks = (0..TOTAL / CHUNK).map(|_| Frame::data(Bytes::from(vec![9u8; CHUNK])));
        let req = Request::put("http://big.test/upload").header("host", "big.test").body(frames(chunks)).unwrap();
        let res = if h2 {
            h2_client(proxy.addr).await.send_request(req).await.unwrap()
        } else {
            h1_client(proxy.addr).await.send_request(req).await.unwrap()
        };
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-received"], TOTAL.to_string().as_str(), "h2: {h2}");
        let mut body = res.into_body();
        let mut downloaded = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            let data = frame.data_ref().unwrap();
            assert!(data.iter().all(|&b| b == 7));
            downloaded += data.len();
        }
        assert_eq!(downloaded, TOTAL, "h2: {h2}");
        let peak = proxy.peak_rss_kib();
        assert!(peak < 50 * 1024, "peak RSS {peak} KiB (h2: {h2}): the body was buffered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_the_upstream_being_killed_and_restarted() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);

    let addr = upstream.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, headers, body) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "text/plain");
    assert!(String::from_utf8_lossy(&body).contains("upstream connect error"), "{body:?}");

    let _upstream = Upstream::start_on(addr, echo()).await;
    let (status, _, _) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);
    // h2c clients see the same.
    let mut tx = h2_client(proxy.addr).await;
    let res = tx.send_request(Request::get("http://x/").body(full("")).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// A raw TCP upstream that reads a request and then does `behaviour`.
async fn raw_upstream(behaviour: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                match behaviour {
                    "close" => drop(stream),
                    // Closed with a reset (RST), not a FIN.
                    "reset" => {
                        let _ = stream.set_zero_linger();
                        drop(stream);
                    }
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    "garbage" => {
                        let _ = stream.write_all(b"this is not HTTP\r\n\r\n").await;
                    }
                    // A transfer coding besides chunked: hyper would unchunk it and hand on
                    // the gzip bytes as if they were the body.
                    "gzip-chunked" => {
                        let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
                        let _ = stream.write_all(answer.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    // Ignores an upgrade: serves a page instead.
                    "ignore-upgrade" => {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npage").await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    // Agrees to a WebSocket upgrade without answering the key.
                    "bad-accept" => {
                        let head = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                                    sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                        let _ = stream.write_all(head.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    // Sends a body after its answer to HEAD (which must have none), shaped as a
                    // response of its own; answers anything else with "ok", on one connection.
                    "body-after-head" => {
                        let mut request = buf;
                        loop {
                            let answer = if request.starts_with(b"HEAD") {
                                let stray = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nPWNED";
                                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", stray.len());
                                // The body comes late, after the next request has gone out.
                                let _ = stream.write_all(head.as_bytes()).await;
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                stray
                            } else {
                                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            request = [0u8; 4096];
                            if matches!(stream.read(&mut request).await, Ok(0) | Err(_)) {
                                return;
                            }
                        }
                    }
                    _ => unreachable!(),
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_get_envoy_style_answers() {
    for protocol in ["http1", "h2"] {
        let args = |extra: &[&'static str]| [&["--upstream-protocol", protocol][..], extra].concat();
        // Closed before answering: 503 (UC).
        let proxy = Proxy::start(raw_upstream("close").await, &args(&[]));
        let (status, _, body) = get(&proxy, "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{protocol}");
        assert!(String::from_utf8_lossy(&body).contains("closed before response headers"), "{protocol}: {body:?}");

        // No answer in time: 504 (UT).
        let proxy = Proxy::start(raw_upstream("hang").await, &args(&["--request-timeout", "300ms"]));
        let (status, _, body) = get(&proxy, "/").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{protocol}");
        assert_eq!(body, "upstream request timeout\n");
        // h2c clients too (a timer per stream rather than the connection's watchdog).
        let res = h2_client(proxy.addr).await.send_request(Request::get("http://x/").body(full("")).unwrap());
        let (parts, body) = res.await.unwrap().into_parts();
        assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT, "{protocol}");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "upstream request timeout\n");

        // Not HTTP: 502 (UPE).
        let proxy = Proxy::start(raw_upstream("garbage").await, &args(&[]));
        let (status, _, body) = get(&proxy, "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{protocol}: {body:?}");
        // An HTTP/1.1 response in a transfer coding the proxy cannot pass on: 502 (UPE).
        if protocol == "http1" {
            let proxy = Proxy::start(raw_upstream("gzip-chunked").await, &args(&[]));
            let (status, _, body) = get(&proxy, "/").await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
            assert_eq!(body, "upstream protocol error\n");
        }

        // Unroutable connect (a port nobody listens on) is 503 (UF); covered above with a
        // killed upstream as well.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let proxy = Proxy::start(port, &args(&[]));
        let (status, _, body) = get(&proxy, "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{protocol}");
        assert!(String::from_utf8_lossy(&body).contains("upstream connect error"), "{protocol}: {body:?}");
        // The answer to an h2c HEAD is its head alone: no DATA, which the client would take
        // for a protocol error.
        let res = h2_client(proxy.addr).await.send_request(Request::head("http://x/").body(full("")).unwrap());
        let (parts, body) = res.await.unwrap().into_parts();
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE, "{protocol}");
        assert!(http_body::Body::is_end_stream(&body), "{protocol}: a HEAD answer with a body");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "", "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_clients_get_their_interim_response() {
    let upstream = Upstream::start(echo()).await;
    for protocol in ["http1", "h2"] {
        let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", protocol]);
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = "POST /upload HTTP/1.1\r\nhost: app.test\r\ncontent-length: 11\r\nexpect: 100-continue\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        // The client waits for the go-ahead before it sends the body.
        let mut interim = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !interim.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "{protocol}: closed before 100 Continue");
                interim.push(byte[0]);
            }
        })
        .await
        .expect("100 Continue before the body");
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{protocol}");
        stream.write_all(b"hello world").await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            // The echo comes back chunked: its end is the last chunk.
            while !response.ends_with(b"0\r\n\r\n") {
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "{protocol}: closed before the response: {:?}", String::from_utf8_lossy(&response));
                response.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the response");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{protocol}: {text}");
        assert!(text.contains("x-seen-method: POST\r\n"), "{protocol}: {text}");
        assert!(text.contains("\r\nhello world\r\n"), "{protocol}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);

    // An h2c client that follows its preface with something that is not a frame: the
    // connection ends (after a GOAWAY), and new ones are served.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nthis is not an HTTP/2 frame at all").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let mut tx = h2_client(proxy.addr).await;
    let res = tx.send_request(Request::get("http://x/").body(full("")).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
}

/// Sends raw HTTP/1.x bytes on a new connection and returns the response head and body.
async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        // Up to the end of the head, then whatever the body's length says (or the close).
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            let Some(head_end) = text.find("\r\n\r\n") else {
                assert!(n > 0, "closed mid-head: {text}");
                continue;
            };
            let length = text[..head_end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map(|v| v.trim().parse::<usize>().unwrap());
            if n == 0 || length.is_some_and(|len| answer.len() >= head_end + 4 + len) || text.ends_with("0\r\n\r\n") {
                break;
            }
        }
    })
    .await
    .expect("an answer");
    String::from_utf8(answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_get_4xx_and_are_not_blamed_on_the_upstream() {
    let upstream = Upstream::start(echo()).await;
    for protocol in ["http1", "h2"] {
        let proxy = Proxy::start_logging_to(upstream.addr, &["--upstream-protocol", protocol], Stdio::piped());
        for (request, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "no Host header"),
            ("GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "more than one Host header"),
            ("GET / HTTP/1.1\r\nhost: a b\r\n\r\n", "invalid Host header"),
            ("GET / HTTP/1.1\r\nhost: user@app.test\r\n\r\n", "invalid Host header"),
            ("GET / HTTP/1.1\r\nhost: app.test:http\r\n\r\n", "invalid Host header"),
            ("GET / HTTP/1.1\r\nhost: \r\n\r\n", "invalid Host header"),
            ("GET http://user@evil.test/ HTTP/1.1\r\nhost: a\r\n\r\n", "invalid authority in the request target"),
            // Not 502 or 503: the upstream did nothing wrong.
            (
                "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                "the request body could not be read",
            ),
        ] {
            let answer = raw_exchange(proxy.addr, request).await;
            assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{protocol} {request:?}: {answer}");
            assert!(answer.ends_with(&format!("\r\n\r\nbad request: {why}\n")), "{protocol} {request:?}: {answer}");
        }
        // Valid ones: an IP literal with a port; an HTTP/1.0 request with no Host (which gets
        // the upstream's); an absolute-form target, whose authority replaces the Host.
        for (request, host) in [
            ("GET / HTTP/1.1\r\nhost: [::1]:8080\r\n\r\n", "[::1]:8080".to_string()),
            ("GET / HTTP/1.0\r\n\r\n", upstream.addr.to_string()),
            ("GET http://app.test/x HTTP/1.1\r\nhost: other.test\r\n\r\n", "app.test".to_string()),
        ] {
            let answer = raw_exchange(proxy.addr, request).await;
            assert!(answer.contains(" 200 OK\r\n"), "{protocol} {request:?}: {answer}");
            assert!(answer.contains(&format!("\r\nx-seen-host: {host}\r\n")), "{protocol} {request:?}: {answer}");
        }
        // `Connection` cannot make `Host` hop-by-hop.
        let answer = raw_exchange(proxy.addr, "GET / HTTP/1.1\r\nhost: app.test\r\nconnection: host\r\n\r\n").await;
        assert!(answer.contains("\r\nx-seen-host: app.test\r\n"), "{protocol}: {answer}");
        // Of `TE`, only `trailers` goes on, however the client spelled or split it.
        for (te, kept) in [
            ("te: Trailers\r\n", true),
            ("te: trailers\r\nte: gzip\r\n", true),
            ("te: gzip;q=0.5, trailers\r\n", true),
            ("te: gzip\r\n", false),
        ] {
            let request = format!("GET / HTTP/1.1\r\nhost: a\r\nconnection: te\r\n{te}\r\n");
            let answer = raw_exchange(proxy.addr, &request).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{protocol} {te:?}: {answer}");
            assert_eq!(answer.contains("\r\nx-seen-te: 1\r\n"), kept, "{protocol} {te:?}: {answer}");
        }
        // A transfer coding the proxy would have to strip is refused, not forwarded as
        // another body.
        let gzip = "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let answer = raw_exchange(proxy.addr, gzip).await;
        assert!(answer.starts_with("HTTP/1.1 501 Not Implemented\r\n"), "{protocol}: {answer}");
        // Hop-by-hop fields in a chunked body's trailers are dropped, not passed on to break
        // the upstream request (an h2 upstream refuses them).
        let trailers = "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\
                        x-checksum: 1\r\nconnection: close\r\nte: trailers\r\n\r\n";
        let answer = raw_exchange(proxy.addr, trailers).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("abc"), "{protocol}: {answer}");
        // A sidecar is no forward proxy: CONNECT is refused, as over HTTP/2.
        let answer = raw_exchange(proxy.addr, "CONNECT app.test:443 HTTP/1.1\r\nhost: app.test:443\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{protocol}: {answer}");
        // An upgrade to h2c (deprecated by RFC 9113) is not passed on: an ordinary request.
        let h2c = "GET /x HTTP/1.1\r\nhost: a\r\nupgrade: h2c\r\nconnection: upgrade, http2-settings\r\n\
                   http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
        let answer = raw_exchange(proxy.addr, h2c).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{protocol}: {answer}");
        assert!(
            !answer.contains("x-seen-upgrade") && !answer.contains("x-seen-http2-settings"),
            "{protocol}: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_graceful_drain_on_sigterm() {
    // An upstream that takes 500 ms to answer.
    let handler: Handler = Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Response::new(full("slow"))
        })
    });
    let upstream = Upstream::start(handler).await;
    let mut proxy = Proxy::start(upstream.addr, &["--drain-timeout", "5s"]);
    assert_eq!(admin_status(&proxy, "/ready").await, Some(StatusCode::OK));
    assert_eq!(admin_status(&proxy, "/live").await, Some(StatusCode::OK));
    assert_eq!(admin_status(&proxy, "/nope").await, Some(StatusCode::NOT_FOUND));

    let url = proxy.url("/slow");
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move {
        let mut tx = h1_client(addr).await;
        let res = tx.send_request(Request::get(url).header("host", "x").body(full("")).unwrap()).await.unwrap();
        (res.status(), res.into_body().collect().await.unwrap().to_bytes())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(admin_status(&proxy, "/ready").await, Some(StatusCode::SERVICE_UNAVAILABLE), "draining");
    assert!(TcpStream::connect(proxy.addr).await.is_err(), "the listener is closed while draining");

    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow"[..]), "the in-flight request finished");
    let exit = proxy.wait_exit().await;
    assert!(exit.success(), "{exit:?}");
}

/// Connections that have not shown their protocol yet (nothing sent, `P`, `PR`, half an h2c
/// preface) have no request to finish: a drain closes them at once, not after the 10 s opening
/// limit or, for the half preface with no idle timeout, the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_connections_still_opening() {
    let upstream = Upstream::start(echo()).await;
    let mut proxy = Proxy::start(upstream.addr, &["--drain-timeout", "60s", "--downstream-idle-timeout", "0"]);
    let mut opening = Vec::new();
    for first in [&b""[..], b"P", b"PR", b"PRI * HTTP/2.0\r\n"] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(first).await.unwrap();
        opening.push(stream);
    }
    // A request on a connection of its own shows the proxy has taken the others in.
    let (status, _, _) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);

    proxy.terminate();
    let exit = proxy.wait_exit().await;
    assert!(exit.success(), "{exit:?}");
    for mut stream in opening {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection was closed");
    }
}

#[test]
fn command_line_help_and_errors() {
    let bin = env!("CARGO_BIN_EXE_mesh-proxy");
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--upstream-protocol",
        "--admin",
        "--request-timeout",
        "--drain-timeout",
        "--workers",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}");
    }

    for bad in [
        &["--bogus"][..],
        &["--listen", "not-an-address"],
        &["--upstream", "no-port"],
        &["--request-timeout", "5 parsecs"],
        &["--stream-idle-timeout", "500us"],
        &["--workers", "0"],
        &["--upstream-protocol", "h3"],
    ] {
        let out = Command::new(bin).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:"), "{bad:?}: {err}");
    }

    // A listener that cannot be opened: exit 1 with the address in the message.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(bin).args(["--listen", &addr, "--admin", "off"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}

/// Reads until the peer closes (bounded); returns what arrived.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .expect("a clean close");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_are_closed_and_busy_ones_kept() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--downstream-idle-timeout", "400ms"]);

    // Connected and silent: closed, with nothing sent.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    // A request head that never completes: closed too, by the idle timeout here (shorter
    // than the request head timeout), which answers nothing, as Envoy's does.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    // An h2c preface that never completes, and a first byte that could start either protocol.
    let mut half_preface = TcpStream::connect(proxy.addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut one_byte = TcpStream::connect(proxy.addr).await.unwrap();
    one_byte.write_all(b"P").await.unwrap();
    assert_eq!(read_until_closed(&mut silent).await, b"");
    assert_eq!(read_until_closed(&mut slow).await, b"");
    // (The server's own SETTINGS frame went out at once; nothing else does.)
    let settings = read_until_closed(&mut half_preface).await;
    assert_eq!(settings.get(3), Some(&4), "only a SETTINGS frame: {settings:?}");
    assert_eq!(settings.len(), 9 + usize::from(settings[2]), "only a SETTINGS frame: {settings:?}");
    // (Closing with the byte read gives EOF; with it unread, as the proxy once only peeked at
    // it, a reset.)
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), one_byte.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => assert_eq!(rest, b""),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Err(_) => panic!("the proxy closes a connection that sent one byte"),
    }

    // A connection that keeps sending requests, more often than the idle timeout, stays open
    // across several idle periods.
    let mut tx = h1_client(proxy.addr).await;
    for _ in 0..8 {
        get_on(&mut tx).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(!tx.is_closed());

    // An idle h2 connection gets GOAWAY and ends; its client sees the connection close.
    let mut h2 = h2_client(proxy.addr).await;
    let res = h2.send_request(Request::get("http://x/").body(full("")).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(res);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !h2.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the idle h2 connection is closed");
}

/// With no idle timeout, the request head timeout still answers 408 to, and closes the
/// connections of, clients that stall in a head or trickle it in (slow-header attacks), and
/// leaves idle keep-alive connections alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_answered_408_without_an_idle_timeout() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--downstream-idle-timeout", "0", "--request-headers-timeout", "300ms"]);

    // Idle between requests for more than three head timeouts: kept, and still serving.
    let mut tx = h1_client(proxy.addr).await;
    for _ in 0..2 {
        get_on(&mut tx).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(!tx.is_closed());

    // A head that stops half-way, on a new connection and after a complete exchange. (Not
    // covered: half a head pipelined behind a request, arriving before its response ended.)
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
    let mut answered = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        // The echo's chunked body ends with its last chunk.
        while !answered.ends_with(b"\r\n0\r\n\r\n") {
            assert_ne!(second.read_buf(&mut answered).await.unwrap(), 0, "closed early");
        }
    })
    .await
    .expect("the first request is answered");
    second.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // Both are answered 408, and closed.
    assert_eq!(String::from_utf8_lossy(&read_until_closed(&mut stalled).await), REQUEST_TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&read_until_closed(&mut second).await), REQUEST_TIMEOUT);

    // A head that keeps coming, a byte every 50 ms (3 s for all of it): answered 408
    // part-way, and closed.
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let trickle = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut from_proxy, mut to_proxy) = trickle.into_split();
    let writer = tokio::spawn(async move {
        for byte in head.chunks(1) {
            if to_proxy.write_all(byte).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), from_proxy.read_to_end(&mut answer))
        .await
        .expect("the proxy closes a slow-header client's connection")
        .expect("a clean close, after the answer");
    assert_eq!(String::from_utf8_lossy(&answer), REQUEST_TIMEOUT);
    // The rest of the head was not sent: the proxy stopped reading half-way.
    assert!(!writer.await.unwrap(), "the whole head went out before the proxy answered");
}

/// What the proxy answers a request head that took too long.
const REQUEST_TIMEOUT: &str = "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n\
    content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_response_is_not_cut_off_by_the_idle_timeout() {
    // The upstream takes longer than the idle timeout to answer: the request is in flight,
    // so the connection is not idle.
    let slow: Handler = Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(900)).await;
            Response::new(full("late"))
        })
    });
    let upstream = Upstream::start(slow).await;
    let proxy = Proxy::start(upstream.addr, &["--downstream-idle-timeout", "200ms"]);
    let (status, _, body) = get(&proxy, "/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"late"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    // Sequential requests, with and without bodies, over several client connections: one
    // upstream connection carries them all.
    for _ in 0..3 {
        let mut tx = h1_client(proxy.addr).await;
        for i in 0..10 {
            let req = if i % 2 == 0 {
                Request::get("/").header("host", "x").body(full("")).unwrap()
            } else {
                Request::post("/").header("host", "x").body(full(vec![b'x'; 100_000])).unwrap()
            };
            tx.ready().await.unwrap();
            let res = tx.send_request(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    // A response body abandoned half-way closes its upstream connection instead of returning
    // it to the pool in an unknown state; the next request gets a fresh one and succeeds.
    let endless: Handler = Arc::new(|req| {
        Box::pin(async move {
            if req.uri().path() == "/endless" {
                let chunk = Bytes::from(vec![b'y'; 64 << 10]);
                Response::new(frames(std::iter::repeat_with(move || Frame::data(chunk.clone()))))
            } else {
                Response::new(full("ok"))
            }
        })
    });
    let upstream = Upstream::start(endless).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    let mut tx = h1_client(proxy.addr).await;
    let res = tx.send_request(Request::get("/endless").header("host", "x").body(full("")).unwrap()).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    drop(tx);
    let (status, _, body) = get(&proxy, "/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

/// A WebSocket echo upstream (a real WebSocket handshake and framing, tokio-tungstenite),
/// which refuses the upgrade with 403 on `/forbidden`.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn websocket_echo_upstream() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let refuse =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                     res: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        if req.uri().path() == "/forbidden" {
                            let mut no = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                                "no websockets here".into(),
                            ));
                            *no.status_mut() = StatusCode::FORBIDDEN;
                            return Err(no);
                        }
                        Ok(res)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, refuse).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_tunnelled_through_http1_upgrades() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = websocket_echo_upstream().await;
    // Whatever protocol ordinary requests use upstream, upgrades go over HTTP/1.1.
    for protocol in ["downstream", "h2"] {
        let proxy = Proxy::start(upstream, &["--upstream-protocol", protocol]);
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, res) = tokio_tungstenite::client_async(format!("ws://{}/chat", proxy.addr), stream)
            .await
            .expect("the WebSocket handshake succeeds through the proxy");
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);

        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        // Larger binary messages, several in flight at once, both ways.
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..4 {
            ws.send(Message::binary(big.clone())).await.unwrap();
        }
        for _ in 0..4 {
            assert_eq!(ws.next().await.unwrap().unwrap().into_data(), big);
        }
        ws.close(None).await.unwrap();

        // A refused upgrade is an ordinary response, and the proxy keeps serving.
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let refused = tokio_tungstenite::client_async(format!("ws://{}/forbidden", proxy.addr), stream).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), StatusCode::FORBIDDEN),
            other => panic!("expected a 403, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_gives_open_websockets_until_the_drain_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = websocket_echo_upstream().await;
    let connect = |proxy: SocketAddr| async move {
        let stream = TcpStream::connect(proxy).await.unwrap();
        tokio_tungstenite::client_async(format!("ws://{proxy}/chat"), stream).await.unwrap().0
    };

    // A tunnel keeps working while the proxy drains, and the drain ends when it closes: far
    // sooner than the 60 s drain timeout (`wait_exit` gives up after 5 s).
    let mut proxy = Proxy::start(upstream, &["--drain-timeout", "60s"]);
    let mut ws = connect(proxy.addr).await;
    proxy.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(admin_status(&proxy, "/ready").await, Some(StatusCode::SERVICE_UNAVAILABLE), "draining");
    ws.send(Message::text("still there?")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still there?"));
    assert!(proxy.child.try_wait().unwrap().is_none(), "the drain waits for the open tunnel");
    ws.close(None).await.unwrap();
    drop(ws);
    let exit = proxy.wait_exit().await;
    assert!(exit.success(), "{exit:?}");

    // A tunnel still open when the drain timeout ends is closed.
    let mut proxy = Proxy::start(upstream, &["--drain-timeout", "300ms"]);
    let mut ws = connect(proxy.addr).await;
    proxy.terminate();
    let exit = proxy.wait_exit().await;
    assert!(exit.success(), "{exit:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the tunnel was closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_does_not_flood_the_log() {
    let log_path = std::env::temp_dir().join(format!("mesh-proxy-outage-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = Proxy::start_logging_to(port, &[], log.into());
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(get(&proxy, "/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let seconds = started.elapsed().as_secs() as usize;
    drop(proxy);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let warnings = log.lines().filter(|l| l.contains("upstream request failed")).count();
    // The first failure is logged, the rest summarised at most once a second.
    assert!((1..=seconds + 2).contains(&warnings), "{warnings} warnings in {seconds} s:\n{log}");
}

/// Each kind of upstream failure is logged with its Envoy response flag (what access logs and
/// metrics will report), over both upstream protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_logged_with_their_response_flags() {
    let unroutable = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cases = [
        ("close", "UC", StatusCode::SERVICE_UNAVAILABLE),
        ("reset", "UC", StatusCode::SERVICE_UNAVAILABLE),
        ("hang", "UT", StatusCode::GATEWAY_TIMEOUT),
        ("garbage", "UPE", StatusCode::BAD_GATEWAY),
        ("unroutable", "UF", StatusCode::SERVICE_UNAVAILABLE),
    ];
    for protocol in ["http1", "h2"] {
        for (behaviour, flag, status) in cases {
            let upstream = match behaviour {
                "unroutable" => unroutable,
                _ => raw_upstream(behaviour).await,
            };
            let log_path = std::env::temp_dir()
                .join(format!("mesh-proxy-flags-{}-{protocol}-{behaviour}.log", std::process::id()));
            let args = ["--upstream-protocol", protocol, "--request-timeout", "300ms"];
            let proxy = Proxy::start_logging_to(upstream, &args, std::fs::File::create(&log_path).unwrap().into());
            assert_eq!(get(&proxy, "/").await.0, status, "{protocol} {behaviour}");
            drop(proxy);
            let log = std::fs::read_to_string(&log_path).unwrap();
            let _ = std::fs::remove_file(&log_path);
            let line = log.lines().find(|l| l.contains("upstream request failed"));
            let line = line.unwrap_or_else(|| panic!("{protocol} {behaviour}: nothing logged:\n{log}"));
            assert!(line.contains(&format!("flags={flag} ")), "{protocol} {behaviour}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_expire() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--idle-timeout", "200ms"]);
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "reused while fresh");
    // Idle for more than 1.25 idle timeouts: closed by the proxy, so a new one is opened.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_giving_up_cancels_the_upstream_request() {
    // Upstream: never answers; reports when a request starts and when it is dropped.
    struct OnDrop(tokio::sync::mpsc::UnboundedSender<&'static str>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send("dropped");
        }
    }
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |_req: Request<Incoming>| {
        let events = events_tx.clone();
        Box::pin(async move {
            let _ = events.send("started");
            let _guard = OnDrop(events);
            std::future::pending::<Response<BoxBody>>().await
        })
    });
    let upstream = Upstream::start(handler).await;
    async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>) -> &'static str {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        event.expect("an upstream event in time").unwrap()
    }
    for protocol in ["h2", "http1"] {
        let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", protocol]);
        let io = TcpStream::connect(proxy.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let (response, mut stream) =
            client.send_request(Request::get("http://app.test/slow").body(()).unwrap(), true).unwrap();
        assert_eq!(next(&mut events).await, "started", "{protocol}");
        stream.send_reset(h2::Reason::CANCEL);
        assert_eq!(next(&mut events).await, "dropped", "{protocol}: the upstream request was cancelled");
        assert!(response.await.is_err());

        // The connection still serves new streams.
        let mut client = client.ready().await.unwrap();
        let (_response, _stream) =
            client.send_request(Request::get("http://app.test/").body(()).unwrap(), true).unwrap();
        assert_eq!(next(&mut events).await, "started", "{protocol}");
        drop(proxy);
        assert_eq!(next(&mut events).await, "dropped", "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_going_away_gracefully_loses_no_request() {
    // An h2c upstream whose connections shut down gracefully (GOAWAY, then finish what is in
    // flight) when told to. `/slow` answers after 400 ms.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(0u32);
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let mut shutdown = shutdown_rx.clone();
            let generation = *shutdown.borrow_and_update();
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                    }
                    Ok::<_, Infallible>(Response::new(full("done")))
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                loop {
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = shutdown.wait_for(|g| *g > generation) => conn.as_mut().graceful_shutdown(),
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(addr, &["--upstream-protocol", "h2"]);

    let slow = tokio::spawn(get_owned(proxy.addr, "/slow".to_owned()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown_tx.send_replace(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The first connection is going away: new requests go on a new one.
    for _ in 0..3 {
        let (status, _, body) = get(&proxy, "/").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"done"[..]));
    }
    // The request in flight on the old connection is finished there.
    let (status, _, body) = slow.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"done"[..]));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

/// A GET over a new HTTP/1.1 connection; owns its arguments, so it can be spawned.
async fn get_owned(addr: SocketAddr, path: String) -> (StatusCode, HeaderMap, Bytes) {
    let mut tx = h1_client(addr).await;
    let req = Request::get(path).header("host", "app.test").body(full("")).unwrap();
    let (parts, body) = tx.send_request(req).await.unwrap().into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

/// A masked (client-to-server) WebSocket frame (RFC 6455 section 5.2).
fn ws_client_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame.into()
}

/// Reads one unmasked (server-to-client) WebSocket frame from an h2 stream: (opcode, payload).
async fn ws_server_frame(recv: &mut h2::RecvStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if buf.len() >= 2 {
            let (opcode, len7) = (buf[0] & 0x0f, usize::from(buf[1] & 0x7f));
            let (header, len) = match len7 {
                126 if buf.len() >= 4 => (4, usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
                127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize),
                126 | 127 => (usize::MAX, 0),
                n => (2, n),
            };
            if header != usize::MAX && buf.len() >= header + len {
                let payload = buf[header..header + len].to_vec();
                buf.drain(..header + len);
                return (opcode, payload);
            }
        }
        let data = tokio::time::timeout(Duration::from_secs(5), recv.data()).await.unwrap().unwrap().unwrap();
        recv.flow_control().release_capacity(data.len()).unwrap();
        buf.extend_from_slice(&data);
    }
}

/// An h2 client of the proxy, once the proxy's SETTINGS have announced extended CONNECT
/// (RFC 8441 section 3).
async fn extended_connect_client(proxy: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let io = TcpStream::connect(proxy).await.unwrap();
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let client = client.ready().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !client.is_extended_connect_protocol_enabled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("SETTINGS_ENABLE_CONNECT_PROTOCOL from the proxy");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_over_http2_extended_connect_are_tunnelled() {
    let upstream = websocket_echo_upstream().await;
    let proxy = Proxy::start(upstream, &[]);
    let mut client = extended_connect_client(proxy.addr).await;

    let connect = |path: &str| {
        Request::builder()
            .method("CONNECT")
            .uri(format!("http://app.test{path}"))
            .extension(h2::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap()
    };
    let (response, mut send) = client.send_request(connect("/chat"), false).unwrap();
    let res = response.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the upstream's 101 is 200 on HTTP/2");
    assert!(!res.headers().contains_key("sec-websocket-accept"));
    let mut recv = res.into_body();
    let mut buf = Vec::new();

    send.send_data(ws_client_frame(0x1, b"hello"), false).unwrap();
    assert_eq!(ws_server_frame(&mut recv, &mut buf).await, (0x1, b"hello".to_vec()));
    // A message larger than the stream's initial window both ways: flow control in the tunnel.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    send.reserve_capacity(big.len() + 16);
    send.send_data(ws_client_frame(0x2, &big), false).unwrap();
    assert_eq!(ws_server_frame(&mut recv, &mut buf).await, (0x2, big));
    // Close: the upstream ends its connection (the echo server does not bother to answer
    // with a close frame of its own), and the proxy ends the stream.
    send.send_data(ws_client_frame(0x8, &1000u16.to_be_bytes()), true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(data) = recv.data().await {
            buf.extend_from_slice(&data.unwrap());
        }
    })
    .await
    .expect("the stream ends after the close");
    assert!(buf.is_empty() || buf[0] & 0x0f == 0x8, "nothing but a close frame: {buf:?}");

    // A refused handshake reaches the client as it was sent; a plain CONNECT is refused.
    let mut client = client.ready().await.unwrap();
    let (response, _send) = client.send_request(connect("/forbidden"), false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::FORBIDDEN);
    let mut client = client.ready().await.unwrap();
    let plain = Request::builder().method("CONNECT").uri("app.test:443").body(()).unwrap();
    let (response, _send) = client.send_request(plain, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);

    // The proxy made this handshake, so it checks the answer to its key: a 101 with a wrong
    // Sec-WebSocket-Accept is an upstream protocol error, not a tunnel.
    let proxy = Proxy::start(raw_upstream("bad-accept").await, &[]);
    let mut client = extended_connect_client(proxy.addr).await;
    let (response, _send) = client.send_request(connect("/chat"), false).unwrap();
    let res = response.await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let mut body = res.into_body();
    let mut text = Vec::new();
    while let Some(data) = body.data().await {
        text.extend_from_slice(&data.unwrap());
    }
    assert_eq!(text, b"upstream protocol error\n");

    // An upstream that ignores the upgrade and answers 200 with a page: a 200 to CONNECT
    // would tell the client its tunnel is open, and the page would be read as WebSocket
    // frames. An upstream protocol error instead.
    let proxy = Proxy::start(raw_upstream("ignore-upgrade").await, &[]);
    let mut client = extended_connect_client(proxy.addr).await;
    let (response, _send) = client.send_request(connect("/chat"), false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::BAD_GATEWAY);
}

/// A WebSocket tunnel on which nothing moves either way for the stream idle timeout is
/// closed, over an HTTP/1.1 upgrade and over HTTP/2 extended CONNECT; one that keeps moving
/// stays open well past it. Over HTTP/2 the tunnel is timed on its own: it is reset while
/// other streams keep its connection busy, and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_tunnels_are_closed_after_the_stream_idle_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const LIMIT: Duration = Duration::from_millis(400);
    let upstream = websocket_echo_upstream().await;
    let proxy = Proxy::start(upstream, &["--stream-idle-timeout", "400ms"]);

    // HTTP/1.1 upgrade: a message every 100 ms for three limits, then silence.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/chat", proxy.addr), stream).await.unwrap();
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ws.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("{i}")), "kept while moving");
    }
    // The proxy moved the echo's last byte before it arrived here.
    let silent = tokio::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("the idle tunnel is closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{end:?}");
    assert!(silent.elapsed() >= LIMIT - Duration::from_millis(50), "closed after {:?}", silent.elapsed());

    // HTTP/2 extended CONNECT: the same, while ordinary requests keep the connection moving.
    let mut client = extended_connect_client(proxy.addr).await;
    let connect = Request::builder()
        .method("CONNECT")
        .uri("http://app.test/chat")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(connect, false).unwrap();
    let res = response.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut recv = res.into_body();
    let mut buf = Vec::new();
    for i in 0..12u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send.send_data(ws_client_frame(0x1, &[b'0' + i % 10]), false).unwrap();
        assert_eq!(ws_server_frame(&mut recv, &mut buf).await, (0x1, vec![b'0' + i % 10]), "kept while moving");
    }
    let silent = tokio::time::Instant::now();
    let mut other = client.clone();
    let busy = async {
        // The echo upstream serves no plain requests; any answer moves bytes on the connection.
        loop {
            other = other.ready().await.unwrap();
            let (response, _) =
                other.send_request(Request::get("http://app.test/plain").body(()).unwrap(), true).unwrap();
            let mut body = response.await.unwrap().into_body();
            while let Some(Ok(_)) = body.data().await {}
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            () = busy => unreachable!(),
            data = recv.data() => data,
        }
    })
    .await
    .expect("the idle tunnel's stream is ended");
    match ended {
        Some(Err(e)) => assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}"),
        other => panic!("expected a reset stream, got {other:?}"),
    }
    assert!(silent.elapsed() >= LIMIT - Duration::from_millis(50), "closed after {:?}", silent.elapsed());
    let client = client.ready().await.expect("the connection is still open");
    let (response, _) =
        client.clone().send_request(Request::get("http://app.test/plain").body(()).unwrap(), true).unwrap();
    response.await.expect("and still serves");
}

/// The h2c connection to the upstream is shared by every client. A client that stops reading
/// must not use up that connection's flow-control window: the data buffered for its streams
/// would then stop every other client's responses on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_stall_the_shared_upstream_connection() {
    let big = Bytes::from(vec![b'x'; 3 << 20]);
    let upstream = Upstream::start(Arc::new(move |req: Request<Incoming>| {
        let body = if req.uri().path() == "/big" { big.clone() } else { Bytes::from_static(b"small") };
        Box::pin(async move { Response::new(full(body)) })
    }))
    .await;
    let proxy = Proxy::start(upstream.addr, &[]);

    // 24 streams, each with 3 MiB on its way, that the client never reads (window 0).
    let io = TcpStream::connect(proxy.addr).await.unwrap();
    let (stalled, conn) = h2::client::Builder::new().initial_window_size(0).handshake::<_, Bytes>(io).await.unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..24 {
        let mut tx = stalled.clone().ready().await.unwrap();
        let (response, _) = tx.send_request(Request::get("http://app.test/big").body(()).unwrap(), true).unwrap();
        held.push(tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap());
    }

    // Other clients, on the same upstream connection, still get their whole responses.
    for _ in 0..3 {
        let mut tx = h2_client(proxy.addr).await;
        let exchange = async {
            let res = tx.send_request(Request::get("http://app.test/small").body(full("")).unwrap()).await.unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        };
        let body =
            tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("a stalled client stalled others");
        assert_eq!(body, "small");
    }
    drop(held);
}

/// A client that stops reading a response, over HTTP/1.1 or h2c, has its connection dropped
/// once nothing has moved on it for the stream idle timeout, instead of holding it (and the
/// upstream connection or stream behind it) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_stream_idle_timeout() {
    const BIG: usize = 64 << 20;
    let big = Bytes::from(vec![b'x'; BIG]);
    let upstream = Upstream::start(Arc::new(move |_req: Request<Incoming>| {
        let big = big.clone();
        Box::pin(async move { Response::new(full(big)) })
    }))
    .await;
    let args = ["--stream-idle-timeout", "300ms", "--downstream-idle-timeout", "1s"];

    // HTTP/1.1: reads the head, then nothing for 2 s. The proxy fills the socket's buffers,
    // then nothing moves; it drops the connection, and the client gets what was buffered.
    let proxy = Proxy::start(upstream.addr, &args);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 17];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK\r\n");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
    match read.expect("the connection ends") {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert!(rest.len() < BIG, "the whole body arrived: the connection was kept");

    // h2c, over both upstream protocols: a client that opens no window for the response.
    for protocol in ["http1", "h2"] {
        let proxy = Proxy::start(upstream.addr, &[&args[..], &["--upstream-protocol", protocol]].concat());
        let io = TcpStream::connect(proxy.addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new().initial_window_size(0).handshake::<_, Bytes>(io).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut tx = client.ready().await.unwrap();
        let (response, _) = tx.send_request(Request::get("http://app.test/big").body(()).unwrap(), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // The connection ends, and with it the response.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        ended.expect("the h2c connection is dropped").unwrap().ok();
        let mut body = response.into_body();
        assert!(matches!(body.data().await, Some(Err(_)) | None), "{protocol}");
    }
}

/// A request that times out (504) while its body is still streaming to an h2c upstream is
/// cancelled there (RST_STREAM), not left open holding a stream and its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_is_cancelled_upstream() {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::start(Arc::new(move |req: Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        Box::pin(async move {
            // Reads the body until it ends, or until the stream is reset.
            let ended = req.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string());
            let _ = seen_tx.send(ended);
            Response::new(full("late"))
        })
    }))
    .await;
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "h2", "--request-timeout", "500ms"]);

    // One chunk of the body, then nothing: the client keeps its connection open.
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    let mut head = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut head)).await.unwrap().unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 504"), "{}", String::from_utf8_lossy(&head[..n]));

    let ended =
        tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.expect("the upstream stream stayed open");
    assert!(ended.unwrap().is_err(), "the upstream saw the body end normally, not a reset");
    drop(client);
}

/// An upstream that wrongly sends a body after its answer to HEAD (here late, so that the
/// proxy's HTTP/1.1 client cannot notice it before reusing the connection) cannot slip that
/// body to the next request on the connection, another client's: a connection that answered
/// HEAD is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_a_head_response_reaches_no_other_request() {
    let proxy = Proxy::start(raw_upstream("body-after-head").await, &["--upstream-protocol", "http1"]);
    let head = raw_exchange(proxy.addr, "HEAD / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for _ in 0..3 {
        let (status, _, body) = get(&proxy, "/secret").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
}

/// A raw h2c client that cancels its streams (premature resets) in three timings: right
/// after sending, after a short delay in batches, and one by one while others are in flight.
/// Each connection ends in GOAWAY ENHANCE_YOUR_CALM, and the upstream sees at most the budget
/// of cancelled requests, plus those in flight when the budget ran out, per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_cancel_streams_early_get_goaway_enhance_your_calm() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let slow: Handler = Arc::new(move |_req: Request<Incoming>| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            // Far longer than the client waits before cancelling, even on a loaded machine.
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("slow"))
        })
    });
    let upstream = Upstream::start(slow).await;
    let proxy = Proxy::start(upstream.addr, &["--max-premature-resets", "20"]);
    for (pattern, batch, delay_ms) in [("immediate", 1, 0), ("delayed batches", 10, 5), ("staggered", 3, 20)] {
        let before = seen.load(Ordering::SeqCst);
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(stream).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut sent = 0;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let mut pending = Vec::new();
                for _ in 0..batch {
                    let Ok(mut ready) = client.clone().ready().await else { return };
                    let req = Request::get("http://proxy/").body(()).unwrap();
                    let Ok((response, _)) = ready.send_request(req, true) else { return };
                    pending.push(response);
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                // Dropping a response future resets its stream (CANCEL).
                drop(pending);
                if sent > 1000 {
                    return;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{pattern}: the connection never ended");
        let conn = tokio::time::timeout(Duration::from_secs(5), conn).await;
        let err = conn.expect("the connection ends").unwrap().expect_err("the proxy ends the connection");
        // The GOAWAY, or, when the client was still writing as the proxy closed, a broken pipe.
        assert!(err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(), "{pattern}: {err}");
        assert!(sent < 1000, "{pattern}: {sent} streams sent");
        // Give cancelled requests that were already on their way time to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reached = seen.load(Ordering::SeqCst) - before;
        eprintln!("{pattern}: {sent} streams sent, {reached} reached the upstream");
        assert!(reached <= 20 + 200, "{pattern}: the upstream saw {reached} requests");
    }
    let stats = raw_exchange(proxy.admin, "GET /stats HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert!(stats.contains("h2_premature_reset_goaways "), "{stats}");
    assert!(!stats.contains("h2_premature_reset_goaways 0\n"), "the proxy's own GOAWAYs: {stats}");
    // A well-behaved client on a new connection is served.
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
}

/// Envoy's limits on request heads (60 KiB, 100 fields) on both protocols, and RFC 9112's
/// rules for the asterisk and authority target forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_misplaced_target_forms_are_refused() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &[]);
    let big = "x".repeat(70 << 10);
    let answer = raw_exchange(proxy.addr, &format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..40.min(answer.len())]);
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(proxy.addr, &format!("GET / HTTP/1.1\r\nhost: a\r\n{many}\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Within the limits: served (the echo answers with a field per field it saw, so the
    // response stays under 100 too; an answer with more is refused as 502).
    let fine: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(proxy.addr, &format!("GET / HTTP/1.1\r\nhost: a\r\n{fine}\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..40]);
    // HTTP/2: more than 100 fields get 431 too.
    let mut h2 = h2_client(proxy.addr).await;
    let mut req = Request::get(proxy.url("/")).body(full("")).unwrap();
    for i in 0..101 {
        req.headers_mut()
            .insert(http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(), "v".parse().unwrap());
    }
    assert_eq!(h2.send_request(req).await.unwrap().status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // `*` is for OPTIONS, `host:port` for CONNECT.
    let answer = raw_exchange(proxy.addr, "GET * HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(proxy.addr, "OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(!answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(proxy.addr, "GET example.com:80 HTTP/1.1\r\nhost: example.com\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// A thousand connections holding unfinished 50 KB heads keep the proxy small, and the
/// connection cap refuses the excess while a client connected before is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unfinished_large_heads_stay_small_and_the_cap_refuses_the_excess() {
    const HOSTILE: usize = 1000;
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--max-connections", &(HOSTILE + 1).to_string()]);
    let mut client = h1_client(proxy.addr).await;
    get_on(&mut client).await;
    let partial = format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {}", "y".repeat(50_000));
    let mut hostile = Vec::new();
    for _ in 0..HOSTILE {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(partial.as_bytes()).await.unwrap();
        hostile.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak_mib = proxy.peak_rss_kib() / 1024;
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
    // One connection too many: closed at once.
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The client connected before is still served.
    get_on(&mut client).await;
    eprintln!("{HOSTILE} unfinished 50 KB heads: peak RSS {peak_mib} MiB");
    drop(hostile);
}

/// Streams cancelled after their requests went upstream over HTTP/1.1: each costs the
/// upstream connection it was on (an exchange cut off mid-way cannot be reused, as in Envoy),
/// so the premature-reset budget is what bounds the connections one client can make the proxy
/// open; connects that a cancelled request started complete into the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_open_a_bounded_number_of_upstream_connections() {
    let slow: Handler = Arc::new(|_req: Request<Incoming>| {
        Box::pin(async {
            // Far longer than the client waits before cancelling, even on a loaded machine.
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("slow"))
        })
    });
    let upstream = Upstream::start(slow).await;
    let proxy = Proxy::start(upstream.addr, &["--upstream-protocol", "http1"]);
    let mut cancelled = 0;
    const CLIENTS: usize = 3;
    for _ in 0..CLIENTS {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(stream).await.unwrap();
        let conn = tokio::spawn(conn);
        'client: for _ in 0..100 {
            let mut batch = Vec::new();
            for _ in 0..10 {
                let Ok(mut ready) = client.clone().ready().await else { break 'client };
                let Ok((response, _)) = ready.send_request(Request::get("http://proxy/").body(()).unwrap(), true)
                else {
                    break 'client;
                };
                batch.push(response);
            }
            // Cancelled after the proxy accepted them (their requests went upstream), before
            // the answers.
            tokio::time::sleep(Duration::from_millis(30)).await;
            cancelled += batch.len();
            drop(batch);
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("the proxy ends the connection");
        let err = ended.unwrap().expect_err("the proxy ends the connection");
        // The GOAWAY, or, when the client was still writing as the proxy closed, a broken pipe.
        assert!(err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(), "{err}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connections = upstream.connections.load(Ordering::SeqCst);
    eprintln!("{cancelled} cancelled requests from {CLIENTS} clients opened {connections} upstream connections");
    // Per client: the budget (100) and the streams in flight when it ran out.
    assert!(connections <= CLIENTS * (100 + 20), "{connections} upstream connections");
}

/// The request head timeout on HTTP/2: a HEADERS frame without END_HEADERS whose
/// CONTINUATION never comes, and a header block trickled in a CONTINUATION at a time, each
/// lose their connection about a head timeout later, while another h2c client on the proxy
/// is served throughout and an idle h2c connection is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_header_blocks_that_never_end_lose_their_connection() {
    let upstream = Upstream::start(echo()).await;
    let proxy = Proxy::start(upstream.addr, &["--downstream-idle-timeout", "0", "--request-headers-timeout", "300ms"]);
    // HPACK for `:method GET`, `:scheme http`, `:path /` (static table 2, 6, 4) and
    // `:authority x` (literal, indexed name 1).
    let block: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let open = |first: &[u8]| {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(0x1, 0x0, 1, first)); // HEADERS, no END_HEADERS
        bytes
    };
    // A well-behaved h2c client, and an idle one.
    let mut good = h2_client(proxy.addr).await;
    let idle = h2_client(proxy.addr).await;

    // Stalled: the block's first half, then nothing.
    let started = std::time::Instant::now();
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(&open(&block[..3])).await.unwrap();
    // Trickled: a CONTINUATION of one byte every 100 ms, never the last one.
    let trickled = TcpStream::connect(proxy.addr).await.unwrap();
    let (trickled_read, mut trickled_write) = trickled.into_split();
    trickled_write.write_all(&open(&block[..1])).await.unwrap();
    let trickler = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickled_write.write_all(&frame(0x9, 0, 1, &[0x86])).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..5 {
        let req = Request::get(format!("http://{}/", proxy.addr)).body(BoxBody::default()).unwrap();
        let res = good.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both stuck clients are dropped, each a head timeout (and at most a few ticks) after
    // its HEADERS frame.
    let closed = |mut read: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut sink))
            .await
            .expect("the header block loses its connection")
            .ok();
        started.elapsed()
    };
    let (stalled_took, trickled_took) = tokio::join!(closed(Box::new(stalled)), closed(Box::new(trickled_read)));
    trickler.abort();
    for took in [stalled_took, trickled_took] {
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    }
    // The idle connection (no header block open) is still there; the good one still serves.
    assert!(!idle.is_closed() && !good.is_closed());
    let req = Request::get(format!("http://{}/", proxy.addr)).body(BoxBody::default()).unwrap();
    assert_eq!(good.send_request(req).await.unwrap().status(), StatusCode::OK);
}
