//! A hyper-util client with the mesh's client side, as a sidecar's outbound path would give
//! it: a VirtualService splits `reviews` 80/20 between subsets v1 and v2 and retries 5xx;
//! each subset's retries share a Linkerd-style budget; a balancer picks among the subset's
//! endpoints, skipping those outlier detection has ejected; every connection is mutual TLS,
//! the server's SPIFFE ID checked.
//!
//! It starts three reviews servers over mTLS on 127.0.0.1 (v1 twice, one of them broken:
//! every answer 503; v2 once), sends 50 requests, prints what happened and checks it:
//!
//! ```text
//! cargo run -p mesh-examples --example mesh_client
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::prelude::*;
use mesh::resilience::outlier::{MonitorLayer, OutlierConfig, OutlierDetector};
use mesh::resilience::retry::Attempts;
use mesh::routing::balance::{Balance, Balancer, Endpoint, LbPolicy};
use mesh::tls::{Accepted, Credentials, DevCa, ExpectedPeer, Identity, MeshAcceptor, MtlsConnector, MtlsMode};
use tower::{ServiceBuilder, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - retries: {attempts: 2, retryOn: 5xx}
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#;

fn identity(ca: &DevCa, id: &str) -> Result<Identity, BoxError> {
    let issued = ca.issue(&id.parse()?, Duration::from_secs(3600))?;
    let pem =
        Credentials::from_pem(issued.cert_chain.as_bytes(), issued.private_key.as_bytes(), ca.cert_pem().as_bytes())?;
    Ok(Identity::new(pem))
}

/// A reviews server over STRICT mTLS answering `name`, or 503 when `broken`.
async fn server(ca: &DevCa, name: &'static str, broken: bool) -> Result<SocketAddr, BoxError> {
    let acceptor = MeshAcceptor::new(MtlsMode::Strict, &identity(ca, "spiffe://cluster.local/ns/shop/sa/reviews")?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Accepted::Mtls(tls)) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    let status = if broken { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
                    let mut res = Response::new(Full::new(Bytes::from(name)));
                    *res.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(*tls), svc).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let ca = DevCa::new(&"cluster.local".parse()?)?;
    let subsets: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::from([
        ("v1", vec![server(&ca, "reviews-v1", false).await?, server(&ca, "reviews-v1 (broken)", true).await?]),
        ("v2", vec![server(&ca, "reviews-v2", false).await?]),
    ]);
    let broken = subsets["v1"][1];

    // mTLS origination as `productpage`, expecting the reviews service account.
    let me = identity(&ca, "spiffe://cluster.local/ns/shop/sa/productpage")?;
    let expected = ExpectedPeer::id("spiffe://cluster.local/ns/shop/sa/reviews".parse()?);
    // Its bodies are the retry layer's replayable ones.
    let client: Client<_, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build(MtlsConnector::new(HttpConnector::new(), &me, expected, false));
    // Two consecutive 5xx eject an endpoint (for 30 s at first).
    let mut config = OutlierConfig::default();
    config.consecutive_5xx = 2;
    config.max_ejection_percent = 50;
    let detector = OutlierDetector::new(config)?;
    detector.set_hosts(subsets.values().flatten().map(|a| Arc::from(a.to_string())));
    let budget: Arc<dyn RetryBudget> = Arc::new(TokenBudget::linkerd_default());
    let watched = detector.clone();

    let outbound = ServiceBuilder::new()
        .mesh_routing(mesh::yaml::route_table(ROUTES)?)
        .layer(DispatchLayer::new(move |key: &DestinationKey| {
            let endpoints = subsets[key.subset.as_deref().unwrap_or("v1")].iter().map(|a| Endpoint::new(a.to_string()));
            let balancer = Balancer::new(LbPolicy::RoundRobin, endpoints.collect()).expect("endpoints");
            let (client, health) = (client.clone(), detector.clone());
            let detector = detector.clone();
            let balance = Balance::new(balancer, move |e: &Endpoint| {
                let address = e.address().clone();
                ServiceBuilder::new()
                    .layer(MonitorLayer::new(detector.monitor(&address).expect("watched")))
                    .map_request(move |mut req: Request<ReplayBody<Full<Bytes>>>| {
                        // To this endpoint, by address (the Host header keeps the service name).
                        *req.uri_mut() = Uri::try_from(format!("http://{address}{}", req.uri().path())).expect("valid");
                        req
                    })
                    .map_err(BoxError::from)
                    .service(client.clone())
            })
            .with_health(Arc::new(health));
            // The route's `retries` (set by the routing layer) apply; none elsewhere.
            ServiceBuilder::new().mesh_retry_with_budget(RetryPolicy::none(), budget.clone()).service(balance)
        }))
        .service_fn(|_req: Request<Full<Bytes>>| async {
            unreachable!("DispatchLayer does not call its inner service")
        });

    let (mut answers, mut retried) = (BTreeMap::<String, usize>::new(), 0);
    for _ in 0..50 {
        let req = Request::get("http://reviews/ratings").header("host", "reviews").body(Full::new(Bytes::new()))?;
        let res = outbound.clone().oneshot(req).await?;
        retried += usize::from(res.extensions().get::<Attempts>().is_some_and(|a| a.0 > 1));
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        *answers.entry(format!("{status} {}", String::from_utf8_lossy(&body))).or_default() += 1;
    }
    for (answer, n) in &answers {
        println!("{n:>3} x {answer}");
    }
    let ejected = watched.status().iter().any(|h| h.ejected && *h.address == *broken.to_string());
    println!("{retried} requests were retried; the broken endpoint is ejected: {ejected}");
    assert!(answers.keys().all(|a| a.starts_with("200 ")), "{answers:?}");
    assert!(ejected && (1..=3).contains(&retried), "retried {retried}, ejected {ejected}");
    println!("client example checks passed");
    Ok(())
}
