//! A hyper-util client with retries: Istio's `retries {attempts: 2, retryOn: 5xx}` and
//! Linkerd's retry budget, from mesh-resilience, around `hyper_util::client::legacy::Client`.
//!
//! It starts a small server on 127.0.0.1 that fails every other request with 503, sends it 20
//! requests through the retrying client, and prints what happened:
//!
//! ```text
//! cargo run -p mesh-examples --example retry_client
//! ```

use std::convert::Infallible;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_resilience::retry::{Attempts, HttpRetry, RetryLayer, RetryPolicy, TokenBudget};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, served) = flaky_server().await?;

    // The policy as a VirtualService writes it.
    let retries: HttpRetry = yaml_serde::from_str("{attempts: 2, retryOn: 5xx, perTryTimeout: 2s}")?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new(RetryPolicy::from_istio(&retries)?).with_budget(Arc::new(TokenBudget::linkerd_default())),
        )
        // The retry layer reads errors as mesh-core classifies them.
        .map_err(|e: hyper_util::client::legacy::Error| -> BoxError { Box::new(e) })
        .service(client);

    let (mut ok, mut retried) = (0, 0);
    for i in 0..20 {
        let req = Request::get(format!("http://{addr}/orders/{i}")).body(Full::new(Bytes::new()))?;
        let res = svc.clone().oneshot(req).await?;
        let tries = res.extensions().get::<Attempts>().map_or(1, |a| a.0);
        ok += usize::from(res.status() == StatusCode::OK);
        retried += usize::from(tries > 1);
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "GET /orders/{i} -> {} after {tries} tr{}",
            String::from_utf8_lossy(&body),
            if tries == 1 { "y" } else { "ies" }
        );
    }
    let upstream = served.load(Ordering::SeqCst);
    println!("{ok} of 20 requests succeeded; {retried} needed a retry; the server saw {upstream} requests");
    assert_eq!(ok, 20, "every request succeeds with one retry at most");
    assert_eq!(upstream, 20 + retried);
    Ok(())
}

/// A server on 127.0.0.1 answering 503 to every other request.
async fn flaky_server() -> Result<(std::net::SocketAddr, Arc<AtomicUsize>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut res = Response::new(Full::new(Bytes::from(if n.is_multiple_of(2) {
                            "unavailable"
                        } else {
                            "order"
                        })));
                        if n.is_multiple_of(2) {
                            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok((addr, served))
}
