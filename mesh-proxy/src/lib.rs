//! `mesh-proxy`: the reference sidecar, assembled from the mesh crates.
//!
//! **Status:** a routing reverse proxy. It serves HTTP/1.1 and h2c (prior knowledge) on one
//! port, told apart by the first bytes a client sends. With configuration files
//! ([`ProxyConfig::config_paths`], `--config`: VirtualService, DestinationRule, ServiceEntry,
//! SMI TrafficSplit and the proxy's own `MeshProxy` kind, read by [`loader`] and compiled by
//! [`snapshot`]) it routes each request by its `Host` / `:authority` through a tower stack of
//! mesh-routing's layers to one pool per endpoint, and reloads the files when they change
//! (a change that does not validate is refused and counted; the running routes keep
//! serving). Without them it forwards every request to one configured upstream. Pools speak
//! keep-alive HTTP/1.1 or one multiplexed h2c connection. Bodies and trailers stream
//! through; hop-by-hop headers are dropped; HTTP/1.1 upgrades and HTTP/2 extended CONNECT
//! (WebSocket) are routed and tunnelled; failures are answered as Envoy answers them (see
//! [`ProxyBody`]); client connections idle for `downstream_idle_timeout` are closed, and
//! HTTP/1.x clients slower than `request_headers_timeout` to send a request head are answered
//! 408 and closed; an admin server answers `/ready` and `/live`, and with a configuration
//! `/config_dump`, `/routes`, `/clusters`, `/certs`, `/stats` and `/metrics`, and `/logging`
//! switches the log filter at run time (`--check` prints the effective settings and exits
//! instead of serving); SIGTERM and
//! Ctrl-C drain in-flight requests (and flush queued spans) before exit. Retries, outlier
//! detection, connection-pool limits, faults and local rate limits come from
//! mesh-resilience; the inbound listener's mTLS, JWT validation and authorization from
//! mesh-tls; trace context, spans (OTLP), Istio's metrics and access logs from
//! mesh-telemetry (`telemetry.rs`, `proxy_metrics.rs`).
//!
//! The request path (see `stack.rs`): the per-connection servers hand each request to the
//! stack; routing, the route timeout, per-destination dispatch and the cluster's balancer are
//! `tower` services; the innermost service is one endpoint's pool. Failures travel as errors
//! up to the server adapter, which answers them (`reply.rs`).
//!
//! HTTP/1.1 is served and spoken by hyper. HTTP/2 is served and spoken with the `h2` crate
//! directly: a client connection's streams are polled by the connection's own task rather
//! than a task each, and requests go to the upstream connection without a channel in between
//! (see `h2server.rs` and `upstream.rs`).
//!
//! # Example
//!
//! ```no_run
//! use mesh_proxy::{ProxyConfig, Server};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ProxyConfig::default();
//! config.listen = "127.0.0.1:0".parse()?;
//! config.upstream = "127.0.0.1:8080".parse()?;
//! let server = Server::bind(config).await?;
//! println!("listening on {}", server.local_addr());
//! server.serve(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::watch;

mod admin;
pub use admin::{LogFilterHook, set_log_filter_hook};
mod body;
pub mod config;
mod downstream;
mod error;
pub mod gateway;
mod h2body;
mod h2server;
mod headers;
pub mod loader;
mod proxy;
mod proxy_metrics;
mod reload;
mod reply;
mod routes;
pub mod snapshot;
mod sniff;
mod stack;
mod telemetry;
mod tunnel;
mod upstream;

pub use body::ProxyBody;
pub use config::{ProxyConfig, UpstreamAddr, UpstreamProtocol};

/// The listeners could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    addr: SocketAddr,
    what: &'static str,
    #[source]
    source: io::Error,
}

/// A bound proxy, ready to [`serve`](Server::serve).
pub struct Server {
    config: ProxyConfig,
    telemetry: Option<Arc<telemetry::Telemetry>>,
    listener: TcpListener,
    inbound: Option<TcpListener>,
    /// The gateway listeners, by Gateway port number.
    gateways: Vec<(u16, TcpListener)>,
    admin: Option<TcpListener>,
    routes: Option<Arc<routes::Routes>>,
    tunnels: Arc<upstream::Tunnels>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.config).field("routed", &self.routes.is_some()).finish()
    }
}

/// Loads and compiles the configuration in `paths`: the snapshot and the warnings, or every
/// error.
pub fn load_snapshot(
    paths: &[std::path::PathBuf],
) -> Result<(snapshot::Snapshot, Vec<loader::Diagnostic>), Vec<loader::Diagnostic>> {
    let loaded = loader::load(paths);
    if loaded.has_errors() {
        return Err(loaded.diagnostics);
    }
    let file = paths.first().cloned().unwrap_or_default();
    match snapshot::compile(loaded.resources) {
        Ok(snapshot) => Ok((snapshot, loaded.diagnostics)),
        Err(e) => Err(vec![loader::Diagnostic {
            severity: loader::Severity::Error,
            file,
            line: None,
            column: None,
            resource: Some(e.resource),
            field: None,
            message: e.message,
        }]),
    }
}

/// Applies a snapshot's `MeshProxy` resource to `config`: the listener and admin addresses,
/// the inbound listener and the workload identity (whose files are read now). Errors name the
/// file and field.
pub fn apply_mesh_proxy(config: &mut ProxyConfig, snapshot: &snapshot::Snapshot) -> Result<(), String> {
    let Some(mp) = &snapshot.resources.mesh_proxy else { return Ok(()) };
    let at = |field: &str, what: String| format!("{}: error: MeshProxy: spec.{field}: {what}", mp.file.display());
    let addr = |field: &str, value: &str| {
        value.parse::<SocketAddr>().map_err(|_| at(field, format!("`{value}` is not an address like 127.0.0.1:15001")))
    };
    if let Some(listen) = &mp.spec.listen {
        config.listen = addr("listen", listen)?;
    }
    match mp.spec.admin.as_deref() {
        Some("off") => config.admin = None,
        Some(a) => config.admin = Some(addr("admin", a)?),
        None => {}
    }
    if let Some(inbound) = &mp.spec.inbound {
        let listen = addr("inbound.listen", &inbound.listen)?;
        let app_text = inbound.app.as_deref().or(mp.spec.app.as_deref()).unwrap_or(config::DEFAULT_UPSTREAM);
        let app: UpstreamAddr =
            app_text.parse().map_err(|_| at("inbound.app", format!("`{app_text}` is not HOST:PORT")))?;
        let mut c = config::InboundConfig::new(listen, app);
        if let Some(p) = &inbound.app_protocol {
            c.app_protocol = match p.as_str() {
                "http1" => UpstreamProtocol::Http1,
                "h2" => UpstreamProtocol::H2,
                "downstream" => UpstreamProtocol::Downstream,
                other => return Err(at("inbound.appProtocol", format!("`{other}` is not http1, h2 or downstream"))),
            };
        }
        config.inbound = Some(c);
    }
    if let Some(gateway) = &mp.spec.gateway {
        config.gateway_listeners.clear();
        for (i, l) in gateway.listeners.iter().enumerate() {
            let port = u16::try_from(l.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| at(&format!("gateway.listeners[{i}].port"), format!("`{}` is not a port", l.port)))?;
            if config.gateway_listeners.iter().any(|(p, _)| *p == port) {
                return Err(at(&format!("gateway.listeners[{i}].port"), format!("port {port} is listed twice")));
            }
            let listen = addr(&format!("gateway.listeners[{i}].listen"), &l.listen)?;
            config.gateway_listeners.push((port, listen));
        }
    }
    if let Some(tracing) = &mp.spec.tracing {
        let workload = &mp.spec.workload;
        let app = workload.labels.get("app").cloned().unwrap_or_else(|| workload.name.clone());
        let app = if app.is_empty() { "unknown".to_owned() } else { app };
        let namespace = workload.namespace.as_deref().unwrap_or("default");
        let mut t = config::TracingConfig::grpc(String::new(), format!("{app}.{namespace}"));
        t.endpoint = None;
        if let Some(otlp) = &tracing.otlp {
            let endpoint = &otlp.endpoint;
            match endpoint.parse::<http::Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
                _ => {
                    return Err(at(
                        "tracing.otlp.endpoint",
                        format!("`{endpoint}` is not a URL like http://127.0.0.1:4317"),
                    ));
                }
            }
            t.protocol = match otlp.protocol.as_deref() {
                None | Some("grpc") => mesh_telemetry::span::OtlpProtocol::Grpc,
                Some("http/protobuf" | "http") => mesh_telemetry::span::OtlpProtocol::HttpProtobuf,
                Some(other) => {
                    return Err(at("tracing.otlp.protocol", format!("`{other}` is not grpc or http/protobuf")));
                }
            };
            t.endpoint = Some(endpoint.clone());
        }
        if !tracing.propagators.is_empty() {
            use mesh_telemetry::propagation::Propagator;
            let mut formats = Vec::new();
            for (i, p) in tracing.propagators.iter().enumerate() {
                let format = match p.as_str() {
                    "tracecontext" | "w3c" => Propagator::W3c,
                    "b3" | "b3multi" => Propagator::B3,
                    other => {
                        return Err(at(
                            &format!("tracing.propagators[{i}]"),
                            format!("`{other}` is not tracecontext or b3"),
                        ));
                    }
                };
                if !formats.contains(&format) {
                    formats.push(format);
                }
            }
            t.propagators = formats;
        }
        if let Some(name) = &tracing.service_name {
            t.service_name = name.clone();
        }
        config.tracing = Some(t);
    }
    if let Some(identity) = &mp.spec.identity {
        let base = mp.file.parent().unwrap_or(std::path::Path::new("."));
        let files = identity.files(base).map_err(|e| at("identity", e))?;
        let loaded = mesh_tls::Identity::from_files(files).map_err(|e| at("identity", e.to_string()))?;
        config.identity = Some(loaded);
    }
    Ok(())
}

impl Server {
    /// Opens the proxy and admin listeners and forwards everything to `config.upstream`.
    /// Must run inside a tokio runtime.
    pub async fn bind(config: ProxyConfig) -> Result<Self, BindError> {
        Self::bind_routed(config, None).await
    }

    /// Opens the listeners and routes by `snapshot` (compiled from `config.config_paths`,
    /// which are then watched for changes), or forwards everything to `config.upstream`
    /// without one.
    pub async fn bind_routed(config: ProxyConfig, snapshot: Option<snapshot::Snapshot>) -> Result<Self, BindError> {
        let bind = |addr: SocketAddr, what| async move {
            TcpListener::bind(addr).await.map_err(|source| BindError { addr, what, source })
        };
        let listener = bind(config.listen, "proxy listener").await?;
        let inbound = match &config.inbound {
            Some(inbound) => Some(bind(inbound.listen, "inbound listener").await?),
            None => None,
        };
        let admin = match config.admin {
            Some(addr) => Some(bind(addr, "admin listener").await?),
            None => None,
        };
        let mut gateways = Vec::new();
        if snapshot.is_some() {
            for (port, addr) in &config.gateway_listeners {
                gateways.push((*port, bind(*addr, "gateway listener").await?));
            }
        }
        let tunnels: Arc<upstream::Tunnels> = Arc::default();
        let access_log = match config.access_log.as_deref() {
            None => None,
            Some(p) if p == std::path::Path::new("-") => {
                Some(mesh_telemetry::access_log::AccessLog::to_stdout(ACCESS_LOG_QUEUE))
            }
            Some(p) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| BindError { addr: config.listen, what: "access log file", source })?;
                Some(mesh_telemetry::access_log::AccessLog::to_writer(file, ACCESS_LOG_QUEUE))
            }
        };
        // Spans go to the collector from a task on this runtime.
        let tracer = match config.tracing.as_ref().and_then(|t| Some((t, t.endpoint.as_ref()?))) {
            Some((t, endpoint)) => {
                let export = match t.protocol {
                    mesh_telemetry::span::OtlpProtocol::Grpc => mesh_telemetry::span::OtlpExport::grpc(endpoint),
                    mesh_telemetry::span::OtlpProtocol::HttpProtobuf => {
                        mesh_telemetry::span::OtlpExport::http(endpoint)
                    }
                };
                let tracer = export.build(&t.service_name).map_err(|e| BindError {
                    addr: config.listen,
                    what: "OTLP exporter",
                    source: std::io::Error::other(e.to_string()),
                })?;
                Some(tracer)
            }
            None => None,
        };
        let telemetry = snapshot.as_ref().map(|s| {
            let spec = s.resources.mesh_proxy.as_ref().map(|r| &r.spec);
            let label = |k: &str| spec.and_then(|p| p.workload.labels.get(k).cloned());
            telemetry::Telemetry::new(
                &telemetry::Workload {
                    name: spec
                        .map(|p| p.workload.name.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| "unknown".into()),
                    namespace: spec.and_then(|p| p.workload.namespace.clone()).unwrap_or_else(|| "default".into()),
                    app: label("app"),
                    version: label("version"),
                    principal: config.identity.as_ref().map(|i| i.current().id().to_string()),
                },
                access_log.clone(),
                tracer.clone(),
                config.tracing.as_ref().map_or(&[][..], |t| &t.propagators),
            )
        });
        let routes = snapshot.map(|s| Arc::new(routes::Routes::new(s, &config)));
        if let (Some(tracer), Some(routes)) = (tracer, &routes) {
            let mut layer = mesh_telemetry::span::ClientSpanLayer::new(tracer);
            if let Some(t) = &config.tracing {
                layer = layer.propagators(&t.propagators);
            }
            let _ = routes.client_spans.set(layer);
        }
        if let (Some(t), Some(r)) = (&telemetry, &routes) {
            t.registry.lock().unwrap_or_else(|p| p.into_inner()).register_collector(Box::new(
                proxy_metrics::ProxyCollector {
                    routes: r.clone(),
                    in_flight: t.in_flight.clone(),
                    access_log: t.access_log.clone(),
                },
            ));
            t.configure(&r.snapshot());
            let t = t.clone();
            r.on_store(Box::new(move |s| t.configure(s)));
        }
        Ok(Self { config, telemetry, listener, inbound, gateways, admin, routes, tunnels })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// The address the inbound listener listens on, if there is one.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.as_ref().map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The gateway listeners' addresses, by Gateway port number.
    pub fn gateway_addrs(&self) -> Vec<(u16, SocketAddr)> {
        self.gateways.iter().map(|(p, l)| (*p, l.local_addr().expect("bound listener has an address"))).collect()
    }

    /// The address the admin server listens on, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The configuration being served.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Serves until `shutdown` completes, then drains: `/ready` turns 503, the listener stops
    /// accepting, open connections finish their in-flight requests (HTTP/1.1 closes after the
    /// current response, HTTP/2 sends GOAWAY), upgraded connections (WebSocket) stay open
    /// until they close by themselves, and whatever is still open after the drain timeout is
    /// closed.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let draining = Arc::new(AtomicBool::new(false));
        let (drain_tx, drain_rx) = watch::channel(false);
        let with_telemetry = |f: proxy::Forward| match &self.telemetry {
            Some(t) => f.with_telemetry(t.clone()),
            None => f,
        };
        let forward = with_telemetry(proxy::Forward::new(&self.config, self.routes.clone(), self.tunnels.clone()));
        if let Some(routes) = &self.routes
            && !self.config.config_paths.is_empty()
        {
            tokio::spawn(reload::watch(
                self.config.config_paths.clone(),
                self.config.reload_interval,
                Arc::downgrade(routes),
            ));
        }
        let limits = downstream::Limits {
            idle: self.config.downstream_idle_timeout,
            request: self.config.request_timeout,
            headers: self.config.request_headers_timeout,
            stream_idle: self.config.stream_idle_timeout,
        };

        let mut http1 = hyper::server::conn::http1::Builder::new();
        // One write per response (head and body copied together): cheaper on TCP than a
        // vectored write of several small buffers. No header read timeout: the connection's
        // watchdog times request heads without a timer per request.
        http1.writev(false);
        // Request heads up to 60 KiB (hyper's own cap is about 400 KB per connection) and
        // 100 fields (hyper's default): beyond, 431.
        http1.max_buf_size(config::MAX_HEAD_BYTES);
        http1.max_headers(config::MAX_HEADERS);

        if let Some(admin) = self.admin {
            tokio::spawn(admin::serve(admin, draining.clone(), self.routes.clone(), self.telemetry.clone()));
        }

        let accept = async {
            loop {
                let (stream, peer) = admit(&self.listener, &drain_tx, self.config.max_connections, "outbound").await;
                let forward = match stream.local_addr() {
                    Ok(local) => forward.for_client(mesh_core::ClientConnection::new(peer, local)),
                    Err(_) => forward.clone(),
                };
                let conn = Conn {
                    forward,
                    drain: drain_rx.clone(),
                    limits,
                    http1: http1.clone(),
                    max_premature_resets: self.config.max_premature_resets,
                };
                tokio::spawn(conn.serve(sniff::Downstream::Tcp(stream)));
            }
        };
        let inbound = async {
            let (Some(listener), Some(inbound), Some(routes)) = (&self.inbound, &self.config.inbound, &self.routes)
            else {
                return std::future::pending().await;
            };
            let forward =
                with_telemetry(proxy::Forward::inbound(&self.config, inbound, routes.clone(), self.tunnels.clone()));
            // One server configuration: it resolves the certificate and trust bundle at each
            // handshake, so rotation needs nothing here.
            // TLS 1.2 as well as 1.3: an Envoy client that Istio did not configure offers at
            // most TLS 1.2.
            let tls = self.config.identity.as_ref().map(|i| i.server_config(mesh_tls::TlsVersions::Tls12And13));
            loop {
                let (stream, peer) = admit(listener, &drain_tx, self.config.max_connections, "inbound").await;
                let mode = routes.snapshot().security.mode;
                let acceptor = match &tls {
                    Some(config) => mesh_tls::MeshAcceptor::with_config(mode, config.clone()),
                    // Without credentials only plaintext can be served; STRICT then refuses
                    // everything (as it should: it cannot be honoured).
                    None if mode == mesh_tls::MtlsMode::Strict => {
                        tracing::warn!(%peer, "inbound connection refused: STRICT mTLS without a workload identity");
                        continue;
                    }
                    None => mesh_tls::MeshAcceptor::plaintext(),
                };
                let conn = Conn {
                    forward: forward.clone(),
                    drain: drain_rx.clone(),
                    limits,
                    http1: http1.clone(),
                    max_premature_resets: self.config.max_premature_resets,
                };
                let app = inbound.app.clone();
                let tunnels = self.tunnels.clone();
                tokio::spawn(async move {
                    let local = match stream.local_addr() {
                        Ok(local) => local,
                        Err(_) => return,
                    };
                    let client = mesh_core::ClientConnection::new(peer, local);
                    match tokio::time::timeout(OPENING_LIMIT, acceptor.accept(stream)).await {
                        Ok(Ok(mesh_tls::Accepted::Mtls(tls))) => {
                            let client = match tls.sni() {
                                Some(sni) => client.with_sni(sni.clone()),
                                None => client,
                            };
                            let identity = mesh_core::PeerIdentity(tls.peer().clone());
                            let forward = conn.forward.for_client(client).for_peer(identity);
                            Conn { forward, ..conn }.serve(sniff::Downstream::Mtls(tls)).await;
                        }
                        Ok(Ok(mesh_tls::Accepted::Plaintext(io))) => {
                            let forward = conn.forward.for_client(client);
                            Conn { forward, ..conn }.serve(sniff::Downstream::Plain(io)).await;
                        }
                        Ok(Ok(mesh_tls::Accepted::Opaque(mut io))) => {
                            // The application's own TLS: passed through untouched.
                            let _open = tunnels.open();
                            match TcpStream::connect(app.as_str()).await {
                                Ok(mut upstream) => {
                                    let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
                                }
                                Err(e) => tracing::debug!(error = %e, "inbound passthrough: the application refused"),
                            }
                        }
                        Ok(Err(e)) => {
                            if matches!(e, mesh_tls::AcceptError::PlaintextRefused) {
                                INBOUND_PLAINTEXT_REFUSED.fetch_add(1, Ordering::Relaxed);
                            } else {
                                INBOUND_HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
                            }
                            tracing::debug!(%peer, error = %e, "inbound connection refused");
                        }
                        Err(_) => tracing::debug!(%peer, "inbound connection took too long to open"),
                    }
                });
            }
        };
        // The gateway listeners: plaintext HTTP, or TLS by SNI (terminated or passed through).
        let has_gateways = self.routes.is_some() && !self.gateways.is_empty();
        let gateways = futures_util::future::join_all(self.gateways.into_iter().filter_map(|(port, listener)| {
            let routes = self.routes.clone()?;
            let forward =
                with_telemetry(proxy::Forward::gateway(&self.config, routes.clone(), port, self.tunnels.clone()));
            let (drain_tx, drain_rx, http1, tunnels) =
                (&drain_tx, drain_rx.clone(), http1.clone(), self.tunnels.clone());
            let (max_connections, max_premature_resets) =
                (self.config.max_connections, self.config.max_premature_resets);
            Some(async move {
                loop {
                    let (stream, peer) = admit(&listener, drain_tx, max_connections, "gateway").await;
                    let Some(plan) = routes.snapshot().gateway.clone() else { continue };
                    let Ok(local) = stream.local_addr() else { continue };
                    let client = mesh_core::ClientConnection::new(peer, local);
                    let conn = Conn {
                        forward: forward.clone(),
                        drain: drain_rx.clone(),
                        limits,
                        http1: http1.clone(),
                        max_premature_resets,
                    };
                    let (routes, tunnels) = (routes.clone(), tunnels.clone());
                    tokio::spawn(async move {
                        let Some(served) = plan.ports.get(&port) else { return };
                        if !served.is_tls() {
                            let forward = conn.forward.for_client(client);
                            return Conn { forward, ..conn }.serve(sniff::Downstream::Tcp(stream)).await;
                        }
                        match tokio::time::timeout(OPENING_LIMIT, gateway::open_tls(stream, served)).await {
                            Ok(Ok(gateway::Opened::Terminated(tls, sni, hosts))) => {
                                let client = match sni {
                                    Some(sni) => client.with_sni(sni),
                                    None => client,
                                };
                                let forward = conn.forward.for_client(client).for_tls_server(hosts);
                                Conn { forward, ..conn }.serve(sniff::Downstream::Tls(tls)).await;
                            }
                            Ok(Ok(gateway::Opened::Passthrough(prefix, stream, targets))) => {
                                // Held while the bytes flow: the connection counts against
                                // the cap, and the drain waits for it.
                                let idle = conn.forward.tunnel_idle_limit();
                                let _open = (tunnels.open(), conn);
                                gateway::pass_through(prefix, stream, targets, routes, idle).await;
                            }
                            Ok(Err(why)) => tracing::debug!(%peer, port, %why, "gateway connection closed"),
                            Err(_) => tracing::debug!(%peer, port, "gateway connection took too long to open"),
                        }
                    });
                }
            })
        }));
        tokio::select! {
            () = accept => {}
            () = inbound => {}
            // (Without gateway listeners `gateways` is ready at once: it must not end the loop.)
            _ = gateways, if has_gateways => {}
            () = shutdown => {}
        }

        draining.store(true, Ordering::Release);
        drop(self.listener);
        drop(self.inbound);
        drain_tx.send_replace(true);
        drop(drain_rx);
        let open = drain_tx.receiver_count();
        let tunnels = forward.tunnels().clone();
        tracing::info!(connections = open, tunnels = tunnels.count(), timeout = ?self.config.drain_timeout, "draining");
        let drained = async {
            drain_tx.closed().await;
            // Upgraded connections outlive the HTTP connections they came from.
            tunnels.all_closed().await;
        };
        tokio::select! {
            () = drained => tracing::info!("drained"),
            () = tokio::time::sleep(self.config.drain_timeout) => {
                tracing::warn!("drain timeout reached; closing the remaining connections");
            }
        }
        // The access log's queued lines reach the file before the process ends.
        // Bounded: a writer stuck on a stalled output does not hold the exit.
        if let Some(log) = self.telemetry.as_ref().and_then(|t| t.access_log.clone()) {
            let flushed =
                tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(move || log.flush()));
            if flushed.await.is_err() {
                tracing::warn!("access log lines not written at exit: its output is not taking them");
            }
        }
        // The spans still queued go to the collector (a blocking call: the export runs on
        // this runtime meanwhile).
        if let Some(tracer) = self.telemetry.as_ref().and_then(|t| t.tracer().cloned()) {
            // Bounded here too: the SDK's shutdown waits for every queued export.
            let flushed = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || tracer.shutdown(Duration::from_secs(5))),
            );
            match flushed.await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "spans not exported at exit"),
                Err(_) => tracing::warn!("spans not exported at exit: the collector did not answer in 5 s"),
                _ => {}
            }
        }
    }
}

/// What serving one downstream connection needs.
/// Client connections refused for the connection cap (for `/stats`).
pub(crate) static REFUSED_CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Access log lines that may wait for the writer; beyond, lines are dropped and counted.
const ACCESS_LOG_QUEUE: usize = 8192;

/// Inbound connections refused for being plaintext under STRICT, and inbound TLS
/// handshakes that failed (bad or missing client certificates), for `/stats`.
pub(crate) static INBOUND_PLAINTEXT_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub(crate) static INBOUND_HANDSHAKE_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The next connection a listener accepts that the connection cap admits, with `TCP_NODELAY`
/// set. Accept errors (out of descriptors and the like) back off instead of spinning; a
/// connection beyond `max` open ones is closed at once and counted.
async fn admit(
    listener: &TcpListener,
    drain: &watch::Sender<bool>,
    max: Option<usize>,
    which: &'static str,
) -> (TcpStream, SocketAddr) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, listener = which, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Every open connection holds a drain receiver: their count is the connection count
        // (plus the accepting tasks' own).
        if max.is_some_and(|max| drain.receiver_count() > max) {
            REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, listener = which, "connection refused: too many open");
            continue;
        }
        let _ = stream.set_nodelay(true);
        return (stream, peer);
    }
}

struct Conn {
    forward: proxy::Forward,
    drain: watch::Receiver<bool>,
    limits: downstream::Limits,
    http1: hyper::server::conn::http1::Builder,
    max_premature_resets: Option<u64>,
}

/// The longest a new connection may take to show its protocol (and, for h2c, to send its
/// connection preface).
const OPENING_LIMIT: Duration = Duration::from_secs(10);

/// A connection whose protocol is known.
#[expect(clippy::large_enum_variant, reason = "made once per connection and taken apart at once")]
enum Opened {
    Http1(sniff::ClientIo),
    H2c(h2::server::Connection<sniff::ClientIo, Bytes>),
}

impl Conn {
    /// Serves HTTP/1.x (through hyper) or h2c (prior knowledge, through the `h2` crate),
    /// whichever the client speaks, with a watchdog for idle time, request timeouts and drain.
    async fn serve(self, stream: sniff::Downstream) {
        let state = downstream::ConnState::new();
        let Some(opened) = self.open(stream, &state).await else { return };
        self.spawn_watchdog(&state);
        match opened {
            Opened::H2c(conn) => {
                let (forward, streams) = (self.forward, state.clone());
                let resets = Arc::new(h2server::ResetBudget::new(self.max_premature_resets));
                let counted = resets.clone();
                let server = h2server::H2Server::new(conn, resets, move |req, respond| {
                    h2server::serve_stream(forward.clone(), req, respond, streams.start_request(), counted.clone())
                });
                if let Some(Err(e)) = downstream::serve(server, state).await {
                    tracing::debug!(error = %e, "h2c downstream connection ended with an error");
                }
            }
            Opened::Http1(io) => {
                let (forward, requests) = (self.forward, state.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let in_flight = requests.start_request();
                    forward.clone().call(req.map(|body| body::RequestBody::http1(body, &requests)), in_flight)
                });
                let conn = self.http1.serve_connection(TokioIo::new(io), service).with_upgrades();
                if let Some(Err(e)) = downstream::serve(conn, state).await {
                    tracing::debug!(error = %e, "HTTP/1.1 downstream connection ended with an error");
                }
            }
        }
    }

    /// Finds out which protocol the client speaks and, for h2c, reads its preface. A client
    /// that takes longer than the idle timeout or the request head timeout (10 s at most, even
    /// with neither) is dropped, and so is one still opening when a drain starts: it has sent
    /// no request yet.
    async fn open(&self, mut stream: sniff::Downstream, state: &Arc<downstream::ConnState>) -> Option<Opened> {
        let limit = [self.limits.idle, self.limits.headers].into_iter().flatten().fold(OPENING_LIMIT, Duration::min);
        let opening = async {
            let (protocol, prefix) = match sniff::sniff(&mut stream).await {
                Ok(Some(sniffed)) => sniffed,
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "reading from a new connection failed");
                    return None;
                }
            };
            let mut io = sniff::Prefixed::new(prefix, stream);
            // Counted from the start, both protocols: for the stream idle timeout, and for
            // HTTP/1.x also the request head timeout.
            io.count_io(state.clone());
            if protocol == sniff::Protocol::H2c {
                io.track_h2_heads();
            }
            match protocol {
                sniff::Protocol::Http1 => Some(Opened::Http1(io)),
                sniff::Protocol::H2c => match h2server::handshake(io).await {
                    Ok(conn) => Some(Opened::H2c(conn)),
                    Err(e) => {
                        tracing::debug!(error = %e, "h2c handshake failed");
                        None
                    }
                },
            }
        };
        let mut drain = self.drain.clone();
        tokio::select! {
            opened = tokio::time::timeout(limit, opening) => opened.ok().flatten(),
            _ = drain.wait_for(|draining| *draining) => None,
        }
    }

    fn spawn_watchdog(&self, state: &Arc<downstream::ConnState>) {
        // HTTP/1.x heads are timed from their first byte, HTTP/2 header blocks from their
        // HEADERS frame (the client's I/O follows its frames).
        let watchdog = downstream::watchdog(state.clone(), self.drain.clone(), self.limits);
        tokio::spawn(watchdog);
    }
}
