//! Routing for mesh services.
//!
//! **Status: no code yet.** This crate will own VirtualService route tables (ordered `http`
//! rules whose match blocks are OR-ed, first match wins), weighted destination choice,
//! subsets, header manipulation, rewrites, redirects and direct responses, and the load
//! balancers (round robin, power-of-two-choices least request, random, consistent hash) over
//! an updatable endpoint set. It deliberately exposes no API until that API exists and is
//! tested.
//!
//! The request matchers it will be built from already exist in `mesh_core::matching`.
