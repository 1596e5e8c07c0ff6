//! The `mesh-proxy` binary. Run `mesh-proxy --help`.

mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// With the `jemalloc` feature (the default): jemalloc, which returns freed memory to the
/// system from a background thread (settings in `.cargo/config.toml`; `_RJEM_MALLOC_CONF`
/// overrides them).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use mesh_proxy::config::{DEFAULT_ADMIN, DEFAULT_LISTEN, DEFAULT_UPSTREAM};
use mesh_proxy::{ProxyConfig, Server, UpstreamAddr, UpstreamProtocol};

/// A service-mesh sidecar proxy.
///
/// Serves HTTP/1.1 and HTTP/2 cleartext (h2c, prior knowledge) on one port and forwards every
/// request to one upstream, over pooled keep-alive connections. When the upstream cannot be
/// reached it answers 503 (flag UF); when it closes or resets before answering, 503 (UC or UR);
/// when it does not answer in time, 504 (UT). With no arguments it runs on the embedded
/// default: listen on 127.0.0.1:15001, forward to 127.0.0.1:8080, admin on 127.0.0.1:15000.
///
/// SIGTERM or Ctrl-C drains: /ready turns 503, the listener closes, in-flight requests and open
/// WebSockets finish (up to --drain-timeout), then the process exits 0. A second signal exits
/// at once.
#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about, long_about, after_help = AFTER_HELP)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Configuration: a YAML file or a directory of them (repeatable). VirtualService,
    /// DestinationRule, ServiceEntry, SMI TrafficSplit and the proxy's own MeshProxy kind;
    /// requests are then routed by their Host / :authority. Reloaded when the files change.
    #[arg(short, long, value_name = "PATH", env = "MESH_PROXY_CONFIG", value_delimiter = ',')]
    config: Vec<PathBuf>,

    /// Address to serve HTTP/1.1 and h2c on (the outbound listener); overrides MeshProxy's
    /// `listen` [default: 127.0.0.1:15001].
    #[arg(short, long, value_name = "ADDR", env = "MESH_PROXY_LISTEN")]
    listen: Option<SocketAddr>,

    /// Upstream to forward every request to, as HOST:PORT (a name is resolved per connection).
    #[arg(short, long, value_name = "HOST:PORT", env = "MESH_PROXY_UPSTREAM", default_value = DEFAULT_UPSTREAM)]
    upstream: UpstreamAddr,

    /// Protocol to speak to the upstream: `downstream` uses the one each request arrived with.
    #[arg(long, value_name = "PROTO", env = "MESH_PROXY_UPSTREAM_PROTOCOL", default_value = "downstream")]
    upstream_protocol: UpstreamProtocol,

    /// Admin address serving /ready, /live (and with --config /config_dump, /routes,
    /// /clusters, /stats), or `off`; overrides MeshProxy's `admin` [default: 127.0.0.1:15000].
    #[arg(short, long, value_name = "ADDR|off", env = "MESH_PROXY_ADMIN", value_parser = parse_admin)]
    admin: Option<AdminAddr>,

    /// Upstream TCP connect timeout (e.g. 250ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// Time allowed until the upstream's response headers arrive; 0 disables it.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    request_timeout: Duration,

    /// How long an idle pooled upstream connection is kept.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// How long a client connection may sit without a request before it is closed; 0 never.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    downstream_idle_timeout: Duration,

    /// Time a client has to send a request head, from its first byte, before it is answered
    /// 408 and closed (HTTP/2: a header block, from its HEADERS frame, before the connection
    /// is dropped); 0 disables it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    request_headers_timeout: Duration,

    /// Time a client connection with a request in flight, or an upgraded connection
    /// (WebSocket), may go without a byte moving on it (a client that stopped reading, a
    /// silent upstream) before it is dropped; 0 disables it.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    stream_idle_timeout: Duration,

    /// Streams an h2c client may cancel before their response (more than half of its
    /// streams, too) before its connection gets GOAWAY ENHANCE_YOUR_CALM; 0 allows any.
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_premature_resets: u64,

    /// Client connections open at once on the data port; more are refused; 0 allows any.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_connections: usize,

    /// Most idle HTTP/1.1 upstream connections kept.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_idle: usize,

    /// How long to wait for in-flight requests after SIGTERM / Ctrl-C.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Worker threads. 1 runs the whole proxy on one thread, a sidecar's usual budget.
    #[arg(short, long, value_name = "N", env = "MESH_PROXY_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `mesh_proxy=debug`).
    /// The JSON access log (one line per request, with a configuration): a file, or `-` for
    /// standard output. Lines are dropped (and counted in /stats) rather than slow requests.
    #[arg(long, value_name = "PATH|-", env = "MESH_PROXY_ACCESS_LOG")]
    access_log: Option<PathBuf>,

    #[arg(long, value_name = "FILTER", env = "MESH_PROXY_LOG", default_value = "info")]
    log: String,

    /// Loads the configuration (and the workload certificate), prints the effective
    /// settings and exits: 0 when the proxy would start with them, 1 when it would not.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Development certificates: a CA and SPIFFE workload certificates (X.509-SVIDs), in
    /// the Kubernetes Secret layout (`tls.crt`, `tls.key`, `ca.crt`).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Starts a small mesh in this process on 127.0.0.1 (a frontend sidecar, reviews v1 / v2
    /// behind sidecars, mTLS from a generated dev CA) and drives traffic through a canary
    /// split, a header route, retries and an ejection, injected faults and a rate limit,
    /// printing what each did.
    Demo {
        /// Requests in the canary phase.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
    },
    /// Asks a running proxy's admin server whether it is ready (`GET /ready`): exit status 0
    /// when it answers 200 within 2 seconds, 1 otherwise. For container health checks in an
    /// image that has no HTTP client of its own.
    Ready {
        /// The admin server's address.
        #[arg(long, default_value = mesh_proxy::config::DEFAULT_ADMIN)]
        admin: std::net::SocketAddr,
    },
    /// Checks configuration files offline: every error with file:line:column and field path,
    /// every unsupported field or kind as a warning. Exit status 1 on errors.
    Validate {
        /// Files or directories of YAML.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum CertsCommand {
    /// Creates a CA for a trust domain: DIR/ca.crt and DIR/ca.key.
    Ca {
        /// The trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Where to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issues a workload certificate: OUT/tls.crt, OUT/tls.key and OUT/ca.crt.
    Issue {
        /// The CA directory (made by `certs ca`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The workload's SPIFFE ID, or `NAMESPACE/SERVICE-ACCOUNT` in the CA's trust domain.
        #[arg(long)]
        id: String,
        /// Validity.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
        valid_for: Duration,
        /// Where to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

const AFTER_HELP: &str = "\
Durations: a number and a unit, combinable: 500ms, 2s, 1.5s, 1m30s.
Exit status: 0 after a clean drain, 1 when a listener cannot be opened, 2 for bad arguments.

Examples:
  mesh-proxy                                         # the embedded default
  mesh-proxy --listen 0.0.0.0:8000 --upstream app:8080
  mesh-proxy -l 127.0.0.1:15001 -u 127.0.0.1:9000 --upstream-protocol h2 --admin off
  mesh-proxy --config /etc/mesh/                    # route by Istio YAML, reloaded on change
  mesh-proxy validate mesh.yaml                      # check files offline";

#[derive(Debug, Clone, Copy)]
struct AdminAddr(Option<SocketAddr>);

fn parse_admin(s: &str) -> Result<AdminAddr, String> {
    if s == "off" {
        return Ok(AdminAddr(None));
    }
    s.parse()
        .map(|a| AdminAddr(Some(a)))
        .map_err(|_| format!("`{s}` is neither an address like 127.0.0.1:15000 nor `off`"))
}

/// An Istio duration (`10s`, `250ms`, `1.5s`); 0 or at least a millisecond, as Istio requires of
/// its timeouts (the watchdogs sample a few times per period, which a shorter one would spin).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = mesh_core::config::Duration::parse(s).map(|d| d.get()).map_err(|e| e.to_string())?;
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(format!("{s:?} is shorter than 1ms (0 disables where that is allowed)"));
    }
    Ok(d)
}

/// `GET /ready` on the admin server, over a plain socket (no runtime needed for one request).
fn ready(admin: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let limit = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, limit).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]).map_err(|e| e.to_string())? {
            0 => break,
            n => read += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    match line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("not ready (status {status})")),
        None => Err("no HTTP answer".into()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Validate { paths }) = &args.command {
        return validate(paths);
    }
    if let Some(Command::Demo { requests }) = &args.command {
        init_logging("warn");
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("mesh-proxy demo: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(demo::run(*requests)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-proxy demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Ready { admin }) = &args.command {
        return match ready(*admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-proxy ready: {admin}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Certs(command)) = &args.command {
        return match certs(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-proxy certs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(&args.log);

    // The runtime first: loading the configuration may start tasks (JWKS fetches,
    // certificate watches).
    let workers = usize::from(args.workers);
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let entered = runtime.enter();

    let mut config = ProxyConfig::default();
    config.listen = DEFAULT_LISTEN.parse().expect("valid default");
    config.admin = Some(DEFAULT_ADMIN.parse().expect("valid default"));
    let mut snapshot = None;
    if !args.config.is_empty() {
        match mesh_proxy::load_snapshot(&args.config) {
            Ok((loaded, warnings)) => {
                for w in &warnings {
                    tracing::warn!("{w}");
                }
                for note in &loaded.notes {
                    tracing::info!("config: {note}");
                }
                if let Err(e) = mesh_proxy::apply_mesh_proxy(&mut config, &loaded) {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
                snapshot = Some(loaded);
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!("mesh-proxy: the configuration has {} error(s); not starting", errors.len());
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin {
        config.admin = admin.0;
    }
    config.config_paths = args.config.clone();
    config.upstream = args.upstream;
    config.upstream_protocol = args.upstream_protocol;
    config.connect_timeout = args.connect_timeout;
    config.request_timeout = (!args.request_timeout.is_zero()).then_some(args.request_timeout);
    config.idle_timeout = args.idle_timeout;
    config.downstream_idle_timeout = (!args.downstream_idle_timeout.is_zero()).then_some(args.downstream_idle_timeout);
    config.request_headers_timeout = (!args.request_headers_timeout.is_zero()).then_some(args.request_headers_timeout);
    config.stream_idle_timeout = (!args.stream_idle_timeout.is_zero()).then_some(args.stream_idle_timeout);
    config.max_idle = args.max_idle;
    config.max_premature_resets = (args.max_premature_resets > 0).then_some(args.max_premature_resets);
    config.max_connections = (args.max_connections > 0).then_some(args.max_connections);
    config.drain_timeout = args.drain_timeout;
    config.workers = workers;
    config.access_log = args.access_log.clone();
    if args.check {
        print_check(&config, snapshot.as_ref());
        return ExitCode::SUCCESS;
    }
    // Certificates rotate as cert-manager or SPIRE rewrite the files.
    let _watch = config.identity.as_ref().map(|i| i.watch(Duration::from_secs(1)));
    drop(entered);

    runtime.block_on(async move {
        let routed = snapshot.is_some();
        let server = match Server::bind_routed(config, snapshot).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        let c = server.config();
        if routed {
            println!(
                "mesh-proxy {}: listening on http://{} (HTTP/1.1 and h2c), routing by {} (reloaded on change)",
                env!("CARGO_PKG_VERSION"),
                server.local_addr(),
                c.config_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            );
        } else {
        println!(
            "mesh-proxy {}: listening on http://{} (HTTP/1.1 and h2c), forwarding to {} (upstream protocol: {}, {} worker{})",
            env!("CARGO_PKG_VERSION"),
            server.local_addr(),
            c.upstream,
            c.upstream_protocol,
            c.workers,
            if c.workers == 1 { "" } else { "s" },
        );
        }
        if let (Some(addr), Some(inbound)) = (server.inbound_addr(), &c.inbound) {
            let identity = c.identity.as_ref().map_or("no identity: plaintext only".to_owned(), |i| format!("identity {}", i.current().id()));
            println!("mesh-proxy: inbound on {addr} to {} ({identity})", inbound.app);
        }
        for (port, addr) in server.gateway_addrs() {
            println!("mesh-proxy: gateway port {port} on {addr}");
        }
        match server.admin_addr() {
            Some(admin) if routed => {
                println!("mesh-proxy: admin on http://{admin} (/ready, /live, /config_dump, /routes, /clusters, /stats, /certs)")
            }
            Some(admin) => println!("mesh-proxy: admin on http://{admin} (/ready, /live)"),
            None => println!("mesh-proxy: admin server off"),
        }
        server.serve(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// `mesh-proxy validate`: prints every diagnostic and a summary; 1 when there are errors.
fn validate(paths: &[PathBuf]) -> ExitCode {
    let files = mesh_proxy::loader::expand(paths).map(|f| f.len()).unwrap_or(0);
    let mut diagnostics = match mesh_proxy::load_snapshot(paths) {
        Ok((_, warnings)) => warnings,
        Err(errors) => errors,
    };
    // Errors found while loading stop compilation: show warnings from the load as well.
    let loaded = mesh_proxy::loader::load(paths);
    for d in loaded.diagnostics {
        if !diagnostics.contains(&d) {
            diagnostics.push(d);
        }
    }
    diagnostics.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    let errors = diagnostics.iter().filter(|d| d.severity == mesh_proxy::loader::Severity::Error).count();
    for d in &diagnostics {
        println!("{d}");
    }
    println!("{files} file(s): {errors} error(s), {} warning(s)", diagnostics.len() - errors);
    if errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn certs(command: &CertsCommand) -> Result<(), String> {
    let write = |dir: &std::path::Path, name: &str, text: &str| {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    match command {
        CertsCommand::Ca { trust_domain, out } => {
            let td: mesh_core::TrustDomain = trust_domain.parse().map_err(|e| format!("--trust-domain: {e}"))?;
            let ca = mesh_tls::DevCa::new(&td).map_err(|e| e.to_string())?;
            write(out, "ca.crt", ca.cert_pem())?;
            write(out, "ca.key", ca.key_pem())?;
            println!("CA for {} in {}", td.as_str(), out.display());
        }
        CertsCommand::Issue { ca, id, valid_for, out } => {
            let read = |name: &str| {
                let path = ca.join(name);
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
            };
            let cert = read("ca.crt")?;
            // The trust domain is the CA certificate's own SPIFFE ID.
            let td = {
                use rustls_pki_types::pem::PemObject;
                let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
                    .map_err(|e| format!("ca.crt: {e}"))?;
                x509_trust_domain(&der).ok_or("ca.crt has no SPIFFE ID naming its trust domain")?
            };
            let ca = mesh_tls::DevCa::from_pem(&cert, &read("ca.key")?, &td).map_err(|e| e.to_string())?;
            let spiffe = if id.starts_with("spiffe://") {
                id.parse::<mesh_core::SpiffeId>()
            } else {
                let (ns, sa) = id.split_once('/').ok_or("--id: a SPIFFE ID or NAMESPACE/SERVICE-ACCOUNT")?;
                mesh_core::SpiffeId::for_service_account(&td, ns, sa)
            }
            .map_err(|e| format!("--id: {e}"))?;
            let issued = ca.issue(&spiffe, *valid_for).map_err(|e| e.to_string())?;
            write(out, "tls.crt", &issued.cert_chain)?;
            write(out, "tls.key", &issued.private_key)?;
            write(out, "ca.crt", &cert)?;
            println!("{spiffe} in {}", out.display());
        }
    }
    Ok(())
}

/// The trust domain named by a CA certificate's SPIFFE ID.
fn x509_trust_domain(der: &rustls_pki_types::CertificateDer<'_>) -> Option<mesh_core::TrustDomain> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix("spiffe://")?.split('/').next()?.parse().ok(),
        _ => None,
    })
}

/// `--check`: the settings the proxy would start with.
fn print_check(config: &ProxyConfig, snapshot: Option<&mesh_proxy::snapshot::Snapshot>) {
    println!("mesh-proxy {} configuration check: ok", env!("CARGO_PKG_VERSION"));
    println!("  listen           {}", config.listen);
    println!("  admin            {}", config.admin.map_or("off".to_owned(), |a| a.to_string()));
    match &config.inbound {
        Some(i) => println!("  inbound          {} -> {} ({:?})", i.listen, i.app, i.app_protocol),
        None => println!("  inbound          none"),
    }
    match &config.identity {
        Some(identity) => {
            let status = identity.status();
            let left = status.not_after.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs());
            println!("  identity         {} (expires in {left} s)", status.id);
        }
        None => println!("  identity         none (no mTLS)"),
    }
    match config.tracing.as_ref().and_then(|t| Some((t, t.endpoint.as_ref()?))) {
        Some((t, endpoint)) => println!("  spans            {endpoint} ({:?}) as {}", t.protocol, t.service_name),
        None => println!("  spans            not exported"),
    }
    println!("  access log       {}", config.access_log.as_ref().map_or("off".to_owned(), |p| p.display().to_string()));
    match snapshot {
        Some(s) => {
            println!("  destinations     {}", s.clusters.len());
            println!("  inbound mTLS     {:?}", s.security.mode);
            println!(
                "  trace sampling   {} %",
                s.trace_sampling.map_or("1 (Istio's default)".to_owned(), |p| p.to_string())
            );
            for note in &s.notes {
                println!("  note: {note}");
            }
        }
        None => println!("  routing          none: everything to {}", config.upstream),
    }
}

fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, text) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(f) => (f, filter.to_owned()),
        Err(e) => {
            eprintln!("mesh-proxy: ignoring log filter `{filter}`: {e}");
            (tracing_subscriber::EnvFilter::new("info"), "info".to_owned())
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The filter can be swapped at run time: the admin server's `/logging`.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
        .init();
    let current = std::sync::Mutex::new(text);
    mesh_proxy::set_log_filter_hook(Box::new(move |wanted| {
        let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wanted) = wanted {
            let filter = tracing_subscriber::EnvFilter::try_new(wanted).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())?;
            tracing::info!(filter = wanted, "log filter changed");
            *current = wanted.to_owned();
        }
        Ok(current.clone())
    }));
}

/// Resolves on the first SIGTERM or Ctrl-C; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("mesh-proxy: second signal, exiting without draining");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
