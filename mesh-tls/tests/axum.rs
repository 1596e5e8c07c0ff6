//! The layers in an axum service served over mTLS: `PeerLayer` records the caller, then
//! `RequestAuthenticationLayer` and `AuthorizationLayer` decide, with no error handling of the
//! application's own (they answer with responses).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use mesh_tls::authz::{AuthorizationLayer, Authorizer, Policy};
use mesh_tls::jwt::{JwtAuthenticator, RequestAuthenticationLayer};
use mesh_tls::{
    Accepted, Credentials, DevCa, ExpectedPeer, Identity, MeshAcceptor, MtlsConnector, MtlsMode, PeerLayer,
};
use tower::Layer;

fn identity(ca: &DevCa, id: &str) -> Identity {
    let issued = ca.issue(&id.parse().unwrap(), Duration::from_secs(3600)).unwrap();
    Identity::new(
        Credentials::from_pem(issued.cert_chain.as_bytes(), issued.private_key.as_bytes(), ca.cert_pem().as_bytes())
            .unwrap(),
    )
}

async fn serve(app: Router, server: &Identity) -> SocketAddr {
    let acceptor = MeshAcceptor::new(MtlsMode::Strict, server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { return };
            let local = tcp.local_addr().unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(Accepted::Mtls(tls)) = acceptor.accept(tcp).await else { return };
                let service = PeerLayer::for_mtls(&tls, peer, local).layer(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(*tls), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_axum_router_with_authorization_over_mtls() {
    let ca = DevCa::new(&"cluster.local".parse().unwrap()).unwrap();
    let server = identity(&ca, "spiffe://cluster.local/ns/shop/sa/api");
    let spec = serde_json::from_value(serde_json::json!({
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
        }],
    }))
    .unwrap();
    let authz = AuthorizationLayer::new(Authorizer::new([Policy::new("shop", "api", spec)]).unwrap());
    let jwt = RequestAuthenticationLayer::new(JwtAuthenticator::default());
    let app = Router::new()
        .route("/api/items", get(|| async { "items\n" }).delete(|| async { "deleted\n" }))
        .layer(authz)
        .layer(jwt);
    let addr = serve(app, &server).await;

    let call = |who: &str, method: http::Method| {
        let client_id = identity(&ca, who);
        async move {
            let connector = MtlsConnector::new(HttpConnector::new(), &client_id, ExpectedPeer::AnyInTrustDomain, false);
            let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{addr}/api/items"))
                .body(Empty::new())
                .unwrap();
            let res = client.request(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status.as_u16(), String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(call("spiffe://cluster.local/ns/shop/sa/frontend", http::Method::GET).await, (200, "items\n".into()));
    assert_eq!(
        call("spiffe://cluster.local/ns/shop/sa/frontend", http::Method::DELETE).await,
        (403, "RBAC: access denied".into())
    );
    assert_eq!(
        call("spiffe://cluster.local/ns/shop/sa/batch", http::Method::GET).await,
        (403, "RBAC: access denied".into())
    );
}
