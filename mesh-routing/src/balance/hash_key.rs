//! [`HashKey`]: what a consistent-hash balancer hashes (Istio `consistentHash`).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderName, HeaderValue, Request};
use xxhash_rust::xxh64::{Xxh64, xxh64};

use crate::random::Random;

/// What a consistent-hash balancer hashes, one variant per Istio `consistentHash` key.
/// See the module docs.
///
/// Every key hashes bytes with xxHash64 (seed 0), so a key's hash is stable across processes
/// and restarts.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HashKey {
    /// `httpHeaderName`: the header's value; several values are hashed joined with `","`.
    /// Absent header ⇒ no hash.
    Header(HeaderName),
    /// `httpCookie`: the named cookie's value. When the request has no such cookie and `ttl` is
    /// set, the proxy generates one ([`HashKey::cookie_to_set`]); without `ttl`, no hash.
    Cookie {
        /// The cookie's name.
        name: String,
        /// `Max-Age` of a generated cookie; zero means a session cookie.
        ttl: Option<Duration>,
        /// `Path` of a generated cookie.
        path: Option<String>,
    },
    /// `useSourceIp`: the downstream peer's IP address (its octets; IPv4-mapped IPv6 addresses
    /// hash as IPv4).
    SourceIp,
    /// `httpQueryParameterName`: the first value of the query parameter (name compared
    /// case-sensitively, neither name nor value percent-decoded). Absent ⇒ no hash.
    QueryParam(String),
}

impl HashKey {
    /// The request's hash under this key, or `None` when the request lacks the key (the
    /// balancer then picks at random).
    ///
    /// * `Header`: xxh64 of the value; several values are hashed as if joined with `","`.
    /// * `Cookie`: xxh64 of the value of the first cookie named `name` over all `cookie`
    ///   headers (pairs split on `;` and trimmed; surrounding double quotes removed, so a
    ///   cookie set by [`HashKey::cookie_to_set`] hashes to the value it returned).
    /// * `SourceIp`: xxh64 of the octets of `peer`'s IP (`None` when `peer` is `None`).
    /// * `QueryParam`: xxh64 of the first value (`""` for `?name` without `=`).
    pub fn hash<B>(&self, request: &Request<B>, peer: Option<SocketAddr>) -> Option<u64> {
        match self {
            HashKey::Header(name) => {
                let mut values = request.headers().get_all(name).iter();
                let first = values.next()?;
                let mut hasher = Xxh64::new(0);
                hasher.update(first.as_bytes());
                for value in values {
                    hasher.update(b",");
                    hasher.update(value.as_bytes());
                }
                Some(hasher.digest())
            }
            HashKey::Cookie { name, .. } => {
                let value = request
                    .headers()
                    .get_all(COOKIE)
                    .iter()
                    .flat_map(|header| header.as_bytes().split(|&b| b == b';'))
                    .find_map(|pair| cookie_value(pair, name.as_bytes()))?;
                Some(xxh64(value, 0))
            }
            HashKey::SourceIp => Some(match peer?.ip().to_canonical() {
                IpAddr::V4(ip) => xxh64(&ip.octets(), 0),
                IpAddr::V6(ip) => xxh64(&ip.octets(), 0),
            }),
            HashKey::QueryParam(name) => {
                let value = request.uri().query()?.split('&').find_map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (key == name).then_some(value)
                })?;
                Some(xxh64(value.as_bytes(), 0))
            }
        }
    }

    /// For a `Cookie` key with a `ttl`, the cookie to set on a request that carried none (call
    /// it when [`HashKey::hash`] returned `None`): the hash to balance this request with (the
    /// hash later requests carrying the cookie will produce) and the `Set-Cookie` header value
    /// `name="value"; Max-Age=<ttl secs>; Path=<path>; HttpOnly`.
    ///
    /// The value is the hex of xxh64 over `peer`'s address (`""` when unknown) seeded with a
    /// draw from `random`; Envoy likewise derives it from a hash of the connection's addresses.
    /// A `ttl` under one second gives a session cookie (no `Max-Age`), as in Envoy, which
    /// truncates the ttl to whole seconds. `Path` is left out when `path` is `None`.
    ///
    /// `None` for other keys, for a cookie key without `ttl`, and when the name or path cannot
    /// appear in a header value.
    pub fn cookie_to_set(&self, random: &Random, peer: Option<SocketAddr>) -> Option<(u64, HeaderValue)> {
        let HashKey::Cookie { name, ttl: Some(ttl), path } = self else {
            return None;
        };
        let mut source = String::new();
        if let Some(peer) = peer {
            let _ = write!(source, "{peer}");
        }
        let value = format!("{:016x}", xxh64(source.as_bytes(), random.next_u64()));
        let mut header = format!("{name}=\"{value}\"");
        if ttl.as_secs() > 0 {
            let _ = write!(header, "; Max-Age={}", ttl.as_secs());
        }
        if let Some(path) = path {
            let _ = write!(header, "; Path={path}");
        }
        header.push_str("; HttpOnly");
        let header = HeaderValue::try_from(header).ok()?;
        Some((xxh64(value.as_bytes(), 0), header))
    }
}

/// The value of `pair` (`" name=value "`) when its name is `name`, without surrounding quotes.
fn cookie_value<'a>(pair: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let pair = pair.trim_ascii();
    let eq = pair.iter().position(|&b| b == b'=')?;
    if pair[..eq].trim_ascii() != name {
        return None;
    }
    let value = pair[eq + 1..].trim_ascii();
    Some(match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    })
}
