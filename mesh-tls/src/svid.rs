//! X.509-SVIDs: the SPIFFE facts of a certificate, read with `x509-parser` and judged by
//! [`mesh_core::identity::LeafSvid`].

use std::time::{Duration, SystemTime};

use mesh_core::identity::{InvalidSvid, LeafSvid};
use mesh_core::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a certificate is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate (or one of its extensions is malformed).
    #[error("not a parsable X.509 certificate: {0}")]
    Parse(String),
    /// The leaf rules of the X.509-SVID standard.
    #[error(transparent)]
    Leaf(#[from] InvalidSvid),
    /// No keyUsage extension, or one without `digitalSignature`.
    #[error("a leaf SVID must have a keyUsage extension with digitalSignature")]
    NoDigitalSignature,
    /// The SVID's trust domain is not the one the trust bundle is for.
    #[error("the peer's trust domain `{found}` is not the trust bundle's `{expected}`")]
    TrustDomain {
        /// The bundle's trust domain.
        expected: String,
        /// The certificate's.
        found: String,
    },
    /// The SPIFFE ID is valid but not one the caller expects.
    #[error("the peer is `{0}`, which is not an expected identity")]
    Unexpected(String),
}

/// What a leaf certificate says: its SPIFFE ID and validity period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID (its only URI SAN).
    pub id: SpiffeId,
    /// Not valid before.
    pub not_before: SystemTime,
    /// Not valid after.
    pub not_after: SystemTime,
}

/// Reads a leaf certificate and applies the X.509-SVID leaf rules: exactly one URI SAN that
/// is a SPIFFE ID with a path, `cA = false`, keyUsage present with `digitalSignature` and
/// without `keyCertSign` / `cRLSign`. Chain validation is the TLS verifier's job.
pub fn leaf_svid(der: &CertificateDer<'_>) -> Result<Svid, SvidError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| SvidError::Parse(e.to_string()))?;
    let parse = |e: x509_parser::error::X509Error| SvidError::Parse(e.to_string());
    let mut uris = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(parse)? {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let is_ca = cert.basic_constraints().map_err(parse)?.is_some_and(|bc| bc.value.ca);
    let usage = cert.key_usage().map_err(parse)?;
    let (key_cert_sign, crl_sign, digital_signature) = usage
        .map(|u| (u.value.key_cert_sign(), u.value.crl_sign(), u.value.digital_signature()))
        .unwrap_or((false, false, false));
    let id = LeafSvid { uri_sans: &uris, is_ca, key_cert_sign, crl_sign }.validate()?;
    if !digital_signature {
        return Err(SvidError::NoDigitalSignature);
    }
    let validity = cert.validity();
    Ok(Svid {
        id,
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
    })
}

/// Checks a verified peer's leaf: an SVID of `trust_domain`.
pub(crate) fn peer_svid(der: &CertificateDer<'_>, trust_domain: &TrustDomain) -> Result<SpiffeId, SvidError> {
    let svid = leaf_svid(der)?;
    if svid.id.trust_domain_str() != trust_domain.as_str() {
        return Err(SvidError::TrustDomain {
            expected: trust_domain.as_str().to_owned(),
            found: svid.id.trust_domain_str().to_owned(),
        });
    }
    Ok(svid.id)
}

/// `notAfter` of any certificate (a CA in a bundle, say).
pub(crate) fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(to_system_time(cert.validity().not_after.timestamp()))
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}
