//! Trace context on the wire: W3C `traceparent` / `tracestate`, B3 (multi-header and single
//! `b3`), and `x-request-id` (SEMANTICS.md 8).
//!
//! [`TraceContext::extract`] reads a request's headers with the configured [`Propagator`]s, in
//! order (the first that finds a valid context wins); an invalid `traceparent` restarts the
//! trace and drops `tracestate`, as the W3C processing model says. [`TraceContext::child`]
//! makes the context of a new span in the same trace, and [`TraceContext::inject`] writes it
//! in every configured format.
//!
//! ```
//! use mesh_telemetry::propagation::{Propagator, TraceContext};
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?);
//! let parent = TraceContext::extract(&headers, &[Propagator::W3c, Propagator::B3]).expect("valid");
//! assert!(parent.sampled());
//! let span = parent.child(0x1111_2222_3333_4444);
//! let mut out = http::HeaderMap::new();
//! span.inject(&mut out, &[Propagator::W3c]);
//! assert_eq!(out["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `b3` (single header).
pub const B3: HeaderName = HeaderName::from_static("b3");
/// `x-b3-traceid`.
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// `x-b3-spanid`.
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// `x-b3-parentspanid`.
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// `x-b3-sampled`.
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// `x-b3-flags`.
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The most `tracestate` members accepted; a header with more is discarded whole.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A trace context format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagator {
    /// W3C Trace Context (`traceparent`, `tracestate`).
    W3c,
    /// Zipkin B3: the single `b3` header first, then the `x-b3-*` headers.
    B3,
}

/// The context of one span: its trace, its own id, its parent's, the sampling decision and
/// the vendors' `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    parent_id: Option<u64>,
    flags: u8,
    debug: bool,
    tracestate: Vec<(String, String)>,
}

const SAMPLED: u8 = 0x01;
/// The flag bits this version knows (sampled, random trace id); the rest are sent as 0.
const KNOWN_FLAGS: u8 = 0x03;

impl TraceContext {
    /// A new trace (a root span), with ids from the caller's randomness.
    pub fn root(trace_id: u128, span_id: u64, sampled: bool) -> Self {
        Self {
            trace_id: trace_id.max(1),
            span_id: span_id.max(1),
            parent_id: None,
            flags: if sampled { SAMPLED } else { 0 },
            debug: false,
            tracestate: Vec::new(),
        }
    }

    /// The context the headers carry, by the first propagator that finds a valid one.
    pub fn extract(headers: &HeaderMap, propagators: &[Propagator]) -> Option<Self> {
        propagators.iter().find_map(|p| match p {
            Propagator::W3c => Self::extract_w3c(headers),
            Propagator::B3 => Self::extract_b3(headers),
        })
    }

    /// W3C: `traceparent` (exactly one header line), then `tracestate`.
    pub fn extract_w3c(headers: &HeaderMap) -> Option<Self> {
        let mut lines = headers.get_all(TRACEPARENT).iter();
        let (Some(value), None) = (lines.next(), lines.next()) else { return None };
        let (trace_id, span_id, flags) = parse_traceparent(value.to_str().ok()?)?;
        let joined: Vec<&str> = headers.get_all(TRACESTATE).iter().filter_map(|v| v.to_str().ok()).collect();
        let tracestate = parse_tracestate(&joined.join(","));
        Some(Self { trace_id, span_id, parent_id: None, flags, debug: false, tracestate })
    }

    /// B3: the single `b3` header wins over the `x-b3-*` headers. A sampling-only header
    /// carries no context (`None`).
    pub fn extract_b3(headers: &HeaderMap) -> Option<Self> {
        if let Some(single) = headers.get(B3) {
            return parse_b3_single(single.to_str().ok()?);
        }
        let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
        let trace_id = parse_b3_trace_id(get(&X_B3_TRACEID)?)?;
        let span_id = parse_hex64(get(&X_B3_SPANID)?)?;
        let parent_id = match get(&X_B3_PARENTSPANID) {
            Some(p) => Some(parse_hex64(p)?),
            None => None,
        };
        let debug = get(&X_B3_FLAGS) == Some("1");
        let sampled = debug || matches!(get(&X_B3_SAMPLED), Some("1" | "true"));
        Some(Self::b3(trace_id, span_id, parent_id, sampled, debug))
    }

    fn b3(trace_id: u128, span_id: u64, parent_id: Option<u64>, sampled: bool, debug: bool) -> Self {
        Self { trace_id, span_id, parent_id, flags: if sampled { SAMPLED } else { 0 }, debug, tracestate: Vec::new() }
    }

    /// The trace id.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// This span's id.
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The parent span's id, when known.
    pub fn parent_id(&self) -> Option<u64> {
        self.parent_id
    }

    /// Whether the trace is sampled.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `tracestate` members, left to right.
    pub fn tracestate(&self) -> &[(String, String)] {
        &self.tracestate
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// A child span `span_id` of this one: same trace, flags and `tracestate`.
    pub fn child(&self, span_id: u64) -> Self {
        Self { span_id: span_id.max(1), parent_id: Some(self.span_id), ..self.clone() }
    }

    /// The same context with the sampling decision `sampled`.
    pub fn with_sampled(mut self, sampled: bool) -> Self {
        self.flags = (self.flags & !SAMPLED) | if sampled { SAMPLED } else { 0 };
        self
    }

    /// `traceparent`, as version `00`.
    pub fn traceparent(&self) -> String {
        String::from_utf8(self.traceparent_bytes().to_vec()).expect("hex and dashes")
    }

    /// `traceparent` in a buffer of its own (no formatting machinery on the request path).
    fn traceparent_bytes(&self) -> [u8; 55] {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut b[3..35], self.trace_id);
        hex_into(&mut b[36..52], u128::from(self.span_id));
        hex_into(&mut b[53..55], u128::from(self.flags & KNOWN_FLAGS));
        b
    }

    /// Writes this context in each format, replacing what the headers held.
    pub fn inject(&self, headers: &mut HeaderMap, propagators: &[Propagator]) {
        for p in propagators {
            match p {
                Propagator::W3c => {
                    headers.insert(
                        TRACEPARENT,
                        HeaderValue::from_bytes(&self.traceparent_bytes()).expect("hex is a valid value"),
                    );
                    headers.remove(TRACESTATE);
                    if !self.tracestate.is_empty() {
                        let mut s = String::new();
                        for (i, (k, v)) in self.tracestate.iter().enumerate() {
                            let _ = write!(s, "{}{k}={v}", if i == 0 { "" } else { "," });
                        }
                        if let Ok(v) = HeaderValue::from_str(&s) {
                            headers.insert(TRACESTATE, v);
                        }
                    }
                }
                Propagator::B3 => {
                    let hex = |v: String| HeaderValue::from_str(&v).expect("hex is a valid value");
                    headers.insert(X_B3_TRACEID, hex(format!("{:032x}", self.trace_id)));
                    headers.insert(X_B3_SPANID, hex(format!("{:016x}", self.span_id)));
                    match self.parent_id {
                        Some(p) => {
                            headers.insert(X_B3_PARENTSPANID, hex(format!("{p:016x}")));
                        }
                        None => {
                            headers.remove(X_B3_PARENTSPANID);
                        }
                    }
                    if self.debug {
                        headers.insert(X_B3_FLAGS, HeaderValue::from_static("1"));
                        headers.remove(X_B3_SAMPLED);
                    } else {
                        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(if self.sampled() { "1" } else { "0" }));
                    }
                    headers.remove(B3);
                }
            }
        }
    }
}

impl TraceContext {
    /// Writes this context in the formats the headers already carry (of `propagators`), or
    /// in the first of them when they carry none: how a hop below the one that answered the
    /// caller in its own format replaces the span id with its own.
    pub fn reinject(&self, headers: &mut HeaderMap, propagators: &[Propagator]) {
        let mut wrote = false;
        for p in propagators {
            let present = match p {
                Propagator::W3c => headers.contains_key(TRACEPARENT),
                Propagator::B3 => headers.contains_key(B3) || headers.contains_key(X_B3_TRACEID),
            };
            if present {
                self.inject(headers, std::slice::from_ref(p));
                wrote = true;
            }
        }
        if !wrote && let Some(first) = propagators.first() {
            self.inject(headers, std::slice::from_ref(first));
        }
    }

    /// This span as OpenTelemetry's [`SpanContext`](opentelemetry::trace::SpanContext)
    /// (`remote`: received from another process, rather than made here).
    pub fn span_context(&self, remote: bool) -> opentelemetry::trace::SpanContext {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let state = TraceState::from_key_value(self.tracestate.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            TraceFlags::new(self.flags & KNOWN_FLAGS),
            remote,
            state,
        )
    }

    /// An OpenTelemetry [`Context`](opentelemetry::Context) whose (remote) parent is this
    /// span: attach it in a handler and the application's own spans are children of the
    /// layer's.
    pub fn otel_context(&self) -> opentelemetry::Context {
        use opentelemetry::trace::TraceContextExt as _;
        opentelemetry::Context::new().with_remote_span_context(self.span_context(true))
    }

    /// The context of an OpenTelemetry span (the application's current one, say), if valid.
    pub fn from_span_context(span: &opentelemetry::trace::SpanContext) -> Option<Self> {
        if !span.is_valid() {
            return None;
        }
        let tracestate = span
            .trace_state()
            .header()
            .split(',')
            .filter_map(|m| m.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Self {
            trace_id: u128::from_be_bytes(span.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(span.span_id().to_bytes()),
            parent_id: None,
            flags: span.trace_flags().to_u8() & KNOWN_FLAGS,
            debug: false,
            tracestate,
        })
    }
}

fn lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_hex64(s: &str) -> Option<u64> {
    (s.len() == 16 && lower_hex(s)).then(|| u64::from_str_radix(s, 16).ok()).flatten().filter(|v| *v != 0)
}

fn parse_hex128(s: &str) -> Option<u128> {
    (s.len() == 32 && lower_hex(s)).then(|| u128::from_str_radix(s, 16).ok()).flatten().filter(|v| *v != 0)
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half of the 128-bit one).
fn parse_b3_trace_id(s: &str) -> Option<u128> {
    match s.len() {
        16 => parse_hex64(s).map(u128::from),
        32 => parse_hex128(s),
        _ => None,
    }
}

/// `traceparent` by the W3C rules: version 00 exactly 55 characters; a future version (not
/// `ff`) at least 55, with `-` after the flags if longer.
fn parse_traceparent(s: &str) -> Option<(u128, u64, u8)> {
    let b = s.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = &s[0..2];
    if !lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && b.len() != 55 {
        return None;
    }
    if b.len() > 55 && b[55] != b'-' {
        return None;
    }
    let trace_id = parse_hex128(&s[3..35])?;
    let span_id = parse_hex64(&s[36..52])?;
    let flags_text = &s[53..55];
    if !lower_hex(flags_text) {
        return None;
    }
    let flags = u8::from_str_radix(flags_text, 16).ok()? & KNOWN_FLAGS;
    Some((trace_id, span_id, flags))
}

/// `tracestate`: up to 32 members (more discards the header), empty members skipped, an
/// invalid member dropped alone, later duplicates of a key dropped.
fn parse_tracestate(s: &str) -> Vec<(String, String)> {
    let members: Vec<&str> = s.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    if members.len() > MAX_TRACESTATE_MEMBERS {
        return Vec::new();
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for m in members {
        let Some((k, v)) = m.split_once('=') else { continue };
        if valid_key(k) && valid_value(v) && !out.iter().any(|(seen, _)| seen == k) {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}

fn valid_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/@".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 256 && v.bytes().all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=') && !v.ends_with(' ')
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`; the sampling-only form
/// (`0`, `1`, `d`) carries no context.
fn parse_b3_single(s: &str) -> Option<TraceContext> {
    let mut parts = s.split('-');
    let trace_id = parse_b3_trace_id(parts.next()?)?;
    let span_id = parse_hex64(parts.next()?)?;
    let (sampled, debug) = match parts.next() {
        None => (false, false),
        Some("1") => (true, false),
        Some("0") => (false, false),
        Some("d") => (true, true),
        Some(_) => return None,
    };
    let parent_id = match parts.next() {
        Some(p) => Some(parse_hex64(p)?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(TraceContext::b3(trace_id, span_id, parent_id, sampled, debug))
}

/// A UUIDv4 (RFC 9562) from 128 random bits, as Envoy generates `x-request-id`.
pub fn request_id(random: u128) -> String {
    let v = (random & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut h = [0u8; 32];
    hex_into(&mut h, v);
    let mut out = String::with_capacity(36);
    for (i, part) in [&h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]].into_iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(std::str::from_utf8(part).expect("hex digits"));
    }
    out
}

/// Writes `value`'s low `out.len() * 4` bits as lowercase hex, most significant first.
fn hex_into(out: &mut [u8], value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((value >> (4 * (n - 1 - i))) & 0xf) as usize];
    }
}
