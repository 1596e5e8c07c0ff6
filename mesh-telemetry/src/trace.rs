//! Trace context and request ids on every request, as a sidecar handles them.
//!
//! [`TraceLayer`] gives each request an `x-request-id` (a UUIDv4 when it has none, as Envoy
//! generates one), continues the trace the request carries (by the configured
//! [`Propagator`]s) or starts one (sampled at Telemetry's `randomSamplingPercentage`; a
//! caller's decision is kept, which is the parent-based default), makes the span of this hop
//! a child of the caller's, and writes it back in every configured format so the next hop
//! sees this one as its parent. The span's context is the request extension
//! [`TraceContext`], for access logs and exporters; with a [`Tracer`] the span is recorded
//! (a server span, ended with the response body), and
//! [`ClientSpanLayer`](crate::span::ClientSpanLayer) below it records each attempt the
//! service sends.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use mesh_core::random::Random;

use crate::propagation::{Propagator, TraceContext, X_REQUEST_ID, request_id};
use crate::span::{Kind, Span, SpanBody, SpanFuture, Tracer};

/// The request's id: the `x-request-id` header it carries or was given by [`TraceLayer`]
/// (read from the header; nothing is copied per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId;

impl RequestId {
    /// The id of a request with these headers (after [`TraceLayer`], always there).
    pub fn of(headers: &http::HeaderMap) -> Option<&str> {
        headers.get(X_REQUEST_ID)?.to_str().ok().filter(|v| !v.is_empty())
    }
}

/// Propagates trace context and request ids (see the module docs).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    propagators: Arc<[Propagator]>,
    /// Sampling of new traces, in parts per million.
    sampling_ppm: u32,
    random: Arc<Random>,
    tracer: Option<Tracer>,
}

impl TraceLayer {
    /// W3C then B3, every new trace sampled, randomness from the system.
    pub fn new() -> Self {
        Self {
            propagators: Arc::from([Propagator::W3c, Propagator::B3]),
            sampling_ppm: 1_000_000,
            random: Arc::new(Random::from_entropy()),
            tracer: None,
        }
    }

    /// Records a server span for each sampled request, ended with its response body.
    pub fn tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// The tracer spans go to, if any.
    pub fn span_tracer(&self) -> Option<&Tracer> {
        self.tracer.as_ref()
    }

    /// The request's server span (after [`apply`](Self::apply)), if sampled and traced.
    pub fn server_span<B>(&self, req: &Request<B>) -> Option<Span> {
        let tracer = self.tracer.as_ref()?;
        let context = req.extensions().get::<TraceContext>()?;
        let mut span = tracer.start(context, Kind::Server, req.method().as_str().to_owned())?;
        span.set_request(req);
        Some(span)
    }

    /// The formats read (first match wins) and written.
    pub fn propagators(mut self, propagators: &[Propagator]) -> Self {
        self.propagators = Arc::from(propagators);
        self
    }

    /// Telemetry's `randomSamplingPercentage` for new traces (clamped to 0–100).
    pub fn sampling_percentage(mut self, percent: f64) -> Self {
        self.sampling_ppm = (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32;
        self
    }

    /// Seeded randomness (for deterministic tests).
    pub fn random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }

    /// Applies the layer's rules to `req`'s headers and extensions; returns this hop's span.
    pub fn apply<B>(&self, req: &mut Request<B>) -> TraceContext {
        if RequestId::of(req.headers()).is_none() {
            let random = (u128::from(self.random.next_u64()) << 64) | u128::from(self.random.next_u64());
            let id = request_id(random);
            req.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_str(&id).expect("hex and dashes"));
        }
        let span_id = self.random.next_u64();
        // A caller's context is answered in its own format; a new trace in the first one.
        let found = self.propagators.iter().find_map(|p| Some((*p, TraceContext::extract(req.headers(), &[*p])?)));
        let (format, span) = match found {
            Some((format, parent)) => (format, parent.child(span_id)),
            None => {
                let trace_id = (u128::from(self.random.next_u64()) << 64) | u128::from(self.random.next_u64());
                let sampled = self.random.below(1_000_000) < u64::from(self.sampling_ppm);
                (
                    self.propagators.first().copied().unwrap_or(Propagator::W3c),
                    TraceContext::root(trace_id, span_id, sampled),
                )
            }
        };
        span.inject(req.headers_mut(), &[format]);
        req.extensions_mut().insert(span.clone());
        span
    }
}

impl Default for TraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner, layer: self.clone() }
    }
}

/// The service of [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

impl<S, B, RB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Error: std::fmt::Display,
{
    type Response = Response<SpanBody<RB>>;
    type Error = S::Error;
    type Future = SpanFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.layer.apply(&mut req);
        let span = self.layer.server_span(&req);
        SpanFuture::new(self.inner.call(req), span)
    }
}
