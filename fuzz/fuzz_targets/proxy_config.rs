//! mesh-proxy's configuration loader and compiler on arbitrary text never panic: the text is
//! loaded as one file (errors are diagnostics), and what loads without errors compiles or is
//! refused with an error naming the resource.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_proxy::loader::{Loaded, load_text};

fuzz_target!(|text: &str| {
    let mut loaded = Loaded::default();
    load_text(Path::new("fuzz.yaml"), text, &mut loaded);
    if !loaded.has_errors() {
        let _ = mesh_proxy::snapshot::compile(loaded.resources);
    }
});
