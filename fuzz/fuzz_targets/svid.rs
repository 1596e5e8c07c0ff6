//! X.509-SVID checks on arbitrary DER never panic: a certificate is accepted as a workload
//! leaf with exactly one SPIFFE ID, or refused.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|der: &[u8]| {
    if let Ok(svid) = mesh_tls::svid::leaf_svid(&CertificateDer::from(der)) {
        assert!(svid.id.as_str().starts_with("spiffe://"));
    }
});
