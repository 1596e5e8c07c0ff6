//! Two mesh-proxy sidecars end to end on loopback: app A → sidecar A → (mTLS, HTTP/2) →
//! sidecar B → app B, with STRICT PeerAuthentication and an AuthorizationPolicy that lets
//! only A's service account GET `/api/*`. Certificates made by openssl; curl and another
//! identity as callers.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn identity(certs: &Path, name: &str) -> String {
    format!(
        "  identity:\n    certChain: {}\n    privateKey: {}\n    trustBundle: {}\n",
        certs.join(format!("{name}.pem")).display(),
        certs.join(format!("{name}.key")).display(),
        certs.join("ca.pem").display()
    )
}

/// Sidecar B's configuration: inbound to `app`, STRICT (or `mode`), only `client` may GET
/// `/api/*`. The application speaks whatever the peer does, so it shows the sidecars' protocol.
fn sidecar_b(certs: &Path, app: SocketAddr, mode: &str) -> String {
    format!(
        r#"apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {{name: reviews}}
spec:
  inbound:
    listen: 127.0.0.1:0
    app: {app}
    appProtocol: downstream
{}  workload:
    name: reviews
    namespace: default
    labels: {{app: reviews}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec:
  mtls: {{mode: {mode}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-api, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/default/sa/client"]}}}}]
    to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
"#,
        identity(certs, "server")
    )
}

/// A caller's sidecar: `reviews` is sidecar B's inbound listener, over ISTIO_MUTUAL,
/// expecting B's service account.
fn sidecar_a(certs: &Path, name: &str, b: SocketAddr) -> String {
    format!(
        r#"apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {{name: {name}}}
spec:
{}  workload: {{name: {name}, namespace: default}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  ports: [{{number: 80, name: http}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: server}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
"#,
        identity(certs, name),
        port = b.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_speak_mtls_over_http2_and_only_the_allowed_identity_gets_in() {
    let dir = config_dir("mtls-two-sidecars");
    let certs = dir.join("certs");
    openssl_certs(&certs);
    let app_b = app(|req| {
        format!(
            "{} {} {:?} xfcc={}",
            req.method(),
            req.uri().path(),
            req.version(),
            header(req, "x-forwarded-client-cert")
        )
    })
    .await;
    let b_dir = dir.join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(b_dir.join("b.yaml"), sidecar_b(&certs, app_b, "STRICT")).unwrap();
    let access_log = dir.join("b-access.log");
    let b = Proxy::start_with(&b_dir, std::process::Stdio::inherit(), &["--access-log", access_log.to_str().unwrap()]);
    let b_inbound = b.inbound.expect("sidecar B has an inbound listener");

    let start_caller = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.yaml"), sidecar_a(&certs, name, b_inbound)).unwrap();
        Proxy::start(&d)
    };
    let a = start_caller("client");
    let mut app_a = Client::connect(a.addr).await;

    // App A speaks HTTP/1.1 to its sidecar; the sidecars speak HTTP/2 over mTLS; B's
    // application learns A's identity from x-forwarded-client-cert.
    let (status, body) = app_a.get("reviews", "/api/ratings", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        "GET /api/ratings HTTP/2.0 xfcc=By=spiffe://cluster.local/ns/default/sa/server;URI=spiffe://cluster.local/ns/default/sa/client"
    );
    // A client cannot pass its own x-forwarded-client-cert through.
    let (_, body) = app_a
        .get("reviews", "/api/x", &[("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/default/sa/admin")])
        .await;
    assert!(body.ends_with("URI=spiffe://cluster.local/ns/default/sa/client"), "{body}");

    // Not GET, or not /api/*: 403 from B.
    let mut del =
        Request::delete("/api/ratings").header("host", "reviews").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    del.headers_mut().insert("x-test", "1".parse().unwrap());
    app_a.0.ready().await.unwrap();
    let res = app_a.0.send_request(del).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"RBAC: access denied");
    assert_eq!(app_a.get("reviews", "/admin", &[]).await.0, StatusCode::FORBIDDEN);

    // Another identity of the same trust domain: 403.
    let other = start_caller("other");
    let (status, body) = Client::connect(other.addr).await.get("reviews", "/api/ratings", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));

    // curl with the client's openssl certificate, straight to B's inbound listener.
    let curl = |cert: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--http1.1", "--cacert"]).arg(certs.join("ca.pem"));
        if let Some(name) = cert {
            cmd.arg("--cert")
                .arg(certs.join(format!("{name}.pem")))
                .arg("--key")
                .arg(certs.join(format!("{name}.key")));
        }
        cmd.arg(format!("https://localhost:{}/api/ratings", b_inbound.port()));
        cmd.output().unwrap()
    };
    let out = curl(Some("client"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("GET /api/ratings HTTP/1.1 xfcc=By="));
    // Refused at the handshake: another trust domain, expired, a CA as leaf, two URI SANs,
    // no certificate.
    for bad in [Some("intruder"), Some("foreign"), Some("expired"), Some("ca-leaf"), Some("two-uris"), None] {
        assert!(!curl(bad).status.success(), "{bad:?} got in");
    }
    // STRICT: plaintext is closed without an answer.
    let mut tcp = tokio::net::TcpStream::connect(b_inbound).await.unwrap();
    tcp.write_all(b"GET /api/ratings HTTP/1.1\r\nhost: reviews\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.is_empty());
    let stats = admin(b.admin, "/stats").await;
    assert!(stats.contains("inbound.plaintext_refused 1"), "{stats}");
    assert!(stats.contains("inbound.ssl.handshake_error 6"), "{stats}");
    let certs_page = admin(b.admin, "/certs").await;
    assert!(certs_page.contains("\"identity\": \"spiffe://cluster.local/ns/default/sa/server\""), "{certs_page}");
    assert!(certs_page.contains("\"inbound_mtls_mode\": \"STRICT\""), "{certs_page}");

    // Istio's metrics on both sides: B reports the caller's identity over mutual TLS, and
    // its denials with the RBAC flag; A reports the destination service.
    let b_metrics = admin(b.admin, "/metrics").await;
    let inbound_ok = "istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"default\",source_principal=\"spiffe://cluster.local/ns/default/sa/client\"";
    assert!(b_metrics.contains(inbound_ok), "{b_metrics}");
    assert!(b_metrics.contains("destination_workload=\"reviews\""), "{b_metrics}");
    let count = |text: &str, principal: &str, code: &str| -> Option<String> {
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains(principal) && l.contains(code))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .next()
    };
    let client = "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"";
    assert_eq!(count(&b_metrics, client, "response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"").as_deref(), Some("3"));
    assert_eq!(count(&b_metrics, client, "response_code=\"403\",grpc_response_status=\"\",response_flags=\"RBAC\",connection_security_policy=\"mutual_tls\"").as_deref(), Some("2"));
    assert_eq!(count(&b_metrics, "sa/other", "response_code=\"403\"").as_deref(), Some("1"));
    let a_metrics = admin(a.admin, "/metrics").await;
    assert!(a_metrics.contains("istio_requests_total{reporter=\"source\",source_workload=\"client\""), "{a_metrics}");
    assert!(a_metrics.contains("destination_service=\"reviews\""), "{a_metrics}");
    assert!(a_metrics.contains("response_code=\"200\""), "{a_metrics}");

    // B's access log: one JSON line per request, with the caller's identity, the request id
    // and trace id the sidecars gave it, and why a request was refused.
    let lines = async {
        loop {
            let text = std::fs::read_to_string(&access_log).unwrap_or_default();
            if text.lines().count() >= 6 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(10), lines).await.unwrap();
    let entries: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let denied = entries.iter().find(|e| e["method"] == "DELETE").expect("the DELETE is logged");
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["response_flags"], "RBAC");
    assert_eq!(denied["downstream_peer_uri_san"], "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(denied["protocol"], "HTTP/2");
    assert_eq!(denied["request_id"].as_str().map(str::len), Some(36));
    assert_eq!(denied["trace_id"].as_str().map(str::len), Some(32));
    let ok = entries.iter().find(|e| e["response_code"] == 200).unwrap();
    assert_eq!(ok["upstream_host"].as_str(), Some(app_b.to_string().as_str()));

    // PERMISSIVE (a reload): plaintext is served, without an identity, so the policy that
    // wants one refuses it; mTLS still works.
    write_atomically(&b_dir, "b.yaml", &sidecar_b(&certs, app_b, "PERMISSIVE"));
    let reloaded = async {
        while !admin(b.admin, "/certs").await.contains("PERMISSIVE") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reloaded).await.unwrap();
    let (status, body) = Client::connect(b_inbound).await.get("reviews", "/api/ratings", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));
    assert_eq!(app_a.get("reviews", "/api/ratings", &[]).await.0, StatusCode::OK);
    let _ = std::fs::remove_dir_all(&dir);
}
