//! Criterion benchmarks of the mesh crates; run with `cargo bench -p mesh-benches`.
