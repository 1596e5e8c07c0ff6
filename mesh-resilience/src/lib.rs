//! Resilience for mesh services: retries with budgets, replayable bodies, back-off and
//! per-try timeouts, as tower layers.
//!
//! | module | what it gives you |
//! |---|---|
//! | [`retry`] | [`RetryLayer`](retry::RetryLayer): Istio's `retries` (`attempts`, `perTryTimeout`, every `retryOn` condition with Envoy's meaning), jittered exponential back-off, bodies replayed from a capped buffer, and retry budgets shared by every clone (Linkerd's token budget, Envoy's concurrency budget) |
//!
//! Every decision reads the shared classification of `mesh_core::classify`, and what the
//! layer did is left on the response for metrics and logs: the [`Attempts`](retry::Attempts)
//! it took and the flags `URX` (retries exhausted) and `UO` (budget exhausted).
//!
//! Still to come here: route timeouts as a layer of their own, outlier detection,
//! connection-pool circuit breaking, rate limiting and fault injection.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod retry;
