//! RequestAuthentication: JWT validation as a tower layer (SEMANTICS.md 6.2).
//!
//! A [`JwtAuthenticator`] holds one provider per `jwtRules` entry. For each request it looks
//! for a token where the rules say (`fromHeaders`, `fromParams`, `fromCookies`; by default
//! `Authorization: Bearer …`, then the `access_token` query parameter):
//!
//! * no token: the request passes without an identity (an AuthorizationPolicy with
//!   `requestPrincipals` is what requires one);
//! * a token that fails (bad signature, expired, not yet valid, unknown issuer, no accepted
//!   audience, malformed): **401** with Envoy's status text as the body
//!   (`Jwt is expired`, `Jwt verification fails`, `Jwt issuer is not configured`,
//!   `Audiences in Jwt are not allowed`, …) and `WWW-Authenticate: Bearer realm="<url>",
//!   error="invalid_token"`;
//! * a valid token: its claims become the [`RequestAuth`] request extension (read by
//!   authorization, rate-limit keys and routing), the token header is removed unless
//!   `forwardOriginalToken`, and `outputPayloadToHeader` / `outputClaimToHeaders` are set.
//!
//! Keys come from an inline `jwks`, a file ([`JwksSource::File`], or `jwksUri: file://…`), or
//! `jwksUri` over HTTPS ([`JwksSource::Https`]): fetched when the authenticator is made and
//! every five minutes after (Envoy's cache duration), keeping the last good set when a fetch
//! fails. `exp` and `nbf` are checked when present, with Envoy's 60 s of clock skew.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use mesh_core::LocalOr;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::authz::WorkloadSelector;

// === the resource ===

/// `RequestAuthentication.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The workloads it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The issuers accepted.
    pub jwt_rules: Vec<JwtRule>,
}

/// One issuer's rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct JwtRule {
    /// `iss` must equal it.
    pub issuer: String,
    /// `aud` must contain one of them (none: not checked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the keys are (`https://…`, or `file://…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Inline keys (a JWKS JSON document).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Token headers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Token query parameters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Token cookies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Keep the token header (default: removed after verification).
    pub forward_original_token: bool,
    /// A header receiving the payload, base64url-encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Claims copied to headers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Claims split on spaces (besides `scope` and `permission`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
    /// The JWKS fetch timeout (default 5 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<mesh_core::config::Duration>,
}

impl JwtRule {
    /// Checks what can be checked offline: an issuer, `jwks` or `jwksUri` (not both; an
    /// `https://` or `file://` URI), header names. `i` is the rule's index, for the field path.
    pub fn check(&self, i: usize) -> Result<(), InvalidJwtRule> {
        let invalid =
            |field: &str, reason: String| Err(InvalidJwtRule { field: format!("jwtRules[{i}].{field}"), reason });
        if self.issuer.is_empty() {
            return invalid("issuer", "required".into());
        }
        match (&self.jwks, &self.jwks_uri) {
            (Some(_), Some(_)) => return invalid("jwks", "`jwks` and `jwksUri` are mutually exclusive".into()),
            (None, None) => return invalid("jwksUri", "no keys: give `jwks` or a `jwksUri`".into()),
            (Some(jwks), None) => {
                if let Err(e) = decoding_keys(jwks) {
                    return invalid("jwks", e);
                }
            }
            (None, Some(uri)) => {
                if !(uri.starts_with("https://") || uri.starts_with("file://")) {
                    return invalid(
                        "jwksUri",
                        format!("`{uri}`: keys are fetched over https:// (or read from file://)"),
                    );
                }
            }
        }
        let names = self.from_headers.iter().map(|h| ("fromHeaders", h.name.as_str()));
        let outputs = self.output_claim_to_headers.iter().map(|c| ("outputClaimToHeaders", c.header.as_str()));
        let payload = self.output_payload_to_header.iter().map(|h| ("outputPayloadToHeader", h.as_str()));
        for (field, name) in names.chain(outputs).chain(payload) {
            if HeaderName::try_from(name).is_err() {
                return invalid(field, format!("`{name}` is not a header name"));
            }
        }
        Ok(())
    }
}

/// A token header and its prefix.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct JwtHeader {
    /// The header.
    pub name: String,
    /// The prefix before the token (`Bearer `).
    pub prefix: String,
}

/// A claim copied to a header.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The header.
    pub header: String,
    /// The claim.
    pub claim: String,
}

// === the identity a token gives ===

/// Request extension: a validated JWT.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAuth {
    principal: String,
    claims: Map<String, Value>,
    space_delimited: Arc<[String]>,
}

impl RequestAuth {
    /// `<iss>/<sub>`, Istio's request principal.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// Every claim.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// The strings of a (nested) claim: a string (split on spaces for `scope`, `permission`
    /// and the configured space-delimited claims), or a list's strings.
    pub fn claim_strings(&self, path: &[String]) -> Vec<&str> {
        let Some((first, rest)) = path.split_first() else { return Vec::new() };
        let mut value = self.claims.get(first);
        for key in rest {
            value = value.and_then(|v| v.get(key));
        }
        let split = path.len() == 1
            && (["scope", "permission"].contains(&first.as_str()) || self.space_delimited.contains(first));
        match value {
            Some(Value::String(s)) if split => s.split(' ').filter(|p| !p.is_empty()).collect(),
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

// === keys ===

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A JWKS document.
    Inline(String),
    /// A JWKS file, read when the authenticator is made.
    File(PathBuf),
    /// An HTTPS URL, fetched with these trust roots and refreshed every five minutes.
    Https {
        /// The URL.
        uri: http::Uri,
        /// The CAs to trust for it.
        roots: Arc<rustls::RootCertStore>,
        /// The fetch timeout.
        timeout: Duration,
    },
}

/// A provider that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidJwtRule {
    /// The field (`jwtRules[0].jwks`).
    pub field: String,
    /// Why.
    pub reason: String,
}

/// A provider's keys, with their `kid`s.
type Keys = Vec<(Option<String>, DecodingKey)>;

enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

struct Provider {
    issuer: String,
    audiences: Vec<String>,
    keys: Arc<ArcSwap<Keys>>,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
    space_delimited: Arc<[String]>,
}

fn decoding_keys(jwks: &str) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys.push((jwk.common.key_id.clone(), key)),
            Err(e) => tracing::warn!(kid = ?jwk.common.key_id, error = %e, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err("the JWKS has no usable key".into());
    }
    Ok(keys)
}

/// Validates JWTs for a workload (see the module docs).
#[derive(Clone, Default)]
pub struct JwtAuthenticator {
    providers: Arc<Vec<Provider>>,
    tasks: Arc<Vec<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.providers.iter().map(|p| &p.issuer)).finish()
    }
}

impl Drop for JwtAuthenticator {
    fn drop(&mut self) {
        if Arc::strong_count(&self.tasks) == 1 {
            for task in self.tasks.iter() {
                task.abort();
            }
        }
    }
}

impl JwtAuthenticator {
    /// An authenticator for `rules`, taking each rule's keys from `source(i, rule)` (the
    /// proxy resolves `jwksUri` to a source; library users may pass their own). HTTPS
    /// sources are fetched by a background task, at once and then every five minutes (when
    /// called inside a tokio runtime; outside one they are never fetched, which suits an
    /// offline check); until the first fetch succeeds that provider's tokens fail with
    /// `Jwks remote fetch is failed`. [`ready`](Self::ready) waits for the keys.
    pub fn new(
        rules: &[JwtRule],
        mut source: impl FnMut(usize, &JwtRule) -> Option<JwksSource>,
    ) -> Result<Self, InvalidJwtRule> {
        let mut providers = Vec::new();
        let mut tasks = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            rule.check(i)?;
            let invalid =
                |field: &str, reason: String| InvalidJwtRule { field: format!("jwtRules[{i}].{field}"), reason };
            let keys = Arc::new(ArcSwap::from_pointee(Vec::new()));
            let from = match &rule.jwks {
                Some(inline) => Some(JwksSource::Inline(inline.clone())),
                None => source(i, rule),
            };
            match from {
                Some(JwksSource::Inline(text)) => {
                    keys.store(Arc::new(decoding_keys(&text).map_err(|e| invalid("jwks", e))?))
                }
                Some(JwksSource::File(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| invalid("jwksUri", format!("{}: {e}", path.display())))?;
                    keys.store(Arc::new(
                        decoding_keys(&text).map_err(|e| invalid("jwksUri", format!("{}: {e}", path.display())))?,
                    ));
                }
                Some(JwksSource::Https { uri, roots, timeout }) => {
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        tasks.push(runtime.spawn(refresh(uri, roots, timeout, Arc::downgrade(&keys))));
                    }
                }
                None => return Err(invalid("jwksUri", "no keys: give `jwks` or a `jwksUri`".into())),
            }
            let mut locations = Vec::new();
            for h in &rule.from_headers {
                let name = HeaderName::try_from(h.name.as_str())
                    .map_err(|_| invalid("fromHeaders", format!("`{}` is not a header name", h.name)))?;
                locations.push(Location::Header { name, prefix: h.prefix.clone() });
            }
            locations.extend(rule.from_params.iter().cloned().map(Location::Param));
            locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations.push(Location::Header { name: http::header::AUTHORIZATION, prefix: "Bearer ".into() });
                locations.push(Location::Param("access_token".into()));
            }
            let header = |name: &str, field: &str| {
                HeaderName::try_from(name).map_err(|_| invalid(field, format!("`{name}` is not a header name")))
            };
            providers.push(Provider {
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                keys,
                locations,
                forward: rule.forward_original_token,
                payload_header: rule
                    .output_payload_to_header
                    .as_deref()
                    .map(|h| header(h, "outputPayloadToHeader"))
                    .transpose()?,
                claim_headers: rule
                    .output_claim_to_headers
                    .iter()
                    .map(|c| Ok((header(&c.header, "outputClaimToHeaders")?, c.claim.clone())))
                    .collect::<Result<_, InvalidJwtRule>>()?,
                space_delimited: rule.space_delimited_claims.clone().into(),
            });
        }
        Ok(Self { providers: Arc::new(providers), tasks: Arc::new(tasks) })
    }

    /// Waits until every provider has keys, or `timeout` passes; whether they all do.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let all = || self.providers.iter().all(|p| !p.keys.load().is_empty());
        let wait = async {
            while !all() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Whether there are no rules (every request passes untouched).
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Authenticates a request: `Ok` with the identity (or `None` without a token), after
    /// the header rewrites; `Err` with the 401 body text.
    pub fn authenticate<B>(&self, req: &mut Request<B>) -> Result<Option<RequestAuth>, &'static str> {
        // The first location (in rule order) that holds a token decides.
        let Some((provider, location, token)) =
            self.providers.iter().find_map(|p| p.locations.iter().find_map(|l| extract(req, l).map(|t| (p, l, t))))
        else {
            return Ok(None);
        };
        let payload =
            payload(&token).ok_or("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")?;
        let issuer = payload.get("iss").and_then(Value::as_str).unwrap_or("");
        // A token of another configured issuer is verified by that issuer's provider.
        let provider = self.providers.iter().find(|p| p.issuer == issuer).unwrap_or(provider);
        if provider.issuer != issuer {
            return Err("Jwt issuer is not configured");
        }
        let claims = verify(provider, &token)?;
        if !provider.forward
            && let Location::Header { name, .. } = location
        {
            req.headers_mut().remove(name);
        }
        if let Some(h) = &provider.payload_header {
            let json = serde_json::to_vec(&claims).unwrap_or_default();
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                req.headers_mut().insert(h.clone(), v);
            }
        }
        for (h, claim) in &provider.claim_headers {
            let text = match claims.get(claim) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
                _ => None,
            };
            if let Some(v) = text.and_then(|t| HeaderValue::from_str(&t).ok()) {
                req.headers_mut().insert(h.clone(), v);
            }
        }
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        Ok(Some(RequestAuth {
            principal: format!("{issuer}/{sub}"),
            claims,
            space_delimited: provider.space_delimited.clone(),
        }))
    }
}

fn extract<B>(req: &Request<B>, location: &Location) -> Option<String> {
    match location {
        Location::Header { name, prefix } => {
            let value = req.headers().get(name)?.to_str().ok()?;
            // A header without the prefix holds no token of this rule.
            let token = if prefix.is_empty() { value } else { value.strip_prefix(prefix.as_str())? };
            Some(token.trim().to_owned())
        }
        Location::Param(name) => req.uri().query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| v.to_owned())
        }),
        Location::Cookie(name) => req.headers().get_all(http::header::COOKIE).iter().find_map(|h| {
            h.to_str().ok()?.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| v.to_owned())
            })
        }),
    }
}

fn payload(token: &str) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (_, body, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else { return None };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn verify(provider: &Provider, token: &str) -> Result<Map<String, Value>, &'static str> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| "Jwt header is an invalid JSON")?;
    let keys = provider.keys.load();
    if keys.is_empty() {
        return Err("Jwks remote fetch is failed");
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = 60;
    validation.validate_nbf = true;
    validation.required_spec_claims = HashSet::new();
    validation.set_issuer(&[&provider.issuer]);
    if provider.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&provider.audiences);
    }
    let candidates = keys.iter().filter(|(kid, _)| header.kid.is_none() || kid.is_none() || *kid == header.kid);
    let mut failure = "Jwt verification fails";
    for (_, key) in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                failure = match e.kind() {
                    K::ExpiredSignature => return Err("Jwt is expired"),
                    K::ImmatureSignature => return Err("Jwt not yet valid"),
                    K::InvalidAudience => return Err("Audiences in Jwt are not allowed"),
                    K::InvalidIssuer => return Err("Jwt issuer is not configured"),
                    _ => "Jwt verification fails",
                };
            }
        }
    }
    Err(failure)
}

// === fetching ===

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fetches a JWKS over HTTPS (HTTP/1.1, verifying the server's name against `roots`).
pub async fn fetch(uri: &http::Uri, roots: &Arc<rustls::RootCertStore>, timeout: Duration) -> Result<Keys, BoxError> {
    let text = tokio::time::timeout(timeout, get(uri, roots)).await.map_err(|_| "timed out")??;
    Ok(decoding_keys(&text)?)
}

async fn get(uri: &http::Uri, roots: &Arc<rustls::RootCertStore>) -> Result<String, BoxError> {
    use http_body_util::BodyExt;
    if uri.scheme_str() != Some("https") {
        return Err("only https JWKS URIs are fetched".into());
    }
    let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let config = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or(host);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path).header(http::header::HOST, authority).body(http_body_util::Empty::<Bytes>::new())?;
    let res = send.send_request(req).await?;
    if !res.status().is_success() {
        return Err(format!("status {}", res.status()).into());
    }
    let body = res.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok(String::from_utf8(body.to_vec())?)
}

async fn refresh(
    uri: http::Uri,
    roots: Arc<rustls::RootCertStore>,
    timeout: Duration,
    keys: std::sync::Weak<ArcSwap<Keys>>,
) {
    loop {
        let Some(slot) = keys.upgrade() else { return };
        match fetch(&uri, &roots, timeout).await {
            Ok(k) => slot.store(Arc::new(k)),
            Err(e) => tracing::warn!(%uri, error = %e, "JWKS fetch failed; keeping the last keys"),
        }
        // Envoy caches a remote JWKS for five minutes; a provider without keys retries sooner.
        let empty = slot.load().is_empty();
        drop(slot);
        tokio::time::sleep(if empty { Duration::from_secs(5) } else { Duration::from_secs(300) }).await;
    }
}

// === the layer ===

/// Applies a [`JwtAuthenticator`] to every request.
#[derive(Clone, Debug)]
pub struct RequestAuthenticationLayer {
    authenticator: JwtAuthenticator,
}

impl RequestAuthenticationLayer {
    /// The layer.
    pub fn new(authenticator: JwtAuthenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> tower::Layer<S> for RequestAuthenticationLayer {
    type Service = RequestAuthentication<S>;
    fn layer(&self, inner: S) -> RequestAuthentication<S> {
        RequestAuthentication { inner, authenticator: self.authenticator.clone() }
    }
}

/// The service of [`RequestAuthenticationLayer`].
#[derive(Clone, Debug)]
pub struct RequestAuthentication<S> {
    inner: S,
    authenticator: JwtAuthenticator,
}

impl<S, B, RB> tower::Service<Request<B>> for RequestAuthentication<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<LocalOr<RB>>;
    type Error = S::Error;
    type Future = crate::authz::Authorized<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.authenticator.authenticate(&mut req) {
            Ok(auth) => {
                if let Some(auth) = auth {
                    req.extensions_mut().insert(auth);
                }
                crate::authz::Authorized::Inner { future: self.inner.call(req) }
            }
            Err(why) => crate::authz::Authorized::Denied { response: Some(unauthorized(req.headers(), why)) },
        }
    }
}

/// 401 with the reason, as Envoy's jwt_authn filter answers.
pub fn unauthorized<RB>(request_headers: &HeaderMap, why: &'static str) -> Response<LocalOr<RB>> {
    let grpc =
        request_headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut res = Response::new(LocalOr::local(if grpc { Bytes::new() } else { Bytes::from_static(why.as_bytes()) }));
    if !grpc {
        *res.status_mut() = StatusCode::UNAUTHORIZED;
    }
    let h = res.headers_mut();
    if grpc {
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(mesh_core::GrpcCode::UNAUTHENTICATED.as_u32()));
        h.insert("grpc-message", HeaderValue::from_static(why));
    } else {
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    h.insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mesh\", error=\"invalid_token\""),
    );
    res
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}
