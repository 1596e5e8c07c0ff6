//! SEMANTICS.md 8: vector 32 and the W3C conformance harness's cases, B3, request ids.

use http::HeaderMap;
use mesh_telemetry::propagation::{Propagator, TraceContext, request_id};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    h
}

fn w3c(pairs: &[(&str, &str)]) -> Option<TraceContext> {
    TraceContext::extract(&headers(pairs), &[Propagator::W3c])
}

const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn vector_32_traceparent() {
    let ok = w3c(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]).unwrap();
    assert_eq!((ok.trace_id_hex().as_str(), ok.span_id(), ok.sampled()), (ID, 0x00f0_67aa_0ba9_02b7, true));
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.anything",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
    ] {
        assert!(w3c(&[("traceparent", bad)]).is_none(), "{bad}");
    }
    // A future version with more fields: accepted, and re-emitted as version 00 with only the
    // known flag bits.
    let future = w3c(&[("traceparent", "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff-extra")]).unwrap();
    assert_eq!(future.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03");
    // Two traceparent header lines: invalid.
    let two = [
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ];
    assert!(w3c(&two).is_none());
}

#[test]
fn vector_32_tracestate() {
    let tp = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    let members = |n: usize| (0..n).map(|i| format!("k{i}=v{i}")).collect::<Vec<_>>().join(",");
    let m32 = members(32);
    assert_eq!(w3c(&[tp, ("tracestate", &m32)]).unwrap().tracestate().len(), 32);
    let m33 = members(33);
    assert!(w3c(&[tp, ("tracestate", &m33)]).unwrap().tracestate().is_empty());
    // One bad member does not drop the others; empty members and whitespace are tolerated;
    // several header lines are one list; a repeated key keeps its first value.
    let ctx = w3c(&[tp, ("tracestate", "a=1, ,B=2,c=3 "), ("tracestate", "d@sys=4,a=5,e=x=y")]).unwrap();
    let keys: Vec<&str> = ctx.tracestate().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "c", "d@sys"]);
    // No traceparent: tracestate is discarded with it.
    assert!(w3c(&[("tracestate", "a=1")]).is_none());
    // A child keeps the trace and the state, with a new parent.
    let child = ctx.child(7);
    let mut out = HeaderMap::new();
    child.inject(&mut out, &[Propagator::W3c]);
    assert_eq!(out["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01");
    assert_eq!(out["tracestate"], "a=1,c=3,d@sys=4");
}

#[test]
fn b3_multi_and_single() {
    let b3 = |pairs: &[(&str, &str)]| TraceContext::extract(&headers(pairs), &[Propagator::B3]);
    let multi = b3(&[
        ("X-B3-TraceId", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("X-B3-SpanId", "e457b5a2e4d86bd1"),
        ("X-B3-ParentSpanId", "05e3ac9a4f6e3b90"),
        ("X-B3-Sampled", "1"),
    ])
    .unwrap();
    assert_eq!(
        (multi.span_id(), multi.parent_id(), multi.sampled()),
        (0xe457_b5a2_e4d8_6bd1, Some(0x05e3_ac9a_4f6e_3b90), true)
    );
    // 64-bit trace ids; malformed parents refuse the context.
    assert_eq!(
        b3(&[("x-b3-traceid", "64fe8b2a57d3eff7"), ("x-b3-spanid", "e457b5a2e4d86bd1")]).unwrap().trace_id(),
        0x64fe_8b2a_57d3_eff7
    );
    assert!(
        b3(&[("x-b3-traceid", "64fe8b2a57d3eff7"), ("x-b3-spanid", "e457b5a2e4d86bd1"), ("x-b3-parentspanid", "-")])
            .is_none()
    );
    // The single header wins; `d` is debug (sampled); the sampling-only form has no context.
    let single = b3(&[
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d-05e3ac9a4f6e3b90"),
        ("x-b3-traceid", "64fe8b2a57d3eff7"),
    ])
    .unwrap();
    assert!(single.sampled());
    assert_eq!(single.trace_id_hex(), "80f198ee56343ba864fe8b2a57d3eff7");
    assert!(b3(&[("b3", "0")]).is_none());
    assert!(b3(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x")]).is_none());
    // Written back as multi headers, with the parent.
    let mut out = HeaderMap::new();
    multi.child(0xabc).inject(&mut out, &[Propagator::B3]);
    assert_eq!(out["x-b3-spanid"], "0000000000000abc");
    assert_eq!(out["x-b3-parentspanid"], "e457b5a2e4d86bd1");
    assert_eq!(out["x-b3-sampled"], "1");
    // W3C first, then B3: a request with only B3 is still continued.
    assert!(TraceContext::extract(&out, &[Propagator::W3c, Propagator::B3]).is_some());
}

#[test]
fn request_ids_are_uuid_v4() {
    let id = request_id(u128::MAX);
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    assert_eq!(request_id(0), "00000000-0000-4000-8000-000000000000");
}
