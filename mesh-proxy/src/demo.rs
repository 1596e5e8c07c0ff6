//! `mesh-proxy demo`: a small mesh in this one process, on 127.0.0.1. A frontend sidecar
//! routes to `reviews` behind three sidecars (v1, a broken v1, v2) over mutual TLS from a
//! development CA made at start, and the demo drives traffic through a canary split, a
//! header route, retries and an outlier ejection, an injected fault and a rate limit, then
//! prints what each did. The configuration is the Istio and Linkerd YAML an operator
//! would write; the proxies are the same `Server`s the binary runs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh_proxy::{ProxyConfig, Server};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An application answering `name`, or 503 when `broken`.
async fn app(name: &'static str, broken: bool) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    let mut res = Response::new(Full::new(Bytes::from(name)));
                    if broken {
                        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, std::convert::Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

/// Starts a proxy on the configuration in `dir`, as the binary would (`MeshProxy` applied).
async fn proxy(dir: &Path, admin: bool) -> Result<Server, BoxError> {
    let (snapshot, _warnings) = mesh_proxy::load_snapshot(&[dir.to_path_buf()])
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))?;
    let mut config = ProxyConfig::default();
    config.listen = "127.0.0.1:0".parse()?;
    config.admin = if admin { Some("127.0.0.1:0".parse()?) } else { None };
    mesh_proxy::apply_mesh_proxy(&mut config, &snapshot)?;
    config.config_paths = vec![dir.to_path_buf()];
    Ok(Server::bind_routed(config, Some(snapshot)).await?)
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), BoxError> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), text)?;
    Ok(())
}

/// Certificates for `sa` in namespace `demo`, in the Secret layout under `dir/certs/sa`.
fn identity(ca: &mesh_tls::DevCa, dir: &Path, sa: &str) -> Result<(), BoxError> {
    let id = mesh_core::SpiffeId::for_service_account(&"cluster.local".parse()?, "demo", sa)?;
    let issued = ca.issue(&id, Duration::from_secs(3600))?;
    let certs = dir.join("certs").join(sa);
    write(&certs, "tls.crt", &issued.cert_chain)?;
    write(&certs, "tls.key", &issued.private_key)?;
    write(&certs, "ca.crt", ca.cert_pem())
}

fn reviews_sidecar(version: &str, app: SocketAddr) -> String {
    format!(
        r#"apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {{name: reviews-{version}}}
spec:
  workload: {{name: reviews-{version}, namespace: demo, serviceAccount: reviews, labels: {{app: reviews, version: {version}}}}}
  inbound: {{listen: "127.0.0.1:0", app: "{app}"}}
  identity: {{secretDir: ../certs/reviews}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: demo}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews, namespace: demo}}
spec:
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/demo/sa/frontend"]}}}}]}}]
"#
    )
}

fn frontend_sidecar(endpoints: &[(&str, SocketAddr)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(version, addr)| {
            format!(
                "  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: {version}, security.istio.io/tlsMode: istio}}, serviceAccount: reviews}}\n",
                addr.port()
            )
        })
        .collect();
    format!(
        r#"apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {{name: frontend}}
spec:
  workload: {{name: frontend, namespace: demo, serviceAccount: frontend, labels: {{app: frontend}}}}
  identity: {{secretDir: ../certs/frontend}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews]
  ports: [{{number: 80, name: http}}]
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: demo}}
spec:
  host: reviews
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews]
  http:
  - name: testers
    match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: chaos
    match: [{{uri: {{prefix: /chaos}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 20}}}}}}
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: canary
    retries: {{attempts: 2, retryOn: 5xx}}
    route:
    - {{destination: {{host: reviews, subset: v1}}, weight: 90}}
    - {{destination: {{host: reviews, subset: v2}}, weight: 10}}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: frontend, namespace: demo}}
spec:
  targetRef: {{group: policy.linkerd.io, kind: Server, name: frontend}}
  total: {{requestsPerSecond: 400}}
"#
    )
}

/// One request through the frontend sidecar: the status and the body.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    canary: bool,
) -> (u16, String) {
    let mut req = Request::get(path).header("host", "reviews");
    if canary {
        req = req.header("x-canary", "true");
    }
    let Ok(req) = req.body(Empty::new()) else { return (0, String::new()) };
    if sender.ready().await.is_err() {
        return (0, "connection closed".into());
    }
    match sender.send_request(req).await {
        Ok(res) => {
            let status = res.status().as_u16();
            let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, BoxError> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(addr).await?)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Tallies answers as `status body`.
fn tally(counts: &mut BTreeMap<String, usize>, (status, body): (u16, String)) {
    *counts.entry(format!("{status} {body}")).or_default() += 1;
}

fn show(title: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    println!("{title}");
    for (answer, n) in counts {
        println!("  {n:>5}  {:>5.1} %  {answer}", *n as f64 * 100.0 / total.max(1) as f64);
    }
}

/// Runs the demo: `requests` for the canary phase.
pub(crate) async fn run(requests: usize) -> Result<(), BoxError> {
    let dir: PathBuf = std::env::temp_dir().join(format!("mesh-proxy-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = mesh_tls::DevCa::new(&"cluster.local".parse()?)?;
    identity(&ca, &dir, "frontend")?;
    identity(&ca, &dir, "reviews")?;
    println!("mesh-proxy demo: a dev CA for cluster.local; SPIFFE identities for demo/frontend and demo/reviews");

    let mut endpoints = Vec::new();
    for (version, name, broken) in
        [("v1", "reviews-v1", false), ("v1", "reviews-v1 (broken)", true), ("v2", "reviews-v2", false)]
    {
        let app = app(name, broken).await?;
        let sidecar_dir = dir.join(format!("reviews-{}", endpoints.len()));
        write(&sidecar_dir, "mesh.yaml", &reviews_sidecar(version, app))?;
        let sidecar = proxy(&sidecar_dir, false).await?;
        let inbound = sidecar.inbound_addr().ok_or("a reviews sidecar without an inbound listener")?;
        println!("  {name:<20} app {app}, sidecar inbound {inbound} (STRICT mTLS, only demo/frontend may call)");
        tokio::spawn(sidecar.serve(std::future::pending()));
        endpoints.push((version, inbound));
    }
    let frontend_dir = dir.join("frontend");
    write(&frontend_dir, "mesh.yaml", &frontend_sidecar(&endpoints))?;
    let frontend = proxy(&frontend_dir, true).await?;
    let outbound = frontend.local_addr();
    let admin = frontend.admin_addr().ok_or("the frontend sidecar without its admin server")?;
    println!("  frontend sidecar     outbound {outbound}, admin http://{admin} (/clusters, /metrics, /routes)");
    tokio::spawn(frontend.serve(std::future::pending()));
    let mut client = connect(outbound).await?;

    // 1. The canary split, with retries covering the broken endpoint until it is ejected.
    let mut counts = BTreeMap::new();
    for i in 0..requests {
        tally(&mut counts, get(&mut client, "/reviews/1", false).await);
        if i % 50 == 0 || i + 1 == requests {
            print!("\r  canary: {}/{requests} requests", i + 1);
            let _ = std::io::stdout().flush();
        }
        // Paced under the rate limit.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    println!();
    show("\n1. canary split 90/10 (the broken v1 endpoint's 503s retried elsewhere, then ejected):", &counts);

    // 2. The header route.
    let mut counts = BTreeMap::new();
    for _ in 0..20 {
        tally(&mut counts, get(&mut client, "/reviews/1", true).await);
    }
    show("\n2. x-canary: true (the testers' route):", &counts);

    // 3. Injected faults: not retried (they never reach an endpoint).
    let mut counts = BTreeMap::new();
    for _ in 0..200 {
        tally(&mut counts, get(&mut client, "/chaos", false).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    show("\n3. /chaos: 20 % aborted with 503 by fault injection:", &counts);

    // 4. The rate limit: 2,000 requests at once over 50 connections.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(async move {
            let mut counts = BTreeMap::new();
            let Ok(mut c) = connect(outbound).await else { return counts };
            for _ in 0..40 {
                let (status, body) = get(&mut c, "/reviews/1", false).await;
                let key = if status == 429 { (429, "local_rate_limited".to_owned()) } else { (status, body) };
                tally(&mut counts, key);
            }
            counts
        }));
    }
    let mut counts = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await? {
            *counts.entry(k).or_default() += v;
        }
    }
    show("\n4. a burst of 2,000 requests against 400 req/s (Linkerd's HTTPLocalRateLimitPolicy):", &counts);

    // What the frontend sidecar's admin server says about it.
    let mut admin_client = connect(admin).await?;
    let (_, metrics) = get(&mut admin_client, "/metrics", false).await;
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    println!("\nThe frontend sidecar's /metrics (http://{admin}/metrics):");
    println!("  mesh_retries_total               {}", sum("mesh_retries_total"));
    println!("  mesh_outlier_ejections_total     {}", sum("mesh_outlier_ejections_total"));
    println!("  mesh_rate_limited_total          {}", sum("mesh_rate_limited_total"));
    println!("  istio_requests_total             {}", sum("istio_requests_total"));
    println!("\nThe configuration is in {} (frontend/ and reviews-*/).", dir.display());
    Ok(())
}
