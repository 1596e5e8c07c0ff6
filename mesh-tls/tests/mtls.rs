//! mTLS with SPIFFE identities over real sockets: mesh-tls against itself, curl and openssl.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::SpiffeId;
use mesh_tls::{
    Credentials, DevCa, ExpectedPeer, Identity, MeshAcceptor, MtlsConnector, MtlsMode, SvidError, leaf_svid,
};
use support::{Seen, files, openssl_certs, pem, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn dev_identity(ca: &DevCa, who: &str) -> Identity {
    let issued = ca.issue(&id(who), Duration::from_secs(3600)).unwrap();
    Identity::new(
        Credentials::from_pem(issued.cert_chain.as_bytes(), issued.private_key.as_bytes(), ca.cert_pem().as_bytes())
            .unwrap(),
    )
}

async fn get(identity: &Identity, expected: ExpectedPeer, h2: bool, url: String) -> Result<String, String> {
    let connector = MtlsConnector::new(HttpConnector::new(), identity, expected, h2);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(h2).build(connector);
    let res = client.get(url.parse().unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn two_dev_identities_speak_mtls_over_http1_and_http2_and_see_each_other() {
    let ca = DevCa::new(&"cluster.local".parse().unwrap()).unwrap();
    let server_id = dev_identity(&ca, "spiffe://cluster.local/ns/shop/sa/reviews");
    let client_id = dev_identity(&ca, "spiffe://cluster.local/ns/shop/sa/frontend");
    let (addr, _) = server(MeshAcceptor::new(MtlsMode::Strict, &server_id)).await;
    let url = format!("http://{addr}/");
    let expected = ExpectedPeer::id(id("spiffe://cluster.local/ns/shop/sa/reviews"));
    assert_eq!(
        get(&client_id, expected.clone(), false, url.clone()).await.unwrap(),
        "spiffe://cluster.local/ns/shop/sa/frontend HTTP/1.1"
    );
    assert_eq!(
        get(&client_id, expected, true, url.clone()).await.unwrap(),
        "spiffe://cluster.local/ns/shop/sa/frontend HTTP/2.0"
    );
    // The client refuses a server that is not the one it expects.
    let wrong = ExpectedPeer::id(id("spiffe://cluster.local/ns/shop/sa/ratings"));
    let err = get(&client_id, wrong, false, url.clone()).await.unwrap_err();
    assert!(err.contains("Unexpected("), "{err}");
    // And one of another trust domain's CA entirely.
    let other = DevCa::new(&"other.org".parse().unwrap()).unwrap();
    let stranger = dev_identity(&other, "spiffe://other.org/ns/shop/sa/frontend");
    assert!(get(&stranger, ExpectedPeer::AnyInTrustDomain, false, url).await.is_err());
}

/// curl with client certificates made by openssl, against a STRICT server whose identity
/// openssl made too.
#[tokio::test]
async fn curl_with_openssl_certificates_is_served_and_bad_svids_are_refused() {
    let dir = openssl_certs();
    let d = dir.path();
    let identity = Identity::from_files(files(d, "server")).unwrap();
    assert_eq!(identity.current().id().as_str(), "spiffe://cluster.local/ns/default/sa/server");
    let (addr, mut seen) = server(MeshAcceptor::new(MtlsMode::Strict, &identity)).await;
    let curl = |cert: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(d.join("ca.pem"));
        if let Some(name) = cert {
            cmd.arg("--cert").arg(d.join(format!("{name}.pem"))).arg("--key").arg(d.join(format!("{name}.key")));
        }
        cmd.arg(format!("https://localhost:{}/", addr.port()));
        cmd.stderr(Stdio::piped());
        async move { tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap() }
    };
    let ok = curl(Some("client")).await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // curl offers h2 first.
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "spiffe://cluster.local/ns/default/sa/client HTTP/2.0");

    for (cert, why) in [
        (Some("intruder"), "UnknownIssuer"),
        (Some("foreign"), "TrustDomain { expected: \"cluster.local\", found: \"other.org\" }"),
        (Some("expired"), "certificate expired"),
        (Some("ca-leaf"), "CaUsedAsEndEntity"),
        (Some("two-uris"), "SeveralUriSans(2)"),
        (None, "peer sent no certificates"),
    ] {
        let out = curl(cert).await;
        assert!(!out.status.success(), "{cert:?} was served: {}", String::from_utf8_lossy(&out.stdout));
        match tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap() {
            Seen::Refused(reason) => assert!(reason.contains(why), "{cert:?}: {reason}"),
            other => panic!("{cert:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn permissive_serves_plaintext_and_mesh_mtls_and_passes_other_tls_through() {
    let dir = openssl_certs();
    let d = dir.path();
    let identity = Identity::from_files(files(d, "server")).unwrap();
    let (addr, mut seen) = server(MeshAcceptor::new(MtlsMode::Permissive, &identity)).await;

    // Plaintext HTTP: served, no identity.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("none HTTP/1.1"), "{answer}");

    // openssl s_client with Istio's ALPN and a client certificate: mTLS, with the identity.
    let s_client = |alpn: &'static str| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-quiet", "-verify_return_error", "-alpn", alpn, "-connect"])
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(d.join("ca.pem"))
            .arg("-cert")
            .arg(d.join("client.pem"))
            .arg("-key")
            .arg(d.join("client.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
            child.wait_with_output().unwrap()
        })
    };
    let out = s_client("istio-http/1.1").await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("spiffe://cluster.local/ns/default/sa/client HTTP/1.1"), "{text}");

    // TLS without an Istio token is the application's: handed over untouched.
    let _ = s_client("http/1.1").await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap(), Some(Seen::Opaque));
}

#[tokio::test]
async fn strict_closes_plaintext_connections() {
    let ca = DevCa::new(&"cluster.local".parse().unwrap()).unwrap();
    let identity = dev_identity(&ca, "spiffe://cluster.local/ns/a/sa/b");
    let (addr, mut seen) = server(MeshAcceptor::new(MtlsMode::Strict, &identity)).await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert!(answer.is_empty());
    assert_eq!(seen.recv().await, Some(Seen::Refused("plaintext connection refused: mTLS is STRICT".into())));
}

/// mesh-tls's client against `openssl s_server` requiring a client certificate.
#[tokio::test]
async fn the_connector_verifies_an_openssl_server_and_presents_its_svid() {
    let dir = openssl_certs();
    let d = dir.path().to_owned();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s_server = Command::new("openssl")
        .args(["s_server", "-www", "-tls1_3", "-Verify", "1", "-verify_return_error", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(d.join("server.pem"))
        .arg("-key")
        .arg(d.join("server.key"))
        .arg("-CAfile")
        .arg(d.join("ca.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), up).await.unwrap();
    let client = Identity::from_files(files(&d, "client")).unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let body = get(&client, ExpectedPeer::id(id("spiffe://cluster.local/ns/default/sa/server")), false, url.clone())
        .await
        .unwrap();
    // s_server -www describes the session, client certificate included.
    assert!(body.contains("TLSv1.3") && body.contains("Client certificate"), "{body}");
    let err =
        get(&client, ExpectedPeer::id(id("spiffe://cluster.local/ns/default/sa/other")), false, url).await.unwrap_err();
    assert!(err.contains("Unexpected("), "{err}");
    let _ = s_server.kill();
    let _ = s_server.wait();
}

/// Vector 31's certificate half, on openssl-made certificates.
#[test]
fn svid_leaf_rules_on_openssl_certificates() {
    let dir = openssl_certs();
    let d = dir.path();
    let leaf = |name: &str| {
        let pem = pem(d, &format!("{name}.pem"));
        use rustls_pki_types::pem::PemObject;
        leaf_svid(&rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
    };
    assert_eq!(leaf("client").unwrap().id.as_str(), "spiffe://cluster.local/ns/default/sa/client");
    assert!(matches!(leaf("two-uris"), Err(SvidError::Leaf(mesh_core::identity::InvalidSvid::SeveralUriSans(2)))));
    assert!(matches!(leaf("ca-leaf"), Err(SvidError::Leaf(mesh_core::identity::InvalidSvid::Ca))));
    // The CA's own certificate: a CA, and its ID has no path.
    assert!(leaf("ca").is_err());
    // Credentials refuse a leaf that is not an SVID, naming the file.
    let err = Credentials::load(&files(d, "two-uris")).unwrap_err().to_string();
    assert!(err.contains("two-uris.pem") && err.contains("2 URI SANs"), "{err}");
    // And a key that is not the certificate's.
    let mut mismatched = files(d, "client");
    mismatched.private_key = d.join("server.key");
    let err = Credentials::load(&mismatched).unwrap_err().to_string();
    assert!(err.contains("server.key"), "{err}");
}
