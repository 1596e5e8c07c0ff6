//! Resilience for mesh services.
//!
//! **Status: no code yet.** This crate will own retries (attempts, per-try timeouts,
//! `retryOn`, jittered back-off, retry budgets, capped body replay), route timeouts, Envoy's
//! outlier-detection algorithm, connection-pool circuit breaking, token-bucket rate limiting
//! on `governor`, and fault injection. It deliberately exposes no API until that API exists
//! and is tested.
//!
//! Every decision it makes will read the shared classification in `mesh_core::classify`.
