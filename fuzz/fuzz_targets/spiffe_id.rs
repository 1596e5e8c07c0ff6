//! SPIFFE ID parsing never panics, and what it accepts round-trips through the principal form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::SpiffeId;

fuzz_target!(|data: &str| {
    if let Ok(id) = SpiffeId::parse(data) {
        assert_eq!(id.as_str(), data);
        assert_eq!(SpiffeId::from_principal(id.principal()).unwrap(), id);
        let _ = id.istio();
    }
});
