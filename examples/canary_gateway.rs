//! An axum gateway that does a canary split with mesh-routing's layers: requests carrying
//! `x-canary: true` go to reviews v2, every other request to `/reviews` is split 90/10 between
//! v1 and v2. The routes are an Istio VirtualService, parsed from YAML; [`RoutingLayer`]
//! decides, [`DispatchLayer`] sends each request to its destination's service.
//!
//! ```text
//! cargo run -p mesh-examples --example canary_gateway
//! curl http://127.0.0.1:3000/reviews                        # reviews v1, 9 times in 10
//! curl -H 'x-canary: true' http://127.0.0.1:3000/reviews    # reviews v2, always
//! curl -i http://127.0.0.1:3000/ratings                     # 404: no route
//! ```
//!
//! With `CANARY_GATEWAY_SELFTEST=1` it serves on a free port instead, sends itself requests
//! over TCP, prints what it saw, checks it and exits:
//!
//! ```text
//! CANARY_GATEWAY_SELFTEST=1 cargo run -p mesh-examples --example canary_gateway
//! ```

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::get;
use mesh_routing::model::VirtualServiceSpec;
use mesh_routing::random::Random;
use mesh_routing::{DestinationKey, DispatchLayer, RouteContext, RouteTable, RoutingLayer, VirtualHostConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, service_fn};

/// The routes, as `kubectl apply` would take them: first match wins, so the canary header
/// route comes before the split. `hosts: ["*"]` answers every `Host` the gateway is reached
/// by; a real gateway would name its public hosts.
const VIRTUAL_SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts: ["*"]
  http:
  - name: canary
    match:
    - uri: {prefix: /reviews}
      headers:
        x-canary: {exact: "true"}
    route:
    - destination: {host: reviews, subset: v2}
  - name: split
    match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"#;

/// The route table of [`VIRTUAL_SERVICE`].
fn route_table() -> Result<RouteTable, Box<dyn Error>> {
    let doc: yaml_serde::Value = yaml_serde::from_str(VIRTUAL_SERVICE)?;
    let name = format!(
        "{}/{}",
        doc["metadata"]["namespace"].as_str().unwrap_or("default"),
        doc["metadata"]["name"].as_str().unwrap_or("unnamed"),
    );
    let spec: VirtualServiceSpec = yaml_serde::from_value(doc["spec"].clone())?;
    let host = VirtualHostConfig::new(name, spec.hosts, spec.http);
    Ok(RouteTable::new(&[host], &RouteContext::default())?)
}

/// The gateway: axum's own routes, and everything else through the mesh routes.
fn gateway(table: RouteTable) -> axum::Router {
    let mesh = ServiceBuilder::new()
        // Finds the route, draws the weighted destination, records it as a `RouteDecision`;
        // answers 404 (flag NR) itself when no route matches.
        .layer(RoutingLayer::new(table))
        // One service per destination, made on first use and cached.
        .layer(DispatchLayer::new(|key: &DestinationKey| {
            // A real gateway would return a hyper-util client here
            // (`hyper_util::client::legacy::Client`) sending to the endpoints of `key`'s
            // subset, picked by a `mesh_routing::balance::Balancer`. This one answers itself.
            let reply = format!("{} {}\n", key.host, key.subset.as_deref().unwrap_or("(all)"));
            service_fn(move |_req: Request| {
                let reply = reply.clone();
                async move { Ok::<_, Infallible>(Response::new(Body::from(reply))) }
            })
        }))
        // Never called: `DispatchLayer` replaces the inner service with the destinations'.
        .service_fn(|_req: Request| async { unreachable!("DispatchLayer does not call its inner service") });
    axum::Router::new().route("/healthz", get(|| async { "ok\n" })).fallback_service(mesh)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let table = route_table()?;
    if std::env::var("CANARY_GATEWAY_SELFTEST").is_ok_and(|v| v == "1") {
        // Seeded, so the self-test prints the same split every run.
        return self_test(gateway(table.with_random(Random::seeded(2024)))).await;
    }
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("canary gateway on http://{addr}/reviews");
    axum::serve(listener, gateway(table))
        .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
        .await?;
    Ok(())
}

/// Serves `app` on a free port and checks it over TCP.
async fn self_test(app: axum::Router) -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("canary gateway self-test on http://{addr}");
    tokio::spawn(axum::serve(listener, app).into_future());

    const CANARY: usize = 20;
    for _ in 0..CANARY {
        let (status, body) = exchange(addr, "/reviews", Some("x-canary: true")).await?;
        assert_eq!((status, body.as_str()), (200, "reviews v2\n"), "the header route always goes to v2");
    }
    println!("x-canary: true -> reviews v2 ({CANARY} of {CANARY} requests)");

    const SPLIT: usize = 200;
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..SPLIT {
        match exchange(addr, "/reviews", None).await? {
            (200, body) if body == "reviews v1\n" => v1 += 1,
            (200, body) if body == "reviews v2\n" => v2 += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("split over {SPLIT} requests: v1 {v1}, v2 {v2}");
    // v2 is Binomial(200, 0.1): mean 20, standard deviation 4.2.
    assert!((5..=45).contains(&v2), "about 10% to v2, not {v2} of {SPLIT}");

    let (status, _) = exchange(addr, "/ratings", None).await?;
    assert_eq!(status, 404, "no route for /ratings");
    println!("/ratings -> {status} (no route)");
    let (status, body) = exchange(addr, "/healthz", None).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    println!("/healthz -> {status} (axum's own route)");
    println!("self-test passed");
    Ok(())
}

/// One HTTP/1.1 exchange on a new connection: the status and the body.
async fn exchange(addr: SocketAddr, path: &str, header: Option<&str>) -> Result<(u16, String), Box<dyn Error>> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        let header = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: reviews.example.com\r\n{header}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), attempt).await??;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("a response without a blank line")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("a response without a status")?;
    Ok((status, body.to_owned()))
}
