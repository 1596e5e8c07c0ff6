//! Trace context from arbitrary header values never panics, and what is extracted survives a
//! round trip: injected and read back in the same format, it is the same trace, span and
//! sampling decision; W3C `tracestate` keeps at most 32 members.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_telemetry::propagation::{MAX_TRACESTATE_MEMBERS, Propagator, TraceContext};

const NAMES: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fuzz_target!(|input: Vec<(u8, &[u8])>| {
    let mut headers = HeaderMap::new();
    for (name, value) in input {
        let Ok(value) = HeaderValue::from_bytes(value) else { continue };
        headers.append(HeaderName::from_static(NAMES[usize::from(name) % NAMES.len()]), value);
    }
    for format in [Propagator::W3c, Propagator::B3] {
        let Some(context) = TraceContext::extract(&headers, &[format]) else { continue };
        assert!(context.tracestate().len() <= MAX_TRACESTATE_MEMBERS);
        let mut out = HeaderMap::new();
        context.inject(&mut out, &[format]);
        let again = TraceContext::extract(&out, &[format]).expect("what was written reads back");
        assert_eq!(
            (again.trace_id(), again.span_id(), again.sampled()),
            (context.trace_id(), context.span_id(), context.sampled())
        );
        let child = context.child(7);
        assert_eq!(child.trace_id(), context.trace_id());
    }
});
