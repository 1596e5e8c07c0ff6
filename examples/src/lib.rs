//! Runnable examples of the mesh crates. See the `*.rs` files next to this crate's
//! `Cargo.toml`; run one with `cargo run -p mesh-examples --example NAME`.

/// The README's code blocks, compiled (not run) as doc tests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
