//! An axum service with the inbound stack a sidecar would give it, in process: mutual TLS with
//! SPIFFE identities (STRICT), an Istio AuthorizationPolicy from YAML, a rate limit per
//! calling identity, trace context and Istio's metrics (reporting the caller's principal).
//! The certificates come from a development CA made at start.
//!
//! It serves on a free port on 127.0.0.1, calls itself as three workloads over mTLS, prints
//! what each got and the metrics, and checks them:
//!
//! ```text
//! cargo run -p mesh-examples --example inbound_axum
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use mesh::prelude::*;
use mesh::resilience::ratelimit::RateLimitKey;
use mesh::tls::authz::{AuthorizationPolicySpec, Policy};
use mesh::tls::{
    Accepted, Credentials, DevCa, ExpectedPeer, Identity, MeshAcceptor, MtlsConnector, MtlsMode, PeerLayer,
};
use tower::{Layer, ServiceBuilder};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Only the frontend may read the API, and only with GET.
const POLICY: &str = r#"
action: ALLOW
rules:
- from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
  to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
"#;

/// The service: its routes behind the inbound layers, and `/metrics` beside them.
fn app(metrics: IstioMetrics, registry: Arc<Mutex<Registry>>) -> Result<Router, BoxError> {
    let spec: AuthorizationPolicySpec = yaml_serde::from_str(POLICY)?;
    let authorizer = Authorizer::new([Policy::new("shop", "api", spec)])?;
    // 3 requests per identity, then one more every minute.
    let limiter = RateLimiter::keyed(RateLimitKey::PeerIdentity, TokenBucket::new(3, 1, Duration::from_secs(60))?);
    let api = Router::new().route("/api/items", get(|| async { "items\n" }).delete(|| async { "deleted\n" })).layer(
        ServiceBuilder::new()
            .mesh_trace()
            .mesh_metrics(metrics, Peers::destination("api", "shop"))
            .mesh_authorization(authorizer)
            .mesh_rate_limit(limiter),
    );
    Ok(api.route_service("/metrics", MetricsService::new(registry)))
}

/// An identity for `id`, issued by `ca`.
fn identity(ca: &DevCa, id: &str) -> Result<Identity, BoxError> {
    let issued = ca.issue(&id.parse()?, Duration::from_secs(3600))?;
    let pem =
        Credentials::from_pem(issued.cert_chain.as_bytes(), issued.private_key.as_bytes(), ca.cert_pem().as_bytes())?;
    Ok(Identity::new(pem))
}

/// Serves `app` over STRICT mTLS as `server`; each connection's peer identity goes into the
/// requests (`PeerLayer`), where authorization and the rate limit read it.
async fn serve(app: Router, server: &Identity) -> Result<SocketAddr, BoxError> {
    let acceptor = MeshAcceptor::new(MtlsMode::Strict, server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(local) = tcp.local_addr() else { return };
                let Ok(Accepted::Mtls(tls)) = acceptor.accept(tcp).await else { return };
                let service = PeerLayer::for_mtls(&tls, peer, local).layer(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(*tls), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let ca = DevCa::new(&"cluster.local".parse()?)?;
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let addr = serve(app(metrics, registry.clone())?, &identity(&ca, "spiffe://cluster.local/ns/shop/sa/api")?).await?;
    println!("api on https://{addr} (mTLS, STRICT)");

    let mut seen = Vec::new();
    for (who, method, times) in [("frontend", "GET", 4), ("frontend", "DELETE", 1), ("batch", "GET", 1)] {
        let me = identity(&ca, &format!("spiffe://cluster.local/ns/shop/sa/{who}"))?;
        let connector = MtlsConnector::new(HttpConnector::new(), &me, ExpectedPeer::AnyInTrustDomain, false);
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        for _ in 0..times {
            let req =
                http::Request::builder().method(method).uri(format!("http://{addr}/api/items")).body(Empty::new())?;
            let res = client.request(req).await?;
            let status = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            println!("{who:>8} {method:<6} /api/items -> {status} {}", String::from_utf8_lossy(&body).trim());
            seen.push((who, method, status));
        }
    }
    let text = mesh::telemetry::metrics::encode(&*registry.lock().map_err(|_| "poisoned")?);
    let counted: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_requests_total{")).collect();
    for line in &counted {
        let code = line.split("response_code=\"").nth(1).and_then(|s| s.get(..3)).unwrap_or("?");
        let principal = line.split("source_principal=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
        println!(
            "istio_requests_total response_code={code} source_principal={principal} {}",
            line.rsplit(' ').next().unwrap_or("?")
        );
    }
    // Three GETs, then the frontend's rate limit; its DELETE and the batch job are denied.
    let statuses: Vec<u16> = seen.iter().map(|s| s.2).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 403, 403], "{seen:?}");
    let has = |principal: &str, code: &str, n: &str| {
        counted.iter().any(|l| {
            l.contains(&format!("source_principal=\"spiffe://cluster.local/ns/shop/sa/{principal}\""))
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.ends_with(&format!(" {n}"))
        })
    };
    assert!(has("frontend", "200", "3") && has("frontend", "429", "1") && has("batch", "403", "1"), "{text}");
    println!("inbound example checks passed");
    Ok(())
}
