//! mTLS and authorization costs, in one run each:
//!
//! * a full mutual TLS 1.3 handshake (no resumption, in memory, P-256 keys): plain rustls
//!   (webpki verifiers, DNS name) next to mesh-tls's configurations (the same webpki chain
//!   checks plus the X.509-SVID rules and the SPIFFE ID read from the certificate);
//! * an authorization decision with 1, 10 and 100 ALLOW policies, for a request the last
//!   policy allows (every policy evaluated) and one none allows.
//!
//! Run with `cargo bench -p mesh-benches --bench tls`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_tls::authz::{Authorizer, Decision, Policy, RequestAttrs};
use mesh_tls::{Credentials, DevCa, ExpectedPeer, Identity, TlsVersions};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// Drives a handshake to its end, moving bytes between the two sides in memory.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) {
    let mut c = ClientConnection::new(client, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets().unwrap();
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().unwrap();
    }
    black_box((c, s));
}

fn no_resumption(mut c: ClientConfig) -> Arc<ClientConfig> {
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// Plain rustls: a CA, a server certificate for `localhost`, a client certificate.
fn plain_configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let provider = mesh_tls::identity::provider();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_cert.der().to_vec())).unwrap();
    let roots = Arc::new(roots);
    let (server_chain, server_key) = leaf("localhost");
    let (client_chain, client_key) = leaf("client");
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    (no_resumption(client), Arc::new(server))
}

fn mesh_configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let ca = DevCa::new(&"cluster.local".parse().unwrap()).unwrap();
    let identity = |id: &str| {
        let issued = ca.issue(&id.parse().unwrap(), Duration::from_secs(3600)).unwrap();
        Identity::new(
            Credentials::from_pem(
                issued.cert_chain.as_bytes(),
                issued.private_key.as_bytes(),
                ca.cert_pem().as_bytes(),
            )
            .unwrap(),
        )
    };
    let server = identity("spiffe://cluster.local/ns/shop/sa/reviews");
    let client = identity("spiffe://cluster.local/ns/shop/sa/frontend");
    let expected = ExpectedPeer::id("spiffe://cluster.local/ns/shop/sa/reviews".parse().unwrap());
    let client = client.client_config(expected, TlsVersions::Tls13, mesh_tls::mesh_alpn(true));
    (no_resumption(ClientConfig::clone(&client)), server.server_config(TlsVersions::Tls13))
}

fn handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("mtls_handshake");
    let (client, server) = plain_configs();
    group.bench_function("rustls_webpki", |b| b.iter(|| handshake(client.clone(), server.clone())));
    let (client, server) = mesh_configs();
    group.bench_function("mesh_tls_spiffe", |b| b.iter(|| handshake(client.clone(), server.clone())));
    group.finish();
}

fn policies(n: usize) -> Authorizer {
    Authorizer::new((0..n).map(|i| {
        let spec = serde_json::from_value(serde_json::json!({
            "rules": [{
                "from": [{"source": {"principals": [format!("cluster.local/ns/shop/sa/caller-{i}")]}}],
                "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": [format!("/api/v{i}/*")]}}],
            }],
        }))
        .unwrap();
        Policy::new("shop", &format!("p{i}"), spec)
    }))
    .unwrap()
}

fn authorization(c: &mut Criterion) {
    let mut group = c.benchmark_group("authorization");
    let headers = http::HeaderMap::new();
    for n in [1usize, 10, 100] {
        let authorizer = policies(n);
        let last = n - 1;
        let peer: mesh_core::SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/caller-{last}").parse().unwrap();
        let path = format!("/api/v{last}/items/7");
        let mut allowed = RequestAttrs::new("GET", &path, "shop", &headers);
        allowed.peer = Some(&peer);
        assert_eq!(authorizer.decide(&allowed), Decision::Allow);
        group.bench_with_input(BenchmarkId::new("allowed_by_the_last", n), &allowed, |b, a| {
            b.iter(|| black_box(authorizer.decide(black_box(a))))
        });
        let mut denied = allowed.clone();
        denied.method = "DELETE";
        group.bench_with_input(BenchmarkId::new("denied", n), &denied, |b, a| {
            b.iter(|| black_box(authorizer.decide(black_box(a))))
        });
    }
    group.finish();
}

criterion_group!(benches, handshakes, authorization);
criterion_main!(benches);
