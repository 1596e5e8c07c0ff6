//! Duration parsing never panics, and what it accepts prints in a form it parses back from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::config::Duration;

fuzz_target!(|data: &str| {
    if let Ok(d) = Duration::parse(data) {
        assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
    }
});
