//! Lays out the release binary's code by `link-order.txt` (written by `bench/link-order.sh`):
//! the functions that run, start-up and the first request first, at the start of `.text`. A
//! running proxy then maps a few contiguous megabytes of code instead of pages spread over
//! all of it (lower RSS, fewer instruction-TLB misses). And it packs the relative relocations
//! (RELR): the ~20,000 relocations of a position-independent binary take a few KiB instead of
//! 24 bytes each, which the dynamic loader reads (and keeps resident) at start.
//!
//! Both are linker flags that only LLD takes (Rust links x86_64 Linux binaries with its own
//! LLD since 1.90), and RELR needs glibc 2.36 where the binary runs. So they are used only
//! when a probe program links with them, through the same compiler, target, flags and
//! linker as this build, and, for RELR, when the probe runs on this machine. Otherwise the
//! binary is the same code in the compiler's layout. `MESH_LINK_ORDER=0` turns both off.

use std::path::{Path, PathBuf};
use std::{env, fs, process::Command};

fn main() {
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-env-changed=MESH_LINK_ORDER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("MESH_LINK_ORDER") == "0" || var("PROFILE") != "release" || var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if !order.is_file() {
        return;
    }
    let ordering = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        // A symbol that a later build no longer has (renamed, inlined) is skipped quietly.
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    let relr = "-Wl,-z,pack-relative-relocs".to_owned();
    let with_relr: Vec<String> = ordering.iter().cloned().chain([relr]).collect();
    let native = var("HOST") == var("TARGET");
    let args = if native && probe(&with_relr, true) {
        with_relr
    } else if probe(&ordering, false) {
        ordering.to_vec()
    } else {
        println!(
            "cargo::warning=the linker does not take --symbol-ordering-file; mesh-proxy keeps the compiler's layout"
        );
        return;
    };
    for arg in args {
        println!("cargo::rustc-link-arg-bin=mesh-proxy={arg}");
    }
}

/// Whether a `fn main` links with `link_args` as this build links, and (with `run`) starts.
fn probe(link_args: &[String], run: bool) -> bool {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_default());
    let source = out.join("probe.rs");
    let binary = out.join("probe");
    if fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let mut rustc = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    rustc.arg("--target").arg(env::var("TARGET").unwrap_or_default());
    rustc.args(["--edition", "2021", "--crate-type", "bin", "-C", "opt-level=0"]);
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    // A linker set in .cargo/config.toml reaches build scripts only as RUSTC_LINKER.
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        rustc.arg("-C").arg(format!("linker={linker}"));
    }
    for arg in link_args {
        rustc.arg("-C").arg(format!("link-arg={arg}"));
    }
    rustc.arg("-o").arg(&binary).arg(&source);
    let linked = rustc.output().is_ok_and(|o| o.status.success());
    linked && (!run || Command::new(&binary).output().is_ok_and(|o| o.status.success()))
}
