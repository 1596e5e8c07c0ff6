//! Lays out the release binary's code by `link-order.txt` (written by `bench/link-order.sh`):
//! the functions that run, hottest first, at the start of `.text`. A running proxy then maps a
//! few contiguous megabytes of code instead of pages spread over all of it (lower RSS, fewer
//! instruction-TLB misses).
//!
//! The ordering needs LLD, which Rust links x86_64 Linux binaries with since 1.90; with another
//! toolchain, target or an explicitly chosen linker the file is not passed and the binary is the
//! same code in the compiler's order. `MESH_LINK_ORDER=0` turns it off (and the packed
//! relocations below).

use std::{env, path::Path, process::Command};

fn main() {
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-env-changed=MESH_LINK_ORDER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("MESH_LINK_ORDER") == "0" || var("PROFILE") != "release" {
        return;
    }
    if var("TARGET") != "x86_64-unknown-linux-gnu" || var("CARGO_ENCODED_RUSTFLAGS").contains("link") {
        return;
    }
    let linker_set = env::vars().any(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER"));
    if linker_set || !rustc_links_with_lld(&var("RUSTC")) {
        return;
    }
    let file = Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if file.is_file() {
        println!("cargo::rustc-link-arg-bin=mesh-proxy=-Wl,--symbol-ordering-file={}", file.display());
        // A symbol that a later build no longer has (renamed, inlined) is skipped quietly.
        println!("cargo::rustc-link-arg-bin=mesh-proxy=-Wl,--no-warn-symbol-ordering");
    }
    // RELR: the ~20,000 relative relocations of a position-independent binary in a few KiB
    // instead of 24 bytes each, which the dynamic loader reads (and keeps resident) at start.
    // Needs glibc 2.36 (Debian 12), which the image ships.
    println!("cargo::rustc-link-arg-bin=mesh-proxy=-Wl,-z,pack-relative-relocs");
}

/// Whether this rustc links x86_64 Linux binaries with its own LLD by default (1.90 and later).
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(out) = Command::new(if rustc.is_empty() { "rustc" } else { rustc }).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 1 || (major == 1 && minor >= 90)
}
