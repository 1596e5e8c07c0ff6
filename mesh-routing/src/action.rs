//! What a route does to a request besides choosing its destination: header operations,
//! rewrites, redirects and direct responses, each compiled once from the model.

use bytes::Bytes;
use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use mesh_core::matching::StringMatch;
use regex::Regex;

use crate::InvalidRoute;
use crate::model::{HeaderOperations, Headers, HttpDirectResponse, HttpRedirect, HttpRewrite};

/// The header Envoy copies the pre-rewrite path into.
pub const ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

// === HeaderOps ===

/// Compiled `HeaderOperations`: removals, then overwrites, then appends.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    remove: Box<[HeaderName]>,
    set: Box<[(HeaderName, HeaderValue)]>,
    add: Box<[(HeaderName, HeaderValue)]>,
}

impl HeaderOps {
    /// Compiles `ops`; `path` names them in errors. `host` / `:authority` keys come back
    /// separately (set wins over add), as Istio turns them into an authority rewrite; pass
    /// `allow_authority = false` where that is not possible (responses).
    pub(crate) fn new(
        ops: Option<&HeaderOperations>,
        path: &str,
        allow_authority: bool,
    ) -> Result<(Self, Option<HeaderValue>), InvalidRoute> {
        let Some(ops) = ops else { return Ok((Self::default(), None)) };
        let mut authority = None;
        let mut pairs = |section: &str, map: &std::collections::BTreeMap<String, String>| {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                let field = format!("{path}.{section}.{k}");
                let value =
                    HeaderValue::from_str(v).map_err(|_| InvalidRoute::new(&field, "not a valid header value"))?;
                if k.eq_ignore_ascii_case("host") || k == ":authority" {
                    if !allow_authority {
                        return Err(InvalidRoute::new(&field, "the authority can only be rewritten on requests"));
                    }
                    if section == "set" || authority.is_none() {
                        authority = Some(value);
                    }
                    continue;
                }
                out.push((header_name(k, &field)?, value));
            }
            Ok::<_, InvalidRoute>(out)
        };
        let set = pairs("set", &ops.set)?;
        let add = pairs("add", &ops.add)?;
        let remove = ops
            .remove
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.eq_ignore_ascii_case("host"))
            .map(|(i, k)| header_name(k, &format!("{path}.remove[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok((Self { remove, set: set.into(), add: add.into() }, authority))
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the operations to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

fn header_name(k: &str, field: &str) -> Result<HeaderName, InvalidRoute> {
    if k.starts_with(':') {
        return Err(InvalidRoute::new(field, "pseudo-headers cannot be set or removed"));
    }
    HeaderName::from_bytes(k.as_bytes()).map_err(|_| InvalidRoute::new(field, "not a valid header name"))
}

/// Request and response operations of one `Headers` block, plus the authority it rewrites.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeaderRules {
    pub(crate) request: HeaderOps,
    pub(crate) response: HeaderOps,
    pub(crate) authority: Option<HeaderValue>,
}

impl HeaderRules {
    pub(crate) fn new(headers: Option<&Headers>, path: &str) -> Result<Self, InvalidRoute> {
        let (request, authority) =
            HeaderOps::new(headers.and_then(|h| h.request.as_ref()), &format!("{path}.request"), true)?;
        let (response, _) =
            HeaderOps::new(headers.and_then(|h| h.response.as_ref()), &format!("{path}.response"), false)?;
        Ok(Self { request, response, authority })
    }
}

// === Rewrite ===

/// A compiled `rewrite`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rewrite {
    uri: Option<Bytes>,
    regex: Option<(Regex, String)>,
    pub(crate) authority: Option<HeaderValue>,
}

impl Rewrite {
    pub(crate) fn new(rewrite: Option<&HttpRewrite>, path: &str) -> Result<Self, InvalidRoute> {
        let Some(r) = rewrite else { return Ok(Self::default()) };
        if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
            return Err(InvalidRoute::new(path, "`uri` and `uriRegexRewrite` cannot both be set"));
        }
        if r.uri.is_none() && r.uri_regex_rewrite.is_none() && r.authority.is_none() {
            return Err(InvalidRoute::new(path, "a rewrite needs `uri`, `uriRegexRewrite` or `authority`"));
        }
        let regex = match &r.uri_regex_rewrite {
            Some(rr) => {
                let field = format!("{path}.uriRegexRewrite.match");
                if rr.pattern.is_empty() {
                    return Err(InvalidRoute::new(&field, "the pattern is empty"));
                }
                let re = Regex::new(&rr.pattern).map_err(|e| InvalidRoute::new(&field, &e.to_string()))?;
                // RE2 writes references as \1; the regex crate as ${1}.
                let replacement = regex::Regex::new(r"\\(\d+)")
                    .expect("valid pattern")
                    .replace_all(&rr.rewrite.replace('$', "$$"), "$${${1}}")
                    .into_owned();
                Some((re, replacement))
            }
            None => None,
        };
        let authority = r
            .authority
            .as_deref()
            .map(|a| {
                HeaderValue::from_str(a)
                    .ok()
                    .filter(|_| a.parse::<Authority>().is_ok())
                    .ok_or_else(|| InvalidRoute::new(&format!("{path}.authority"), "not a valid authority"))
            })
            .transpose()?;
        Ok(Self { uri: r.uri.clone().map(Bytes::from), regex, authority })
    }

    pub(crate) fn rewrites_path(&self) -> bool {
        self.uri.is_some() || self.regex.is_some()
    }

    /// The new path and query, given what the matched block's `uri` was.
    pub(crate) fn path(&self, uri: &Uri, matched: Option<&StringMatch>) -> Option<PathAndQuery> {
        let path = uri.path();
        let query = uri.query();
        let new_path = if let Some(replacement) = &self.uri {
            let replacement = std::str::from_utf8(replacement).unwrap_or("/");
            match matched {
                // The matched prefix is swapped (Envoy `prefix_rewrite`); the prefix matched
                // against path and query, but a prefix that reaches into the query (rare) is
                // taken as the whole path.
                Some(StringMatch::Prefix(p)) if p.len() <= path.len() => {
                    // The same length is swapped whether or not it matched ignoring case.
                    let rest = &path[p.len()..];
                    format!("{replacement}{rest}")
                }
                None => {
                    // No uri match is Envoy's `prefix: /`.
                    format!("{replacement}{}", &path[1.min(path.len())..])
                }
                _ => replacement.to_owned(),
            }
        } else if let Some((re, replacement)) = &self.regex {
            re.replace_all(path, replacement.as_str()).into_owned()
        } else {
            return None;
        };
        let new_path = if new_path.is_empty() { "/".to_owned() } else { new_path };
        let full = match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        full.parse().ok()
    }
}

/// Applies a path rewrite, keeping the old path in `x-envoy-original-path` (with its query, as
/// Envoy copies the whole `:path`).
pub(crate) fn set_path<B>(req: &mut Request<B>, pq: PathAndQuery) {
    let original = req.uri().path_and_query().map_or_else(|| req.uri().path(), PathAndQuery::as_str);
    if let Ok(original) = HeaderValue::from_str(original) {
        req.headers_mut().insert(ORIGINAL_PATH, original);
    }
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Sets the request's authority: the URI's when it has one (HTTP/2, absolute form), and `Host`.
pub(crate) fn set_authority<B>(req: &mut Request<B>, value: &HeaderValue) {
    if req.uri().authority().is_some()
        && let Ok(authority) = Authority::try_from(value.as_bytes())
    {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = Some(authority);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req.headers_mut().insert(HOST, value.clone());
}

// === Redirect ===

/// A compiled `redirect`.
#[derive(Clone, Debug)]
pub struct Redirect {
    status: StatusCode,
    uri: Option<String>,
    authority: Option<String>,
    scheme: Option<Scheme>,
    port: PortRule,
}

#[derive(Clone, Copy, Debug)]
enum PortRule {
    Keep,
    Set(u16),
    FromRequest,
    ProtocolDefault,
}

impl Redirect {
    pub(crate) fn new(r: &HttpRedirect, path: &str) -> Result<Self, InvalidRoute> {
        let status = match r.redirect_code.unwrap_or(0) {
            0 | 301 => StatusCode::MOVED_PERMANENTLY,
            302 => StatusCode::FOUND,
            303 => StatusCode::SEE_OTHER,
            307 => StatusCode::TEMPORARY_REDIRECT,
            308 => StatusCode::PERMANENT_REDIRECT,
            _ => return Err(InvalidRoute::new(&format!("{path}.redirectCode"), "must be 301, 302, 303, 307 or 308")),
        };
        let scheme = match r.scheme.as_deref() {
            None => None,
            Some("http") => Some(Scheme::HTTP),
            Some("https") => Some(Scheme::HTTPS),
            Some(_) => return Err(InvalidRoute::new(&format!("{path}.scheme"), "must be `http` or `https`")),
        };
        let port = match (r.port, r.derive_port.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(InvalidRoute::new(path, "`port` and `derivePort` cannot both be set"));
            }
            (Some(p), None) => PortRule::Set(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| InvalidRoute::new(&format!("{path}.port"), "must be a port from 1 to 65535"))?,
            ),
            (None, Some("FROM_REQUEST_PORT")) => PortRule::FromRequest,
            (None, Some("FROM_PROTOCOL_DEFAULT")) => PortRule::ProtocolDefault,
            (None, Some(_)) => {
                return Err(InvalidRoute::new(
                    &format!("{path}.derivePort"),
                    "must be FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
                ));
            }
            (None, None) => PortRule::Keep,
        };
        if r.uri.is_none() && r.authority.is_none() && scheme.is_none() && matches!(port, PortRule::Keep) {
            return Err(InvalidRoute::new(path, "a redirect needs `uri`, `authority`, `scheme` or `port`"));
        }
        if let Some(a) = &r.authority
            && a.parse::<Authority>().is_err()
        {
            return Err(InvalidRoute::new(&format!("{path}.authority"), "not a valid authority"));
        }
        Ok(Self { status, uri: r.uri.clone(), authority: r.authority.clone(), scheme, port })
    }

    /// The redirect response for `req`.
    pub fn respond<B>(&self, req: &Request<B>) -> Response<Bytes> {
        let request_authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
            .unwrap_or_default();
        let scheme = self.scheme.clone().or_else(|| req.uri().scheme().cloned()).unwrap_or(Scheme::HTTP);
        let authority = self.authority.clone().unwrap_or_else(|| request_authority.clone());
        let (host, own_port) = split_port(&authority);
        let request_port = split_port(&request_authority).1;
        let port = match self.port {
            PortRule::Set(p) => Some(p),
            // Istio: the port of the listener the request came in on.
            PortRule::FromRequest => {
                mesh_core::ClientConnection::of(req.extensions()).map(|c| c.local.port()).or(request_port)
            }
            PortRule::ProtocolDefault => None,
            // A scheme change drops the old scheme's default port (`:80` going to https), as
            // Envoy does; any other port stays.
            PortRule::Keep if self.scheme.is_some() => {
                let old = req.uri().scheme().cloned().unwrap_or(Scheme::HTTP);
                own_port.filter(|p| !(*p == 80 && old == Scheme::HTTP || *p == 443 && old == Scheme::HTTPS))
            }
            PortRule::Keep => own_port,
        };
        let port = port.filter(|p| !(*p == 80 && scheme == Scheme::HTTP || *p == 443 && scheme == Scheme::HTTPS));
        let path = match &self.uri {
            Some(uri) if uri.contains('?') => uri.clone(),
            Some(uri) => match req.uri().query() {
                Some(q) => format!("{uri}?{q}"),
                None => uri.clone(),
            },
            None => req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned(),
        };
        let location = match port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        };
        let mut res = Response::new(Bytes::new());
        *res.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&location) {
            res.headers_mut().insert(LOCATION, v);
        }
        res
    }
}

fn split_port(authority: &str) -> (&str, Option<u16>) {
    let colon = if authority.starts_with('[') { authority.find("]:").map(|i| i + 1) } else { authority.rfind(':') };
    match colon.map(|i| (i, authority[i + 1..].parse())) {
        Some((i, Ok(port))) => (&authority[..i], Some(port)),
        _ => (authority, None),
    }
}

// === Direct response ===

/// A compiled `directResponse`.
#[derive(Clone, Debug)]
pub struct DirectResponse {
    status: StatusCode,
    body: Bytes,
}

/// Istio refuses direct-response bodies over 1 MB.
const MAX_DIRECT_BODY: usize = 1 << 20;

impl DirectResponse {
    pub(crate) fn new(d: &HttpDirectResponse, path: &str) -> Result<Self, InvalidRoute> {
        let status = u16::try_from(d.status)
            .ok()
            .filter(|s| (200..=600).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| InvalidRoute::new(&format!("{path}.status"), "must be from 200 to 600"))?;
        let body = match &d.body {
            None => Bytes::new(),
            Some(b) => match (&b.string, &b.bytes) {
                (Some(s), None) => Bytes::from(s.clone()),
                (None, Some(b64)) => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map(Bytes::from)
                        .map_err(|e| InvalidRoute::new(&format!("{path}.body.bytes"), &format!("not base64: {e}")))?
                }
                (None, None) => Bytes::new(),
                (Some(_), Some(_)) => {
                    return Err(InvalidRoute::new(&format!("{path}.body"), "set `string` or `bytes`, not both"));
                }
            },
        };
        if body.len() > MAX_DIRECT_BODY {
            return Err(InvalidRoute::new(&format!("{path}.body"), "larger than 1 MB"));
        }
        Ok(Self { status, body })
    }

    /// The response.
    pub fn respond(&self) -> Response<Bytes> {
        let mut res = Response::new(self.body.clone());
        *res.status_mut() = self.status;
        if !self.body.is_empty() {
            res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        res
    }
}
