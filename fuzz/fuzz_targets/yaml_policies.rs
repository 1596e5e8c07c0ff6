//! The YAML a service hands the `mesh` facade (VirtualServices for a route table, an Istio
//! `retries` block) never panics, however malformed: it compiles or is refused with an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = mesh::yaml::route_table(text);
    let _ = mesh::yaml::retry_policy(text);
});
