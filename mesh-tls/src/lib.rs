//! Identity and access for mesh services.
//!
//! **Status: no code yet.** This crate will own rustls server and client configurations from
//! PEM files, SPIFFE X.509-SVID verification in both directions, the PeerAuthentication modes
//! (STRICT, PERMISSIVE with TLS sniffing, DISABLE), certificate hot reload, and the
//! AuthorizationPolicy and RequestAuthentication layers. It deliberately exposes no API until
//! that API exists and is tested.
//!
//! SPIFFE ID parsing and the X.509-SVID leaf rules already live in
//! [`mesh-core`](https://docs.rs/mesh-core) (`mesh_core::identity`), so that this crate only
//! has to extract the certificate facts and hand them over.
