//! The ingress gateway through the binary: a Gateway in the seed's shape, with VirtualServices
//! bound to it, on two gateway listeners. curl is the client (TLS from OpenSSL, HTTP/1.1 and
//! h2 by ALPN); the certificates are made with openssl.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

/// A CA, server certificates for the gateway's hosts and the passthrough backend, and two
/// client certificates, all by openssl.
fn certs(dir: &Path) {
    let script = r#"set -eu
cd "$1"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
key ca
openssl req -x509 -new -key ca.key -out ca.pem -days 30 -subj "/O=gateway-test/CN=ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() { # name SAN usage
    key "$1"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "/O=gateway-test/CN=$1" 2>/dev/null
    printf '[l]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' "$3" "$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out "$1.pem" \
        -extfile "$1.ext" -extensions l 2>/dev/null
}
leaf shop "DNS:shop.example.com" serverAuth
leaf partner-server "DNS:partner.example.com" serverAuth
leaf db "DNS:db.example.com" serverAuth
leaf partner "DNS:partner.example.com" clientAuth
leaf stranger "DNS:stranger.example.com" clientAuth
"#;
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("sh").args(["-c", script, "certs"]).arg(dir).status().unwrap();
    assert!(status.success(), "openssl made the certificates");
}

/// A backend that terminates TLS itself (the passthrough target) and answers with what it saw.
async fn tls_backend(certs: &Path, name: &'static str) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(certs.join("db.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(certs.join("db.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(mesh_tls::identity::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = format!("{name} {} sni={sni}", req.uri().path());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    addr
}

fn config(app: SocketAddr, reviews: SocketAddr, db: (SocketAddr, SocketAddr), shop_credential: &str) -> String {
    format!(
        r#"apiVersion: proxy.mesh.dev/v1alpha1
kind: MeshProxy
metadata: {{name: ingress}}
spec:
  workload:
    name: istio-ingressgateway
    namespace: istio-system
    labels: {{istio: ingressgateway}}
  gateway:
    credentialsDir: creds
    listeners:
    - {{port: 80, listen: "127.0.0.1:0"}}
    - {{port: 443, listen: "127.0.0.1:0"}}
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: ecommerce-gateway
  namespace: default
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {{number: 80, name: http-shop, protocol: HTTP}}
    hosts: ["shop.example.com"]
    tls: {{httpsRedirect: true}}
  - port: {{number: 80, name: http-api, protocol: HTTP}}
    hosts: ["api.example.com", "cart.example.com"]
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls:
      mode: SIMPLE
      credentialName: {shop_credential}
    hosts:
      - "shop.example.com"
  - port: {{number: 443, name: https-partner, protocol: HTTPS}}
    tls:
      mode: MUTUAL
      credentialName: partner
      subjectAltNames: ["partner.example.com"]
    hosts: ["partner.example.com"]
  - port: {{number: 443, name: tls-db, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: ["db.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: internal-gateway, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: tls-db2, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: ["db2.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: default}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: default}}
spec:
  hosts: ["shop.example.com", "partner.example.com", "api.example.com"]
  gateways: [ecommerce-gateway]
  http:
  - match: [{{uri: {{prefix: /reviews}}}}]
    route: [{{destination: {{host: reviews}}}}]
  - route: [{{destination: {{host: productpage}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cart-rest, namespace: default}}
spec:
  hosts: ["cart.example.com"]
  gateways: [ecommerce-gateway]
  http:
  - route: [{{destination: {{host: productpage}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cart-reviews, namespace: default}}
spec:
  hosts: ["cart.example.com", "api.example.com"]
  gateways: [ecommerce-gateway]
  http:
  - match: [{{uri: {{prefix: /reviews}}}}, {{uri: {{prefix: /admin}}}}]
    route: [{{destination: {{host: reviews}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: other, namespace: default}}
spec:
  hosts: ["*"]
  gateways: [egress]
  http:
  - route: [{{destination: {{host: productpage}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: internal, namespace: default}}
spec:
  hosts: [productpage]
  http:
  - route: [{{destination: {{host: productpage}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catch-all-tls, namespace: default}}
spec:
  hosts: ["*.example.com"]
  gateways: [ecommerce-gateway]
  tls:
  - match: [{{sniHosts: ["*.example.com"]}}]
    route: [{{destination: {{host: db}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db2, namespace: default}}
spec:
  hosts: ["db2.example.com"]
  gateways: [internal-gateway]
  tls:
  - match: [{{sniHosts: ["db2.example.com"]}}]
    route: [{{destination: {{host: db2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: ["db.example.com"]
  gateways: [default/ecommerce-gateway]
  tls:
  - match: [{{port: 443, sniHosts: ["db.example.com"]}}]
    route: [{{destination: {{host: db}}}}]
---
{productpage}{reviews}{db}{db2}"#,
        productpage = service_entry_in("productpage", app.port()),
        reviews = service_entry_in("reviews", reviews.port()),
        db = service_entry_in("db", db.0.port()),
        db2 = service_entry_in("db2", db.1.port()),
    )
}

fn service_entry_in(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: 80, name: http}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]\n---\n"
    )
}

/// curl against `host` resolved to `at`: (exit status, body or `%{{…}}` output).
fn curl(at: SocketAddr, url: &str, extra: &[&str]) -> (i32, String) {
    let host = url.split("://").nth(1).unwrap().split(['/', ':']).next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve"])
        .arg(format!("{host}:{}:127.0.0.1", at.port()))
        .args(extra)
        .arg(url.replace("PORT", &at.port().to_string()))
        .stderr(Stdio::piped())
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_http_redirects_terminates_tls_by_sni_and_passes_tls_through() {
    let dir = config_dir("gateway");
    let certs_dir = dir.join("certs");
    certs(&certs_dir);
    // The credentials as mounted Secrets: NAME/tls.crt, tls.key, ca.crt.
    for (name, cert, ca) in [("shop-cert", "shop", false), ("partner", "partner-server", true)] {
        let secret = dir.join("config/creds").join(name);
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::copy(certs_dir.join(format!("{cert}.pem")), secret.join("tls.crt")).unwrap();
        std::fs::copy(certs_dir.join(format!("{cert}.key")), secret.join("tls.key")).unwrap();
        if ca {
            std::fs::copy(certs_dir.join("ca.pem"), secret.join("ca.crt")).unwrap();
        }
    }
    let productpage = app(|req| {
        // The host: `host` over HTTP/1.1, `:authority` over h2.
        let host = req.uri().host().map_or_else(|| header(req, "host"), str::to_owned);
        format!(
            "productpage {} {} host={host} {:?} proto={} xff={} xfcc={}",
            req.method(),
            req.uri().path(),
            req.version(),
            header(req, "x-forwarded-proto"),
            header(req, "x-forwarded-for"),
            header(req, "x-forwarded-client-cert")
        )
    })
    .await;
    let reviews = app(|req| format!("reviews {} {:?}", req.uri().path(), req.version())).await;
    let db = (tls_backend(&certs_dir, "db").await, tls_backend(&certs_dir, "db2").await);
    let config_dir = dir.join("config");
    write_atomically(&config_dir, "ingress.yaml", &config(productpage, reviews, db, "shop-cert"));
    let proxy = Proxy::start(&config_dir);
    let (http, https) = (proxy.gateway(80), proxy.gateway(443));
    let ca = certs_dir.join("ca.pem");
    let ca = ca.to_str().unwrap();

    // Port 80: plaintext for api.example.com, a redirect for shop.example.com.
    // The x-forwarded headers are the gateway's to set: the client's certificate header is
    // dropped, the scheme said, the client's address appended.
    let (code, body) = curl(
        http,
        "http://api.example.com:PORT/hello",
        &[
            "-H",
            "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/default/sa/admin",
            "-H",
            "x-forwarded-for: 203.0.113.7",
        ],
    );
    assert_eq!(code, 0, "{body}");
    assert_eq!(
        body,
        format!(
            "productpage GET /hello host=api.example.com:{} HTTP/1.1 proto=http xff=203.0.113.7, 127.0.0.1 xfcc=",
            http.port()
        )
    );
    let (_, out) = curl(
        http,
        "http://shop.example.com:PORT/cart?item=1",
        &["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"],
    );
    assert!(out.starts_with("301 https://shop.example.com"), "{out}");
    assert!(out.ends_with("/cart?item=1"), "{out}");
    // VirtualServices bound to the gateway for one host are merged, in load order with the
    // catch-alls last: an earlier one's catch-all does not hide a later one's routes, also for
    // a host that the earlier VirtualService routes together with others (api.example.com).
    for (host, path, upstream) in [
        ("cart.example.com", "/reviews/9", "reviews"),
        ("cart.example.com", "/checkout", "productpage"),
        ("api.example.com", "/admin/users", "reviews"),
        ("api.example.com", "/orders", "productpage"),
    ] {
        let (code, body) = curl(http, &format!("http://{host}:PORT{path}"), &[]);
        assert_eq!(code, 0, "{body}");
        assert!(body.starts_with(&format!("{upstream} ")) && body.contains(path), "{host}{path}: {body}");
    }
    // Hosts no server of this proxy's Gateways lists, and the mesh-only VirtualService's
    // host: not routed here.
    for host in ["other.example.com", "productpage"] {
        let (_, out) = curl(http, &format!("http://{host}:PORT/"), &["-o", "/dev/null", "-w", "%{http_code}"]);
        assert_eq!(out, "404", "{host}");
    }

    // Port 443, SIMPLE: TLS terminated with the Secret's certificate; HTTP/1.1 and h2 by ALPN.
    let (code, body) = curl(https, "https://shop.example.com:PORT/reviews/1", &["--cacert", ca, "--http1.1"]);
    assert_eq!((code, body.as_str()), (0, "reviews /reviews/1 HTTP/1.1"));
    let (code, body) = curl(https, "https://shop.example.com:PORT/", &["--cacert", ca, "--http2"]);
    assert_eq!(code, 0, "{body}");
    assert!(body.starts_with("productpage GET / host=shop.example.com HTTP/2.0 proto=https"), "{body}");
    let (_, version) = curl(
        https,
        "https://shop.example.com:PORT/",
        &["--cacert", ca, "--http2", "-o", "/dev/null", "-w", "%{http_version}"],
    );
    assert_eq!(version, "2", "curl and the gateway agreed on h2");

    // MUTUAL: no client certificate, or one whose name is not in subjectAltNames: refused.
    let partner = |cert: Option<&str>, extra_args: &[&str]| {
        let (c, k) = cert.map_or((String::new(), String::new()), |n| {
            (
                certs_dir.join(format!("{n}.pem")).display().to_string(),
                certs_dir.join(format!("{n}.key")).display().to_string(),
            )
        });
        let mut extra = vec!["--cacert", ca];
        if cert.is_some() {
            extra.extend(["--cert", c.as_str(), "--key", k.as_str()]);
        }
        extra.extend(extra_args);
        curl(https, "https://partner.example.com:PORT/orders", &extra)
    };
    let (code, body) = partner(Some("partner"), &[]);
    assert_eq!(code, 0, "{body}");
    assert!(body.starts_with("productpage GET /orders host=partner.example.com"), "{body}");
    // Refused in the handshake: no HTTP answer at all (curl's status 000), and curl fails
    // (35, 55 or 56, as the server's alert reaches it while it reads or writes).
    let no_answer = ["-o", "/dev/null", "-w", "%{http_code}"];
    let (code, out) = partner(None, &no_answer);
    assert!(code != 0 && out.starts_with("000"), "no client certificate: refused ({code}: {out})");
    let (code, out) = partner(Some("stranger"), &no_answer);
    assert!(
        code != 0 && out.starts_with("000"),
        "a client certificate not in subjectAltNames: refused ({code}: {out})"
    );
    // A connection to the SIMPLE server cannot ask for the MUTUAL server's host: 421.
    let (_, out) = curl(
        https,
        "https://shop.example.com:PORT/orders",
        &["--cacert", ca, "-H", "host: partner.example.com", "-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(out, "421", "a request for another server's host on this connection");

    // PASSTHROUGH: the backend terminates TLS (its own certificate, the client's SNI).
    let (code, body) = curl(https, "https://db.example.com:PORT/query", &["--cacert", ca]);
    assert_eq!((code, body.as_str()), (0, "db /query sni=db.example.com"));
    // The server the SNI picked takes its own Gateway's TLS routes only: the catch-all route
    // bound to the other Gateway does not take db2 (the backend's certificate names db, so
    // curl is told not to check it).
    let (code, body) = curl(https, "https://db2.example.com:PORT/query", &["-k"]);
    assert_eq!((code, body.as_str()), (0, "db2 /query sni=db2.example.com"));

    // An SNI no server lists: the connection is closed.
    let (code, _) = curl(https, "https://unknown.example.com:PORT/", &["--cacert", ca, "-k"]);
    assert_ne!(code, 0);

    // A Gateway whose certificate does not load is refused; the running one keeps serving.
    let failures = metric(proxy.admin, "mesh_config_reload_failures_total").await;
    write_atomically(&config_dir, "ingress.yaml", &config(productpage, reviews, db, "missing-cert"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(proxy.admin, "mesh_config_reload_failures_total").await <= failures {
        assert!(tokio::time::Instant::now() < deadline, "the broken Gateway was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = curl(https, "https://shop.example.com:PORT/reviews/2", &["--cacert", ca, "--http1.1"]);
    assert_eq!((code, body.as_str()), (0, "reviews /reviews/2 HTTP/1.1"));

    // `mesh-proxy ready` (the image's health check) asks the admin server.
    let ready = |admin: SocketAddr| {
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["ready", "--admin"])
            .arg(admin.to_string())
            .status()
            .unwrap()
    };
    assert!(ready(proxy.admin).success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert!(!ready(closed).success(), "nothing listens there");

    // `validate` names the file and the field of a Gateway mistake.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy")).arg("validate").arg(&bad).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("bad.yaml:6") && text.contains("spec.servers[0].tls"), "{text}");
}
