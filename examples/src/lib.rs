//! Runnable examples of the mesh crates. See the `*.rs` files next to this crate's
//! `Cargo.toml`; run one with `cargo run -p mesh-examples --example NAME`.
