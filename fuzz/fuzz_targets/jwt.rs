//! RequestAuthentication on arbitrary `Authorization` values never panics: a token is
//! refused, or accepted only if it verifies against the provider's key (the P-256 base point
//! here, whose private key is 1: nothing a fuzzer produces by chance).
#![no_main]
use http::{HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use mesh_tls::jwt::{JwtAuthenticator, JwtRule};

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"k","x":"axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY","y":"T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"}]}"#;

fuzz_target!(|value: &[u8]| {
    thread_local! {
        static AUTH: JwtAuthenticator = {
            let rule = JwtRule { issuer: "https://issuer.example".into(), jwks: Some(JWKS.into()), ..JwtRule::default() };
            JwtAuthenticator::new(&[rule], |_, _| None).expect("a valid rule")
        };
    }
    let Ok(value) = HeaderValue::from_bytes(value) else { return };
    let mut req = Request::get("/").header("authorization", value).body(()).unwrap();
    AUTH.with(|auth| {
        let _ = auth.authenticate(&mut req);
    });
});
