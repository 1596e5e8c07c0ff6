//! Compiling a regex match from arbitrary text and matching arbitrary header bytes never panics;
//! `headers` and `withoutHeaders` disagree on every present header.
#![no_main]
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_core::matching::{HeaderMatch, StringMatch};

fuzz_target!(|input: (&str, &[u8])| {
    let (pattern, value) = input;
    let m = StringMatch::Regex(pattern.into());
    let (Ok(with), Ok(without)) = (HeaderMatch::new("x", &m), HeaderMatch::without("x", &m)) else { return };
    let Ok(value) = HeaderValue::from_bytes(value) else { return };
    let mut headers = HeaderMap::new();
    headers.insert("x", value);
    assert_ne!(with.matches(&headers), without.matches(&headers));
});
