//! A development certificate authority: SPIFFE workload certificates without an external
//! tool, for examples, tests, the demo and `mesh-proxy certs`.
//!
//! The CA's certificate carries the trust domain's SPIFFE ID (no path); each workload
//! certificate carries exactly one URI SAN (its SPIFFE ID), `cA = false`, keyUsage
//! `digitalSignature` + `keyEncipherment`, and extendedKeyUsage `serverAuth` + `clientAuth`,
//! as the X.509-SVID standard asks. Keys are ECDSA P-256.

use std::time::{Duration, SystemTime};

use mesh_core::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A failure to make or read a certificate.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation: {0}")]
pub struct CertError(#[from] rcgen::Error);

/// A workload's PEM files.
#[derive(Debug, Clone)]
pub struct WorkloadPem {
    /// The certificate (leaf only; the CA is the bundle).
    pub cert_chain: String,
    /// The PKCS#8 private key.
    pub private_key: String,
}

/// A self-signed CA for one trust domain.
#[derive(Debug)]
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    trust_domain: TrustDomain,
}

impl DevCa {
    /// A new CA for `trust_domain`, valid for ten years from an hour ago.
    pub fn new(trust_domain: &TrustDomain) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("mesh dev CA ({})", trust_domain.as_str()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key), trust_domain: trust_domain.clone() })
    }

    /// A CA read back from its PEM certificate and key (as [`DevCa::cert_pem`] and
    /// [`DevCa::key_pem`] wrote them).
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &TrustDomain) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            trust_domain: trust_domain.clone(),
        })
    }

    /// The CA certificate: the trust bundle.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// A workload certificate for `id`, valid from a minute ago for `validity`.
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<WorkloadPem, CertError> {
        let now = SystemTime::now();
        self.issue_between(id, now - Duration::from_secs(60), now + validity)
    }

    /// A workload certificate for `id` valid from `not_before` to `not_after` (a past
    /// `not_after` makes an expired one, for tests).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadPem, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(id.principal());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadPem { cert_chain: cert.pem(), private_key: key.serialize_pem() })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesh");
    dn.push(DnType::CommonName, common_name);
    dn
}
