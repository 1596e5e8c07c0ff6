//! AuthorizationPolicy and RequestAuthentication: SEMANTICS.md vectors 26–29, the seed
//! policies, and the layers over real sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::SpiffeId;
use mesh_tls::authz::{
    AuthorizationLayer, AuthorizationPolicySpec, Authorizer, Decision, InvalidPolicy, Policy, RequestAttrs,
};
use mesh_tls::jwt::{JwksSource, JwtAuthenticator, JwtRule, RequestAuthenticationLayer};
use tower::{Layer, ServiceExt};

fn policy(ns: &str, name: &str, yaml: &str) -> Policy {
    Policy::new(ns, name, yaml_serde::from_str::<AuthorizationPolicySpec>(yaml).unwrap())
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

struct Req {
    method: &'static str,
    path: &'static str,
    headers: HeaderMap,
    peer: Option<SpiffeId>,
    ip: Option<IpAddr>,
}

impl Req {
    fn new(method: &'static str, path: &'static str) -> Self {
        Req { method, path, headers: HeaderMap::new(), peer: None, ip: None }
    }
    fn from(mut self, peer: &str) -> Self {
        self.peer = Some(id(peer));
        self
    }
    fn decide(&self, a: &Authorizer) -> bool {
        let mut attrs = RequestAttrs::new(self.method, self.path, "svc", &self.headers);
        attrs.peer = self.peer.as_ref();
        attrs.source_ip = self.ip;
        attrs.remote_ip = self.ip;
        a.decide(&attrs) == Decision::Allow
    }
}

#[test]
fn vector_26_no_policy_allows_an_allow_policy_without_rules_denies_and_an_empty_rule_allows() {
    let none = Authorizer::new([]).unwrap();
    assert!(Req::new("GET", "/").decide(&none));
    let nothing = Authorizer::new([policy("ns", "allow-nothing", "action: ALLOW")]).unwrap();
    assert!(!Req::new("GET", "/").decide(&nothing));
    let everything = Authorizer::new([policy("ns", "allow-all", "action: ALLOW\nrules: [{}]")]).unwrap();
    assert!(Req::new("GET", "/").decide(&everything));
}

#[test]
fn vector_27_deny_post_from_the_dev_namespace() {
    let a = Authorizer::new([policy(
        "ns",
        "no-dev-posts",
        "action: DENY\nrules:\n- from: [{source: {namespaces: [dev]}}]\n  to: [{operation: {methods: [POST]}}]",
    )])
    .unwrap();
    assert!(!Req::new("POST", "/").from("spiffe://cluster.local/ns/dev/sa/x").decide(&a));
    assert!(Req::new("GET", "/").from("spiffe://cluster.local/ns/dev/sa/x").decide(&a));
    assert!(Req::new("POST", "/").from("spiffe://cluster.local/ns/prod/sa/x").decide(&a));
    // Plaintext: no namespace, so no match.
    assert!(Req::new("POST", "/").decide(&a));
}

#[test]
fn vector_28_principals_exact_and_any() {
    let exact =
        Authorizer::new([policy("ns", "p", "rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]}]")])
            .unwrap();
    assert!(Req::new("GET", "/").from("spiffe://cluster.local/ns/a/sa/b").decide(&exact));
    assert!(!Req::new("GET", "/").from("spiffe://cluster.local/ns/a/sa/c").decide(&exact));
    assert!(!Req::new("GET", "/").from("spiffe://other.org/ns/a/sa/b").decide(&exact));
    let any = Authorizer::new([policy("ns", "p", "rules: [{from: [{source: {principals: ['*']}}]}]")]).unwrap();
    assert!(Req::new("GET", "/").from("spiffe://x.org/anything").decide(&any));
    assert!(!Req::new("GET", "/").decide(&any));
    // notPrincipals always match a plaintext peer.
    let not = Authorizer::new([policy(
        "ns",
        "p",
        "action: DENY\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/a/sa/b]}}]}]",
    )])
    .unwrap();
    assert!(!Req::new("GET", "/").decide(&not));
    assert!(Req::new("GET", "/").from("spiffe://cluster.local/ns/a/sa/b").decide(&not));
}

#[test]
fn value_forms_paths_hosts_ips_service_accounts_and_conditions() {
    let a = Authorizer::new([policy(
        "shop",
        "p",
        r#"
rules:
- to: [{operation: {paths: ["/api/*", "*.json", "/users/{*}/orders/{**}"], notPaths: ["/api/admin*"]}}]
  from: [{source: {serviceAccounts: [frontend, "ops/cron"]}}]
- from: [{source: {ipBlocks: ["10.0.0.0/8", "2001:db8::/32"], notIpBlocks: ["10.9.9.9"]}}]
  when:
  - key: request.headers[x-api-key]
    values: ["secret-*"]
  - key: source.ip
    notValues: ["10.1.0.0/16"]
"#,
    )])
    .unwrap();
    let fe = "spiffe://cluster.local/ns/shop/sa/frontend";
    assert!(Req::new("GET", "/api/x").from(fe).decide(&a));
    assert!(!Req::new("GET", "/api/admin/x").from(fe).decide(&a));
    assert!(Req::new("GET", "/x/y.json").from(fe).decide(&a));
    assert!(Req::new("GET", "/users/7/orders/1/items").from(fe).decide(&a));
    assert!(!Req::new("GET", "/users/7/8/orders/1").from(fe).decide(&a));
    assert!(Req::new("GET", "/api/x").from("spiffe://cluster.local/ns/ops/sa/cron").decide(&a));
    assert!(!Req::new("GET", "/api/x").from("spiffe://cluster.local/ns/ops/sa/frontend").decide(&a));
    let by_ip = |ip: &str, key: Option<&str>| {
        let mut r = Req::new("GET", "/other");
        r.ip = Some(ip.parse().unwrap());
        if let Some(k) = key {
            r.headers.insert("x-api-key", k.parse().unwrap());
        }
        r.decide(&a)
    };
    assert!(by_ip("10.2.3.4", Some("secret-1")));
    assert!(by_ip("2001:db8::1", Some("secret-1")));
    assert!(!by_ip("10.2.3.4", None));
    assert!(!by_ip("10.2.3.4", Some("nope")));
    assert!(!by_ip("10.9.9.9", Some("secret-1")));
    assert!(!by_ip("10.1.2.3", Some("secret-1")));
    assert!(!by_ip("192.168.1.1", Some("secret-1")));
    // IPv4-mapped IPv6 peers count as IPv4.
    assert!(by_ip("::ffff:10.2.3.4", Some("secret-1")));
}

#[test]
fn invalid_policies_are_refused_with_the_field_and_unknown_condition_keys_skip_the_rule() {
    let err = |yaml: &str| Authorizer::new([policy("ns", "bad", yaml)]).unwrap_err();
    let InvalidPolicy { field, reason, .. } = err("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]");
    assert_eq!(field, "spec.action");
    assert!(reason.contains("CUSTOM"), "{reason}");
    assert_eq!(err("action: DENY").field, "spec.rules");
    assert_eq!(err("rules: [{from: []}]").field, "spec.rules[0].from");
    assert_eq!(err("rules: [{from: [{source: {}}]}]").field, "spec.rules[0].from[0].source");
    assert_eq!(err("rules: [{to: [{operation: {ports: [http]}}]}]").field, "spec.rules[0].to[0].operation.ports");
    assert_eq!(
        err("rules: [{from: [{source: {ipBlocks: ['10.0.0.0/33']}}]}]").field,
        "spec.rules[0].from[0].source.ipBlocks"
    );
    assert_eq!(err("rules: [{when: [{key: source.ip}]}]").field, "spec.rules[0].when[0]");
    let skipped = Authorizer::new([policy(
        "ns",
        "p",
        "rules: [{when: [{key: 'request.regex.headers[x]', values: [a]}]}, {to: [{operation: {methods: [GET]}}]}]",
    )])
    .unwrap();
    assert_eq!(skipped.warnings().len(), 1);
    assert!(Req::new("GET", "/").decide(&skipped));
    assert!(!Req::new("POST", "/").decide(&skipped));
}

#[test]
fn deny_wins_over_allow_and_audit_and_dry_run_never_decide() {
    let a = Authorizer::new([
        policy("ns", "allow-all", "rules: [{}]"),
        policy("ns", "deny-delete", "action: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]"),
        policy("ns", "audit-get", "action: AUDIT\nrules: [{to: [{operation: {methods: [GET]}}]}]"),
        Policy { dry_run: true, ..policy("ns", "dry", "action: DENY\nrules: [{to: [{operation: {methods: [GET]}}]}]") },
    ])
    .unwrap();
    assert!(Req::new("GET", "/").decide(&a));
    assert!(!Req::new("DELETE", "/").decide(&a));
}

/// The seed AuthorizationPolicies, scoped to the workloads their selectors name.
#[test]
fn the_seed_policies_decide_as_their_documents_say() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/seeds");
    let mut policies = Vec::new();
    for file in ["000_72edd42856911899.yaml", "001_20ec9f7b39974c56.yaml", "003_5e49fdb77310e31d.yaml"] {
        let text = std::fs::read_to_string(seeds.join(file)).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v: yaml_serde::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"].as_str() == Some("AuthorizationPolicy") {
                let meta = &v["metadata"];
                let ns = meta["namespace"].as_str().unwrap_or("default");
                let spec: AuthorizationPolicySpec = yaml_serde::from_value(v["spec"].clone()).unwrap();
                policies.push(Policy::new(ns, meta["name"].as_str().unwrap(), spec));
            }
        }
    }
    assert_eq!(policies.len(), 7);
    let workload = |ns: &str, app: &str| {
        let labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
        Authorizer::new(policies.iter().filter(|p| p.applies_to(ns, &labels, "istio-system")).cloned()).unwrap()
    };
    // 000: only the frontend may GET the product API; nobody may DELETE in ecommerce.
    let product = workload("ecommerce", "product-service");
    let frontend = "spiffe://cluster.local/ns/ecommerce/sa/frontend";
    assert!(Req::new("GET", "/api/products/1").from(frontend).decide(&product));
    assert!(!Req::new("POST", "/api/products/1").from(frontend).decide(&product));
    assert!(!Req::new("GET", "/api/products/1").from("spiffe://cluster.local/ns/ecommerce/sa/other").decide(&product));
    assert!(!Req::new("DELETE", "/api/products/1").from(frontend).decide(&product));
    // 000: the order service takes 10/8 and 172.16/12 with the API key.
    let order = workload("ecommerce", "order-service");
    let mut r = Req::new("POST", "/orders");
    r.ip = Some("172.20.1.1".parse().unwrap());
    r.headers.insert("x-api-key", "secret-api-key-123".parse().unwrap());
    assert!(r.decide(&order));
    r.ip = Some("192.168.0.1".parse().unwrap());
    assert!(!r.decide(&order));
    // 000: the frontend requires a JWT (requestPrincipals) with role user or admin.
    assert!(!Req::new("GET", "/").decide(&workload("ecommerce", "frontend")));
    // 001: httpbin lets sleep GET /info*, or anyone with a JWT of the test issuer in group1
    // (two ALLOW policies: either one allows).
    let httpbin = workload("default", "httpbin");
    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    assert!(Req::new("GET", "/info/x").from(sleep).decide(&httpbin));
    assert!(!Req::new("POST", "/info").from(sleep).decide(&httpbin));
    assert!(!Req::new("GET", "/info").from("spiffe://cluster.local/ns/default/sa/other").decide(&httpbin));
    // 003: service-a may GET /api/v1/*.
    let svc = workload("default", "my-service");
    assert!(Req::new("GET", "/api/v1/x").from("spiffe://cluster.local/ns/default/sa/service-a").decide(&svc));
    assert!(!Req::new("DELETE", "/api/v1/x").from("spiffe://cluster.local/ns/default/sa/service-a").decide(&svc));
    // A workload no policy selects: allowed.
    assert!(Req::new("DELETE", "/").decide(&workload("default", "unrelated")));
}

// === JWT ===

struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

fn issuer() -> Issuer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": "k1", "alg": "ES256", "use": "sig"}]});
    Issuer { key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()), jwks: jwks.to_string() }
}

impl Issuer {
    fn token(&self, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

async fn stack(
    rule: JwtRule,
    policies: Vec<Policy>,
) -> impl Fn(
    Request<Full<Bytes>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = (StatusCode, String, HeaderMap)> + Send>> {
    let jwt = JwtAuthenticator::new(&[rule], |_, _| None).unwrap();
    let authz = Authorizer::new(policies).unwrap();
    let inner = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let principal = req.extensions().get::<mesh_tls::jwt::RequestAuth>().map(|a| a.principal().to_owned());
        let mut res = http::Response::new(Full::new(Bytes::from(principal.unwrap_or_else(|| "anonymous".into()))));
        *res.headers_mut() = req.headers().clone();
        Ok::<_, std::convert::Infallible>(res)
    });
    let svc = RequestAuthenticationLayer::new(jwt).layer(AuthorizationLayer::new(authz).layer(inner));
    move |req| {
        let svc = svc.clone();
        Box::pin(async move {
            let res = svc.oneshot(req).await.unwrap();
            let (parts, body) = res.into_parts();
            (parts.status, String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap(), parts.headers)
        })
    }
}

fn bearer(token: &str) -> Request<Full<Bytes>> {
    Request::get("/").header("authorization", format!("Bearer {token}")).body(Full::default()).unwrap()
}

#[tokio::test]
async fn vector_29_no_token_passes_an_expired_one_is_401_and_a_required_principal_is_403() {
    let iss = issuer();
    let rule = JwtRule {
        issuer: "https://auth.example.com".into(),
        jwks: Some(iss.jwks.clone()),
        audiences: vec!["ecommerce-api".into()],
        ..Default::default()
    };
    let open = stack(rule.clone(), vec![]).await;
    assert_eq!(open(Request::get("/").body(Full::default()).unwrap()).await.0, StatusCode::OK);
    let expired = iss.token(serde_json::json!({"iss": "https://auth.example.com", "sub": "u1", "aud": "ecommerce-api", "exp": now() - 3600}));
    let (status, body, headers) = open(bearer(&expired)).await;
    assert_eq!((status, body.as_str()), (StatusCode::UNAUTHORIZED, "Jwt is expired"));
    assert!(headers["www-authenticate"].to_str().unwrap().contains("invalid_token"));

    let required = stack(rule, vec![policy("ns", "require-jwt", "rules: [{from: [{source: {requestPrincipals: ['*']}}], when: [{key: 'request.auth.claims[role]', values: [user, admin]}]}]")]).await;
    let (status, body, _) = required(Request::get("/").body(Full::default()).unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));
    let good = iss.token(serde_json::json!({"iss": "https://auth.example.com", "sub": "u1", "aud": ["x", "ecommerce-api"], "exp": now() + 3600, "role": "admin"}));
    let (status, body, headers) = required(bearer(&good)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "https://auth.example.com/u1"));
    // Not forwarded by default.
    assert!(!headers.contains_key("authorization"));
    let guest = iss.token(
        serde_json::json!({"iss": "https://auth.example.com", "sub": "u2", "aud": "ecommerce-api", "role": "guest"}),
    );
    assert_eq!(required(bearer(&guest)).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_tokens_get_envoys_reasons_and_valid_ones_fill_the_configured_headers() {
    let iss = issuer();
    let rule = JwtRule {
        issuer: "testing@secure.istio.io".into(),
        jwks: Some(iss.jwks.clone()),
        audiences: vec!["api".into()],
        from_headers: vec![mesh_tls::jwt::JwtHeader { name: "x-jwt".into(), prefix: String::new() }],
        from_params: vec!["token".into()],
        forward_original_token: true,
        output_payload_to_header: Some("x-jwt-payload".into()),
        output_claim_to_headers: vec![mesh_tls::jwt::ClaimToHeader { header: "x-user".into(), claim: "sub".into() }],
        ..Default::default()
    };
    let svc = stack(rule, vec![]).await;
    let with = |token: &str| Request::get("/").header("x-jwt", token).body(Full::default()).unwrap();
    let claims = serde_json::json!({"iss": "testing@secure.istio.io", "sub": "alice", "aud": "api"});
    let good = iss.token(claims.clone());
    let (status, body, headers) = svc(with(&good)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "testing@secure.istio.io/alice"));
    assert_eq!(headers["x-jwt"], good.as_str());
    assert_eq!(headers["x-user"], "alice");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(headers["x-jwt-payload"].as_bytes()).unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&payload).unwrap(), claims);
    // From the query parameter too.
    let q = Request::get(format!("/?a=1&token={good}")).body(Full::default()).unwrap();
    assert_eq!(svc(q).await.0, StatusCode::OK);

    let reason = |token: String| {
        let svc = &svc;
        async move { svc(with(&token)).await }
    };
    let other = issuer();
    assert_eq!(reason(other.token(claims.clone())).await.1, "Jwt verification fails");
    assert_eq!(
        reason(iss.token(serde_json::json!({"iss": "someone-else", "sub": "a", "aud": "api"}))).await.1,
        "Jwt issuer is not configured"
    );
    assert_eq!(
        reason(iss.token(serde_json::json!({"iss": "testing@secure.istio.io", "sub": "a", "aud": "web"}))).await.1,
        "Audiences in Jwt are not allowed"
    );
    assert_eq!(
        reason(iss.token(serde_json::json!({"iss": "testing@secure.istio.io", "aud": "api", "nbf": now() + 3600})))
            .await
            .1,
        "Jwt not yet valid"
    );
    let (status, body, _) = reason("not-a-jwt".into()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.starts_with("Jwt is not in the form"), "{body}");
}

/// `jwksUri` over HTTPS: a local HTTPS server with a certificate for `localhost`.
#[tokio::test]
async fn jwks_are_fetched_over_https() {
    let iss = issuer();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &ca).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(mesh_tls::identity::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let jwks = iss.jwks.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req| {
                    let jwks = jwks.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(jwks)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let roots = std::sync::Arc::new(roots);
    let uri: http::Uri = format!("https://localhost:{}/.well-known/jwks.json", addr.port()).parse().unwrap();
    let rule =
        JwtRule { issuer: "https://auth.example.com".into(), jwks_uri: Some(uri.to_string()), ..Default::default() };
    let jwt = JwtAuthenticator::new(std::slice::from_ref(&rule), |_, _| {
        Some(JwksSource::Https { uri: uri.clone(), roots: roots.clone(), timeout: std::time::Duration::from_secs(5) })
    })
    .unwrap();
    assert!(jwt.ready(std::time::Duration::from_secs(10)).await);
    let mut req = bearer(&iss.token(serde_json::json!({"iss": "https://auth.example.com", "sub": "bob"})));
    assert_eq!(jwt.authenticate(&mut req).unwrap().unwrap().principal(), "https://auth.example.com/bob");
}

/// The seed PeerAuthentications of 001: a mesh-wide STRICT, STRICT for `production`, a
/// PERMISSIVE default for `default`, and STRICT for `app: external-service` there.
#[test]
fn the_seed_peer_authentications_resolve_as_istio_does() {
    use mesh_tls::MtlsMode;
    use mesh_tls::peer::{PeerAuthentication, PeerAuthenticationSpec, resolve_mode};
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/seeds/001_20ec9f7b39974c56.yaml"),
    )
    .unwrap();
    let mut policies = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&text) {
        let v: yaml_serde::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"].as_str() == Some("PeerAuthentication") {
            let namespace = v["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
            let spec: PeerAuthenticationSpec = yaml_serde::from_value(v["spec"].clone()).unwrap();
            policies.push(PeerAuthentication { namespace, spec });
        }
    }
    assert_eq!(policies.len(), 4);
    let mode = |ns: &str, app: &str| {
        let labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
        resolve_mode(&policies, ns, &labels, "istio-system", Some(8080))
    };
    assert_eq!(mode("default", "web"), MtlsMode::Permissive);
    assert_eq!(mode("default", "external-service"), MtlsMode::Strict);
    assert_eq!(mode("production", "web"), MtlsMode::Strict);
    assert_eq!(mode("shop", "web"), MtlsMode::Strict);
    // Nothing at all: PERMISSIVE.
    assert_eq!(resolve_mode(&[], "shop", &BTreeMap::new(), "istio-system", None), MtlsMode::Permissive);
}

#[test]
fn port_level_mtls_overrides_the_workload_and_unset_inherits() {
    use mesh_tls::MtlsMode;
    use mesh_tls::peer::{PeerAuthentication, PeerAuthenticationSpec, resolve_mode};
    let spec = |yaml: &str| yaml_serde::from_str::<PeerAuthenticationSpec>(yaml).unwrap();
    let policies = vec![
        PeerAuthentication { namespace: "shop".into(), spec: spec("mtls: {mode: STRICT}") },
        PeerAuthentication {
            namespace: "shop".into(),
            spec: spec(
                "selector: {matchLabels: {app: db}}\nmtls: {mode: UNSET}\nportLevelMtls: {5432: {mode: DISABLE}, 9090: {mode: PERMISSIVE}}",
            ),
        },
    ];
    let db = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    assert_eq!(resolve_mode(&policies, "shop", &db, "istio-system", Some(5432)), MtlsMode::Disable);
    assert_eq!(resolve_mode(&policies, "shop", &db, "istio-system", Some(9090)), MtlsMode::Permissive);
    // UNSET on the workload: the namespace's STRICT.
    assert_eq!(resolve_mode(&policies, "shop", &db, "istio-system", Some(80)), MtlsMode::Strict);
}
