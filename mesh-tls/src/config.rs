//! rustls configurations from an [`Identity`]: SPIFFE verification both ways, rotation at
//! each handshake, TLS 1.3 by default.

use std::fmt;
use std::sync::Arc;

use mesh_core::SpiffeId;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use crate::identity::{Identity, provider};
use crate::svid::{SvidError, peer_svid};

/// ALPN: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN: HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Istio's in-mesh ALPN tokens: a client sidecar offers them when it originates mesh mTLS,
/// and a PERMISSIVE server tells mesh mTLS from application TLS by them (SEMANTICS.md 6.1).
pub const ISTIO_ALPNS: [&[u8]; 5] =
    [b"istio-peer-exchange", b"istio", b"istio-http/1.0", b"istio-http/1.1", b"istio-h2"];

/// Whether a ClientHello's ALPN list marks mesh mTLS (any of [`ISTIO_ALPNS`]).
pub fn is_mesh_alpn<'a>(mut offered: impl Iterator<Item = &'a [u8]>) -> bool {
    offered.any(|p| ISTIO_ALPNS.contains(&p))
}

/// TLS versions offered: 1.3 only unless TLS 1.2 is asked for (Envoy peers speak 1.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// TLS 1.3 only.
    #[default]
    Tls13,
    /// TLS 1.2 and 1.3.
    Tls12And13,
}

impl TlsVersions {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static BOTH: [&rustls::SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsVersions::Tls13 => &TLS13,
            TlsVersions::Tls12And13 => &BOTH,
        }
    }
}

/// Which server identities a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Any SVID of the trust bundle's trust domain.
    AnyInTrustDomain,
    /// One of these SPIFFE IDs (Istio's `subjectAltNames`, or the destination's service
    /// accounts).
    OneOf(Vec<SpiffeId>),
}

impl ExpectedPeer {
    /// Exactly `id`.
    pub fn id(id: SpiffeId) -> Self {
        ExpectedPeer::OneOf(vec![id])
    }

    fn check(&self, id: &SpiffeId) -> Result<(), SvidError> {
        match self {
            ExpectedPeer::AnyInTrustDomain => Ok(()),
            ExpectedPeer::OneOf(ids) if ids.contains(id) => Ok(()),
            ExpectedPeer::OneOf(_) => Err(SvidError::Unexpected(id.to_string())),
        }
    }
}

fn refuse(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl Identity {
    /// A server configuration: this identity's certificate (rotated at each handshake),
    /// client certificates required and verified as SVIDs of the bundle's trust domain, ALPN
    /// `h2`, `http/1.1` and Istio's in-mesh tokens (after a handshake the application
    /// protocol is sniffed when the token does not name one).
    pub fn server_config(&self, versions: TlsVersions) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions.versions())
            .expect("the provider supports TLS 1.2 and 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { identity: self.clone() }))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        let mut alpn: Vec<Vec<u8>> = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        alpn.extend(ISTIO_ALPNS.iter().map(|p| p.to_vec()));
        config.alpn_protocols = alpn;
        Arc::new(config)
    }

    /// A client configuration that presents this identity's certificate and accepts servers
    /// whose SVID chains to the bundle, belongs to its trust domain and is `expected`. The
    /// server name is not checked against DNS SANs: SPIFFE identity replaces it. `alpn` is
    /// offered as given (see [`mesh_alpn`]).
    pub fn client_config(
        &self,
        expected: ExpectedPeer,
        versions: TlsVersions,
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions.versions())
            .expect("the provider supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { identity: self.clone(), expected }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn;
        Arc::new(config)
    }
}

/// The ALPN list a mesh client offers: Istio's token for the protocol, `istio`, then the
/// protocol itself (so a plain TLS server that knows no Istio token still agrees).
pub fn mesh_alpn(h2: bool) -> Vec<Vec<u8>> {
    if h2 {
        vec![b"istio-h2".to_vec(), b"istio".to_vec(), ALPN_H2.to_vec()]
    } else {
        vec![b"istio-http/1.1".to_vec(), b"istio".to_vec(), ALPN_HTTP11.to_vec()]
    }
}

/// Serves the identity's current certificate, to servers and clients alike.
#[derive(Debug)]
struct Resolver(Identity);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates: the chain with webpki against the current bundle, then the
/// leaf as an SVID of the bundle's trust domain.
struct SpiffeClientVerifier {
    identity: Identity,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let current = self.identity.current();
        current.client_verifier().verify_client_cert(end_entity, intermediates, now)?;
        peer_svid(end_entity, current.trust_domain()).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies server certificates: the chain with webpki against the current bundle, the leaf
/// as an SVID of the bundle's trust domain, and its ID against what the client expects.
struct SpiffeServerVerifier {
    identity: Identity,
    expected: ExpectedPeer,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier").field("expected", &self.expected).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let current = self.identity.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            current.roots(),
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let id = peer_svid(end_entity, current.trust_domain()).map_err(refuse)?;
        self.expected.check(&id).map_err(refuse)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
