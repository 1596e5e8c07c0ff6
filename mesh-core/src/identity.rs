//! SPIFFE identities: IDs, trust domains, Istio principals, X.509-SVID leaf rules.
//!
//! A [`SpiffeId`] is `spiffe://<trust-domain><path>`, validated as the SPIFFE standard
//! requires:
//!
//! * the scheme is exactly `spiffe://`; no userinfo, port, query or fragment;
//! * the trust domain is non-empty and uses only `a-z 0-9 . - _` (lowercase, no
//!   percent-encoding);
//! * each path segment is non-empty, not `.` or `..`, and uses only `a-z A-Z 0-9 . - _`; the
//!   path has no trailing `/`;
//! * the whole ID is at most 2048 bytes.
//!
//! Istio names workloads `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and
//! writes principals as the ID without `spiffe://` (`cluster.local/ns/default/sa/web`);
//! [`SpiffeId::principal`], [`SpiffeId::from_principal`] and [`SpiffeId::istio`] convert.
//!
//! [`LeafSvid`] applies the X.509-SVID rules for a leaf certificate to facts extracted from it
//! (the TLS crate extracts them; this crate does no parsing of certificates).
//!
//! # Example
//!
//! ```
//! use mesh_core::SpiffeId;
//!
//! let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse()?;
//! assert_eq!(id.trust_domain().as_str(), "cluster.local");
//! assert_eq!(id.principal(), "cluster.local/ns/shop/sa/cart");
//! let istio = id.istio().expect("Istio-shaped path");
//! assert_eq!((istio.namespace, istio.service_account), ("shop", "cart"));
//!
//! assert!("spiffe://Example.org/a".parse::<SpiffeId>().is_err());
//! # Ok::<(), mesh_core::identity::InvalidSpiffeId>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSpiffeId {
    /// It does not start with `spiffe://`.
    #[error("a SPIFFE ID must start with `spiffe://`")]
    Scheme,
    /// The trust domain is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has an uppercase letter.
    #[error("the trust domain must be lowercase (found `{0}`)")]
    UppercaseTrustDomain(char),
    /// A `:` in the authority: a port.
    #[error("a SPIFFE ID must not have a port")]
    Port,
    /// An `@` in the authority: userinfo.
    #[error("a SPIFFE ID must not have userinfo")]
    Userinfo,
    /// A `?`.
    #[error("a SPIFFE ID must not have a query")]
    Query,
    /// A `#`.
    #[error("a SPIFFE ID must not have a fragment")]
    Fragment,
    /// A `%`.
    #[error("a SPIFFE ID must not be percent-encoded")]
    PercentEncoded,
    /// Another character not allowed in the trust domain.
    #[error("`{0}` is not allowed in a trust domain (only a-z, 0-9, `.`, `-`, `_`)")]
    TrustDomainChar(char),
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// An empty path segment (`//`) or a trailing `/`.
    #[error("the path has an empty segment or a trailing `/`")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("the path must not have `.` or `..` segments")]
    DotSegment,
    /// A character not allowed in the path.
    #[error("`{0}` is not allowed in a path segment (only a-z, A-Z, 0-9, `.`, `-`, `_`)")]
    PathChar(char),
    /// The ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("the SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
}

// === TrustDomain ===

/// A SPIFFE trust domain name, such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    /// Validates a trust domain name (without `spiffe://`).
    pub fn new(name: &str) -> Result<Self, InvalidSpiffeId> {
        validate_trust_domain(name)?;
        Ok(TrustDomain(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>` (no path).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), InvalidSpiffeId> {
    if td.is_empty() {
        return Err(InvalidSpiffeId::EmptyTrustDomain);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(InvalidSpiffeId::UppercaseTrustDomain(c)),
            ':' => return Err(InvalidSpiffeId::Port),
            '@' => return Err(InvalidSpiffeId::Userinfo),
            '?' => return Err(InvalidSpiffeId::Query),
            '#' => return Err(InvalidSpiffeId::Fragment),
            '%' => return Err(InvalidSpiffeId::PercentEncoded),
            other => return Err(InvalidSpiffeId::TrustDomainChar(other)),
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(InvalidSpiffeId::TrustDomainTooLong);
    }
    Ok(())
}

// === SpiffeId ===

/// A validated SPIFFE ID. See the module docs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: Box<str>,
    /// Byte offset where the path starts (`id.len()` when there is none).
    path_start: usize,
}

/// The parts of an Istio-shaped SPIFFE ID, `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioIdentity<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// The Kubernetes namespace.
    pub namespace: &'a str,
    /// The Kubernetes service account.
    pub service_account: &'a str,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, InvalidSpiffeId> {
        let rest = s.strip_prefix(SCHEME).ok_or(InvalidSpiffeId::Scheme)?;
        let (td, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        validate_trust_domain(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                validate_segment(segment)?;
            }
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(InvalidSpiffeId::TooLong);
        }
        Ok(SpiffeId { id: s.into(), path_start: SCHEME.len() + td.len() })
    }

    /// The ID for an Istio principal (`cluster.local/ns/a/sa/b`).
    pub fn from_principal(principal: &str) -> Result<Self, InvalidSpiffeId> {
        Self::parse(&format!("{SCHEME}{principal}"))
    }

    /// The Istio-convention ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidSpiffeId> {
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    /// The trust domain, borrowed.
    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, starting with `/`, or `""` for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// Whether the ID has no path (it names a trust domain, not a workload).
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// The Istio principal form: the ID without `spiffe://`.
    pub fn principal(&self) -> &str {
        &self.id[SCHEME.len()..]
    }

    /// The namespace and service account, when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn istio(&self) -> Option<IstioIdentity<'_>> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (segments.next(), segments.next(), segments.next(), segments.next(), segments.next()) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Some(IstioIdentity { trust_domain: self.trust_domain_str(), namespace, service_account })
            }
            _ => None,
        }
    }

    /// The namespace from a `/ns/<namespace>/` path prefix (how Istio derives a peer's
    /// namespace for `source.namespace` and the metrics' namespace labels).
    pub fn namespace(&self) -> Option<&str> {
        let rest = self.path().strip_prefix("/ns/")?;
        Some(rest.split('/').next().unwrap_or(rest))
    }
}

fn validate_segment(segment: &str) -> Result<(), InvalidSpiffeId> {
    if segment.is_empty() {
        return Err(InvalidSpiffeId::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(InvalidSpiffeId::DotSegment);
    }
    for c in segment.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '?' => return Err(InvalidSpiffeId::Query),
            '#' => return Err(InvalidSpiffeId::Fragment),
            '%' => return Err(InvalidSpiffeId::PercentEncoded),
            other => return Err(InvalidSpiffeId::PathChar(other)),
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

// === LeafSvid ===

/// The facts of a leaf certificate that the X.509-SVID rules judge, as extracted by a
/// certificate parser.
#[derive(Debug, Clone, Copy)]
pub struct LeafSvid<'a> {
    /// Every URI subject alternative name, in order.
    pub uri_sans: &'a [&'a str],
    /// basicConstraints `cA`.
    pub is_ca: bool,
    /// keyUsage `keyCertSign`.
    pub key_cert_sign: bool,
    /// keyUsage `cRLSign`.
    pub crl_sign: bool,
}

/// Why a leaf certificate is not a valid X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSvid {
    /// No URI SAN.
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("the certificate has {0} URI SANs; an SVID has exactly one")]
    SeveralUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    Id(#[from] InvalidSpiffeId),
    /// The SPIFFE ID has no path.
    #[error("a leaf SVID's SPIFFE ID must have a path")]
    RootId,
    /// `cA = true`.
    #[error("a leaf SVID must not be a CA certificate")]
    Ca,
    /// keyCertSign or cRLSign.
    #[error("a leaf SVID must not carry keyCertSign or cRLSign")]
    SigningKeyUsage,
}

impl LeafSvid<'_> {
    /// Applies the leaf rules and returns the SPIFFE ID on success. Chain validation to the
    /// trust bundle of the ID's trust domain is the caller's (TLS) job.
    pub fn validate(&self) -> Result<SpiffeId, InvalidSvid> {
        if self.is_ca {
            return Err(InvalidSvid::Ca);
        }
        if self.key_cert_sign || self.crl_sign {
            return Err(InvalidSvid::SigningKeyUsage);
        }
        let uri = match self.uri_sans {
            [] => return Err(InvalidSvid::NoUriSan),
            [one] => one,
            several => return Err(InvalidSvid::SeveralUriSans(several.len())),
        };
        let id = SpiffeId::parse(uri)?;
        if id.is_root() {
            return Err(InvalidSvid::RootId);
        }
        Ok(id)
    }
}

// === PeerIdentity ===

/// Request extension: the authenticated identity of the peer that sent the request (from its
/// mTLS certificate). Absent for plaintext or unauthenticated connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub SpiffeId);

impl PeerIdentity {
    /// The peer's identity recorded in a request's extensions, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&SpiffeId> {
        extensions.get::<PeerIdentity>().map(|p| &p.0)
    }
}
