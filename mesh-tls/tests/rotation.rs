//! Certificate rotation under load, as a Kubernetes Secret volume does it (an atomic swap of
//! the `..data` symlink), with a broken set in between.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::SpiffeId;
use mesh_tls::{
    CredentialFiles, Credentials, DevCa, ExpectedPeer, Identity, MeshAcceptor, MtlsConnector, MtlsMode, TlsVersions,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Writes a set of files into `dir/..<version>` and points `dir/..data` at it atomically.
fn publish(dir: &Path, version: &str, cert: &str, key: &str, ca: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    for (name, text) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)] {
        std::fs::write(versioned.join(name), text).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

async fn served_leaf(client: &Identity, addr: std::net::SocketAddr) -> Vec<u8> {
    let config = client.client_config(ExpectedPeer::AnyInTrustDomain, TlsVersions::Tls13, mesh_tls::mesh_alpn(false));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let waiting = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request_and_a_broken_set_is_refused() {
    let ca = DevCa::new(&"cluster.local".parse().unwrap()).unwrap();
    let server_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/reviews".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = ca.issue(&server_id, Duration::from_secs(3600)).unwrap();
    publish(dir.path(), "v0", &first.cert_chain, &first.private_key, ca.cert_pem());
    let identity = Identity::from_files(CredentialFiles::kubernetes_secret(dir.path())).unwrap();
    let _watch = identity.watch(Duration::from_millis(20));
    let (addr, _) = support::server(MeshAcceptor::new(MtlsMode::Strict, &identity)).await;

    let issued =
        ca.issue(&"spiffe://cluster.local/ns/shop/sa/frontend".parse().unwrap(), Duration::from_secs(3600)).unwrap();
    let client_id = Identity::new(
        Credentials::from_pem(issued.cert_chain.as_bytes(), issued.private_key.as_bytes(), ca.cert_pem().as_bytes())
            .unwrap(),
    );
    assert_eq!(served_leaf(&client_id, addr).await, der(&first.cert_chain));

    // Two clients send without pause: one keeps its connections, one opens a new one for
    // every request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for fresh in [false, true] {
        let connector =
            MtlsConnector::new(HttpConnector::new(), &client_id, ExpectedPeer::id(server_id.clone()), false);
        let mut builder = Client::builder(TokioExecutor::new());
        if fresh {
            builder.pool_max_idle_per_host(0);
        }
        let client: Client<_, Empty<Bytes>> = builder.build(connector);
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url: http::Uri = format!("http://{addr}/").parse().unwrap();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = match client.get(url.clone()).await {
                    Ok(res) => res.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("{e:?}")),
                };
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    let mut last = first.cert_chain.clone();
    for round in 1..=3u64 {
        let before = ok.load(Ordering::Relaxed);
        let next = ca.issue(&server_id, Duration::from_secs(3600)).unwrap();
        publish(dir.path(), &format!("v{round}"), &next.cert_chain, &next.private_key, ca.cert_pem());
        wait_for("the rotation", || identity.status().reloads == round).await;
        assert_eq!(served_leaf(&client_id, addr).await, der(&next.cert_chain), "round {round}");
        wait_for("requests after the rotation", || ok.load(Ordering::Relaxed) > before + 20).await;
        last = next.cert_chain;
    }

    // A set whose key does not match its certificate (a half-written rotation) is refused,
    // and the last good certificate keeps serving.
    let other = ca.issue(&server_id, Duration::from_secs(3600)).unwrap();
    publish(dir.path(), "broken", &other.cert_chain, &first.private_key, ca.cert_pem());
    wait_for("the refusal", || identity.status().failures == 1).await;
    let status = identity.status();
    assert_eq!(status.reloads, 3);
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("tls.key")), "{:?}", status.last_error);
    assert_eq!(served_leaf(&client_id, addr).await, der(&last));
    let before = ok.load(Ordering::Relaxed);
    wait_for("requests after the refusal", || ok.load(Ordering::Relaxed) > before + 20).await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests (ok: {})", ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) >= 100);
}
