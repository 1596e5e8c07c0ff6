//! An axum service that sends canary users to a different handler, with a match block
//! compiled once from Istio-shaped config.
//!
//! ```text
//! cargo run -p mesh-examples --example canary_axum
//! curl -H 'cookie: theme=dark; user=jason' http://127.0.0.1:3000/reviews   # canary
//! curl http://127.0.0.1:3000/reviews                                       # stable
//! ```

use std::sync::Arc;

use axum::{Router, extract::Request, middleware::Next, response::Response, routing::get};
use mesh_core::matching::{HttpMatch, HttpMatchRequest, StringMatch};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rule = HttpMatchRequest::default();
    rule.uri = Some(StringMatch::Prefix("/reviews".into()));
    rule.cookies.insert("user".into(), StringMatch::Exact("jason".into()));
    let canary = Arc::new(HttpMatch::new(&rule)?);

    let app = Router::new().route("/reviews", get(|| async { "reviews v1\n" })).layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let canary = canary.clone();
            async move {
                if canary.matches_request(&req) {
                    return Response::new("reviews v2 (canary)\n".into());
                }
                next.run(req).await
            }
        },
    ));
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("canary example on http://{addr}/reviews");
    axum::serve(listener, app).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
    Ok(())
}
