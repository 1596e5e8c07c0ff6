//! Identity and access for mesh services: mTLS with SPIFFE X.509-SVIDs, PeerAuthentication,
//! certificate rotation, AuthorizationPolicy and JWT RequestAuthentication.
//!
//! | module | what |
//! |---|---|
//! | [`identity`] | a workload's certificate, key and trust bundle from PEM files; rotation ([`Identity`]) |
//! | [`config`] | rustls server and client configurations verifying SPIFFE IDs both ways |
//! | [`accept`] | PeerAuthentication modes on accept: STRICT, PERMISSIVE (TLS sniffed), DISABLE |
//! | [`peer`] | PeerAuthentication resolution: the mTLS mode of a workload port |
//! | [`connect`] | mTLS origination for hyper-util clients ([`MtlsConnector`]) |
//! | [`svid`] | the X.509-SVID leaf rules applied to certificates |
//! | [`authz`] | AuthorizationPolicy: compiled policies ([`authz::Authorizer`]) and [`authz::AuthorizationLayer`] |
//! | [`jwt`] | RequestAuthentication: JWT validation against JWKS ([`jwt::RequestAuthenticationLayer`]) |
//! | [`certs`] | a development CA that issues SPIFFE workload certificates |
//!
//! Every configuration uses rustls with the aws-lc-rs provider, TLS 1.3 by default. A
//! verified peer's SPIFFE ID becomes the request extension [`mesh_core::PeerIdentity`], which
//! authorization reads.

pub mod accept;
pub mod authz;
pub mod certs;
pub mod config;
pub mod connect;
pub mod identity;
pub mod jwt;
pub mod peer;
pub mod svid;

pub use accept::{AcceptError, Accepted, MeshAcceptor, MtlsMode, MtlsStream, PeerLayer, Rewind, WithPeer};
pub use certs::{DevCa, WorkloadPem};
pub use config::{ExpectedPeer, ISTIO_ALPNS, TlsVersions, is_mesh_alpn, mesh_alpn};
pub use connect::{MtlsConnection, MtlsConnector};
pub use identity::{CredentialFiles, Credentials, CredentialsError, Identity, IdentityStatus};
pub use svid::{Svid, SvidError, leaf_svid};
